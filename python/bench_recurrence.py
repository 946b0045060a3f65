"""Microbenchmark of the moment-recurrence ops (CPU): fused kernels vs the eager PyTorch they replace.

Run: make bench, or .venv/bin/python python/bench_recurrence.py (writes its section of BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

import bayesdiff_ext
from bayesdiff_ext import ops
from bench_timing import markdown_table, median_seconds, write_section

SHAPES = {"16×3×64×64": (16, 3, 64, 64), "8×4×64×64": (8, 4, 64, 64)}


def traffic_elements(numel: int, samples: int) -> int:
    """Elements read + written by the fused pair: mc_moments reads 3 stacks of S and mean_x, writes 3;
    moment_step reads 5 and writes 2."""
    return (3 * samples + 1 + 3 + 5 + 2) * numel


def eager_moment_step(mean_x, var_x, eps_mean, eps_var, cov, a, b, c2):
    mean_next = a * mean_x + b * eps_mean
    var_next = (a * a * var_x + 2 * a * b * cov + b * b * eps_var + c2).clamp_min(0)
    return mean_next, var_next


def eager_mc_moments(x, eps_mean, eps_var, mean_x):
    e_eps = eps_mean.mean(0)
    var_eps = (eps_var.mean(0) + eps_mean.var(0, unbiased=False)).clamp_min(0)
    cov = (x * eps_mean).mean(0) - mean_x * e_eps
    return e_eps, var_eps, cov


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--samples", type=int, default=10, help="Monte Carlo samples S for mc_moments")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    for name, shape in SHAPES.items():
        mean_x, var_x = torch.randn(shape), torch.rand(shape)
        xs, ms, vs = (torch.randn(args.samples, *shape) for _ in range(3))
        vs = vs.abs()

        def eager_pair():
            e, ve, cov = eager_mc_moments(xs, ms, vs, mean_x)
            return eager_moment_step(mean_x, var_x, e, ve, cov, 0.99, -0.1, 0.0)

        def fused_pair():
            e, ve, cov = ops.mc_moments(xs, ms, vs, mean_x)
            return ops.moment_step(mean_x, var_x, e, ve, cov, a=0.99, b=-0.1)

        # A clone moves each element twice (read + write): half the pair's traffic in elements.
        copy_source = torch.randn(traffic_elements(mean_x.numel(), args.samples) // 2)
        times = {
            "eager": median_seconds(eager_pair, args.repeats),
            "fused": median_seconds(fused_pair, args.repeats),
            "clone": median_seconds(copy_source.clone, args.repeats),
        }
        rows.append(
            [
                f"{name}, S={args.samples}",
                f"{times['eager'] * 1e3:.2f}",
                f"{times['fused'] * 1e3:.2f}",
                f"{times['clone'] * 1e3:.2f}",
                f"{times['eager'] / times['fused']:.1f}×",
                f"{times['fused'] / times['clone']:.2f}×",
            ]
        )

    header = ["shape", "eager pair (ms)", "fused pair (ms)", "clone, same bytes (ms)", "eager / fused", "fused / clone"]
    table = markdown_table(header, rows)
    body = (
        f"`python/bench_recurrence.py` — CPU, {args.threads} threads, median of {args.repeats} runs after warm-up; "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, bayesdiff_ext "
        f"{bayesdiff_ext.__version__}; load average {os.getloadavg()[0]:.1f} at the end of the run (the machine "
        "is shared: compare the ratios, not the absolute times). Eager baseline: the same formulas as chained PyTorch ops "
        "(variance via `Tensor.var`, which is two-pass). The pair is `mc_moments` then `moment_step`; "
        "the clone copies a buffer whose read + write traffic equals the pair's (targets: eager/fused ≥ 3×, "
        "fused/clone ≤ 2×).\n\n" + table
    )
    print(body)
    if not args.no_write:
        write_section(Path(__file__).with_name("BENCHMARKS.md"), "bench_recurrence", body)


if __name__ == "__main__":
    main()
