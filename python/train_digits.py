#!/usr/bin/env python
"""Train the bundled digits model of bayesdiff_ext (offline, CPU).

Trains, on scikit-learn's digits upsampled to 16x16 in [-1, 1]:

1. a small ``diffusers.UNet2DModel`` noise predictor (epsilon prediction, DDPM loss, AdamW,
   EMA of the weights) and its ``DDPMScheduler``  -> ``<out>/unet/``, ``<out>/scheduler/``;
2. a small CNN classifier (``bayesdiff_ext.digits.DigitsClassifier``) with a held-out split,
   used as the quality oracle and FID feature extractor -> ``<out>/classifier.safetensors``;
3. ``<out>/MODEL_CARD.md`` and ``<out>/training_log.json``.

Variants: ``--dropout P`` trains an MC-dropout UNet into ``<out>/unet_dropout/``;
``--ensemble-member K`` trains another UNet with seed ``seed + K`` into
``<out>/ensemble/member_K/unet``. ``--unet-only`` / ``--classifier-only`` train one part; the
log and the model card keep the other parts' entries.

Reproduce the bundled assets (from the repository root):

    python python/train_digits.py --out bayesdiff_ext/assets/digits

All files are written atomically (``bayesdiff_ext.io.atomic``: a temporary file or folder in the
same directory, then ``os.replace``).
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
from safetensors.torch import save  # noqa: E402

from bayesdiff_ext import digits  # noqa: E402  (the package root is light: no compiled extension needed)
from bayesdiff_ext.io.atomic import atomic_directory, atomic_write  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# Architecture of the bundled UNet (1.1 M parameters; batch-64 forward ~55 ms on 2 CPU cores).
UNET_KWARGS = dict(
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
)
SCHEDULER_KWARGS = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    clip_sample=False,
    prediction_type="epsilon",
)
CLASSIFIER_KWARGS = dict(channels=(32, 64), feature_dim=128)


def save_folder(save_fn, dest: Path) -> None:
    """``save_fn(folder)`` writes a folder that then replaces ``dest`` whole."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(dest, replace=True) as folder:
        save_fn(folder)


# --------------------------------------------------------------------------------------------
# classifier
# --------------------------------------------------------------------------------------------
def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift] (background fill)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    return out


@torch.no_grad()
def accuracy(model, x, y, batch=512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
    return correct / max(len(x), 1)


def train_classifier(args, x, y, log) -> dict:
    from sklearn.model_selection import train_test_split

    t0 = time.time()
    torch.manual_seed(args.seed)
    idx = np.arange(len(x))
    tr, te = train_test_split(idx, test_size=args.test_fraction, random_state=args.seed, stratify=y.numpy())
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
    model = digits.DigitsClassifier(**CLASSIFIER_KWARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(xtr) / 64)
    total = args.classifier_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=total)
    gen = torch.Generator().manual_seed(args.seed)
    from tqdm.auto import tqdm

    bar = tqdm(range(args.classifier_epochs), desc="classifier", mininterval=2.0)
    for _epoch in bar:
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        losses = []
        for i in range(0, len(xtr), 64):
            b = perm[i : i + 64]
            xb = random_shift(xtr[b], 1, gen)
            xb = (xb + 0.05 * torch.randn(xb.shape, generator=gen)).clamp(-1, 1)
            loss = F.cross_entropy(model(xb), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
    test_acc = accuracy(model, xte, yte)
    train_acc = accuracy(model, xtr, ytr)
    all_acc = accuracy(model, x, y)
    sd = model.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    atomic_write(args.out / "classifier.safetensors", save(tensors, metadata={"format": "pt"}))
    cfg = dict(model.config, resolution=args.resolution)
    atomic_write(args.out / "classifier_config.json", json.dumps(cfg, indent=2) + "\n")
    entry = {
        "command": args.command,
        "architecture": "`bayesdiff_ext.digits.DigitsClassifier`: 2x(conv3x3,ReLU) -> maxpool -> "
        "2x(conv3x3,ReLU) -> avgpool 4x4 -> Linear(1024,128),ReLU [features] -> Linear(128,10)",
        "config": cfg,
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": args.classifier_epochs,
        "augmentation": "random integer shifts of +-1 px, Gaussian noise sigma 0.05",
        "split": {"train": len(tr), "test": len(te), "stratified": True, "seed": args.seed},
        "final_train_loss": float(np.mean(losses)),
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "all_images_accuracy": all_acc,
        "wall_time_s": round(time.time() - t0, 1),
    }
    print(f"classifier: test accuracy {test_acc:.4f} (train {train_acc:.4f}, all {all_acc:.4f})", flush=True)
    log["classifier"] = entry
    return entry


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema, model, decay):
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm.detach(), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(bm)


