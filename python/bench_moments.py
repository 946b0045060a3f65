"""Microbenchmark of the moment ops (CPU): fused kernels vs the eager PyTorch they replace.

Run: .venv/bin/python python/bench_moments.py   (writes the `bench_moments` section of BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

import bayesdiff_ext
from bayesdiff_ext import ops
from bench_timing import markdown_table, median_seconds, write_section

SHAPES = {
    "CelebA-like 4×3×64×64": (4, 3, 64, 64),
    "SD-latent 2×4×64×64": (2, 4, 64, 64),
    "ADM-128 1×3×128×128": (1, 3, 128, 128),
    "batch 64×3×64×64": (64, 3, 64, 64),
}


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
        m, v, e, w, c = (torch.randn(shape) for _ in range(5))
        v, w = v.abs(), w.abs()
        t_eager = median_seconds(lambda: eager_moment_step(m, v, e, w, c, 0.99, -0.1, 0.0), args.repeats)
        t_fused = median_seconds(lambda: ops.moment_step(m, v, e, w, c, a=0.99, b=-0.1), args.repeats)
        rows.append([f"moment_step {name}", f"{t_eager * 1e3:.3f}", f"{t_fused * 1e3:.3f}", f"{t_eager / t_fused:.2f}×"])

        xs, ms, vs = (torch.randn(args.samples, *shape) for _ in range(3))
        vs = vs.abs()
        t_eager = median_seconds(lambda: eager_mc_moments(xs, ms, vs, m), args.repeats)
        t_fused = median_seconds(lambda: ops.mc_moments(xs, ms, vs, m), args.repeats)
        rows.append(
            [f"mc_moments S={args.samples} {name}", f"{t_eager * 1e3:.3f}", f"{t_fused * 1e3:.3f}", f"{t_eager / t_fused:.2f}×"]
        )

    table = markdown_table(["case", "eager PyTorch (ms)", "fused op (ms)", "speed-up"], rows)
    body = (
        f"`python/bench_moments.py` — CPU, {args.threads} threads, median of {args.repeats} runs after warm-up; "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, bayesdiff_ext "
        f"{bayesdiff_ext.__version__}. Eager baseline: the same formulas as chained PyTorch ops "
        "(variance via `Tensor.var`, which is two-pass).\n\n" + table
    )
    print(body)
    if not args.no_write:
        write_section(Path(__file__).with_name("BENCHMARKS.md"), "bench_moments", body)


if __name__ == "__main__":
    main()
