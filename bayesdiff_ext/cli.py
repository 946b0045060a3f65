"""The ``bayesdiff`` command: sample with per-pixel uncertainty, fit posteriors, write results.

A front door (layer 6 of docs/ARCHITECTURE.md): it parses arguments, calls the package and writes
files; the method itself lives in :mod:`bayesdiff_ext.posterior`, :mod:`bayesdiff_ext.sampler`,
:mod:`bayesdiff_ext.aggregation` and :mod:`bayesdiff_ext.io`. Bad input ends with one line on
stderr, ``bayesdiff: error: ...``: exit status 2 for bad input (an argument, or a file it names:
the checks of :mod:`bayesdiff_ext.validation` and the loaders), 1 for a failure while running.
Nothing is written then. ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import time
import traceback
import warnings
from pathlib import Path

__all__ = ["build_parser", "main"]

#: The scores every run reports; ``--aggregation`` picks the one that filters and sorts, and may
#: change its parameters.
REPORTED_SCORES = {"sum": {}, "mean": {}, "max": {}, "percentile": {"q": 95.0}, "patch_max": {"patch": 4}}

#: ``--data`` value that names the bundled scikit-learn digits (16x16) instead of a path.
BUILTIN_DIGITS = "builtin:digits"
#: ``--data`` value that names the bundled photo-crops model's data set (2000 RGB 16x16 crops).
BUILTIN_PHOTOS = "builtin:photos"

#: ``--sampler``: the scheduler class built from the model's scheduler config, and the settings it
#: gets on top of that config (the moment recurrence needs affine steps: no x̂_0 clipping).
SAMPLERS = {
    "ddim": ("DDIMScheduler", {"clip_sample": False, "thresholding": False}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False, "thresholding": False}),
    "dpm2": ("DPMSolverSinglestepScheduler", {"solver_order": 2, "thresholding": False}),
}

#: Errors that mean bad input (exit status 2); any other error is a failure while running (1).
BAD_INPUT = (
    ValueError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)

#: ``--method`` values (bayesdiff_ext.methods.METHODS, repeated so that --help needs no torch).
METHODS = ("laplace", "trajectories", "hfl", "isotropic", "mc-dropout", "ensemble", "x0-drift", "weight-samples")
#: ``--preset`` values and the default (bayesdiff_ext.sampler.settings, repeated for --help).
PRESETS = ("accurate", "fast", "paper")
DEFAULT_PRESET = "fast"
DRAWS = ("independent", "antithetic", "sobol")
COVARIANCES = ("mc", "regression", "none")
#: Methods that sample with their own models and take the recurrence's Skip and S for the sampler's noise only.
REPEATED_METHODS = ("mc-dropout", "ensemble")
#: weight-samples' M by default (bayesdiff_ext.methods.weight_samples.DEFAULT_WEIGHT_SAMPLES, repeated for --help).
DEFAULT_WEIGHT_SAMPLES = 4
#: The weight-samples method's per-image entropy, an ``--aggregation`` beside the variance's.
FEATURE_ENTROPY = "feature_entropy"

#: ``fit --inference`` values: laplace and bayesdiff_ext.posterior.inference.INFERENCES.
INFERENCES = ("laplace", "vi", "mcmc", "head-ensemble")
#: ``fit`` options of one inference: argparse destination -> (inference, constructor keyword).
INFERENCE_OPTIONS = {
    "vi_steps": ("vi", "steps"),
    "vi_samples": ("vi", "samples"),
    "vi_lr": ("vi", "lr"),
    "chains": ("mcmc", "chains"),
    "warmup": ("mcmc", "warmup"),
    "draws": ("mcmc", "draws"),
    "thin": ("mcmc", "thin"),
    "leapfrog_steps": ("mcmc", "leapfrog_steps"),
    "target_accept": ("mcmc", "target_accept"),
    "members": ("head-ensemble", "members"),
    "bootstrap": ("head-ensemble", "bootstrap"),
    "train_steps": ("head-ensemble", "steps"),
}

_DESCRIPTION = """\
Per-pixel uncertainty for diffusion models (BayesDiff: a last-layer Laplace posterior on the
UNet's noise-prediction head, its variance carried through the sampler). Every image gets an
uncertainty map and a score; the most uncertain images are filtered out."""

_EPILOG = """\
examples:
  bayesdiff demo                                   # bundled digits model, 64 images, a few minutes on a CPU
  bayesdiff demo --num-images 16 --out my-first-run
  bayesdiff fit --model path/to/pipeline --data path/to/images/ --out posterior.safetensors
  bayesdiff sample --model path/to/pipeline --posterior posterior.safetensors --num-images 32
  bayesdiff sample --model path/to/unet --scheduler path/to/scheduler --posterior p.safetensors \\
                   --sampler dpm2 --steps 25 --filter top_k:k=4

Run `bayesdiff <command> --help` for the options of one command."""


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=96)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default in its help (unless the help names it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = "default" in text or action.default in (argparse.SUPPRESS, False) or action.required or action.nargs == 0
        if shown or not action.option_strings:
            return text
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"


class _Parser(argparse.ArgumentParser):
    """argparse, but usage mistakes also end with a single line, and every --help shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs["formatter_class"] = _HelpFormatter
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"bayesdiff: error: {message} (see `{self.prog} --help`)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _float_or_choice(*choices: str):
    def parse(text: str):
        if text in choices:
            return text
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number or one of {', '.join(choices)}, got {text!r}"
            ) from None

    return parse


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_spec(text: str) -> tuple[str, dict]:
    """``"name"`` or ``"name:key=value,key=value"`` -> ``(name, {key: number})``."""
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        try:
            if not eq or not key:
                raise ValueError
            params[key.strip()] = _number(value.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"cannot read {item!r} in {text!r}: write NAME or NAME:KEY=NUMBER[,KEY=NUMBER]"
            ) from None
    return name.strip(), params


