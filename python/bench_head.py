"""Benchmark of the fused head ops (CPU) against the ways the head's predictive is computed today.

Diagonal posterior, ``conv_head_mean_var`` against
  (a) BayesDiff's estimator: 100 weight draws W + √V·ε, 100 head convolutions, mean and variance;
      also the same 100 draws batched into one convolution with 100·C output channels;
  (b) the eager pair ``conv2d(φ, W, b)`` + ``conv2d(φ², V, v)``;
  (c) laplace-torch's GLM predictive (DiagLaplace on Sequential(conv, Flatten)) where it fits in
      memory; elsewhere the memory it would need;
and against a single ``conv2d`` forward of the head (the floor: the target is within 1.5× of it).
Factored posterior (full GGN, R = D+1 directions), ``conv_head_var_factored`` against its eager
composition conv2d into R channels → square → mix.

Run: .venv/bin/python python/bench_head.py   (writes the `bench_head` section of BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bayesdiff_ext
from bayesdiff_ext import ops
from bench_timing import markdown_table, write_section

GIB = 2.0**30


@dataclass(frozen=True)
class Head:
    name: str
    batch: int
    in_channels: int
    channels: int
    size: int
    kernel: int = 3
    padding: int = 1

    @property
    def taps(self) -> int:
        return self.in_channels * self.kernel * self.kernel

    @property
    def outputs(self) -> int:
        """K = C·H·W, the outputs per image laplace-torch treats as one vector."""
        return self.channels * self.size * self.size

    @property
    def parameters(self) -> int:
        return self.channels * (self.taps + 1)

    def laplace_glm_bytes(self) -> float:
        """float32 memory of laplace-torch's GLM predictive: jacrev's B·K × B·K cotangent basis,
        the (B, K, P) Jacobian and the (B, K, K) output covariance."""
        rows = self.batch * self.outputs
        return 4.0 * (rows * rows + rows * self.parameters + self.batch * self.outputs * self.outputs)


HEADS = [
    Head("CelebA-like 4×(128→3)×64²", 4, 128, 3, 64),
    Head("SD-like 2×(320→4)×64²", 2, 320, 4, 64),
    Head("ADM-128-like 1×(256→3)×128²", 1, 256, 3, 128),
    # Small enough for laplace-torch's GLM predictive, so that it has a measured number.
    Head("small 1×(128→3)×24²", 1, 128, 3, 24),
]


def interleaved_medians(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each function, timed in rounds (one call of each per round), so that a
    change of machine load hits every candidate alike (this machine is shared)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def make_inputs(head: Head, generator: torch.Generator):
    phi = torch.randn(head.batch, head.in_channels, head.size, head.size, generator=generator)
    weight = torch.randn(head.channels, head.in_channels, head.kernel, head.kernel, generator=generator) * 0.05
    weight_var = torch.rand(weight.shape, generator=generator) * 1e-4
    bias, bias_var = torch.randn(head.channels, generator=generator), torch.rand(head.channels, generator=generator)
    return phi, weight, bias, weight_var, bias_var


def eager_pair(phi, weight, bias, weight_var, bias_var, padding):
    return F.conv2d(phi, weight, bias, padding=padding), F.conv2d(phi * phi, weight_var, bias_var, padding=padding)


def bayesdiff_monte_carlo(phi, weight, bias, weight_var, bias_var, padding, draws):
    """BayesDiff's head variance: `draws` sampled weight sets, one convolution each."""
    outputs = []
    for _ in range(draws):
        w = weight + weight_var.sqrt() * torch.randn_like(weight)
        b = bias + bias_var.sqrt() * torch.randn_like(bias)
        outputs.append(F.conv2d(phi, w, b, padding=padding))
    stacked = torch.stack(outputs)
    return stacked.mean(0), stacked.var(0)


