"""Bad input through the Python API ends in one clear error (bayesdiff_ext.validation and its callers).

The table runs the reproductions of a hostile user on the bundled digits model (16x16, one channel;
it loads in well under a second) and its bundled diagonal posterior: each bad input must end in the
exception type and message given, raised before any model call where the input alone is wrong.
"""

import ast
import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from safetensors import safe_open
from safetensors.torch import save_file
from test_digits import scheduler, unet
from tiny_models import tiny_unet
from torch.utils.data import DataLoader, TensorDataset

from bayesdiff_ext import BayesDiffSampler, LastLayerLaplace, digits, validation
from bayesdiff_ext.guidance import ClassifierFreeGuidance
from bayesdiff_ext.posterior import LastLayerVI
from bayesdiff_ext.posterior.serialization import METADATA_KEY

__all__ = ["scheduler", "unet"]  # the bundled model's fixtures, imported for these tests

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


@pytest.fixture(scope="module")
def posterior(unet):
    return LastLayerLaplace.load(digits.bundled_dir() / "posterior_diag.safetensors", unet)


@pytest.fixture(scope="module")
def images():
    return digits.load_digits_images(16)[0][:8]


def _ddim(scheduler):
    return DDIMScheduler.from_config(scheduler.config)


def _with_one(images, value):
    bad = images.clone()
    bad[3, 0, 5, 7] = value
    return bad


# what the user fits on, made from 8 digits: f(images); the exception type; the message pattern
FIT = [
    pytest.param(
        lambda im: _with_one(im, float("nan")),
        ValueError,
        r"images must be finite, but holds 1 NaN/Inf value\(s\), the first nan at index \(3, 0, 5, 7\)",
        id="nan pixel",
    ),
    pytest.param(
        lambda im: _with_one(im, float("inf")),
        ValueError,
        r"holds 1 NaN/Inf value\(s\), the first inf",
        id="inf pixel",
    ),
    pytest.param(
        lambda im: ((im + 1) * 127.5).round().to(torch.uint8),
        TypeError,
        r"floating-point tensor, got dtype torch.uint8; convert uint8 0..255 images with "
        r"bayesdiff_ext.validation.pixels_to_model_scale",
        id="uint8 0..255",
    ),
    pytest.param(
        lambda im: ((im + 1) * 127.5).round().long(),
        TypeError,
        "got dtype torch.int64",
        id="int64 0..255",
    ),
    pytest.param(
        lambda im: (im + 1) * 127.5,
        ValueError,
        r"range over \[0, 255\], never below 0: that looks like \[0, 255\] image data.*x / 127.5 - 1",
        id="floats in [0, 255]",
    ),
    pytest.param(
        lambda im: (im + 1) / 2,
        ValueError,
        r"looks like \[0, 1\] image data.*x \* 2 - 1",
        id="floats in [0, 1]",
    ),
    pytest.param(
        lambda im: im.repeat(1, 3, 1, 1),
        ValueError,
        r"images must have shape \(B, 1, H, W\) for this model, got \(8, 3, 16, 16\)",
        id="3 channels for a 1-channel model",
    ),
    pytest.param(
        lambda im: torch.nn.functional.interpolate(im, size=32),
        ValueError,
        "images are 32x32 but the model takes 16x16 samples",
        id="32x32 for a 16x16 model",
    ),
    pytest.param(
        lambda im: im[:, 0],
        ValueError,
        r"must have shape \(B, 1, H, W\)",
        id="no channel dimension",
    ),
    pytest.param(
        lambda im: im[:0],
        ValueError,
        "`images` is empty",
        id="empty",
    ),
    pytest.param(
        lambda im: im.tolist(),
        TypeError,
        "must be a tensor, a Dataset or a DataLoader",
        id="a list",
    ),
    pytest.param(
        lambda im: DataLoader(TensorDataset(((im + 1) * 127.5).to(torch.uint8)), batch_size=4),
        TypeError,
        "got dtype torch.uint8",
        id="a loader of uint8",
    ),
]