def _add_sampling_options(p: argparse.ArgumentParser, *, num_images: int, batch_size: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--num-images",
        type=_int_at_least(1),
        default=num_images,
        metavar="N",
        help=f"how many images to generate (default {num_images})",
    )
    g.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=batch_size,
        metavar="B",
        help=f"images per sampler call; each uncertainty step runs the UNet on B x MC-samples "
        f"inputs at once, so lower it if memory runs out (default {batch_size})",
    )
    g.add_argument(
        "--sampler",
        choices=tuple(SAMPLERS),
        default=None,
        help="ddim (the default for a UNet folder), ddpm, or dpm2 (DPM-Solver-2, singlestep), built from the "
        "model's scheduler config (its noise schedule); a change of class is reported and recorded in "
        "summary.json. A pipeline folder samples with its own scheduler unless this is given",
    )
    g.add_argument(
        "--no-clipping",
        action="store_true",
        help="sample a model whose scheduler has clip_sample or thresholding on with them off (the moment "
        "recurrence needs affine steps; the images are then not clipped either). Without it such a "
        "scheduler is refused",
    )
    g.add_argument("--steps", type=_int_at_least(1), default=50, help="sampler steps (default 50)")
    g.add_argument(
        "--eta",
        type=_non_negative_float,
        default=0.0,
        help="DDIM's eta: 0 = deterministic (default), 1 = DDPM-like noise",
    )
    g.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="what estimates Var[x_0 | x_T]: fast (the default: trajectory Monte Carlo, 16 weight draws), "
        "accurate (64 draws; 64 noise streams on a stochastic sampler), paper (BayesDiff's moment recurrence, Skip 5 and S = 10: the paper's "
        "reproduction, which does not track the truth). Their numbers: python/BENCHMARKS.md, bench_truth. "
        "The options below override the preset's values",
    )
    g.add_argument(
        "--samples",
        type=_int_at_least(1),
        default=None,
        metavar="M",
        help="trajectory presets: head-weight draws per image, each a whole trajectory; weight-samples: M, the "
        f"draws fixed per trajectory (default {DEFAULT_WEIGHT_SAMPLES}; even for a stochastic sampler)",
    )
    g.add_argument("--draws", choices=DRAWS, default=None, help="trajectory presets: how the weights are drawn")
    g.add_argument(
        "--per-image-draws",
        action="store_true",
        help="trajectory presets: each image's own weight draws (and noise streams) instead of the same draws for "
        "every image, seeded by --seed (the default: common random numbers, so that the images' scores rank as "
        "the true ones do; docs/MATH.md §14.10)",
    )
    g.add_argument(
        "--uq-every",
        type=_int_at_least(1),
        default=None,
        metavar="K",
        help="recurrence (paper): propagate the full uncertainty every K-th step, the cheap update in "
        "between (BayesDiff-Skip; 1 = every step; the paper's 5 by default)",
    )
    g.add_argument(
        "--mc-samples",
        type=_int_at_least(0),
        default=None,
        metavar="S",
        help="recurrence (paper): Monte Carlo samples of x_t per uncertainty step (the paper's 10 by default)",
    )
    g.add_argument(
        "--covariance",
        choices=COVARIANCES,
        default=None,
        help="recurrence (paper): Cov(x_t, eps) by plain Monte Carlo (mc, the paper's), its regression form "
        "(regression: reproducible maps), or none (the closed form without Monte Carlo)",
    )
    g.add_argument(
        "--seed",
        type=_int_at_least(0),
        default=0,
        help="random seed: image k's noise depends only on the seed and k, so the same seed gives the "
        "same images and maps for any --batch-size, in sample and demo alike (default 0)",
    )
    g = p.add_argument_group("uncertainty method")
    g.add_argument(
        "--method",
        choices=METHODS,
        default="laplace",
        help="laplace (default: the posterior file as fitted, whatever its inference, estimated as --preset says), "
        "trajectories (the same posterior, by trajectory Monte Carlo whatever the preset), hfl (Hessian-free "
        "Laplace from a full posterior), isotropic (Sigma = I/lambda from a diag posterior), mc-dropout (--passes "
        "samples of a UNet trained with dropout), ensemble (independently trained UNets, --ensemble), "
        "x0-drift (how much the predicted final image still moves over the last --last-steps steps: "
        "no posterior, no extra model calls), weight-samples (--samples M head weights drawn from the "
        "posterior once (from --seed, the same for every image), each fixed along a whole trajectory from the "
        "same x_T: the variance of the M final images, "
        "and their entropy in the --features space as the score feature_entropy)",
    )
    g.add_argument(
        "--passes",
        type=_int_at_least(2),
        default=10,
        metavar="T",
        help="mc-dropout: dropout passes per image (default 10)",
    )
    g.add_argument(
        "--probes",
        type=_int_at_least(1),
        default=16,
        metavar="K",
        help="hfl: random probes per image (default 16); each costs one CG solve per uncertainty step, "
        "the estimate's error shrinks like 1/sqrt(K)",
    )
    g.add_argument(
        "--last-steps",
        type=_int_at_least(2),
        default=5,
        metavar="L",
        help="x0-drift: the variance of the predicted x_0 over the last L steps (default 5)",
    )
    g.add_argument(
        "--features",
        default=None,
        metavar="random_conv|PATH",
        help="weight-samples: the feature space of the entropy: random_conv (a fixed-seed random conv net), or a "
        "TorchScript file mapping images (N, C, H, W) to features (N, d); images are clamped to [-1, 1] first "
        "(default random_conv)",
    )
    g.add_argument(
        "--ensemble",
        type=Path,
        nargs="+",
        default=None,
        metavar="DIR",
        help="ensemble: with sample, the other members' UNet folders (--model is member 0); with "
        "demo, all members (default: the digits members trained into <assets>/ensemble/member_K/unet)",
    )
    g.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu)",
    )
    g = p.add_argument_group("scores and output")
    g.add_argument(
        "--aggregation",
        type=parse_spec,
        default=("sum", {}),
        metavar="NAME[:K=V]",
        help="the image score that filters and sorts: sum (default, the paper's), mean, max, "
        "percentile:q=95, patch_max:patch=4, or feature_entropy (--method weight-samples). All of them are "
        "written to scores.csv",
    )
    g.add_argument(
        "--filter",
        type=parse_spec,
        default=("mean_plus_std", {}),
        metavar="RULE[:K=V]",
        help="which images to drop: mean_plus_std (default, the paper's: score > mean + 1 std "
        "of the run; mean_plus_std:num_std=2 for a stricter cut), top_k:k=8 (the 8 most "
        "uncertain), quantile:q=0.9 (keep scores <= the 90%% quantile)",
    )
    g.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output folder, created; must not exist or be empty (default ./bayesdiff-out/<date-time>/). "
        "Finished batches are kept in DIR.work/ until the folder is written; a second run into the same "
        "folder is refused",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run into --out from the batches kept in DIR.work/ (the same settings "
        "are required; the result is bit-identical to an uninterrupted run)",
    )


def _add_pipeline_options(p: argparse.ArgumentParser, *, sampling: bool) -> None:
    g = p.add_argument_group(
        "pipeline folders (Stable Diffusion, SDXL, SD3, Flux, PixArt-Sigma, DiT: what save_pretrained writes)"
    )
    g.add_argument("--prompt", default=None, help="the prompt of every image (default: the empty prompt)")
    g.add_argument("--class-label", type=_int_at_least(0), default=None, metavar="K", help="DiT: the class of every image")
    g.add_argument("--height", type=_int_at_least(1), default=None, help="image height in pixels (default: the pipeline's)")
    g.add_argument("--width", type=_int_at_least(1), default=None, help="image width in pixels (default: the pipeline's)")
    if not sampling:
        return
    g.add_argument("--negative-prompt", default=None, help="the negative prompt of every image")
    g.add_argument(
        "--guidance-scale",
        type=_non_negative_float,
        default=None,
        metavar="S",
        help="the pipeline's guidance_scale (default: the pipeline's own; Flux: the distilled guidance input)",
    )
    g.add_argument(
        "--decode-samples",
        type=_int_at_least(2),
        default=16,
        metavar="N",
        help="--method laplace: draws of the latent z_0 per image decoded by the pipeline's VAE for the pixel maps "
        "(weight-samples and x0-drift decode their own M final latents or L predictions of x_0) (default 16)",
    )