@torch.no_grad()
def eval_loss(unet, scheduler, x, seed, batch=256) -> float:
    """Mean epsilon-MSE over the whole dataset with fixed noise and timesteps (deterministic)."""
    unet.eval()
    gen = torch.Generator().manual_seed(seed + 12345)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    total = 0.0
    for i in range(0, len(x), batch):
        xt = scheduler.add_noise(x[i : i + batch], noise[i : i + batch], t[i : i + batch])
        pred = unet(xt, t[i : i + batch]).sample
        total += F.mse_loss(pred, noise[i : i + batch], reduction="sum").item()
    return total / x.numel()


@torch.no_grad()
def sample_quality(unet, scheduler, classifier_dir: Path, n=64, steps=50, seed=0) -> dict | None:
    """DDIM-sample ``n`` images and score them with the bundled classifier (if present)."""
    from diffusers import DDIMScheduler

    if not (classifier_dir / "classifier.safetensors").is_file():
        return None
    clf = digits.load_bundled_classifier(root=classifier_dir)
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    unet.eval()
    gen = torch.Generator().manual_seed(seed)
    r = unet.config.sample_size
    xt = torch.randn((n, 1, r, r), generator=gen)
    t0 = time.time()
    for t in ddim.timesteps:
        eps = unet(xt, t).sample
        xt = ddim.step(eps, t, xt).prev_sample
    dt = time.time() - t0
    conf = torch.softmax(clf(xt.clamp(-1, 1)), 1).max(1)
    counts = torch.bincount(conf.indices, minlength=10).tolist()
    return {
        "n": n,
        "ddim_steps": steps,
        "seed": seed,
        "sampling_time_s": round(dt, 2),
        "mean_max_softmax": round(conf.values.mean().item(), 4),
        "frac_confidence_gt_0.9": round((conf.values > 0.9).float().mean().item(), 4),
        "predicted_class_counts": counts,
        "sample_range": [round(xt.min().item(), 3), round(xt.max().item(), 3)],
    }


@torch.no_grad()
def time_forward(unet, r, batch=64, reps=10) -> float:
    unet.eval()
    x = torch.randn(batch, 1, r, r)
    t = torch.full((batch,), 500)
    for _ in range(2):
        unet(x, t)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        unet(x, t)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.min(times))


def exact_command(args, steps_done: int) -> str:
    """The command that repeats a run the time cap stopped: no cap, stop after ``steps_done``."""
    argv, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
            continue
        if a in ("--minutes", "--stop-after-steps"):
            skip = True
            continue
        if a.startswith(("--minutes=", "--stop-after-steps=")):
            continue
        argv.append(a)
    argv += ["--minutes", "0", "--stop-after-steps", str(steps_done)]
    return "HF_HUB_OFFLINE=1 python python/train_digits.py " + shlex.join(argv)


def unet_variant(args):
    """(seed, destination folder, log key) of the UNet selected by the arguments."""
    if args.ensemble_member is not None:
        k = int(args.ensemble_member)
        return args.seed + k, args.out / "ensemble" / f"member_{k}" / "unet", f"ensemble_member_{k}"
    if args.dropout > 0:
        return args.seed, args.out / "unet_dropout", "unet_dropout"
    return args.seed, args.out / "unet", "unet"