@pytest.mark.parametrize("make, error, pattern", FIT)
def test_bad_fitting_images(unet, scheduler, images, make, error, pattern):
    with pytest.raises(error, match=pattern):
        LastLayerLaplace(unet).fit(make(images), scheduler, progress=False)


@pytest.mark.parametrize(
    "options, error, pattern",
    [
        (dict(batch_size=0), ValueError, "batch_size must be an integer >= 1, got 0"),
        (dict(batch_size=2.0), TypeError, r"batch_size must be an integer >= 1, got 2.0 \(float\)"),
        (dict(timesteps_per_image=0), ValueError, "timesteps_per_image must be an integer >= 1"),
        (dict(timesteps_per_image=1.5), TypeError, "timesteps_per_image must be an integer"),
    ],
)
def test_bad_fitting_counts(unet, scheduler, images, options, error, pattern):
    with pytest.raises(error, match=pattern):
        LastLayerLaplace(unet).fit(images, scheduler, progress=False, **options)


def test_a_nan_model_output_is_named_as_such(scheduler, images):
    broken = digits.load_bundled_unet()
    with torch.no_grad():
        broken.conv_norm_out.weight[0] = float("nan")
    with pytest.raises(ValueError, match="the model's output must be finite"):
        LastLayerLaplace(broken).fit(images, scheduler, progress=False)


NOISE = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
SAMPLE = [
    pytest.param(
        dict(batch_size=2, num_inference_steps=0),
        ValueError,
        "num_inference_steps must be an integer >= 1, got 0",
        id="num_inference_steps=0",
    ),
    pytest.param(
        dict(batch_size=2, num_inference_steps=-1),
        ValueError,
        "num_inference_steps must be an integer >= 1",
        id="num_inference_steps=-1",
    ),
    pytest.param(
        dict(batch_size=2, num_inference_steps=2.5),
        TypeError,
        "num_inference_steps must be an integer",
        id="num_inference_steps=2.5",
    ),
    pytest.param(
        dict(batch_size=0),
        ValueError,
        "batch_size must be an integer >= 1, got 0",
        id="batch_size=0",
    ),
    pytest.param(
        dict(batch_size=-1),
        ValueError,
        "batch_size must be an integer >= 1",
        id="batch_size=-1",
    ),
    pytest.param(
        dict(batch_size=True),
        TypeError,
        "batch_size must be an integer",
        id="batch_size=True",
    ),
    pytest.param(
        dict(noise=torch.full((2, 1, 16, 16), float("nan"))),
        ValueError,
        "noise must be finite, but holds 512 NaN/Inf",
        id="NaN noise",
    ),
    pytest.param(
        dict(noise=_with_one(NOISE.repeat(2, 1, 1, 1), float("-inf"))),
        ValueError,
        r"the first -inf at index \(3, 0, 5, 7\)",
        id="one Inf in the noise",
    ),
    pytest.param(
        dict(noise=torch.ones(2, 1, 16, 16, dtype=torch.long)),
        TypeError,
        "noise must be a floating-point tensor",
        id="integer noise",
    ),
    pytest.param(
        dict(noise=[[0.0]]),
        TypeError,
        "noise must be a torch.Tensor, got list",
        id="noise as a list",
    ),
    pytest.param(
        dict(noise=torch.randn(2, 3, 16, 16)),
        ValueError,
        r"noise must have shape \(B, 1, H, W\) for this model, got \(2, 3, 16, 16\)",
        id="3-channel noise",
    ),
    pytest.param(
        dict(noise=torch.randn(1, 16, 16)),
        ValueError,
        r"noise must have shape \(B, 1, H, W\)",
        id="noise without a batch",
    ),
    pytest.param(
        dict(noise=torch.randn(2, 1, 15, 15)),
        ValueError,
        "this model takes multiples of 4",
        id="noise of 15x15",
    ),
    pytest.param(
        dict(noise=torch.randn(0, 1, 16, 16)),
        ValueError,
        "noise must be a non-empty batch",
        id="empty noise",
    ),
    pytest.param(
        dict(batch_size=2, mc_samples=-1),
        ValueError,
        "mc_samples must be an integer >= 0",
        id="mc_samples=-1",
    ),
    pytest.param(
        dict(batch_size=2, mc_samples=2.0),
        TypeError,
        "mc_samples must be an integer",
        id="mc_samples=2.0",
    ),
    pytest.param(
        dict(batch_size=2, uq_every=0),
        ValueError,
        "uq_every must be an integer >= 1",
        id="uq_every=0",
    ),
    pytest.param(
        dict(batch_size=2, eta=float("nan")),
        ValueError,
        "eta must be a finite number",
        id="eta=nan",
    ),
    pytest.param(
        dict(batch_size=2, eta=-1.0),
        ValueError,
        "eta must be >= 0",
        id="eta=-1",
    ),
    pytest.param(
        dict(batch_size=2, eta="big"),
        TypeError,
        "eta must be a number",
        id="eta='big'",
    ),
    pytest.param(
        dict(batch_size=2, num_inference_steps=5000),
        ValueError,
        "cannot be larger than",
        id="more steps than trained",
    ),
]


