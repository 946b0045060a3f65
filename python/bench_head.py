"""Benchmark of the fused head ops (CPU) against the eager compositions a user would write, and
against the ways the head's predictive is computed elsewhere.

1. Targets (issue 23: no slower than eager), timed in interleaved rounds at 1 and 2 threads:
   * conv heads, diagonal posterior: ``conv_head_mean_var`` vs the eager pair
     ``conv2d(φ, W, b)`` + ``conv2d(φ², V, v)`` (and a single ``conv2d`` forward, the floor);
   * conv heads, full GGN (R = D+1 directions): ``conv_head_var_factored`` vs conv2d into R channels
     → square → mix;
   * Linear heads on tokens (Flux-like 4096 × 3072 → 64, SD3-medium-like 4096 × 1536 → 64),
     diagonal: ``linear_head_mean_var`` vs ``linear(φ, W, b)`` + ``linear(φ², V, v)``; full GGN:
     the factored op as ``posterior.head_ops`` calls it (rows as 1×1 images) vs
     ``linear(φ, Q, β)`` → square → mix.
2. Context at the larger thread count (fewer rounds: these baselines are slow): BayesDiff's
   estimator (100 weight draws, one head call each), the same draws batched into one call, and
   laplace-torch's GLM predictive where it fits in memory (elsewhere the memory it would need).
3. Peak memory of the Linear heads: the rise of the resident set during a first call, each method
   in a fresh process.

Run: .venv/bin/python python/bench_head.py   (writes the `bench_head` section of BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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

GIB = 2.0**30


@dataclass(frozen=True)
class Head:
    """A conv head (kernel ≥ 1, spatial size) or a Linear head on tokens (kernel 0, size = tokens)."""

    name: str
    batch: int
    in_channels: int
    channels: int
    size: int
    kernel: int = 3

    @property
    def is_linear(self) -> bool:
        return self.kernel == 0

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def taps(self) -> int:
        return self.in_channels * max(self.kernel, 1) ** 2

    @property
    def outputs(self) -> int:
        """K, the outputs per image laplace-torch treats as one vector: C·H·W, or C·tokens."""
        return self.channels * (self.size if self.is_linear else self.size * self.size)

    @property
    def parameters(self) -> int:
        return self.channels * (self.taps + 1)

    def laplace_glm_bytes(self, full: bool = False) -> float:
        """float32 memory of laplace-torch's GLM predictive: jacrev's B·K × B·K cotangent basis,
        the (B, K, P) Jacobian and the (B, K, K) output covariance (+ the P×P covariance if full)."""
        rows = self.batch * self.outputs
        p = self.parameters
        return 4.0 * (rows * rows + rows * p + self.batch * self.outputs**2 + (p * p if full else 0))

    def phi(self, generator) -> torch.Tensor:
        if self.is_linear:
            return torch.randn(self.batch, self.size, self.in_channels, generator=generator)
        return torch.randn(self.batch, self.in_channels, self.size, self.size, generator=generator)

    def weight_shape(self) -> tuple:
        kernel = () if self.is_linear else (self.kernel, self.kernel)
        return (self.channels, self.in_channels, *kernel)


CONV_HEADS = [
    Head("CelebA-like 4×(128→3)×64²", 4, 128, 3, 64),
    Head("SD-like 2×(320→4)×64²", 2, 320, 4, 64),
    Head("ADM-128-like 1×(256→3)×128²", 1, 256, 3, 128),
]
# The full GGN costs R·D = (D+1)·D per pixel: one image each, so that ≥ 21 rounds at two thread
# counts fit in minutes.
CONV_FULL_HEADS = [
    Head("CelebA-like 1×(128→3)×64²", 1, 128, 3, 64),
    Head("SD-like 1×(320→4)×32²", 1, 320, 4, 32),
    Head("ADM-128-like 1×(256→3)×128²", 1, 256, 3, 128),
]
LINEAR_HEADS = [
    Head("Flux-like 1×4096 tokens (3072→64)", 1, 3072, 64, 4096, kernel=0),
    Head("SD3-medium-like 1×4096 tokens (1536→64)", 1, 1536, 64, 4096, kernel=0),
]
# Small enough for laplace-torch's GLM predictive, so that it has a measured number.
SMALL_HEADS = [
    Head("small conv 1×(128→3)×24²", 1, 128, 3, 24),
    Head("small Linear 1×64 tokens (256→16)", 1, 256, 16, 64, kernel=0),
]


def diag_inputs(head: Head, generator):
    phi = head.phi(generator)
    weight = torch.randn(head.weight_shape(), generator=generator) * 0.05
    weight_var = torch.rand(head.weight_shape(), generator=generator) * 1e-4
    bias, bias_var = torch.randn(head.channels, generator=generator), torch.rand(head.channels, generator=generator)
    return phi, weight, bias, weight_var, bias_var


def full_inputs(head: Head, generator):
    """φ and a full-GGN factored posterior: R = D+1 directions (columns of a Cholesky factor), mix = 1."""
    phi = head.phi(generator)
    rank = head.taps + 1
    directions = torch.randn(rank, *head.weight_shape()[1:], generator=generator) * 0.01
    proj_bias = torch.randn(rank, generator=generator) * 0.01
    return phi, directions, proj_bias, torch.ones(head.channels, rank), torch.zeros(head.channels)


def eager_diag(head: Head, phi, weight, bias, weight_var, bias_var):
    if head.is_linear:
        return F.linear(phi, weight, bias), F.linear(phi * phi, weight_var, bias_var)
    mean = F.conv2d(phi, weight, bias, padding=head.padding)
    return mean, F.conv2d(phi * phi, weight_var, bias_var, padding=head.padding)


def fused_diag(head: Head, phi, weight, bias, weight_var, bias_var):
    if head.is_linear:
        return ops.linear_head_mean_var(phi, weight, bias, weight_var, bias_var)
    return ops.conv_head_mean_var(phi, weight, bias, weight_var, bias_var, padding=head.padding)


def forward(head: Head, phi, weight, bias, weight_var, bias_var):
    return F.linear(phi, weight, bias) if head.is_linear else F.conv2d(phi, weight, bias, padding=head.padding)


def eager_full(head: Head, phi, directions, proj_bias, mix, bias_var):
    if head.is_linear:
        projection = F.linear(phi, directions, proj_bias)  # (B, N, R)
        return (projection * projection) @ mix.T + bias_var
    projection = F.conv2d(phi, directions, proj_bias, padding=head.padding)
    return torch.einsum("cr,brhw->bchw", mix, projection * projection) + bias_var.view(1, -1, 1, 1)


def fused_full(head: Head, phi, directions, proj_bias, mix, bias_var):
    if head.is_linear:  # as posterior.head_ops.factored_var calls it
        rows = phi.reshape(-1, head.in_channels, 1, 1)
        var = ops.conv_head_var_factored(rows, directions.reshape(-1, head.in_channels, 1, 1), proj_bias, mix, bias_var)
        return var.reshape(*phi.shape[:-1], mix.shape[0])
    return ops.conv_head_var_factored(phi, directions, proj_bias, mix, bias_var, padding=head.padding)


def bayesdiff_draws(head: Head, phi, weight, bias, weight_var, bias_var, draws: int):
    """BayesDiff's head variance: `draws` sampled weight sets, one head call each."""
    outputs = []
    for _ in range(draws):
        w = weight + weight_var.sqrt() * torch.randn_like(weight)
        outputs.append(forward(head, phi, w, bias + bias_var.sqrt() * torch.randn_like(bias), None, None))
    stacked = torch.stack(outputs)
    return stacked.mean(0), stacked.var(0)