def evaluate_unet(args, x, log) -> dict:
    """Re-measure a saved UNet (forward time, eval loss, sample quality) and update its log entry."""
    from diffusers import DDPMScheduler, UNet2DModel

    seed, dest, key = unet_variant(args)
    if key not in log:
        raise SystemExit(f"no training-log entry '{key}' in {args.out / 'training_log.json'}; train it first")
    unet = UNet2DModel.from_pretrained(str(dest), local_files_only=True).eval()
    scheduler = DDPMScheduler.from_pretrained(str(args.out / "scheduler"), local_files_only=True)
    entry = log[key]
    fwd, fwd_min = time_forward(unet, args.resolution, reps=30)
    entry["forward_batch64_s"], entry["forward_batch64_min_s"] = round(fwd, 4), round(fwd_min, 4)
    entry["eval_loss_ema" if entry.get("saved_weights") == "EMA" else "eval_loss_raw"] = eval_loss(
        unet, scheduler, x, args.seed
    )
    entry["sample_quality"] = sample_quality(unet, scheduler, args.out, seed=args.seed)
    entry["evaluation"] = {
        "command": args.command,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "threads": torch.get_num_threads(),
    }
    print(json.dumps({k: entry[k] for k in ("forward_batch64_s", "sample_quality")}, indent=1), flush=True)
    return entry


def train_unet(args, x, log) -> dict:
    from diffusers import DDPMScheduler, UNet2DModel
    from tqdm.auto import tqdm

    seed, dest, key = unet_variant(args)
    load_start = [round(v, 2) for v in os.getloadavg()]

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=args.resolution, dropout=args.dropout, **UNET_KWARGS)
    scheduler = DDPMScheduler(**SCHEDULER_KWARGS)
    ema = copy.deepcopy(unet).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = min(args.warmup, max(args.steps // 10, 1))

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        prog = (step - warmup) / max(args.steps - warmup, 1)
        return args.lr * (
            args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0)))
        )

    gen = torch.Generator().manual_seed(seed)
    T = scheduler.config.num_train_timesteps
    n = len(x)
    perm, pos = torch.randperm(n, generator=gen), 0
    losses = []
    t_start = time.time()
    deadline = t_start + args.minutes * 60 if args.minutes and args.minutes > 0 else None
    stopped_by_time = False
    bar = tqdm(range(args.steps), desc=key, mininterval=args.progress_interval)
    step = 0
    for step in bar:
        if deadline is not None and time.time() > deadline:
            stopped_by_time = True
            break
        if args.stop_after_steps is not None and step >= args.stop_after_steps:
            break
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        b = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        x0 = x[b]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, T, (len(b),), generator=gen)
        xt = scheduler.add_noise(x0, noise, t)
        unet.train()
        loss = F.mse_loss(unet(xt, t).sample, noise)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema_update(ema, unet, min(args.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}", lr=f"{lr_at(step):.1e}")
    else:
        step = args.steps
    steps_done = step
    bar.close()
    wall = time.time() - t_start
    final_model = ema if args.ema_decay > 0 else unet
    final_model.eval()

    def save(tmp):
        final_model.save_pretrained(str(tmp), safe_serialization=True)

    save_folder(save, dest)
    save_folder(lambda tmp: scheduler.save_pretrained(str(tmp)), args.out / "scheduler")

    ev_ema = eval_loss(ema, scheduler, x, args.seed)
    ev_raw = eval_loss(unet, scheduler, x, args.seed)
    fwd, fwd_min = time_forward(final_model, args.resolution)
    quality = sample_quality(final_model, scheduler, args.out, seed=args.seed)
    entry = {
        "command": args.command,
        "path": str(dest.relative_to(args.out)),
        "seed": seed,
        "architecture": {
            "class": "diffusers.UNet2DModel",
            "sample_size": args.resolution,
            "dropout": args.dropout,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in UNET_KWARGS.items()},
        },
        "scheduler": SCHEDULER_KWARGS,
        "parameters": n_params,
        "steps_requested": args.steps,
        "steps": steps_done,
        "stopped_by_time_cap": stopped_by_time,
        "reproduce_exact": exact_command(args, steps_done) if stopped_by_time else args.command,
        "load_average_start_end": [load_start, [round(v, 2) for v in os.getloadavg()]],
        "batch_size": args.batch_size,
        "epochs": round(steps_done * args.batch_size / n, 1),
        "optimizer": f"AdamW(lr={args.lr}, weight_decay={args.weight_decay}), warmup {warmup} steps, "
        f"cosine decay to {args.min_lr_ratio}*lr, grad-norm clip 1.0",
        "ema_decay": args.ema_decay,
        "saved_weights": "EMA" if args.ema_decay > 0 else "raw",
        "final_train_loss_last200": float(np.mean(losses[-200:])) if losses else None,
        "eval_loss_ema": ev_ema,
        "eval_loss_raw": ev_raw,
        "wall_time_s": round(wall, 1),
        "steps_per_s": round(steps_done / max(wall, 1e-9), 3),
        "forward_batch64_s": round(fwd, 4),
        "forward_batch64_min_s": round(fwd_min, 4),
        "sample_quality": quality,
    }
    print(
        json.dumps(
            {
                k: entry[k]
                for k in (
                    "steps",
                    "final_train_loss_last200",
                    "eval_loss_ema",
                    "wall_time_s",
                    "forward_batch64_s",
                    "sample_quality",
                )
            },
            indent=1,
        ),
        flush=True,
    )
    log[key] = entry
    return entry