def _add_general_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the full traceback when something fails")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bayesdiff",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    files_written = (
        "writes: samples/*.png, uncertainty/*.png (variance maps, one colour scale), kept/*.png (the images "
        "the filter keeps), grid_sorted.png, scores.csv, summary.json, tensors.safetensors"
    )

    demo = commands.add_parser(
        "demo",
        help="try it: the bundled digits model and posterior, no arguments needed",
        description=_wrap(
            "Sample 64 digits with the bundled 16x16 model and its bundled posterior, score and "
            f"filter them, and write the results. Nothing is downloaded. {files_written}."
        ),
        epilog="example:\n  bayesdiff demo --num-images 16 --out demo-run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_sampling_options(demo, num_images=64, batch_size=64)
    _add_general_options(demo)

    sample = commands.add_parser(
        "sample",
        help="sample with uncertainty from a local diffusers model and a fitted posterior",
        description=_wrap(
            "Sample images with per-pixel uncertainty from a local diffusers model (an unconditional "
            "UNet2DModel: a pipeline folder with unet/ and scheduler/, or a bare UNet folder plus --scheduler; "
            "or a Stable Diffusion, SDXL, SD3, Flux, PixArt-Sigma or DiT pipeline folder, sampled with its own "
            "scheduler, --prompt/--class-label, the maps decoded through its VAE; --method laplace, weight-samples or "
            f"x0-drift) using a posterior made by `bayesdiff fit`. {files_written}."
        ),
        epilog="examples:\n  bayesdiff sample --model ./my-pipeline --posterior posterior.safetensors "
        "--num-images 32 --sampler ddim --steps 50\n"
        "  bayesdiff sample --model ./sdxl --posterior sdxl.safetensors --prompt 'a cat' --guidance-scale 5 "
        "--steps 30 --num-images 8\n"
        "  bayesdiff sample --model ./sd3 --method x0-drift --prompt 'a cat' --steps 28 --num-images 8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sample.add_argument(
        "--model", type=Path, required=True, metavar="DIR", help="local diffusers model folder"
    )
    sample.add_argument(
        "--posterior",
        type=Path,
        default=None,
        metavar="FILE",
        help="posterior file from `bayesdiff fit` for this model: any inference for --method laplace; "
        "a full (hfl) or diag (isotropic) Laplace posterior for those methods",
    )
    sample.add_argument(
        "--scheduler",
        type=Path,
        default=None,
        metavar="DIR",
        help="scheduler folder (scheduler_config.json), needed for a bare UNet folder",
    )
    _add_sampling_options(sample, num_images=64, batch_size=16)
    _add_pipeline_options(sample, sampling=True)
    _add_general_options(sample)

    fit = commands.add_parser(
        "fit",
        help="fit a posterior (Laplace, VI, MCMC or a head ensemble) to a model's head and save it",
        description=_wrap(
            "Fit a posterior of the model's last layer on training images (noised at random timesteps, "
            "like in training) and save it for `bayesdiff sample`. --inference laplace (default) is the "
            "paper's last-layer Laplace; vi, mcmc and head-ensemble run on the same data pass (the model "
            "runs once) with sigma and the prior precision chosen as for the full Laplace, then fixed. "
            "A Stable Diffusion, SDXL, SD3, Flux, PixArt-Sigma or DiT pipeline folder is fitted the pipeline's "
            "way: the images encoded by its VAE, conditioned by --prompt (or --class-label), noised as the "
            "model was trained."
        ),
        epilog="examples:\n"
        "  bayesdiff fit --model ./my-pipeline --data ./train-images/ --out posterior.safetensors\n"
        "  bayesdiff fit --model ./my-pipeline --data images.npy --structure full --prior-precision 1\n"
        f"  bayesdiff fit --model bayesdiff_ext/assets/digits --data {BUILTIN_DIGITS} --out p.safetensors\n"
        f"  bayesdiff fit --model bayesdiff_ext/assets/digits --data {BUILTIN_DIGITS} --inference mcmc --chains 4\n"
        f"  bayesdiff fit --model bayesdiff_ext/assets/digits --data {BUILTIN_DIGITS} --inference vi --structure full\n"
        "  bayesdiff fit --model ./sdxl --data ./photos/ --prompt 'a photo' --out sdxl.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("--model", type=Path, required=True, metavar="DIR", help="local diffusers model folder")
    fit.add_argument(
        "--scheduler",
        type=Path,
        default=None,
        metavar="DIR",
        help="scheduler folder, needed for a bare UNet folder",
    )
    fit.add_argument(
        "--data",
        required=True,
        metavar="DIR|FILE",
        help="training images: a folder of PNG/JPG files (resized to the model's size), a .npy/.pt "
        "tensor (N, C, H, W) (uint8 0..255, or floats in [-1, 1]), or "
        f"{BUILTIN_DIGITS} (scikit-learn's digits at 16x16) or {BUILTIN_PHOTOS} (the photo-crops model's 2000 "
        "crops of scikit-learn's sample photos)",
    )
    fit.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE",
        help="where to save the posterior (default ./posterior_<structure or inference>.safetensors)",
    )
    fit.add_argument("--overwrite", action="store_true", help="replace an existing posterior file")
    fit.add_argument(
        "--inference",
        choices=INFERENCES,
        default="laplace",
        help="laplace (default), vi (variational inference), mcmc (Hamiltonian Monte Carlo), "
        "head-ensemble (heads re-initialised and trained on the fixed trunk)",
    )
    fit.add_argument(
        "--structure",
        choices=("diag", "full", "kron", "isotropic", "hfl"),
        default=None,
        help="laplace: covariance structure, diag (default, the paper's), full (exact GGN), kron (KFAC), "
        "isotropic, hfl (Hessian-free Laplace: the full GGN's variance from random probes); "
        "vi: the variational family, diag (mean-field, default) or full",
    )
    fit.add_argument(
        "--curvature",
        choices=("ggn", "ef", "ef_bayesdiff"),
        default=None,
        help="laplace only: ggn (default), ef (empirical Fisher), ef_bayesdiff (the paper code's 2x EF with "
        "sigma = prior precision = 1; diag only)",
    )
    fit.add_argument(
        "--sigma",
        type=_float_or_choice("ml"),
        default=None,
        metavar="ml|NUMBER",
        help="observation noise: ml = maximum likelihood on the fitting residuals (default), or a number",
    )
    fit.add_argument(
        "--prior-precision",
        type=_float_or_choice("mackay", "marglik"),
        default=None,
        metavar="mackay|marglik|NUMBER",
        help="prior precision: mackay (default, MacKay's fixed point), marglik (marginal "
        "likelihood), or a number",
    )
    fit.add_argument(
        "--timesteps-per-image",
        type=_int_at_least(1),
        default=1,
        metavar="T",
        help="random (timestep, noise) draws per image (default 1)",
    )
    fit.add_argument(
        "--batch-size", type=_int_at_least(1), default=64, metavar="B", help="images per forward (default 64)"
    )
    fit.add_argument(
        "--seed", type=int, default=0, help="seed of the timestep and noise draws and of the inference (default 0)"
    )
    fit.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    _add_inference_options(fit)
    _add_pipeline_options(fit, sampling=False)
    _add_general_options(fit)
    _add_eval_command(commands)
    return parser


def _add_inference_options(fit: argparse.ArgumentParser) -> None:
    """Options of one --inference each (None = the class's default; INFERENCE_OPTIONS says whose)."""
    count = _int_at_least(1)
    g = fit.add_argument_group("--inference vi")
    g.add_argument("--vi-steps", type=_int_at_least(4), metavar="N", help="Adam steps on the ELBO (default 3000)")
    g.add_argument("--vi-samples", type=count, metavar="S", help="reparameterised draws per step (default 16)")
    g.add_argument("--vi-lr", type=float, metavar="LR", help="Adam learning rate (default 0.05)")
    g = fit.add_argument_group("--inference mcmc")
    g.add_argument("--chains", type=count, help="chains (default 4)")
    g.add_argument("--warmup", type=_int_at_least(0), metavar="N", help="adaptation iterations (default 1000)")
    g.add_argument("--draws", type=_int_at_least(4), metavar="N", help="draws kept per chain (default 1000)")
    g.add_argument("--thin", type=count, metavar="K", help="keep every K-th iteration (default 1)")
    g.add_argument("--leapfrog-steps", type=count, metavar="L", help="most leapfrog steps per trajectory (default 16)")
    g.add_argument("--target-accept", type=float, metavar="P", help="acceptance the step size aims at (default 0.8)")
    g = fit.add_argument_group("--inference head-ensemble")
    g.add_argument("--members", type=_int_at_least(2), metavar="N", help="heads in the ensemble (default 8)")
    g.add_argument(
        "--no-bootstrap",
        dest="bootstrap",
        action="store_const",
        const=False,
        help="train every head on all the data (they then all reach the same optimum: no spread)",
    )
    g.add_argument(
        "--train-steps",
        type=_int_at_least(0),
        metavar="K",
        help="gradient-descent steps per head (default: to convergence; a number = early stopping)",
    )


#: ``bayesdiff eval`` options: (flag, type, metavar, help) per EvaluationConfig setting. Their parser
#: default is None ("not given"): the run takes EvaluationConfig's default, or with --reuse the cached
#: run's setting; the help shows EvaluationConfig's default.
_EVAL_OPTIONS = {
    "model": (
        "--model",
        str,
        "builtin:NAME|DIR",
        "the model: builtin:digits or builtin:photos (bundled), or a local diffusers model folder (an "
        "unconditional UNet2DModel pipeline folder with unet/ and scheduler/)",
    ),
    "scheduler": ("--scheduler", str, "DIR", "the scheduler folder of a bare UNet folder (scheduler_config.json)"),
    "data": ("--data", str, "DIR|FILE", "a model folder's real images: a folder of PNG/JPG or a .npy/.pt tensor"),
    "features": (
        "--features",
        str,
        "random_conv|PATH",
        "a model folder's feature space for FID/KID/PRDC and the k-NN realism oracle: random_conv, or a "
        "TorchScript file mapping images at model scale (N, C, H, W) to features (N, d) (default for a "
        "folder: random_conv; the bundled models use their classifier's embedding)",
    ),
    "classifier": (
        "--classifier",
        str,
        "PATH",
        "a TorchScript classifier (images at model scale -> logits) whose confidence is a second oracle",
    ),
    "posterior": ("--posterior", str, "FILE", "the default posterior (default: the bundled one, or a diag GGN fitted on --data)"),
    "num_images": ("--num-images", int, "N", "samples"),
    "steps": ("--steps", int, "K", "DDIM steps"),
    "batch_size": ("--batch-size", int, "B", "images per batch"),
    "seed": ("--seed", int, "S", "seed of x_T and the random subsets"),
    "costly_images": (
        "--costly-images",
        int,
        "N",
        "images scored by the methods with extra model calls other than the paper's (default: all)",
    ),
    "mc_samples": ("--mc-samples", int, "S", "Monte Carlo samples per uncertainty step"),
    "uq_every": ("--uq-every", int, "K", "Skip: Monte Carlo every K-th step"),
    "weight_samples": ("--weight-samples", int, "M", "head-weight draws of weight-samples"),
    "dropout_passes": ("--dropout-passes", int, "T", "MC dropout passes (bundled digits)"),
    "drift_last_steps": ("--drift-last-steps", int, "L", "steps whose x_0 predictions x0-drift compares"),
    "hfl_probes": ("--hfl-probes", int, "K", "Hessian-free Laplace probes per image"),
    "fit_images": ("--fit-images", int, "N", "real images the fitted posteriors see (default: all)"),
    "random_seeds": (
        "--random-seeds",
        int,
        "K",
        "random subsets per kept fraction (fewer than 5: no σ advantages, no verdict)",
    ),
    "bad_fraction": ("--bad-fraction", float, "F", "share of images the oracle calls bad (AUROC)"),
}


def _add_eval_command(commands) -> None:
    from bayesdiff_ext.evaluation.config import default_settings

    defaults = default_settings()
    evaluate = commands.add_parser(
        "eval",
        help="does the uncertainty find bad images? filtering vs random removal, on a bundled model or yours",
        description=_wrap(
            "Generate N images with a model, score them by every uncertainty method on the same images, and "
            "compare filtering by each score with removing random images (FID, KID, CMMD, precision/recall over "
            "seeds), plus AUROC and Spearman against quality oracles (a k-NN realism score against the real "
            "images in the chosen feature space; a classifier's confidence where there is one). The run time is "
            "estimated before generation starts and shown by a progress bar. Writes the model's section of "
            "EVALUATION.md, figures under evaluation/<model>/, results.json and a cache (filtering_run.npz) "
            "with the settings that made it: --reuse renders again without sampling, with those settings."
        ),
        epilog="examples:\n"
        "  bayesdiff eval --out eval-out --docs docs                       # bundled digits, the documented run\n"
        "  bayesdiff eval --model builtin:photos --out eval-photos --docs docs\n"
        "  bayesdiff eval --model ./my-pipeline --data ./images/ --num-images 500 --out my-eval\n"
        "  bayesdiff eval --out eval-out --reuse --random-seeds 20         # re-render with other analysis settings",
    )
    evaluate.add_argument("--out", type=Path, default=Path("eval-out"), metavar="DIR", help="cache and results folder")
    evaluate.add_argument(
        "--docs", type=Path, default=None, metavar="DIR", help="where EVALUATION.md and evaluation/ go (default: --out)"
    )
    evaluate.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted generation into --out from the batches kept in DIR.work/ (the same settings "
        "are required; the result is bit-identical to an uninterrupted run)",
    )
    evaluate.add_argument(
        "--reuse",
        action="store_true",
        help="render from the cached run in --out, no sampling; its settings are the cache's (an option that asks "
        "for another generation setting is refused, naming it)",
    )
    for name, (flag, kind, metavar, text) in _EVAL_OPTIONS.items():
        default = defaults[name]
        shown = "" if "default" in text else f" (default: {'none' if default is None else default})"
        evaluate.add_argument(flag, dest=name, type=_eval_value(kind), default=None, metavar=metavar, help=text + shown)
    evaluate.add_argument("--label", default=None, help="a line printed at the top of the report's section")
    _add_general_options(evaluate)


def _eval_value(kind):
    """Parse an eval option's value; range checks are EvaluationConfig's (one place)."""

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None

    return parse if kind in (int, float) else kind


# ------------------------------------------------------------------------------------------------
# the commands
# ------------------------------------------------------------------------------------------------
def _say(message: str) -> None:
    """A progress line on stderr (from process 0 only, under torchrun)."""
    from bayesdiff_ext.cli_session import current

    current().say(message)


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _scheduler_for(args, base, affine: bool = True) -> tuple:
    """The ``--sampler`` scheduler built from the model's scheduler ``base`` and what it changes of
    ``base``: ``{"class": [old, new], setting: [old, new], ...}``. For the moment recurrence
    (``affine``), a ``base`` with clip_sample or thresholding on is refused unless ``--no-clipping``
    (the rule of the Python API, which refuses it); trajectory Monte Carlo runs such a scheduler."""
    import diffusers

    from bayesdiff_ext.validation import nonlinear_scheduler_settings

    nonlinear = nonlinear_scheduler_settings(base.config) if affine or args.no_clipping else {}
    if nonlinear and not args.no_clipping:
        setting, effect = next(iter(nonlinear.items()))
        raise ValueError(
            f"the model's {type(base).__name__} has {setting}=True, which {effect}: the moment recurrence needs "
            f"affine steps; pass --no-clipping to sample with {' and '.join(nonlinear)} off (the images are then "
            "not clipped either)"
        )
    # No --sampler (a pipeline folder): the model's own scheduler class, with --no-clipping's changes only.
    class_name, settings = SAMPLERS[args.sampler] if args.sampler else (type(base).__name__, dict.fromkeys(nonlinear, False))
    scheduler = getattr(diffusers, class_name).from_config(base.config, **settings)
    changes = {}
    if type(scheduler) is not type(base):
        changes["class"] = [type(base).__name__, class_name]
    for key, value in settings.items():
        if key in base.config and base.config[key] != value:
            changes[key] = [base.config[key], value]
    return scheduler, changes


def _describe_changes(args, changes: dict) -> str:
    """One line saying what the run changed of the model's scheduler."""
    parts = []
    if "class" in changes:
        old, new = changes["class"]
        parts.append(f"{old} -> {new} (--sampler {args.sampler}; its noise schedule is kept)")
    for key, (old, new) in changes.items():
        if key != "class":
            flag = "--no-clipping" if key in ("clip_sample", "thresholding") else f"--sampler {args.sampler}"
            parts.append(f"{key} {old} -> {new} ({flag})")
    return "the model's scheduler changed: " + "; ".join(parts)


def _check_run_options(args) -> tuple[Path, dict]:
    """Validate --out, --aggregation and --filter before any work; return the output folder and
    the scores to report."""
    from bayesdiff_ext import aggregation
    from bayesdiff_ext.io import check_output_dir, timestamped_out_dir

    method, params = args.aggregation
    if method == "masked_mean":
        raise ValueError("--aggregation masked_mean needs a mask; use bayesdiff_ext.aggregation from Python")
    if method == FEATURE_ENTROPY:
        if args.method != "weight-samples" or params:
            raise ValueError("--aggregation feature_entropy (no parameters) is the score of --method weight-samples")
    elif method not in REPORTED_SCORES:
        raise ValueError(f"unknown aggregation {method!r}; valid: {', '.join(REPORTED_SCORES)}, {FEATURE_ENTROPY}")
    else:
        aggregation.check_aggregation(method, params)
    rule, rule_params = args.filter
    aggregation.check_filter(rule, rule_params)
    if args.method == "x0-drift" and args.last_steps > args.steps:
        raise ValueError(f"--last-steps {args.last_steps} compares more steps than the run has (--steps {args.steps})")
    if rule == "top_k" and rule_params["k"] > args.num_images:
        raise ValueError(
            f"--filter top_k:k={rule_params['k']} removes more images than --num-images {args.num_images}"
        )
    if args.features is not None and args.method != "weight-samples":
        raise ValueError(f"--features is the feature space of --method weight-samples' entropy; --method {args.method} takes none")
    if args.method in (*REPEATED_METHODS, "x0-drift", "weight-samples"):
        estimators = ("preset", "draws", "covariance")
        if args.method == "weight-samples":
            estimators += ("uq_every", "mc_samples")  # its draws are independent, around their mean
        else:
            estimators += ("samples",)
        given = [f"--{k.replace('_', '-')}" for k in estimators if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} choose(s) the Laplace estimators; --method {args.method} takes none")
    else:
        _uncertainty_settings(args)  # refuse a bad combination before any work
    out_dir = check_output_dir(args.out if args.out is not None else timestamped_out_dir())
    if method == FEATURE_ENTROPY:
        return out_dir, dict(REPORTED_SCORES)
    return out_dir, {**REPORTED_SCORES, method: {**REPORTED_SCORES.get(method, {}), **params}}


def _sample_and_write(
    args, run_options, unet, base_scheduler, method_inputs: dict, described: dict, load_s: float
) -> int:
    """``method_inputs``: ``posterior`` for the Laplace methods, ``members`` (the other UNets) for
    the ensemble."""
    import torch

    from bayesdiff_ext import aggregation
    from bayesdiff_ext.cli_session import current
    from bayesdiff_ext.io import RunRecord, write_run
    from bayesdiff_ext.io.outputs import LATENT_MOMENTS
    from bayesdiff_ext.posterior.hfl import seed_image_probes
    from bayesdiff_ext.randomness import image_generators

    out_dir, scores_to_report = run_options
    # The options the method's sample() takes; the recorded settings say what the run used.
    if args.method == "x0-drift":
        settings, uncertainty, recorded = None, {}, dict(last_steps=args.last_steps)
    elif args.method == "weight-samples":
        # the same M draws for every image, from the seed: the sampler's option, a pipeline wrapper's own
        settings, uncertainty = None, {} if "pipeline" in method_inputs else {"weight_seed": args.seed}
        recorded = dict(samples=args.samples or DEFAULT_WEIGHT_SAMPLES, features=args.features or "random_conv")
    elif args.method in REPEATED_METHODS:
        settings = None
        uncertainty = {k: getattr(args, k) for k in ("uq_every", "mc_samples") if getattr(args, k) is not None}
        recorded = uncertainty
    else:
        settings = _uncertainty_settings(args)
        uncertainty, recorded = {"settings": settings}, settings.describe()
    if "pipeline" in method_inputs:
        sampler, scheduler, scheduler_changes, device, how = _pipeline_sampler(args, method_inputs, settings)
    else:
        sampler, scheduler, scheduler_changes, device, how = _unet_sampler(
            args, unet, base_scheduler, method_inputs, settings
        )
    if settings is not None and "pipeline" not in method_inputs:
        # hfl and isotropic derive their posterior from the file's (other structure, other δ)
        described = {**described, **_posterior_description(sampler.posterior, described["posterior"])}
    if scheduler_changes:
        _say(_describe_changes(args, scheduler_changes))
    _say(
        f"sampling {args.num_images} images: {args.sampler or type(scheduler).__name__}, {args.steps} steps, "
        f"method {args.method}, {how}, on {device}"
    )
    started = time.perf_counter()

    def sample_batch(indices):
        # an image's probes from (seed, its index): any --batch-size, --resume, torchrun
        seed_image_probes(getattr(sampler, "posterior", None), args.seed, indices)
        return sampler.sample(
            batch_size=len(indices),
            num_inference_steps=args.steps,
            # image k's x_T, noise and draws come from (seed, k): any --batch-size, same results
            generator=image_generators(args.seed, indices),
            eta=args.eta,
            progress=not args.no_progress,
            **uncertainty,
        )

    # batch by batch, over the processes of a torchrun launch, each batch kept as it finishes (--resume)
    runs = current().run_batches(sample_batch, args.num_images, args.batch_size)
    if runs is None:  # another process than 0: process 0 writes the output
        return 0
    images, variance, mean, aleatoric, clamped = (
        torch.cat([getattr(r, k) for r in runs]).cpu()
        for k in ("images", "variance", "mean", "aleatoric_variance", "clamped_pixels")
    )
    latent_moments = {k: torch.cat([getattr(r, k) for r in runs]).cpu() for k in LATENT_MOMENTS if hasattr(runs[0], k)}
    sampled = time.perf_counter()

    method, _ = args.aggregation
    rule, rule_params = args.filter
    scores = aggregation.aggregate_many(variance, scores_to_report)
    if getattr(runs[0], FEATURE_ENTROPY, None) is not None:  # a weight-samples run with --features
        scores[FEATURE_ENTROPY] = torch.cat([r.feature_entropy for r in runs]).cpu()
    decision = aggregation.filter_scores(scores[method], rule, **rule_params)
    settings = {
        **described,
        "method": args.method,
        "sampler": args.sampler,
        "steps": args.steps,
        "eta": args.eta,
        **recorded,
        **({"passes": args.passes} if args.method == "mc-dropout" else {}),
        **({"probes": args.probes} if args.method == "hfl" else {}),
        "seed": args.seed,
        "num_images": args.num_images,
        "batch_size": args.batch_size,
        "device": str(device),
        "aggregation": method,
        "filter": rule,
        "filter_params": rule_params,
        "sampler_settings": {k: v for k, v in runs[0].settings.items() if k != "timesteps"},
        "timesteps": runs[0].settings.get("timesteps"),
        "scheduler_config": dict(scheduler.config),
        "scheduler_changes": scheduler_changes,
    }
    timings = {
        "load_s": load_s,
        "sample_s": sampled - started,
        **_model_forwards(runs, args.num_images),
        "score_s": time.perf_counter() - sampled,
    }
    record = RunRecord(
        images,
        variance,
        scores,
        scores_to_report,
        method,
        decision,
        settings,
        timings,
        mean=mean,
        aleatoric_variance=aleatoric,
        clamped_pixels=clamped,
        latent_moments=latent_moments,
    )
    path = write_run(out_dir, record)
    kept, total = len(decision.kept), len(decision.keep)
    _say(f"scored by {method}; filter {rule}: kept {kept} of {total}, removed {total - kept}")
    print(path)
    return 0


def _model_forwards(runs, num_images: int) -> dict:
    """Model calls per image over the run (every sampler of the package records them)."""
    if not all("model_forwards_per_image" in r.timings for r in runs):
        return {}
    return {"model_forwards_per_image": sum(r.timings["model_forwards_per_image"] * len(r.images) for r in runs) / num_images}


def _uncertainty_settings(args):
    """The run's UncertaintySettings from --preset, --method trajectories and the explicit options."""
    from bayesdiff_ext.sampler.settings import resolve_settings

    explicit = {k: getattr(args, k) for k in ("samples", "draws", "uq_every", "mc_samples", "covariance")}
    if args.per_image_draws:
        explicit["shared_draws"] = False
    estimator = "trajectories" if args.method == "trajectories" else None
    if estimator and args.preset == "paper":
        raise ValueError("--method trajectories runs trajectory Monte Carlo; --preset paper is the recurrence")
    settings = resolve_settings(args.preset, estimator=estimator, **explicit)
    # the draws every image shares come from the run's seed, like everything else it draws
    return dataclasses.replace(settings, weight_seed=args.seed) if settings.shared_draws else settings


def _describe_uncertainty(settings) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.describe().items() if v is not None)


