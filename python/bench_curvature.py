"""Benchmark of the fitting accumulators (CPU) against the eager computations they replace.

* Conv head (CelebA-like: B images of 128 feature channels at 64×64, a 3×3 conv to 3 channels,
  padding 1): ``conv_diag_ggn``, ``conv_diag_ef``, ``conv_patch_gram`` against ``F.unfold`` of the
  whole batch and the same reductions (as BayesDiff's fit and laplace-torch's backends do).
* Linear heads on tokens (Flux-like: 4096 tokens of 3072 features → 64 outputs; SD3-medium-like:
  1536 features): ``linear_diag_ggn``, ``linear_diag_ef``, ``linear_gram`` against the eager float64
  code they replaced in ``posterior.head_ops`` (a float64 copy of φ, then square-sum / per-sample
  einsum / the augmented matrix product).

Time: medians of interleaved rounds (each round calls every candidate once at each thread count).
Memory: the analytic size of the eager path's intermediates, and the rise of the peak resident set
of each method's first call, in a fresh process.

Run: .venv/bin/python python/bench_curvature.py   (writes the `bench_curvature` section of BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import bayesdiff_ext
from bayesdiff_ext import ops
from bench_timing import (
    add_paused_flag,
    interleaved_medians,
    load_average,
    markdown_table,
    paused_note,
    peak_rise_mib,
    thread_scaling,
    verdict,
    write_section,
)

MIB = 2**20
BATCH, C_IN, C_OUT, SIZE, KERNEL, PADDING = 4, 128, 3, 64, 3, 1
# (samples, tokens, features, outputs)
LINEAR_SHAPES = {
    "Flux-like 1×4096 tokens (3072→64)": (1, 4096, 3072, 64),
    "SD3-medium-like 1×4096 tokens (1536→64)": (1, 4096, 1536, 64),
}


def conv_inputs():
    torch.manual_seed(0)
    return torch.randn(BATCH, C_IN, SIZE, SIZE), torch.randn(BATCH, C_OUT, SIZE, SIZE)


def linear_inputs(name: str):
    torch.manual_seed(0)
    samples, tokens, features, outputs = LINEAR_SHAPES[name]
    return torch.randn(samples, tokens, features), torch.randn(samples, tokens, outputs)


def eager_conv_diag_ggn(phi, residual):
    patches = F.unfold(phi, KERNEL, padding=PADDING)  # (N, D, P): the whole batch unfolded
    return (patches * patches).sum((0, 2)).view(C_IN, KERNEL, KERNEL)


def eager_conv_diag_ef(phi, residual):
    patches = F.unfold(phi, KERNEL, padding=PADDING)
    per_image_gradient = torch.bmm(residual.flatten(2), patches.transpose(1, 2))  # (N, C, D)
    return (per_image_gradient * per_image_gradient).sum(0).view(C_OUT, C_IN, KERNEL, KERNEL)


def eager_conv_patch_gram(phi, residual):
    patches = F.unfold(phi, KERNEL, padding=PADDING)
    gram = torch.empty(patches.shape[1] + 1, patches.shape[1] + 1)
    gram[:-1, :-1] = torch.bmm(patches, patches.transpose(1, 2)).sum(0)  # per-image Grams, (N, D, D)
    gram[:-1, -1] = gram[-1, :-1] = patches.sum((0, 2))
    gram[-1, -1] = patches.shape[0] * patches.shape[2]
    return gram


def eager_linear_diag_ggn(phi, residual):
    return phi.reshape(-1, phi.shape[-1]).to(torch.float64).square().sum(0)


def eager_linear_diag_ef(phi, residual):
    n = phi.shape[0]
    rows_phi = phi.reshape(n, -1, phi.shape[-1]).to(torch.float64)
    rows_res = residual.reshape(n, -1, residual.shape[-1]).to(torch.float64)
    return torch.einsum("ntc,ntd->ncd", rows_res, rows_phi).square().sum(0), rows_res.sum(1).square().sum(0)


def eager_linear_gram(phi, residual):
    rows = phi.reshape(-1, phi.shape[-1]).to(torch.float64)
    augmented = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return augmented.T @ augmented


METHODS = {
    "conv diag GGN": (eager_conv_diag_ggn, lambda phi, r: ops.conv_diag_ggn(phi, KERNEL, padding=PADDING)),
    "conv diag EF": (eager_conv_diag_ef, lambda phi, r: ops.conv_diag_ef(phi, r, KERNEL, padding=PADDING)),
    "conv patch Gram": (eager_conv_patch_gram, lambda phi, r: ops.conv_patch_gram(phi, KERNEL, padding=PADDING)),
    "Linear diag GGN": (eager_linear_diag_ggn, lambda phi, r: ops.linear_diag_ggn(phi)),
    "Linear diag EF": (eager_linear_diag_ef, lambda phi, r: ops.linear_diag_ef(phi, r, with_bias=True)),
    "Linear Gram": (eager_linear_gram, lambda phi, r: ops.linear_gram(phi)),
}


def cases():
    """(row label, method, inputs name): the conv head once, each Linear shape for each Linear method."""
    conv_methods = [name for name in METHODS if name.startswith("conv")]
    linear_methods = [name for name in METHODS if name.startswith("Linear")]
    conv = [(f"{name}, {BATCH}×({C_IN}→{C_OUT})×{SIZE}²", name, "conv") for name in conv_methods]
    linear = [(f"{name}, {shape}", name, shape) for shape in LINEAR_SHAPES for name in linear_methods]
    return conv + linear


def inputs_for(which: str):
    return conv_inputs() if which == "conv" else linear_inputs(which)


def analytic_extra_mib(method: str, which: str) -> tuple[float, float]:
    """(eager, fused) intermediates in MiB: the eager path's unfold or float64 copies; the fused
    path's tiles (CPU: ≤ 16 MiB of unfolded positions or of float64 rows)."""
    if which == "conv":
        unfold = BATCH * C_IN * KERNEL * KERNEL * SIZE * SIZE * 4 / MIB
        per_image_grams = BATCH * (C_IN * KERNEL * KERNEL) ** 2 * 4 / MIB
        eager = {"conv diag GGN": 2 * unfold, "conv diag EF": unfold, "conv patch Gram": unfold + per_image_grams}
        return eager[method], 16.0
    samples, tokens, features, outputs = LINEAR_SHAPES[which]
    copy64 = samples * tokens * features * 8 / MIB
    residual64 = samples * tokens * outputs * 8 / MIB
    eager = {"Linear diag GGN": 2 * copy64, "Linear diag EF": copy64 + residual64, "Linear Gram": 2 * copy64}
    return eager[method], 16.0 if method != "Linear diag GGN" else 2 * features * 8 / MIB