# --------------------------------------------------------------------------------------------
# model card
# --------------------------------------------------------------------------------------------
CARD_BEGIN = (
    "<!-- generated by python/train_digits.py from training_log.json; edits above the END marker are lost -->"
)
CARD_END = "<!-- END generated part: what follows is hand-written and kept by python/train_digits.py -->"


def human_size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def write_card(out: Path, log: dict) -> None:
    lines = ["# Bundled digits model (bayesdiff_ext)", ""]
    data = log.get("data", {})
    lines += [
        "## Data",
        "",
        f"scikit-learn `load_digits` ({data.get('n_images', 1797)} grey 8x8 images, values 0..16, shipped "
        "inside scikit-learn, no download). Scaled linearly to [-1, 1] (0 -> -1, 16 -> 1) and upsampled to "
        f"{data.get('resolution', 16)}x{data.get('resolution', 16)} with bilinear interpolation "
        "(`align_corners=False`): `bayesdiff_ext.digits.load_digits_images`. No flips (digits are not "
        "symmetric). The UNet is trained on all images.",
        "",
    ]

    def order(k):
        return (0, 0) if k == "unet" else (1, 0) if k.startswith("unet_") else (2, int(k.rsplit("_", 1)[1]))

    variants = sorted((k for k in log if k.startswith(("unet_", "ensemble_member_"))), key=order)
    for key in [k for k in ("unet",) if k in log] or variants[:1]:
        e = log[key]
        a = e["architecture"]
        q = e.get("sample_quality") or {}
        title = {
            "unet": "Noise predictor (`unet/`)",
            "unet_dropout": "MC-dropout noise predictor (`unet_dropout/`)",
        }.get(key, f"Ensemble member (`{e['path']}/`)")
        threads = log.get("env", {}).get("threads", "?")
        stop_note = ", stopped by the time cap" if e["stopped_by_time_cap"] else ""
        fwd_min = e.get("forward_batch64_min_s")
        fwd_min = f", min {fwd_min * 1000:.0f} ms" if fwd_min is not None else ""
        ev = e.get("evaluation")
        ev_note = f" (re-measured by `{ev['command']}` at load average {ev['load_average']})" if ev else ""
        lines += [
            f"## {title}",
            "",
            f"* `diffusers.UNet2DModel`, 1 channel, sample_size {a['sample_size']}, block_out_channels "
            f"{tuple(a['block_out_channels'])}, layers_per_block {a['layers_per_block']}, "
            f"down {tuple(a['down_block_types'])}, up {tuple(a['up_block_types'])}, "
            f"norm groups {a['norm_num_groups']}, attention head dim {a['attention_head_dim']}, "
            f"dropout {a['dropout']}. Head: the standard `conv_out` "
            f"Conv2d({a['block_out_channels'][0]} -> 1, 3x3, padding 1) on SiLU(GroupNorm(h)).",
            f"* Parameters: {e['parameters']:,}.",
            f"* Scheduler (`scheduler/`): `DDPMScheduler` {e['scheduler']} (epsilon prediction).",
            f"* Training: epsilon-MSE DDPM loss, uniform t, {e['steps']} steps "
            f"(requested {e['steps_requested']}{stop_note}) of batch {e['batch_size']} "
            f"(~{e['epochs']} epochs), {e['optimizer']}; saved weights: {e['saved_weights']} "
            f"(decay {e['ema_decay']}); seed {e['seed']}.",
            f"* Final training loss (mean of the last 200 steps): {e['final_train_loss_last200']:.4f}; "
            f"full-data eval loss (fixed noise/t) EMA {e['eval_loss_ema']:.4f}, "
            f"raw {e['eval_loss_raw']:.4f}.",
            f"* Wall time: {e['wall_time_s']:.0f} s ({e['steps_per_s']:.2f} steps/s), {threads} CPU threads "
            f"(load average at start and end: {e.get('load_average_start_end', '?')}; "
            "the machine was shared, so this is an upper bound).",
            f"* Forward of a batch of 64 (eval, CPU): median {e['forward_batch64_s'] * 1000:.0f} ms"
            f"{fwd_min}{ev_note}." + (f" {e['forward_note']}" if e.get("forward_note") else ""),
        ]
        if q:
            lines.append(
                f"* Sample check: {q['n']} DDIM samples ({q['ddim_steps']} steps, seed {q['seed']}, "
                f"{q['sampling_time_s']} s): classifier mean max-softmax {q['mean_max_softmax']:.3f}, "
                f"fraction with confidence > 0.9: {q['frac_confidence_gt_0.9']:.3f}, predicted class counts "
                f"{q['predicted_class_counts']}."
            )
        lines += [f"* Command: `{e['command']}`"]
        if e.get("stopped_by_time_cap"):
            lines += [f"* Reproduce exactly (same LR schedule, same last step): `{e['reproduce_exact']}`"]
        lines += [""]
    if variants:
        lines += [
            "## UNet variants (summary of `training_log.json`)",
            "",
            "| log key | folder | dropout | seed | steps x batch | eval loss (EMA) | sample mean max-softmax "
            "| conf > 0.9 | reproduce |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key in variants:
            e = log[key]
            q = e.get("sample_quality") or {}
            lines.append(
                f"| `{key}` | `{e['path']}/` | {e['architecture']['dropout']} | {e['seed']} | "
                f"{e['steps']} x {e['batch_size']} | {e['eval_loss_ema']:.4f} | "
                f"{q.get('mean_max_softmax', float('nan')):.3f} | "
                f"{q.get('frac_confidence_gt_0.9', float('nan')):.3f} "
                f"| `{e.get('reproduce_exact', e['command'])}` |"
            )
        lines += [""]
    if "classifier" in log:
        c = log["classifier"]
        split = c["split"]
        lines += [
            "## Classifier / feature extractor (`classifier.safetensors`, `classifier_config.json`)",
            "",
            f"* {c['architecture']}. "
            f"{c['parameters']:,} parameters. `features(x)` (128-d) is the default FID/CMMD feature "
            "extractor for this model; no batch norm or dropout, so it is deterministic given the weights.",
            f"* Training: {c['epochs']} epochs, AdamW + one-cycle LR, {c['augmentation']}; stratified split "
            f"{split['train']} train / {split['test']} test (seed {split['seed']}).",
            f"* Accuracy: held-out test {c['test_accuracy']:.4f}, train {c['train_accuracy']:.4f}, "
            f"all images {c['all_images_accuracy']:.4f}. Wall time {c['wall_time_s']:.0f} s.",
            f"* Reproduce: `{c['command']}`",
            "",
        ]
    files = []
    for p in sorted(out.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and p.name != "MODEL_CARD.md":
            files.append(f"| `{p.relative_to(out)}` | {human_size(p.stat().st_size)} |")
    env = log.get("env", {})
    lines += [
        "## Reproduce",
        "",
        "```",
        (log.get("unet") or {}).get("reproduce_exact")
        or "HF_HUB_OFFLINE=1 python python/train_digits.py --out bayesdiff_ext/assets/digits",
        "```",
        "",
        "(run from the repository root; the command of each part is listed above). CPU training is "
        "deterministic up to floating-point summation order for a fixed thread count; a `--minutes` cap "
        "makes the number of steps depend on the machine, which `--stop-after-steps` pins.",
        "",
        f"Environment: torch {env.get('torch')}, diffusers {env.get('diffusers')}, scikit-learn "
        f"{env.get('sklearn')}, Python {env.get('python')}, {env.get('threads')} threads.",
        "",
        "## Files",
        "",
        "| file | size |",
        "|---|---|",
        *files,
        "",
    ]
    card = out / "MODEL_CARD.md"
    tail = ""
    if card.is_file():
        old = card.read_text()
        if CARD_END in old:
            tail = old.split(CARD_END, 1)[1].lstrip("\n")
    text = "\n".join([CARD_BEGIN, *lines, CARD_END, ""]) + ("\n" + tail if tail else "")
    atomic_write(card, text)


# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--out", type=Path, default=REPO / "bayesdiff_ext" / "assets" / "digits", help="output folder"
    )
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000, help="UNet optimisation steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--ema-decay", type=float, default=0.999, help="0 disables EMA")
    p.add_argument("--minutes", type=float, default=28.0, help="wall-time cap for the UNet loop (0: none)")
    p.add_argument(
        "--stop-after-steps",
        type=int,
        default=None,
        metavar="K",
        help="stop the UNet loop after K steps while keeping the LR schedule of --steps "
        "(reproduces a run that the time cap stopped)",
    )
    p.add_argument(
        "--evaluate-only",
        action="store_true",
        help="re-measure the saved UNet (forward time, eval loss, samples) and update log + card",
    )
    p.add_argument("--classifier-epochs", type=int, default=40)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--classifier-only", action="store_true")
    p.add_argument("--unet-only", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0, help="UNet dropout; > 0 saves into unet_dropout/")
    p.add_argument(
        "--ensemble-member",
        type=int,
        default=None,
        metavar="K",
        help="train with seed+K into ensemble/member_K/unet",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--progress-interval", type=float, default=10.0, help="tqdm mininterval (s)")
    args = p.parse_args(argv)
    if args.classifier_only and args.unet_only:
        p.error("--classifier-only and --unet-only are exclusive")
    if args.dropout and args.ensemble_member is not None:
        p.error("--dropout and --ensemble-member are exclusive")
    if not 0.0 <= args.dropout < 1.0:
        p.error("--dropout must be in [0, 1)")
    if (args.dropout > 0 or args.ensemble_member is not None) and args.classifier_only:
        p.error("--dropout / --ensemble-member train a UNet; drop --classifier-only")
    argv_list = sys.argv[1:] if argv is None else list(argv)
    args.argv = argv_list
    args.command = "HF_HUB_OFFLINE=1 python python/train_digits.py " + shlex.join(argv_list)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "training_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    import diffusers
    import sklearn

    log["env"] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    x, y = digits.load_digits_images(args.resolution)
    log["data"] = {
        "source": "sklearn.datasets.load_digits",
        "n_images": len(x),
        "resolution": args.resolution,
        "range": [-1.0, 1.0],
        "upsampling": "bilinear, align_corners=False",
    }
    variant = args.dropout > 0 or args.ensemble_member is not None
    if args.evaluate_only:
        evaluate_unet(args, x, log)
        atomic_write(log_path, json.dumps(log, indent=2) + "\n")
        write_card(args.out, log)
        print(f"updated {log_path}", flush=True)
        return
    if not args.unet_only and not variant:
        train_classifier(args, x, y, log)
        atomic_write(log_path, json.dumps(log, indent=2) + "\n")
    if not args.classifier_only:
        train_unet(args, x, log)
    atomic_write(log_path, json.dumps(log, indent=2) + "\n")
    write_card(args.out, log)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
