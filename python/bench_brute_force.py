"""The moment recurrence on the Euler family and flow matching against its own brute force.

For each scheduler the test suite checks (``tests/test_sampler_schedulers.py``), on the same tiny
UNet whose output tracks its input and the same diag posterior: Var[x_0] propagated by the
recurrence (Monte Carlo at every step, S = 48 antithetic samples, three Monte Carlo seeds) against
M = 200 independent trajectories from one x_T in which every model call's prediction is drawn from
the head's predictive (BayesDiff's per-step independence, the recurrence's own assumption; trajectory
Monte Carlo with shared weights is bench_truth's subject). Columns: the ratio of summed variances and
the per-pixel Pearson r, the same without the covariance term, and two brute-force runs against each
other (the ceiling of r). The model, posterior and brute force are the test suite's, imported from
``tests/``, so these are the numbers the test's tolerances come from.

Run: .venv/bin/python python/bench_brute_force.py (≈ 1–3 min on one thread; writes its section of
BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's tiny model, posterior and brute force

import bayesdiff_ext  # noqa: E402
from bench_timing import load_average, markdown_table, write_section  # noqa: E402
from brute_force import brute_force_variance, correlation, with_output_tracking_input  # noqa: E402
from test_sampler import _posterior  # noqa: E402
from test_sampler_schedulers import SCHEDULERS, STEPS, _noise, _sample  # noqa: E402
from tiny_models import tiny_unet  # noqa: E402

CHECKED = ("euler-epsilon", "euler-v", "flow", "flow-stochastic", "euler_ancestral-epsilon")
MC_SEEDS = (1, 2, 3)


def _span(values: list[float], digits: int = 2) -> str:
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if round(low, digits) == round(high, digits) else f"{low:.{digits}f}–{high:.{digits}f}"


def measure(name: str, unet, posterior, trajectories: int) -> list[str]:
    make = SCHEDULERS[name]
    empirical = brute_force_variance(unet, posterior, make(), _noise(), steps=STEPS, trajectories=trajectories, seed=5)
    repeat = brute_force_variance(unet, posterior, make(), _noise(), steps=STEPS, trajectories=trajectories, seed=6)
    ratios, rs, without = [], [], []
    for seed in MC_SEEDS:
        settings = dict(noise=_noise(), mc_samples=48, generator=torch.Generator().manual_seed(seed))
        ours = _sample(unet, make(), posterior, **settings)
        ratios.append(float(ours.variance.sum() / empirical.sum()))
        rs.append(correlation(ours.variance, empirical))
        plain = _sample(unet, make(), posterior, covariance="none", **settings)
        without.append(float(plain.variance.sum() / empirical.sum()))
    return [
        name,
        _span(ratios),
        _span(rs),
        _span(without),
        f"{float(repeat.sum() / empirical.sum()):.2f}, {correlation(repeat, empirical):.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=200, help="brute-force trajectories M (default 200)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, load_before = time.perf_counter(), load_average()
    unet = with_output_tracking_input(tiny_unet(add_attention=False))
    posterior = _posterior(unet)
    rows = [measure(name, unet, posterior, args.trajectories) for name in CHECKED]
    table = markdown_table(
        ["scheduler", "propagated / brute force", "per-pixel r", "ratio without Cov(x, ε)", "two brute-force runs: ratio, r"],
        rows,
    )
    body = (
        f"`python/bench_brute_force.py` — the recurrence (Monte Carlo every step, S = 48, Monte Carlo seeds "
        f"{', '.join(map(str, MC_SEEDS))}) against M = {args.trajectories} brute-force trajectories of BayesDiff's "
        f"per-step independent head noise, {STEPS} steps, a tiny UNet whose output tracks its input (batch 2, "
        f"3×8×8), diag posterior; the model and brute force of tests/test_sampler_schedulers.py. CPU "
        f"({platform.machine()}), one thread, torch {torch.__version__}, bayesdiff_ext {bayesdiff_ext.__version__}; "
        f"load average {load_before} before, {load_average()} after; {time.perf_counter() - start:.0f} s.\n\n"
        f"{table}\n\n"
        "Reading: the third column is what the covariance term contributes (the recurrence without it); the "
        "last column bounds r where the sampler's own noise makes two brute-force runs differ (stochastic flow "
        "matching, Euler-Ancestral). Trajectory Monte Carlo (weights shared along a trajectory: the quantity the "
        "package reports by default) is measured in `bench_truth`."
    )
    write_section(Path(__file__).with_name("BENCHMARKS.md"), "bench_brute_force", body)
    print(body)


if __name__ == "__main__":
    main()