@pytest.mark.parametrize("options, error, pattern", SAMPLE)
def test_bad_sampling_arguments(unet, scheduler, posterior, options, error, pattern):
    sampler = BayesDiffSampler(unet, _ddim(scheduler), posterior)
    with pytest.raises(error, match=pattern):
        sampler.sample(**{"num_inference_steps": STEPS, "progress": False, **options})


@pytest.mark.parametrize(
    "scale, error, pattern",
    [
        (float("nan"), ValueError, "guidance scale must be a finite number"),
        (float("inf"), ValueError, "guidance scale must be a finite number"),
    ],
)
def test_bad_guidance_scale(scale, error, pattern):
    with pytest.raises(error, match=pattern):
        ClassifierFreeGuidance(scale)


@pytest.mark.parametrize("setting", ["clip_sample", "thresholding"])
def test_a_nonlinear_scheduler_is_refused_naming_the_setting(unet, scheduler, posterior, setting):
    stock = DDPMScheduler.from_config(scheduler.config, **{setting: True})
    pattern = f"has {setting}=True, which .* moment recurrence needs affine steps; pass {setting}=False"
    with pytest.raises(ValueError, match=pattern):
        BayesDiffSampler(unet, stock, posterior)


# ------------------------------------------------------------------------------------------------
# the posterior follows its model
# ------------------------------------------------------------------------------------------------
def _run(model, scheduler, posterior):
    return BayesDiffSampler(model, _ddim(scheduler), posterior).sample(
        noise=NOISE,
        num_inference_steps=STEPS,
        uq_every=2,
        mc_samples=3,
        progress=False,
        generator=torch.Generator().manual_seed(1),
    )


def test_a_deep_copy_of_the_model_gives_the_same_result(unet, scheduler, posterior):
    twin = copy.deepcopy(unet)
    sampler = BayesDiffSampler(twin, _ddim(scheduler), posterior)
    assert sampler.posterior.head is twin.conv_out and posterior.head is unet.conv_out
    original, copied = _run(unet, scheduler, posterior), _run(twin, scheduler, posterior)
    assert torch.equal(original.images, copied.images) and torch.equal(original.variance, copied.variance)


def test_a_copy_in_another_dtype_samples(unet, scheduler, posterior):
    low = copy.deepcopy(unet).to(torch.bfloat16)
    out = _run(low, scheduler, posterior)
    reference = _run(unet, scheduler, posterior)
    assert out.variance.dtype == torch.float32 and torch.isfinite(out.variance).all()
    assert torch.allclose(out.variance.sum(), reference.variance.sum(), rtol=0.2)