def _unet_sampler(args, unet, base_scheduler, method_inputs: dict, settings):
    """(sampler, scheduler, its changes, device, a line on the method) of an unconditional UNet model;
    ``settings`` are the Laplace methods' uncertainty settings (None for the other methods)."""
    from bayesdiff_ext import methods
    from bayesdiff_ext.sampler.schedulers import check_supported

    channels = unet.config.in_channels
    if channels not in (1, 3):
        raise ValueError(
            f"the model makes {channels}-channel samples; the command line writes grey or RGB images only "
            "(a latent model is sampled from its pipeline folder: Stable Diffusion, SDXL, SD3, Flux, "
            "PixArt-Sigma or DiT)"
        )
    device = _device(args.device)
    # weight-samples runs trajectories: any scheduler, clipping and thresholding included
    recurrence = args.method != "weight-samples" and (settings is None or settings.estimator == "recurrence")
    scheduler, scheduler_changes = _scheduler_for(args, base_scheduler, affine=recurrence)
    if recurrence:
        check_supported(scheduler, args.eta)
    scheduler.set_timesteps(args.steps)  # refuses more steps than the model was trained with, before any work
    unet.to(device)
    members = [member.to(device) for member in method_inputs.get("members", ())]
    sampler = methods.sampler_for(
        args.method,
        unet,
        scheduler,
        posterior=method_inputs.get("posterior"),
        members=members,
        passes=args.passes,
        seed=args.seed,
        probes=args.probes if args.method == "hfl" else None,
        last_steps=args.last_steps,
        **(_weight_samples_options(args, channels, device) if args.method == "weight-samples" else {}),
    )
    if settings is not None:
        how = _describe_uncertainty(settings)
    elif args.method in ("weight-samples", "x0-drift"):
        how = _describe_method(args, getattr(sampler, "samples", None))
    else:
        recurrence = f"sampler-noise recurrence every {args.uq_every or 'default'} steps, S {args.mc_samples or 'default'}"
        how = f"{args.passes} dropout passes, {recurrence}" if args.method == "mc-dropout" else (
            f"{len(members) + 1} members, {recurrence}"
        )
    return sampler, scheduler, scheduler_changes, device, how