def batched_monte_carlo(phi, weight, bias, weight_var, bias_var, padding, draws):
    """The same draws as one convolution with draws·C output channels."""
    w = weight + weight_var.sqrt() * torch.randn(draws, *weight.shape)
    b = bias + bias_var.sqrt() * torch.randn(draws, *bias.shape)
    out = F.conv2d(phi, w.flatten(0, 1), b.flatten(), padding=padding)
    out = out.view(phi.shape[0], draws, weight.shape[0], *out.shape[2:])
    return out.mean(1), out.var(1)


def laplace_glm(head: Head, phi, weight, bias, weight_var, bias_var):
    """A DiagLaplace over Sequential(conv, Flatten) with this posterior, and its GLM predictive."""
    from laplace import DiagLaplace

    conv = nn.Conv2d(head.in_channels, head.channels, head.kernel, padding=head.padding)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    la = DiagLaplace(nn.Sequential(conv, nn.Flatten()), "regression", sigma_noise=1.0, prior_precision=1.0)
    # The posterior variance is 1 / (H + δ): choose H so that it is this diagonal.
    la.H = 1.0 / torch.cat([weight_var.flatten(), bias_var]) - 1.0
    la.n_data, la.n_outputs = 1, head.outputs
    return lambda: la(phi, pred_type="glm")


def diag_rows(heads, args, generator):
    rows, checks = [], []
    for head in heads:
        phi, weight, bias, weight_var, bias_var = make_inputs(head, generator)
        p = head.padding

        def fused():
            return ops.conv_head_mean_var(phi, weight, bias, weight_var, bias_var, padding=p)

        candidates = {
            "forward": lambda: F.conv2d(phi, weight, bias, padding=p),
            "pair": lambda: eager_pair(phi, weight, bias, weight_var, bias_var, p),
            "fused": fused,
            "mc": lambda: bayesdiff_monte_carlo(phi, weight, bias, weight_var, bias_var, p, args.draws),
            "batched": lambda: batched_monte_carlo(phi, weight, bias, weight_var, bias_var, p, args.draws),
        }
        need = head.laplace_glm_bytes()
        glm = laplace_glm(head, phi, weight, bias, weight_var, bias_var) if need <= args.laplace_max_gib * GIB else None
        if glm is not None:
            candidates["glm"] = glm
        t = interleaved_medians(candidates, args.repeats)
        t_forward, t_pair, t_fused, t_mc, t_batched = (t[k] for k in ("forward", "pair", "fused", "mc", "batched"))
        if glm is not None:
            laplace_cell = f"{t['glm'] * 1e3:.1f} ms ({t['glm'] / t_fused:.0f}× fused; {need / GIB:.2f} GiB)"
            f_mu, f_var = glm()
            mean, var = fused()
            checks.append((head.name, "laplace GLM var", _rel_err(var.flatten(1), f_var.diagonal(dim1=-2, dim2=-1))))
        else:
            laplace_cell = f"does not fit: needs {need / GIB:.1f} GiB"

        mean, var = fused()
        ref_mean, ref_var = eager_pair(phi.double(), weight.double(), bias.double(), weight_var.double(), bias_var.double(), p)
        checks.append((head.name, "fused vs float64 eager", max(_rel_err(mean, ref_mean), _rel_err(var, ref_var))))
        rows.append(
            [
                head.name,
                f"{t_forward * 1e3:.2f}",
                f"{t_pair * 1e3:.2f}",
                f"{t_fused * 1e3:.2f}",
                f"{t_fused / t_forward:.2f}×",
                f"{t_pair / t_fused:.1f}×",
                f"{t_mc * 1e3:.0f} ({t_mc / t_fused:.0f}×)",
                f"{t_batched * 1e3:.0f} ({t_batched / t_fused:.0f}×)",
                laplace_cell,
            ]
        )
    return rows, checks


def eager_factored(phi, proj_weight, proj_bias, mix, bias_var, padding):
    projection = F.conv2d(phi, proj_weight, proj_bias, padding=padding)
    return torch.einsum("cr,brhw->bchw", mix, projection * projection) + bias_var.view(1, -1, 1, 1)