def test_a_sampler_may_be_built_before_its_posterior_is_fitted(unet, scheduler, images):
    posterior = LastLayerLaplace(unet)
    sampler = BayesDiffSampler(unet, _ddim(scheduler), posterior)
    posterior.fit(images, scheduler, progress=False)
    assert sampler.sample(batch_size=1, num_inference_steps=2, progress=False).variance.shape == (1, 1, 16, 16)


def test_a_vi_posterior_follows_a_copy_too(unet, scheduler, images):
    vi = LastLayerVI(unet, steps=4, samples=1).fit(images, scheduler, progress=False)
    twin = copy.deepcopy(unet)
    assert BayesDiffSampler(twin, _ddim(scheduler), vi).posterior.head is twin.conv_out
    original, copied = _run(unet, scheduler, vi), _run(twin, scheduler, vi)
    assert torch.equal(original.images, copied.images) and torch.equal(original.variance, copied.variance)


def test_a_changed_copy_or_another_model_is_refused_in_one_line(unet, scheduler, posterior):
    tuned = copy.deepcopy(unet)
    with torch.no_grad():
        tuned.conv_out.weight.mul_(1.01)
    pattern = r"`conv_out` of this UNet2DModel has other weights .*load_posterior\(file, model\)"
    with pytest.raises(ValueError, match=pattern):
        BayesDiffSampler(tuned, _ddim(scheduler), posterior)
    with pytest.raises(ValueError, match=r"posterior is for the head Conv2d\(32->1.* is Conv2d\(8->3"):
        BayesDiffSampler(tiny_unet(), _ddim(scheduler), posterior)
    with pytest.raises(ValueError, match="has no Conv2d there: fit a posterior for this model"):
        posterior.for_model(torch.nn.Sequential())


def test_posterior_to_moves_the_float64_curvature(unet, posterior, images):
    moved = copy.copy(posterior).to("cpu", torch.float16)
    assert moved.posterior is not posterior.posterior
    assert all(t.dtype == torch.float64 for t in moved.posterior.tensors().values())
    with posterior.capture() as cap:
        unet(images[:2], 10)
    mean, var = posterior.predict(cap.phi)
    half_mean, half_var = moved.predict(cap.phi.half())
    assert half_var.dtype == torch.float32 and torch.allclose(half_var, var, rtol=1e-2, atol=1e-6)
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        moved.to(dtype=torch.int64)