def _describe_method(args, samples: int | None) -> str:
    """A line on a weight-samples (``samples`` = M) or x0-drift run."""
    if args.method == "weight-samples":
        return f"{samples} head-weight draws fixed per trajectory, entropy in {args.features or 'random_conv'} features"
    return f"variance of the predicted x_0 over the last {args.last_steps} steps"


def _weight_samples_options(args, channels: int, device) -> dict:
    """weight-samples' M and its entropy's feature space (on ``device``), from --samples and --features."""
    from bayesdiff_ext.methods.feature_entropy import ClampedFeatures
    from bayesdiff_ext.metrics import RandomConvFeatures, load_feature_module

    if args.features in (None, "random_conv"):
        extractor = RandomConvFeatures(in_channels=channels, seed=0)
    else:
        extractor = load_feature_module(Path(args.features))
    return dict(samples=args.samples or DEFAULT_WEIGHT_SAMPLES, features=ClampedFeatures(extractor).to(device))


def _pipeline_sampler(args, method_inputs: dict, settings):
    """(sampler, scheduler, its changes, device, a line on the method) of a pipeline folder: the
    pipeline wrapper with the run's conditioning, its own scheduler unless --sampler names one."""
    from bayesdiff_ext import BayesDiffPipeline
    from bayesdiff_ext.pipelines.batch_sampler import PipelineSampler
    from bayesdiff_ext.sampler.schedulers import MULTISTEP, check_supported

    pipe = method_inputs["pipeline"]
    if args.sampler == "ddpm" or args.eta:
        raise ValueError(
            "a pipeline folder is sampled with a deterministic scheduler (its pixel maps have no sampler-noise "
            "part): leave out --sampler ddpm and --eta"
        )
    device = _device(args.device)
    # weight-samples and x0-drift run the scheduler's own step, as the trajectory estimators do
    recurrence = args.method == "laplace" and settings.estimator == "recurrence"
    scheduler, scheduler_changes = _scheduler_for(args, pipe.scheduler, affine=recurrence)
    if recurrence and type(scheduler).__name__ in MULTISTEP:
        raise ValueError(
            f"the model's {type(scheduler).__name__} is a multistep scheduler (each step mixes earlier model "
            "outputs), which the moment recurrence (--preset paper, --uq-every, --mc-samples, --covariance) does "
            "not follow: leave those out for the default preset, trajectory Monte Carlo, which runs the model's own "
            "scheduler, or pass --sampler ddim to swap one in"
        )
    if recurrence:
        check_supported(scheduler, args.eta)
    pipe.scheduler = scheduler
    options: dict = {}
    if args.method == "weight-samples":
        options = dict(_weight_samples_options(args, 3, device), weight_seed=args.seed)  # entropy on decoded RGB
    elif args.method == "x0-drift":
        options = dict(last_steps=args.last_steps)
    wrapper = BayesDiffPipeline.from_pipe(
        pipe.to(device), method_inputs.get("posterior"), method=args.method, **options
    )
    sampler = PipelineSampler(wrapper, _pipeline_conditioning(args, wrapper), decode_samples=args.decode_samples)
    if args.method == "laplace":
        how = f"{_describe_uncertainty(settings)}, pixel maps from {args.decode_samples} decoded latents"
    else:
        how = f"{_describe_method(args, sampler.wrapper.method.samples)}, pixel maps on the decoded images"
    return sampler, scheduler, scheduler_changes, device, how