def factored_rows(heads, args, generator):
    rows, checks = [], []
    for head in heads:
        phi = make_inputs(head, generator)[0]
        rank = head.taps + 1  # the full GGN posterior: q_r = columns of L, R = D+1
        proj_weight = torch.randn(rank, head.in_channels, head.kernel, head.kernel, generator=generator) * 0.01
        proj_bias = torch.randn(rank, generator=generator) * 0.01
        mix = torch.ones(head.channels, rank)
        bias_var = torch.zeros(head.channels)
        p = head.padding

        def fused():
            return ops.conv_head_var_factored(phi, proj_weight, proj_bias, mix, bias_var, padding=p)

        t = interleaved_medians(
            {"eager": lambda: eager_factored(phi, proj_weight, proj_bias, mix, bias_var, p), "fused": fused}, args.repeats
        )
        t_eager, t_fused = t["eager"], t["fused"]
        projection_bytes = 4.0 * head.batch * rank * head.size * head.size
        ref = eager_factored(phi.double(), proj_weight.double(), proj_bias.double(), mix.double(), bias_var.double(), p)
        checks.append((head.name, "factored vs float64 eager", _rel_err(fused(), ref)))
        rows.append(
            [
                head.name,
                str(rank),
                f"{t_eager * 1e3:.0f}",
                f"{projection_bytes / 2**20:.0f} MiB",
                f"{t_fused * 1e3:.0f}",
                f"{t_eager / t_fused:.2f}×",
            ]
        )
    return rows, checks


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draws", type=int, default=100, help="BayesDiff's weight draws per head call")
    parser.add_argument("--laplace-max-gib", type=float, default=2.0, help="run laplace-torch only below this memory")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    warnings.filterwarnings("ignore", module="laplace")
    load_before = os.getloadavg()[0]

    diag, diag_checks = diag_rows(HEADS, args, generator)
    factored, factored_checks = factored_rows(HEADS[:3], args, generator)
    diag_table = markdown_table(
        [
            "head (3×3, padding 1)",
            "conv2d forward (ms)",
            "eager conv2d pair (ms)",
            "fused mean+var (ms)",
            "fused / forward",
            "pair / fused",
            f"BayesDiff {args.draws} draws (ms, × fused)",
            f"{args.draws} draws in one conv (ms, × fused)",
            "laplace-torch GLM",
        ],
        diag,
    )
    factored_table = markdown_table(
        [
            "head",
            "R = D+1",
            "eager conv→square→mix (ms)",
            "eager (B,R,H,W) projection",
            "conv_head_var_factored (ms)",
            "eager / fused",
        ],
        factored,
    )
    load_after = os.getloadavg()[0]
    check_lines = "\n".join(f"* {name}: {what} max relative error {err:.1e}" for name, what, err in diag_checks + factored_checks)
    body = (
        f"`python/bench_head.py` — CPU ({platform.processor() or platform.machine()}, {args.threads} threads), "
        f"median of {args.repeats} runs after warm-up, candidates timed in interleaved rounds; torch {torch.__version__}, bayesdiff_ext {bayesdiff_ext.__version__}, "
        "float32. Ratios are against baselines measured in the same run. laplace-torch's GLM predictive is run "
        f"only where its memory (jacrev's B·K×B·K basis + the B·K·P Jacobian + the B·K·K covariance, K = C·H·W, "
        f"P = C·(D+1), float32) is below {args.laplace_max_gib:g} GiB. The machine is shared: its 1-minute load "
        f"average was {load_before:.1f} at the start and {load_after:.1f} at the end ({os.cpu_count()} cores), so absolute "
        "times move with it; compare the ratios, measured in interleaved rounds.\n\n"
        "Diagonal posterior (`conv_head_mean_var`):\n\n" + diag_table + "\n\n"
        "Full-GGN posterior (`conv_head_var_factored`, directions = columns of the Cholesky factor, mix = 1):\n\n"
        + factored_table
        + "\n\nOutputs checked in the same run:\n\n"
        + check_lines
    )
    print(body)
    if not args.no_write:
        write_section(Path(__file__).with_name("BENCHMARKS.md"), "bench_head", body)


if __name__ == "__main__":
    main()