def batched_draws(head: Head, phi, weight, bias, weight_var, bias_var, draws: int):
    """The same draws as one head call with draws·C outputs."""
    w = (weight + weight_var.sqrt() * torch.randn(draws, *weight.shape)).flatten(0, 1)
    b = (bias + bias_var.sqrt() * torch.randn(draws, *bias.shape)).flatten()
    out = forward(head, phi, w, b, None, None)
    out = out.unflatten(-1, (draws, head.channels)) if head.is_linear else out.unflatten(1, (draws, head.channels))
    dim = -2 if head.is_linear else 1
    return out.mean(dim), out.var(dim)


def laplace_model(head: Head, weight, bias) -> nn.Module:
    if head.is_linear:
        layer = nn.Linear(head.in_channels, head.channels)
    else:
        layer = nn.Conv2d(head.in_channels, head.channels, head.kernel, padding=head.padding)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return nn.Sequential(layer, nn.Flatten())


def laplace_diag_glm(head: Head, phi, weight, bias, weight_var, bias_var):
    """A DiagLaplace with this posterior, and a call of its GLM predictive."""
    from laplace import DiagLaplace

    la = DiagLaplace(laplace_model(head, weight, bias), "regression", sigma_noise=1.0, prior_precision=1.0)
    # The posterior variance is 1 / (H + δ): choose H so that it is this diagonal.
    la.H = 1.0 / torch.cat([weight_var.flatten(), bias_var]) - 1.0
    la.n_data, la.n_outputs = 1, head.outputs
    return lambda: la(phi, pred_type="glm")