def _pipeline_conditioning(args, wrapper) -> dict:
    """The stock call's arguments of one image from the pipeline options (the pipeline's own defaults otherwise)."""
    if wrapper.prompted:
        if args.class_label is not None:
            raise ValueError(f"--class-label applies to DiT; {type(wrapper.pipe).__name__} takes --prompt")
        call = {"prompt": args.prompt or ""}
        if getattr(args, "negative_prompt", None) is not None:
            call["negative_prompt"] = args.negative_prompt
    else:
        if args.prompt is not None or getattr(args, "negative_prompt", None) is not None:
            raise ValueError(f"{type(wrapper.pipe).__name__} is class-conditional: pass --class-label, not --prompt")
        if args.class_label is None:
            raise ValueError(f"{type(wrapper.pipe).__name__} is class-conditional: pass --class-label K")
        call = {"class_labels": args.class_label}
    if getattr(args, "guidance_scale", None) is not None:
        call["guidance_scale"] = args.guidance_scale
    call.update(wrapper.command_line_arguments())
    if "height" not in wrapper.stock_arguments():
        if args.height is not None or args.width is not None:
            raise ValueError(f"{type(wrapper.pipe).__name__} makes images of its model's size: leave out --height/--width")
        return call
    height, width = wrapper.default_size()
    return {**call, "height": args.height or height, "width": args.width or width}


