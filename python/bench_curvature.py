"""Benchmark of the curvature accumulators (CPU) against the eager computation they replace, which
unfolds the whole batch (as BayesDiff's fit and laplace-torch's backends do).

Shape: a CelebA-like head, B=8 images of 128 feature channels at 64×64, a 3×3 conv to 3 channels
(padding 1). Time: median of repeats after warm-up. Memory: the unfold held by the eager path,
analytically, and the rise of the process's peak RSS measured for each method in a fresh process.

Run: .venv/bin/python python/bench_curvature.py   (writes the `bench_curvature` section of BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_timing import markdown_table, write_section

import bayesdiff_ext
from bayesdiff_ext import ops

BATCH, C_IN, C_OUT, SIZE, KERNEL, PADDING = 8, 128, 3, 64, 3, 1
MIB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")


def eager_diag_ggn(phi, residual):
    patches = F.unfold(phi, KERNEL, padding=PADDING)  # (N, D, P): the whole batch unfolded
    return (patches * patches).sum((0, 2)).view(C_IN, KERNEL, KERNEL)


def eager_diag_ef(phi, residual):
    patches = F.unfold(phi, KERNEL, padding=PADDING)
    per_image_gradient = torch.bmm(residual.flatten(2), patches.transpose(1, 2))  # (N, C, D)
    return (per_image_gradient * per_image_gradient).sum(0).view(C_OUT, C_IN, KERNEL, KERNEL)


def eager_patch_gram(phi, residual):
    patches = F.unfold(phi, KERNEL, padding=PADDING)
    gram = torch.empty(patches.shape[1] + 1, patches.shape[1] + 1)
    gram[:-1, :-1] = torch.bmm(patches, patches.transpose(1, 2)).sum(0)  # per-image Grams, (N, D, D)
    gram[:-1, -1] = gram[-1, :-1] = patches.sum((0, 2))
    gram[-1, -1] = patches.shape[0] * patches.shape[2]
    return gram


def fused_diag_ggn(phi, residual):
    return ops.conv_diag_ggn(phi, KERNEL, padding=PADDING)


def fused_diag_ef(phi, residual):
    return ops.conv_diag_ef(phi, residual, KERNEL, padding=PADDING)


def fused_patch_gram(phi, residual):
    return ops.conv_patch_gram(phi, KERNEL, padding=PADDING)


METHODS = {
    "diag GGN": (eager_diag_ggn, fused_diag_ggn),
    "diag EF": (eager_diag_ef, fused_diag_ef),
    "patch Gram": (eager_patch_gram, fused_patch_gram),
}


def inputs():
    torch.manual_seed(0)
    return torch.randn(BATCH, C_IN, SIZE, SIZE), torch.randn(BATCH, C_OUT, SIZE, SIZE)


def peak_rss_rise_mib(name: str, fused: bool, threads: int) -> float:
    """Run one method once in a fresh process: the peak rise of its resident set over the inputs'."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--measure",
            name,
            "--fused" if fused else "--eager",
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["rise_mib"]


def interleaved_medians(fns, repeats: int) -> list[float]:
    """Median seconds of each function, run alternately after one warm-up each, so that load from
    other processes on a shared machine falls on both sides of a ratio alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / MIB


def measure(name: str, fused: bool) -> None:
    """Sample the resident set every 0.2 ms while the method runs once (its first call)."""
    phi, residual = inputs()
    fn = METHODS[name][1 if fused else 0]
    baseline = peak = resident_mib()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_mib())
            time.sleep(2e-4)

    sampler = threading.Thread(target=sample)
    sampler.start()
    fn(phi, residual)
    done.set()
    sampler.join()
    print(json.dumps({"rise_mib": max(peak, resident_mib()) - baseline}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        measure(args.measure, args.fused)
        return

    phi, residual = inputs()
    patch = C_IN * KERNEL * KERNEL
    positions = SIZE * SIZE
    unfold_mib = BATCH * patch * positions * 4 / MIB
    per_image_grams_mib = BATCH * patch * patch * 4 / MIB
    analytic = {
        # Eager: the unfold, plus the square for the GGN and the per-image Grams for the Gram.
        # Fused (CPU): one H×W plane of accumulators per thread; one chunk of unfolded positions.
        "diag GGN": (2 * unfold_mib, args.threads * SIZE * SIZE * 4 / MIB),
        "diag EF": (unfold_mib, min(16.0, positions * patch * 4 / MIB)),
        "patch Gram": (unfold_mib + per_image_grams_mib, 16.0),
    }
    rows = []
    for name, (eager, fused) in METHODS.items():
        torch.testing.assert_close(fused(phi, residual), eager(phi, residual), rtol=1e-4, atol=1e-3)
        t_eager, t_fused = interleaved_medians(
            [lambda fn=eager: fn(phi, residual), lambda fn=fused: fn(phi, residual)], args.repeats
        )
        rss_eager = peak_rss_rise_mib(name, False, args.threads)
        rss_fused = peak_rss_rise_mib(name, True, args.threads)
        mem_eager, mem_fused = analytic[name]
        rows.append(
            [
                name,
                f"{t_eager * 1e3:.1f}",
                f"{t_fused * 1e3:.1f}",
                f"{t_eager / t_fused:.2f}×",
                f"{mem_eager:.0f} / {rss_eager:.0f}",
                f"≤ {mem_fused:.2f} / {rss_fused:.0f}",
            ]
        )

    table = markdown_table(
        [
            "accumulator",
            "eager unfold (ms)",
            "fused op (ms)",
            "speed-up",
            "eager extra MiB (analytic / peak-RSS rise)",
            "fused extra MiB (analytic / peak-RSS rise)",
        ],
        rows,
    )
    body = (
        f"`python/bench_curvature.py` — CPU, {args.threads} threads, median of {args.repeats} runs after "
        f"warm-up, eager and fused alternating; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, bayesdiff_ext {bayesdiff_ext.__version__}. "
        f"B={BATCH}, {C_IN}→{C_OUT} channels, {SIZE}×{SIZE}, {KERNEL}×{KERNEL} kernel, padding {PADDING} "
        f"(D = {patch}, {positions} positions per image). Eager: `F.unfold` of the whole batch "
        f"({unfold_mib:.0f} MiB float32) then the same reductions. Fused: the accumulators, which never "
        "unfold the batch (CPU: chunks of ≤ 16 MiB of positions; CUDA: patch entries read on the fly, "
        "extra memory C_in·H·W accumulators for the diag GGN only). Peak-RSS rise: the first call in a "
        "fresh process, resident set sampled every 0.2 ms, over the footprint with the inputs allocated "
        "(so it includes one-time buffers such as BLAS workspaces). The machine is shared: absolute times "
        "move with its load, the speed-ups come from alternating runs.\n\n" + table
    )
    print(body)
    if not args.no_write:
        write_section(Path(__file__).with_name("BENCHMARKS.md"), "bench_curvature", body)


if __name__ == "__main__":
    main()