def peak_rise_in_child(method: str, which: str, fused: bool, threads: int) -> float:
    """Run one method once in a fresh process: the peak rise of its resident set over the inputs'."""
    out = subprocess.run(
        [sys.executable, __file__, "--measure", method, "--inputs", which, "--fused" if fused else "--eager"]
        + ["--threads", str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["rise_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--cases", nargs="+",
        help="measure only the rows whose label contains one of these strings (e.g. conv_diag_ggn, Flux); "
        "written to their own `bench_curvature: CASES` section",
    )
    add_paused_flag(parser)
    args = parser.parse_args()
    if args.measure:
        torch.set_num_threads(args.threads[-1])
        phi, residual = inputs_for(args.inputs)
        fn = METHODS[args.measure][1 if args.fused else 0]
        print(json.dumps({"rise_mib": peak_rise_mib(lambda: fn(phi, residual))}))
        return

    load_before = load_average()
    rows, scaling = [], []
    for label, method, which in cases():
        if args.cases and not any(case in label for case in args.cases):
            continue
        phi, residual = inputs_for(which)
        eager, fused = METHODS[method]
        outputs, expected = (r if isinstance(r, tuple) else (r,) for r in (fused(phi, residual), eager(phi, residual)))
        for out, ref in zip(outputs, expected):
            torch.testing.assert_close(out.double(), ref.double(), rtol=1e-4, atol=1e-3)
        candidates = {"eager": lambda: eager(phi, residual), "fused": lambda: fused(phi, residual)}
        t = interleaved_medians(candidates, args.repeats, threads=args.threads)
        mem_eager, mem_fused = analytic_extra_mib(method, which)
        rss_eager = peak_rise_in_child(method, which, False, args.threads[-1])
        rss_fused = peak_rise_in_child(method, which, True, args.threads[-1])
        for n in args.threads:
            ratio = t[(n, "eager")] / t[(n, "fused")]
            rows.append(
                [
                    label,
                    str(n),
                    f"{t[(n, 'eager')] * 1e3:.1f}",
                    f"{t[(n, 'fused')] * 1e3:.1f}",
                    f"{ratio:.2f}× ({verdict(ratio >= 1)})",
                    f"{mem_eager:.0f} / {rss_eager:.0f}",
                    f"≤ {mem_fused:.2f} / {rss_fused:.0f}",
                ]
            )
        if len(args.threads) > 1:
            scaling.append([label] + thread_scaling(t, args.threads, ("eager", "fused")))

    table = markdown_table(
        [
            "accumulator",
            "threads",
            "eager (ms)",
            "fused op (ms)",
            "eager / fused (≥ 1)",
            f"eager extra MiB (analytic / peak-RSS rise at {args.threads[-1]} threads)",
            "fused extra MiB (analytic / peak-RSS rise)",
        ],
        rows,
    )
    body = (
        f"`python/bench_curvature.py` — CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"torch {torch.__version__}, bayesdiff_ext {bayesdiff_ext.__version__}, float32 inputs; median of "
        f"{args.repeats} interleaved rounds (each round calls both candidates at each of "
        f"{', '.join(map(str, args.threads))} threads). Load average (1, 5, 15 min) {load_before} before and "
        f"{load_average()} after (the machine is shared: ratios within a round are fair).{paused_note(args)} Conv: eager = `F.unfold` "
        "of the whole batch then the same reductions; fused = the accumulators, which never unfold the batch. "
        "Linear: eager = the float64 code the ops replaced in `posterior.head_ops` (a float64 copy of φ); fused = "
        "float64 accumulation without the copy (GGN: per-thread partial sums; EF and Gram: float64 BLAS on 16 MiB "
        "tiles of rows). Peak-RSS rise: the first call in a fresh process, resident set sampled every 0.2 ms, over "
        "the footprint with the inputs allocated (so it includes one-time buffers such as BLAS workspaces).\n\n"
        + table
    )
    if scaling:
        body += (
            f"\n\nThread scaling (time at {args.threads[0]} thread(s) / time at {args.threads[-1]}, same rounds):\n\n"
            + markdown_table(["accumulator", "eager", "fused"], scaling)
        )
    print(body)
    if not args.no_write:
        name = f"bench_curvature: {', '.join(args.cases)}" if args.cases else "bench_curvature"
        write_section(Path(__file__).with_name("BENCHMARKS.md"), name, body)


if __name__ == "__main__":
    main()