def _refuse_pipeline_options(args) -> None:
    """The pipeline options given for a UNet folder: refused, naming the first."""
    for flag in ("prompt", "negative_prompt", "guidance_scale", "class_label", "height", "width"):
        if getattr(args, flag, None) is not None:
            raise ValueError(
                f"--{flag.replace('_', '-')} applies to pipeline folders (Stable Diffusion, SDXL, SD3, Flux, "
                f"PixArt-Sigma, DiT); {args.model} is an unconditional UNet model"
            )


def _posterior_description(posterior, path) -> dict:
    return {
        "posterior": str(path),
        "posterior_inference": getattr(posterior, "inference", "laplace"),
        "posterior_structure": posterior.structure,
        "posterior_curvature": posterior.curvature,
        "sigma_noise": posterior.sigma_noise,
        "prior_precision": posterior.prior_precision,
    }


def _load_posterior(path: Path, unet):
    """The saved posterior on ``unet``'s head. A posterior fitted at other head weights of the same
    shape loads with a warning in the package; here it is an error, because its curvature and
    hyperparameters belong to another model."""
    from bayesdiff_ext.posterior import load_posterior

    if not path.exists():
        raise FileNotFoundError(f"posterior file {path} does not exist (make one with `bayesdiff fit`)")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the head weights differ")
        try:
            return load_posterior(path, unet)
        except UserWarning as mismatch:
            raise ValueError(f"{path} is a posterior for another model: {mismatch}") from None


def _run_demo(args) -> int:
    from bayesdiff_ext import digits

    run_options = _check_run_options(args)
    args.sampler = args.sampler or "ddim"
    started = time.perf_counter()
    root = digits.bundled_dir()
    described = {"command": "demo", "model": "bundled digits (bayesdiff_ext/assets/digits)"}
    inputs: dict = {}
    if args.method == "mc-dropout":
        unet = digits.load_bundled_unet(dropout=True)
        described["model"] += ", unet_dropout/"
    elif args.method == "ensemble":
        members = _ensemble_members(args, root, root / "scheduler")
        unet, inputs["members"] = members[0], members[1:]
        described["ensemble"] = [str(p) for p in args.ensemble] if args.ensemble else "bundled members"
    elif args.method == "x0-drift":
        unet = digits.load_bundled_unet()
    else:
        unet = digits.load_bundled_unet()
        path = root / ("posterior_full.safetensors" if args.method == "hfl" else "posterior_diag.safetensors")
        if not path.is_file():
            structure = "full" if args.method == "hfl" else "diag"
            raise FileNotFoundError(
                f"the bundled posterior {path} is missing; make it with `bayesdiff fit --model "
                f"{root} --data {BUILTIN_DIGITS} --structure {structure} --out {path}`"
            )
        inputs["posterior"] = _load_posterior(path, unet)
        described.update(_posterior_description(inputs["posterior"], path))
    scheduler = digits.load_bundled_scheduler()
    load_s = time.perf_counter() - started
    return _sample_and_write(args, run_options, unet, scheduler, inputs, described, load_s)


def _ensemble_members(args, root: Path, scheduler_dir: Path) -> list:
    """The ``--ensemble`` folders (UNet or pipeline folders; a bare UNet folder is checked against
    ``scheduler_dir``), or else every digits member found in ``root/ensemble/member_K/unet``."""
    from bayesdiff_ext.io.inputs import load_model

    if args.ensemble:
        return [load_model(folder, scheduler_dir)[0] for folder in args.ensemble]
    found = sorted(root.glob("ensemble/member_*/unet/config.json"), key=lambda p: p.parent.parent.name)
    if len(found) < 2:
        raise FileNotFoundError(
            f"the demo's ensemble needs at least 2 members in {root / 'ensemble'} (found {len(found)}); "
            "they are not shipped (4.5 MB each): train them with `python python/train_digits.py "
            "--unet-only --ensemble-member K` for K = 0, 1, 2, or pass UNet folders with --ensemble"
        )
    return [load_model(p.parent, scheduler_dir)[0] for p in found]


def _run_sample(args) -> int:
    from bayesdiff_ext.io.inputs import load_model, pipeline_class

    run_options = _check_run_options(args)
    if pipeline_class(args.model) is not None:
        return _run_pipeline_sample(args, run_options)
    _refuse_pipeline_options(args)
    args.sampler = args.sampler or "ddim"
    laplace = args.method in ("laplace", "trajectories", "hfl", "isotropic", "weight-samples")
    if laplace and args.posterior is None:
        raise ValueError(f"--method {args.method} needs --posterior FILE (made by `bayesdiff fit`)")
    if args.method == "ensemble" and not args.ensemble:
        raise ValueError("--method ensemble needs --ensemble DIR [DIR ...]: the other members' UNet folders")
    started = time.perf_counter()
    unet, scheduler = load_model(args.model, args.scheduler)
    described = {"command": "sample", "model": str(args.model), "scheduler": str(args.scheduler or "")}
    inputs: dict = {}
    if laplace:
        inputs["posterior"] = _load_posterior(args.posterior, unet)
        described.update(_posterior_description(inputs["posterior"], args.posterior))
    if args.method == "ensemble":
        scheduler_dir = args.scheduler or (args.model / "scheduler" if args.model.is_dir() else None)
        inputs["members"] = _ensemble_members(args, args.model, scheduler_dir)
        described["ensemble"] = [str(p) for p in args.ensemble]
    load_s = time.perf_counter() - started
    return _sample_and_write(args, run_options, unet, scheduler, inputs, described, load_s)


def _run_pipeline_sample(args, run_options) -> int:
    """``sample`` on a pipeline folder: the Laplace, weight-samples or x0-drift method through the pipeline's wrapper."""
    from bayesdiff_ext.io.inputs import load_pipeline
    from bayesdiff_ext.pipelines.method import PIPELINE_METHODS

    if args.method not in PIPELINE_METHODS:
        raise ValueError(
            f"--method {args.method} takes unconditional UNet models; a pipeline folder samples --method "
            f"{', '.join(PIPELINE_METHODS)}"
        )
    posterior_needed = args.method != "x0-drift"
    if posterior_needed and args.posterior is None:
        raise ValueError(f"--method {args.method} needs --posterior FILE (made by `bayesdiff fit`)")
    started = time.perf_counter()
    pipe = load_pipeline(args.model)
    described = {
        "command": "sample",
        "model": str(args.model),
        "pipeline": type(pipe).__name__,
        **{k: getattr(args, k) for k in ("prompt", "negative_prompt", "guidance_scale", "class_label", "height", "width")},
        **({"decode_samples": args.decode_samples} if args.method == "laplace" else {}),
    }
    inputs: dict = {"pipeline": pipe}
    if posterior_needed:
        inputs["posterior"] = _load_posterior(args.posterior, getattr(pipe, "unet", None) or pipe.transformer)
        described.update(_posterior_description(inputs["posterior"], args.posterior))
    return _sample_and_write(args, run_options, None, pipe.scheduler, inputs, described, time.perf_counter() - started)


def _fit_images(args, unet):
    from bayesdiff_ext.io.inputs import load_images

    size = unet.config.sample_size
    if not isinstance(size, int):
        if len(set(size)) != 1:
            raise ValueError(f"the model's sample_size {tuple(size)} is not square; fit it from Python")
        size = size[0]
    if args.data == BUILTIN_DIGITS:
        from bayesdiff_ext.digits import load_digits_images

        if unet.config.in_channels != 1:
            raise ValueError(
                f"{BUILTIN_DIGITS} are grey images; the model takes {unet.config.in_channels} channels"
            )
        return load_digits_images(resolution=size)[0]
    if args.data == BUILTIN_PHOTOS:
        from bayesdiff_ext.photos import load_photo_crops

        if unet.config.in_channels != 3:
            raise ValueError(f"{BUILTIN_PHOTOS} are RGB images; the model takes {unet.config.in_channels} channels")
        return load_photo_crops(resolution=size)[0]
    return load_images(args.data, size=size, channels=unet.config.in_channels)


