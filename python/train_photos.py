#!/usr/bin/env python
"""Train the bundled photo-crops model of bayesdiff_ext (offline, CPU, one thread in ~20 min).

Data: random 16x16 crops of scikit-learn's two sample photos (``bayesdiff_ext.photos``), drawn
afresh for every batch. Trains

1. a crop classifier (``bayesdiff_ext.digits.DigitsClassifier`` with 3 input channels and 8
   classes: photo x quadrant), the evaluation's feature extractor and confidence oracle
   -> ``<out>/classifier.safetensors``, ``classifier_config.json``;
2. a small ``diffusers.UNet2DModel`` noise predictor (epsilon prediction, DDPM loss, AdamW, EMA)
   and its ``DDPMScheduler`` -> ``<out>/unet/``, ``<out>/scheduler/``;
3. the diag last-layer Laplace posterior of its ``conv_out`` on the model's fixed crop set
   (``photos.load_photo_crops()``) -> ``<out>/posterior_diag.safetensors``;
4. ``<out>/training_log.json`` and ``<out>/MODEL_CARD.md``.

Reproduce the bundled assets (from the repository root):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python python/train_photos.py --out bayesdiff_ext/assets/photos

The folder writer, the EMA update and the evaluation loss are those of ``train_digits.py``; every file
is written atomically (``bayesdiff_ext.io.atomic``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from safetensors.torch import save  # noqa: E402
from train_digits import REPO, accuracy, ema_update, eval_loss, human_size, save_folder  # noqa: E402

from bayesdiff_ext import photos  # noqa: E402
from bayesdiff_ext.digits import DigitsClassifier, load_bundled_classifier  # noqa: E402
from bayesdiff_ext.io.atomic import atomic_write  # noqa: E402

COMMAND = "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python python/train_photos.py "
RESOLUTION = 16
UNET_KWARGS = dict(
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
)
SCHEDULER_KWARGS = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False, prediction_type="epsilon"
)
CLASSIFIER_KWARGS = dict(channels=(32, 64), feature_dim=128, num_classes=photos.NUM_CLASSES, in_channels=3)
#: Held-out crops (another seed than the model's data set) for the classifier's test accuracy.
TEST_SEED = 99


def _load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def train_classifier(args, log) -> None:
    started = time.time()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    source = photos.load_photos()
    model = DigitsClassifier(**CLASSIFIER_KWARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.classifier_steps)
    for _ in range(args.classifier_steps):
        x, y = photos.random_crops(source, 64, RESOLUTION, generator)
        x = (x + 0.03 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()
    x_test, y_test = photos.random_crops(source, 2000, RESOLUTION, torch.Generator().manual_seed(TEST_SEED))
    with torch.no_grad():
        probs = model(x_test).softmax(dim=1)
    per_photo = probs.unflatten(1, (2, -1)).sum(dim=2)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(args.out / "classifier.safetensors", save(tensors, metadata={"format": "pt"}))
    config = dict(model.config, resolution=RESOLUTION)
    atomic_write(args.out / "classifier_config.json", json.dumps(config, indent=2) + "\n")
    quantiles = probs.amax(dim=1).quantile(torch.tensor([0.1, 0.25, 0.5])).tolist()
    log["classifier"] = {
        "command": args.command,
        "config": config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args.classifier_steps,
        "batch_size": 64,
        "augmentation": "fresh random crops every batch, Gaussian noise sigma 0.03",
        "test_accuracy": accuracy(model, x_test, y_test),
        "test_photo_accuracy": float((per_photo.argmax(dim=1) == y_test // (photos.NUM_CLASSES // 2)).float().mean()),
        "test_confidence_quantiles_10_25_50": [round(q, 3) for q in quantiles],
        "wall_time_s": round(time.time() - started, 1),
    }
    print(json.dumps(log["classifier"], indent=1), flush=True)


def _lr_at(args, step: int) -> float:
    warmup = min(args.warmup, max(args.steps // 10, 1))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min((step - warmup) / max(args.steps - warmup, 1), 1.0)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def _sample_check(unet, scheduler, classifier, n: int = 64, steps: int = 20, seed: int = 0) -> dict:
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    x = torch.randn((n, 3, RESOLUTION, RESOLUTION), generator=torch.Generator().manual_seed(seed))
    for t in ddim.timesteps:
        x = ddim.step(unet(x, t).sample, t, x).prev_sample
    confidence = classifier(x.clamp(-1, 1)).softmax(dim=1).amax(dim=1)
    return {
        "n": n,
        "ddim_steps": steps,
        "seed": seed,
        "mean_max_softmax": round(float(confidence.mean()), 4),
        "sample_range": [round(float(x.min()), 3), round(float(x.max()), 3)],
    }


def train_unet(args, log) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    started, load_start = time.time(), _load_average()
    torch.manual_seed(args.seed)
    unet = UNet2DModel(sample_size=RESOLUTION, **UNET_KWARGS)
    scheduler = DDPMScheduler(**SCHEDULER_KWARGS)
    ema = copy.deepcopy(unet).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(args.seed)
    source = photos.load_photos()
    deadline = started + args.minutes * 60 if args.minutes > 0 else None
    limit = args.steps if args.stop_after_steps is None else min(args.steps, args.stop_after_steps)
    losses, step, stopped_by_time = [], 0, False
    unet.train()
    while step < limit:
        if deadline is not None and time.time() > deadline:
            stopped_by_time = True
            break
        x0, _ = photos.random_crops(source, args.batch_size, RESOLUTION, generator)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        for group in opt.param_groups:
            group["lr"] = _lr_at(args, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema_update(ema, unet, min(args.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            print(f"step {step}: loss {np.mean(losses[-100:]):.4f}, {time.time() - started:.0f} s", flush=True)
    wall = time.time() - started
    save_folder(lambda tmp: ema.save_pretrained(str(tmp), safe_serialization=True), args.out / "unet")
    save_folder(lambda tmp: scheduler.save_pretrained(str(tmp)), args.out / "scheduler")
    data, _ = photos.load_photo_crops(resolution=RESOLUTION)
    reproduce = args.command
    if stopped_by_time:
        reproduce = COMMAND + shlex.join(
            _without_time_cap(args.argv) + ["--minutes", "0", "--stop-after-steps", str(step)]
        )
    log["unet"] = {
        "command": args.command,
        "reproduce_exact": reproduce,
        "architecture": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_KWARGS.items()},
        "sample_size": RESOLUTION,
        "scheduler": SCHEDULER_KWARGS,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "steps_requested": args.steps,
        "steps": step,
        "stopped_by_time_cap": stopped_by_time,
        "batch_size": args.batch_size,
        "optimizer": f"AdamW(lr={args.lr}, weight_decay=0.0001), warmup {min(args.warmup, max(args.steps // 10, 1))} "
        f"steps, cosine decay to {args.min_lr_ratio}*lr, grad-norm clip 1.0",
        "ema_decay": args.ema_decay,
        "final_train_loss_last200": float(np.mean(losses[-200:])) if losses else None,
        "eval_loss_ema": eval_loss(ema, scheduler, data, args.seed),
        "eval_loss_raw": eval_loss(unet.eval(), scheduler, data, args.seed),
        "wall_time_s": round(wall, 1),
        "steps_per_s": round(step / max(wall, 1e-9), 3),
        "threads": torch.get_num_threads(),
        "load_average_start_end": [load_start, _load_average()],
        "sample_check": _sample_check(ema, scheduler, load_bundled_classifier(root=args.out)),
    }
    print(json.dumps({k: log["unet"][k] for k in ("steps", "eval_loss_ema", "wall_time_s")}), flush=True)


def _without_time_cap(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--minutes", "--stop-after-steps"):
            skip = True
        else:
            out.append(a)
    return out


def fit_posterior(args, log) -> None:
    from bayesdiff_ext import LastLayerLaplace
    from bayesdiff_ext.digits import load_bundled_scheduler, load_bundled_unet

    started = time.time()
    unet = load_bundled_unet(root=args.out)
    images, _ = photos.load_photo_crops(resolution=RESOLUTION)
    posterior = LastLayerLaplace(unet, "diag").fit(
        images, load_bundled_scheduler(root=args.out), batch_size=64,
        generator=torch.Generator().manual_seed(args.seed), progress=False,
    )
    posterior.save(args.out / "posterior_diag.safetensors")
    log["posterior_diag"] = {
        "command": f"HF_HUB_OFFLINE=1 bayesdiff fit --model {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out} "
        "--data builtin:photos --out posterior_diag.safetensors",
        "images": len(images),
        "structure": posterior.structure,
        "curvature": posterior.curvature,
        "sigma_noise": posterior.sigma_noise,
        "prior_precision": posterior.prior_precision,
        "wall_time_s": round(time.time() - started, 1),
    }


CARD_NOTE = "<!-- generated by python/train_photos.py from training_log.json -->"


def write_card(out: Path, log: dict) -> None:
    u, c, p = log["unet"], log["classifier"], log.get("posterior_diag")
    a = u["architecture"]
    check = u.get("sample_check") or {}
    files = [
        f"| `{f.relative_to(out)}` | {human_size(f.stat().st_size)} |"
        for f in sorted(out.rglob("*"))
        if f.is_file() and not f.name.startswith(".") and f.name != "MODEL_CARD.md"
    ]
    env = log["env"]
    lines = [
        CARD_NOTE,
        "# Bundled photo-crops model (bayesdiff_ext)",
        "",
        "## Data",
        "",
        "scikit-learn `load_sample_images()` (two 427x640 RGB photos, `china.jpg` and `flower.jpg`, shipped "
        f"inside scikit-learn, no download), each shrunk by {photos.DOWNSCALE} (antialiased bilinear, 107x160) and "
        f"cut into random {RESOLUTION}x{RESOLUTION} crops in [-1, 1]: `bayesdiff_ext.photos`. Training draws fresh "
        "crops for every batch; the model's fixed data set (posterior fit, the evaluation's real images) is "
        "`photos.load_photo_crops()` (2000 crops, seed 0). Class of a crop: the photo and the quadrant of "
        f"its centre ({photos.NUM_CLASSES} classes). Unlike digits: colour, textures and smooth regions "
        "(sky, blurred background) instead of grey strokes on black.",
        "",
        "## Noise predictor (`unet/`)",
        "",
        f"* `diffusers.UNet2DModel`, 3 channels, sample_size {u['sample_size']}, block_out_channels "
        f"{tuple(a['block_out_channels'])}, layers_per_block {a['layers_per_block']}, down {tuple(a['down_block_types'])}, "
        f"up {tuple(a['up_block_types'])}, norm groups {a['norm_num_groups']}, attention head dim "
        f"{a['attention_head_dim']}. Head: `conv_out` Conv2d({a['block_out_channels'][0]} -> 3, 3x3, padding 1).",
        f"* Parameters: {u['parameters']:,}.",
        f"* Scheduler (`scheduler/`): `DDPMScheduler` {u['scheduler']}.",
        f"* Training: epsilon-MSE DDPM loss, uniform t, {u['steps']} steps (requested {u['steps_requested']}"
        f"{', stopped by the time cap' if u['stopped_by_time_cap'] else ''}) of batch {u['batch_size']}, "
        f"{u['optimizer']}; saved weights: EMA (decay {u['ema_decay']}); seed {log['seed']}.",
        f"* Final training loss (last 200 steps): {u['final_train_loss_last200']:.4f}; eval loss on the fixed crop "
        f"set (fixed noise/t): EMA {u['eval_loss_ema']:.4f}, raw {u['eval_loss_raw']:.4f}.",
        f"* Wall time: {u['wall_time_s']:.0f} s ({u['steps_per_s']:.2f} steps/s), {u['threads']} CPU thread(s), "
        f"load average at start and end {u['load_average_start_end']} (shared 2-core machine: an upper bound).",
    ]
    if check:
        lines.append(
            f"* Sample check: {check['n']} DDIM samples ({check['ddim_steps']} steps, seed {check['seed']}): "
            f"classifier mean max-softmax {check['mean_max_softmax']:.3f}, range {check['sample_range']}."
        )
    lines += [
        f"* Command: `{u['command']}`",
        f"* Reproduce exactly: `{u['reproduce_exact']}`",
        "",
        "## Classifier / feature extractor (`classifier.safetensors`, `classifier_config.json`)",
        "",
        f"* `bayesdiff_ext.digits.DigitsClassifier` with 3 input channels and {photos.NUM_CLASSES} classes "
        f"({c['parameters']:,} parameters); `features(x)` (128-d) is the evaluation's feature space.",
        f"* Training: {c['steps']} steps of batch {c['batch_size']}, AdamW + one-cycle LR, {c['augmentation']}.",
        f"* Held-out crops (seed {TEST_SEED}, 2000): accuracy {c['test_accuracy']:.3f} over the "
        f"{photos.NUM_CLASSES} classes, {c['test_photo_accuracy']:.3f} for the photo alone; max-softmax "
        f"quantiles (10%, 25%, 50%) {c['test_confidence_quantiles_10_25_50']}: smooth crops (sky, blurred "
        "background) belong to several quadrants, so a low confidence often means an ambiguous crop, not a bad "
        "one; the evaluation's primary quality oracle for this model is therefore the k-NN realism score.",
        f"* Wall time {c['wall_time_s']:.0f} s.",
        "",
    ]
    if p:
        lines += [
            "## Bundled posterior (`posterior_diag.safetensors`)",
            "",
            f"* Last-layer Laplace on `conv_out`, {p['structure']}/{p['curvature']}, fitted on the "
            f"{p['images']} crops of the data set (one timestep and noise per crop, seed {log['seed']}): "
            f"sigma_noise {p['sigma_noise']:.4g} (maximum likelihood), prior precision {p['prior_precision']:.4g} "
            f"(MacKay). Wall time {p['wall_time_s']:.0f} s.",
            f"* Refit: `{p['command']}`",
            "",
        ]
    lines += [
        "## Reproduce",
        "",
        f"`{u['reproduce_exact']}` (from the repository root). CPU training is deterministic up to "
        "floating-point summation order for a fixed thread count.",
        "",
        f"Environment: torch {env['torch']}, diffusers {env['diffusers']}, scikit-learn {env['sklearn']}, "
        f"Python {env['python']}.",
        "",
        "## Files",
        "",
        "| file | size |",
        "|---|---|",
        *files,
        "",
    ]
    atomic_write(out / "MODEL_CARD.md", "\n".join(lines))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "bayesdiff_ext" / "assets" / "photos", help="output folder")
    p.add_argument("--steps", type=int, default=4000, help="UNet optimisation steps (the LR schedule's length)")
    p.add_argument("--minutes", type=float, default=17.0, help="wall-time cap of the UNet loop (0: none)")
    p.add_argument("--stop-after-steps", type=int, default=None, metavar="K", help="stop the UNet loop after K steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--classifier-steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.command = COMMAND + shlex.join(args.argv)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    import diffusers
    import sklearn

    log = {
        "seed": args.seed,
        "env": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "sklearn": sklearn.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
    }
    train_classifier(args, log)
    train_unet(args, log)
    fit_posterior(args, log)
    atomic_write(args.out / "training_log.json", json.dumps(log, indent=2) + "\n")
    write_card(args.out, log)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