def laplace_full_glm(head: Head, phi, weight, bias):
    """A FullLaplace (a random SPD posterior precision) and a call of its GLM predictive."""
    from laplace import FullLaplace

    la = FullLaplace(laplace_model(head, weight, bias), "regression", sigma_noise=1.0, prior_precision=1.0)
    a = torch.randn(head.parameters, head.parameters) / head.parameters**0.5
    la.H = a @ a.T
    la.n_data, la.n_outputs = 1, head.outputs
    return lambda: la(phi, pred_type="glm")


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max())


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 1 else f"{seconds * 1e3:.0f}"


# A round in which other processes used more than this share of one CPU is timed again.
MAX_OTHERS = 0.05


def target_rows(heads, inputs, candidates, args, generator, checks):
    """One table row per head and thread count: each candidate's median, fused vs eager; and the
    number of rounds timed again because other processes used the CPU."""
    rows = []
    disturbed = 0
    for head in heads:
        data = inputs(head, generator)
        fns = {name: (lambda fn=fn: fn(head, *data)) for name, fn in candidates.items()}
        t = interleaved_medians(fns, args.repeats, threads=args.threads, max_others=MAX_OTHERS)
        disturbed += t.disturbed
        for n in args.threads:
            cells = [_ms(t[(n, name)]) for name in candidates]
            ratio = t[(n, "eager")] / t[(n, "fused")]
            paired = statistics.median(e / f for e, f in zip(t.rounds[(n, "eager")], t.rounds[(n, "fused")]))
            rows.append([head.name, str(n), *cells, f"{ratio:.2f}× ({verdict(ratio >= 1)})", f"{paired:.2f}×"])
        if len(args.threads) > 1:
            rows[-1] += thread_scaling(t, args.threads, ("fused",))
            rows[-2].append("")
        expected = candidates["eager"](head, *(d.double() for d in data))
        fused = candidates["fused"](head, *data)
        outputs = as_tuple(fused)
        for what, out, ref in zip(("mean", "var")[-len(outputs):], outputs, as_tuple(expected)):
            checks.append(f"* {head.name}: fused {what} vs float64 eager, max relative error {_rel_err(out, ref):.1e}")
    return rows, disturbed


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def context_rows(heads, args, generator, checks):
    threads = args.threads[-1]
    torch.set_num_threads(threads)
    rows = []
    for head in heads:
        data = diag_inputs(head, generator)
        fns = {
            "fused": lambda: fused_diag(head, *data),
            "draws": lambda: bayesdiff_draws(head, *data, args.draws),
            "batched": lambda: batched_draws(head, *data, args.draws),
        }
        need = head.laplace_glm_bytes()
        if need <= args.laplace_max_gib * GIB:
            fns["glm"] = laplace_diag_glm(head, *data)
        t = interleaved_medians(fns, args.context_repeats)
        if "glm" in t:
            glm_cell = f"{_ms(t['glm'])} ms ({t['glm'] / t['fused']:.0f}× fused; {need / GIB:.2f} GiB)"
            _, glm_var = fns["glm"]()
            error = _rel_err(fused_diag(head, *data)[1].flatten(1), glm_var.diagonal(dim1=-2, dim2=-1))
            checks.append(f"* {head.name}: laplace GLM var vs fused, max relative error {error:.1e}")
        else:
            glm_cell = f"does not fit: needs {need / GIB:.1f} GiB"
        rows.append(
            [
                head.name,
                _ms(t["fused"]),
                f"{_ms(t['draws'])} ({t['draws'] / t['fused']:.0f}×)",
                f"{_ms(t['batched'])} ({t['batched'] / t['fused']:.0f}×)",
                glm_cell,
            ]
        )
    return rows, threads