def _fit_posterior(args, unet):
    """The unfitted posterior that ``fit``'s options describe."""
    from bayesdiff_ext import LastLayerLaplace
    from bayesdiff_ext.posterior.inference import INFERENCES as CLASSES

    options = {}
    for dest, (inference, keyword) in INFERENCE_OPTIONS.items():
        value = getattr(args, dest)
        if value is not None:
            if inference != args.inference:
                flag = "--no-bootstrap" if dest == "bootstrap" else "--" + dest.replace("_", "-")
                raise ValueError(f"{flag} applies to --inference {inference}, not {args.inference}")
            options[keyword] = value
    hyperparameters = dict(sigma_noise=args.sigma, prior_precision=args.prior_precision)
    if args.inference == "laplace":
        return LastLayerLaplace(unet, args.structure or "diag", args.curvature or "ggn", **hyperparameters)
    if args.curvature is not None:
        raise ValueError(f"--curvature applies to --inference laplace, not {args.inference}")
    if args.structure is not None:
        if args.inference != "vi" or args.structure not in ("diag", "full"):
            raise ValueError(
                f"--structure {args.structure} does not apply to --inference {args.inference} "
                "(laplace takes any structure, vi diag or full)"
            )
        options["family"] = args.structure
    return CLASSES[args.inference](unet, seed=args.seed, **hyperparameters, **options)


def _run_fit(args) -> int:
    import torch

    from bayesdiff_ext.io.inputs import load_model, pipeline_class

    default_name = (args.structure or "diag") if args.inference == "laplace" else args.inference
    out = (args.out or Path(f"posterior_{default_name}.safetensors")).expanduser().absolute()
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give a file name such as posterior.safetensors")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: folder {out.parent} does not exist")
    if pipeline_class(args.model) is not None:
        return _fit_pipeline(args, out)
    _refuse_pipeline_options(args)
    unet, scheduler = load_model(args.model, args.scheduler)
    posterior = _fit_posterior(args, unet)
    images = _fit_images(args, unet)
    device = _device(args.device)
    unet.to(device)
    what = args.inference
    if args.inference == "laplace":
        what = f"{args.structure or 'diag'}/{args.curvature or 'ggn'} Laplace"
    _say(f"fitting a {what} posterior on {len(images)} images x {args.timesteps_per_image} timestep(s) on {device}")
    posterior.fit(
        images,
        scheduler,
        batch_size=args.batch_size,
        timesteps_per_image=args.timesteps_per_image,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        progress=not args.no_progress,
    )
    return _save_posterior(posterior, out)


def _save_posterior(posterior, out: Path) -> int:
    from bayesdiff_ext.distributed import is_main_process

    if not is_main_process():  # every process of a torchrun launch holds the same posterior
        return 0
    posterior.save(out)
    _say(repr(posterior))
    record = getattr(posterior, "record", {})
    reported = [f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if reported:
        _say(", ".join(reported))
    print(out)
    return 0


def _fit_pipeline(args, out: Path) -> int:
    """``fit`` on a pipeline folder: images encoded by its VAE, conditioned by --prompt/--class-label."""
    import torch

    from bayesdiff_ext import BayesDiffPipeline
    from bayesdiff_ext.io.inputs import load_images, load_pipeline
    from bayesdiff_ext.pipelines import fit_pipeline_posterior

    if args.data == BUILTIN_DIGITS:
        raise ValueError(f"{BUILTIN_DIGITS} are grey 16x16 digits; a pipeline folder is fitted on RGB images (--data)")
    pipe = load_pipeline(args.model)
    posterior = _fit_posterior(args, getattr(pipe, "unet", None) or pipe.transformer)
    conditioning = _pipeline_conditioning(args, BayesDiffPipeline.from_pipe(pipe, posterior))
    default_height, default_width = BayesDiffPipeline.from_pipe(pipe, posterior).default_size()
    height, width = conditioning.pop("height", default_height), conditioning.pop("width", default_width)
    conditioning = {k: v for k, v in conditioning.items() if k in ("prompt", "class_labels")}
    if height != width:
        raise ValueError(f"--height {height} and --width {width} differ: the command line fits square images")
    images = load_images(args.data, size=height, channels=3)
    device = _device(args.device)
    pipe.to(device)
    _say(f"fitting a posterior of {type(pipe).__name__} on {len(images)} images x {args.timesteps_per_image} timestep(s) on {device}")
    fit_pipeline_posterior(
        pipe,
        images.to(device),
        posterior,
        batch_size=args.batch_size,
        timesteps_per_image=args.timesteps_per_image,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        progress=not args.no_progress,
        **conditioning,
    )
    return _save_posterior(posterior, out)


def _run_eval(args) -> int:
    from bayesdiff_ext.cli_session import batch_settings, current
    from bayesdiff_ext.evaluation import EvaluationConfig, run_evaluation
    from bayesdiff_ext.evaluation.cache import cached_settings

    given = {name: getattr(args, name) for name in _EVAL_OPTIONS if getattr(args, name) is not None}
    # With --reuse the cache's settings stand in for the ones not given; a given one that differs is
    # refused by run_evaluation, naming it.
    base = cached_settings(args.out) if args.reuse else {}
    config = EvaluationConfig(
        **{**base, **given}, out_dir=args.out, docs_dir=args.docs, progress=not args.no_progress
    )
    session = current()
    if args.reuse:
        if args.resume:
            raise ValueError("--resume continues a generation and --reuse renders a cached run without one: give one of them")
    else:
        # the generation's batches are kept beside --out (--resume) and shared by torchrun's processes
        session.open_work(batch_settings("eval", _eval_batch_options(config), "cpu"))
    report = run_evaluation(config, reuse=args.reuse, label=args.label, run=session.run_batches)
    if report is not None:  # process 0 writes the report
        print(report)
    return 0


def _eval_batch_options(config) -> dict:
    """The generation settings of an eval, with the files and folders they name as paths (whose
    contents then count, see batch_settings)."""
    files = ("model", "scheduler", "data", "features", "posterior")
    return {
        name: Path(value) if name in files and value is not None and Path(value).expanduser().exists() else value
        for name, value in config.generation().items()
    }


_COMMANDS = {"demo": _run_demo, "sample": _run_sample, "fit": _run_fit, "eval": _run_eval}


def _stopped(session, line: str) -> None:
    """Why the command stopped, on every process; on process 0 also how to resume a sampling run."""
    print(line, file=sys.stderr, flush=True)
    hint = session.resume_hint()
    if hint:
        print(hint, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bayesdiff`` console script (and of ``python -m bayesdiff_ext``, which
    ``torchrun`` launches once per process); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    from bayesdiff_ext.cli_session import CommandSession

    verbosity = diffusers_logging.get_verbosity()
    if not args.debug:
        # diffusers' loading notes (e.g. "install accelerate") would drown the one-line report
        diffusers_logging.set_verbosity_error()
    session = CommandSession(args, argv)
    try:
        with session:
            return _COMMANDS[args.command](args)
    except KeyboardInterrupt as stop:
        _stopped(session, f"bayesdiff: stopped ({stop or 'SIGINT'})")
        return getattr(stop, "exit_code", 130)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(err).split()) or type(err).__name__
        _stopped(session, session.error_line(message))
        return 2 if isinstance(err, BAD_INPUT) else 1
    finally:
        diffusers_logging.set_verbosity(verbosity)


if __name__ == "__main__":
    sys.exit(main())