# ------------------------------------------------------------------------------------------------
# posterior files from outside
# ------------------------------------------------------------------------------------------------
def _rewrite_metadata(tmp_path, change):
    with safe_open(str(digits.bundled_dir() / "posterior_diag.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()[METADATA_KEY])
    change(meta)
    path = tmp_path / "changed.safetensors"
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def _truncated(tmp_path):
    data = (digits.bundled_dir() / "posterior_diag.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.safetensors"


def _foreign(tmp_path):
    (tmp_path / "foreign.safetensors").write_bytes(b"PK\x03\x04 a zip, not safetensors" * 8)
    return tmp_path / "foreign.safetensors"


FILES = [
    pytest.param(
        lambda tmp: tmp / "nope.safetensors",
        FileNotFoundError,
        "posterior file .* does not exist",
        id="missing",
    ),
    pytest.param(
        lambda tmp: tmp,
        IsADirectoryError,
        "is a folder; give the .safetensors file",
        id="a folder",
    ),
    pytest.param(
        _truncated,
        ValueError,
        "is not a posterior file: safetensors cannot read it .* truncated or of another format",
        id="truncated",
    ),
    pytest.param(
        _foreign,
        ValueError,
        "is not a posterior file",
        id="foreign bytes",
    ),
    pytest.param(
        lambda tmp: digits.bundled_dir() / "unet" / "diffusion_pytorch_model.safetensors",
        ValueError,
        "is not a saved bayesdiff_ext posterior",
        id="model weights, not a posterior",
    ),
    pytest.param(
        lambda tmp: _rewrite_metadata(tmp, lambda m: m.update(format_version=2)),
        ValueError,
        r"has posterior format version 2, but this bayesdiff_ext \(.*\) reads version 1: "
        r"load it with the bayesdiff_ext that wrote it \(version .*\), or refit",
        id="a newer format version",
    ),
    pytest.param(
        lambda tmp: _rewrite_metadata(tmp, lambda m: m.pop("head")),
        ValueError,
        "is a damaged posterior file: KeyError 'head'",
        id="metadata without the head",
    ),
    pytest.param(
        lambda tmp: _rewrite_metadata(tmp, lambda m: m["head"].update(in_channels=16)),
        ValueError,
        r"was fitted for the head Conv2d\(16->1",
        id="another head shape",
    ),
]


@pytest.mark.parametrize("make, error, pattern", FILES)
def test_bad_posterior_files(unet, tmp_path, make, error, pattern):
    with pytest.raises(error, match=pattern):
        LastLayerLaplace.load(make(tmp_path), unet)


def test_no_code_path_unpickles_files():
    """Every torch.load passes weights_only=True, every numpy load allow_pickle=False; no pickle loads."""
    offenders = []
    safe = {
        "torch.load": ("weights_only", True),
        "np.load": ("allow_pickle", False),
        "numpy.load": ("allow_pickle", False),
    }
    sources = [path for folder in ("bayesdiff_ext", "python", "tests") for path in (ROOT / folder).rglob("*.py")]
    for path in sorted(sources):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            keywords = {k.arg: k.value for k in node.keywords}
            call = f"{owner}.{node.func.attr}"
            if call in safe:
                name, value = safe[call]
                if not (isinstance(keywords.get(name), ast.Constant) and keywords[name].value is value):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {call} without {name}={value}")
            if owner in ("pickle", "dill", "cloudpickle") and node.func.attr in ("load", "loads", "Unpickler"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {call}")
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------------
# the rules themselves
# ------------------------------------------------------------------------------------------------
def test_pixels_to_model_scale_states_its_rule():
    scale = validation.pixels_to_model_scale
    assert torch.equal(scale(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([-1.0, 1.0]))
    assert torch.equal(scale(torch.tensor([0, 51, 255])), torch.tensor([-1.0, -0.6, 1.0]))
    assert torch.equal(scale(torch.tensor([-1.0005, 0.5])), torch.tensor([-1.0, 0.5]))
    for bad, pattern in [
        (torch.tensor([0, 256]), r"range over \[0, 256\]; expected 0..255"),
        (torch.tensor([-2.0, 0.5]), "must be at model scale"),
        (torch.tensor([0.0, 0.5]), "never below 0"),
        (torch.tensor([float("nan"), 0.0]), "must be finite"),
        (torch.tensor([]), "is empty"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            validation.pixels_to_model_scale(bad)
    with pytest.raises(TypeError, match="expected integers 0..255 or floats"):
        validation.pixels_to_model_scale(torch.tensor([True]))


def test_all_zero_or_centred_images_pass(unet):
    shape = validation.sample_shape(unet)
    assert shape == validation.SampleShape(1, (16, 16), 4)
    validation.check_images(torch.zeros(2, 1, 16, 16), shape)
    validation.check_images(torch.rand(2, 1, 16, 16) * 2 - 1, shape)
    validation.check_noise(torch.randn(2, 1, 20, 12), shape)  # another size the UNet takes


@pytest.mark.parametrize(
    "value, minimum, error",
    [(True, 1, TypeError), (1.0, 1, TypeError), ("3", 1, TypeError), (0, 1, ValueError), (-1, 0, ValueError)],
)
def test_check_count(value, minimum, error):
    with pytest.raises(error):
        validation.check_count("n", value, minimum)
    assert validation.check_count("n", torch.tensor(3).item()) == 3