METHODS = {
    "fused diag": lambda head, g: (lambda d=diag_inputs(head, g): fused_diag(head, *d)),
    "eager diag": lambda head, g: (lambda d=diag_inputs(head, g): eager_diag(head, *d)),
    "fused full": lambda head, g: (lambda d=full_inputs(head, g): fused_full(head, *d)),
    "eager full": lambda head, g: (lambda d=full_inputs(head, g): eager_full(head, *d)),
    "laplace diag GLM": lambda head, g: laplace_diag_glm(head, *diag_inputs(head, g)),
    "laplace full GLM": lambda head, g: laplace_full_glm(head, *diag_inputs(head, g)[:3]),
}


def measure_in_child(head_index: int, method: str, threads: int) -> float:
    """Peak-RSS rise of one method's first call, in a fresh process (the inputs allocated first)."""
    out = subprocess.run(
        [sys.executable, __file__, "--measure", method, "--head", str(head_index), "--threads", str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["rise_mib"]


def memory_rows(args):
    heads = LINEAR_HEADS + SMALL_HEADS[1:]
    rows = []
    for index, head in enumerate(heads):
        cells = []
        for method in METHODS:
            laplace = method.startswith("laplace")
            need = head.laplace_glm_bytes(full="full" in method)
            if laplace and need > args.laplace_max_gib * GIB:
                cells.append(f"needs {need / GIB:.0f} GiB")
            else:
                cells.append(f"{measure_in_child(index, method, args.threads[-1]):.0f}")
        rows.append([head.name, *cells])
    return rows


def measure(method: str, head_index: int) -> None:
    warnings.filterwarnings("ignore")
    head = (LINEAR_HEADS + SMALL_HEADS[1:])[head_index]
    fn = METHODS[method](head, torch.Generator().manual_seed(0))
    print(json.dumps({"rise_mib": peak_rise_mib(fn)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--context-repeats", type=int, default=5)
    parser.add_argument("--draws", type=int, default=100, help="BayesDiff's weight draws per head call")
    parser.add_argument("--laplace-max-gib", type=float, default=2.0, help="run laplace-torch only below this memory")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--head", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--parts", nargs="+", choices=list(PARTS), default=list(PARTS),
        help="which tables to measure; each writes its own `bench_head: PART` section",
    )
    parser.add_argument("--heads", nargs="+", help="only the heads whose name contains one of these strings")
    add_paused_flag(parser)
    args = parser.parse_args()
    if args.measure:
        torch.set_num_threads(args.threads[-1])
        measure(args.measure, args.head)
        return
    warnings.filterwarnings("ignore", module="laplace")
    for part in args.parts:
        generator = torch.Generator().manual_seed(0)
        load_before = load_average()
        checks: list[str] = []
        text = PARTS[part](args, generator, checks)
        name = f"bench_head: {part}" + (f" ({', '.join(args.heads)})" if args.heads else "")
        body = (
            f"`python/bench_head.py --parts {part}{' --heads ' + ' '.join(args.heads) if args.heads else ''}` — CPU ({platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores), torch {torch.__version__}, bayesdiff_ext {bayesdiff_ext.__version__}, float32. "
            f"Load average (1, 5, 15 min) {load_before} before and {load_average()} after (the machine is shared: "
            f"ratios within a round are fair, absolute times move with the load).{paused_note(args)}\n\n"
            + text
            + ("\n\nOutputs checked in the same run:\n\n" + "\n".join(checks) if checks else "")
        )
        print(body)
        if not args.no_write:
            write_section(Path(__file__).with_name("BENCHMARKS.md"), name, body)


def _chosen(heads, args):
    return [head for head in heads if not args.heads or any(key in head.name for key in args.heads)]


def _target_part(title, heads, inputs, candidates, full):
    def run(args, generator, checks):
        scaling = [f"fused {args.threads[0]}→{args.threads[-1]} threads"] if len(args.threads) > 1 else []
        ratios = ["eager / fused (≥ 1)", "eager / fused within a round (median)"]
        if full:
            header = ["head", "threads", "eager → square → mix (ms)", "fused (ms)", *ratios, *scaling]
        else:
            header = ["head", "threads", "forward alone (ms)", "eager pair (ms)", "fused (ms)", *ratios, *scaling]
        rows, disturbed = target_rows(_chosen(heads, args), inputs, candidates, args, generator, checks)
        return (
            f"{title}; median of {args.repeats} interleaved rounds (each round calls every candidate once at each "
            f"of {', '.join(map(str, args.threads))} threads, in a new random order each round; a round in which "
            f"other processes used more than {MAX_OTHERS:.0%} of a CPU was timed again: {disturbed} of them):\n\n"
            + markdown_table(header, rows)
        )

    return run


def _context_part(args, generator, checks):
    rows, threads = context_rows(_chosen(CONV_HEADS + LINEAR_HEADS + SMALL_HEADS, args), args, generator, checks)
    return (
        f"Context at {threads} threads, median of {args.context_repeats} interleaved rounds (diagonal "
        f"posterior): BayesDiff's estimator ({args.draws} weight draws, one head call each), the same draws in "
        "one call, and laplace-torch's GLM predictive where its memory (jacrev's B·K×B·K basis + the B·K·P "
        f"Jacobian + the B·K·K covariance, K = outputs per image, P = C·(D+1), float32) is below "
        f"{args.laplace_max_gib:g} GiB:\n\n"
        + markdown_table(
            [
                "head",
                "fused (ms)",
                f"{args.draws} draws (ms, × fused)",
                f"{args.draws} draws in one call (ms, × fused)",
                "laplace-torch GLM",
            ],
            rows,
        )
    )


def _memory_part(args, generator, checks):
    return (
        f"Peak memory of the Linear heads (MiB: the rise of the resident set during a first call, each "
        f"method in a fresh process at {args.threads[-1]} threads, inputs allocated before; φ of the Flux-like "
        "head is 48 MiB):\n\n" + markdown_table(["head", *METHODS], memory_rows(args))
    )


_DIAG = {"forward": forward, "eager": eager_diag, "fused": fused_diag}
_FULL = {"eager": eager_full, "fused": fused_full}
PARTS = {
    "conv-diag": _target_part("Conv heads, diagonal posterior (`conv_head_mean_var`; 3×3, padding 1)",
                              CONV_HEADS, diag_inputs, _DIAG, full=False),
    "conv-full": _target_part("Conv heads, full GGN (`conv_head_var_factored`, R = D+1 directions, mix = 1)",
                              CONV_FULL_HEADS, full_inputs, _FULL, full=True),
    "linear-diag": _target_part("Linear heads on tokens, diagonal posterior (`linear_head_mean_var`)",
                                LINEAR_HEADS, diag_inputs, _DIAG, full=False),
    "linear-full": _target_part("Linear heads on tokens, full GGN (the factored op on rows, R = D+1)",
                                LINEAR_HEADS, full_inputs, _FULL, full=True),
    "context": _context_part,
    "memory": _memory_part,
}


if __name__ == "__main__":
    main()
