"""A seeded random search over the compiled ops' arguments (shapes, strides, dtypes, geometry,
scalars, negative variances), on the CPU kernels and on the emulated CUDA kernels.

Every call must end in one of two ways: a result equal to the float64 reference (``reference.py``)
within float32 or float64 rounding, with no negative output variance; or a RuntimeError /
ValueError / TypeError whose message names the op or an argument. Arguments the generator made
valid must give a result. The fake (meta) implementation must fail exactly where the real op fails,
and otherwise give the real op's shape and dtype. The search runs in a child process, so that a
crash (a segfault, an abort) fails the test with the case that caused it instead of killing pytest.

Run by hand: ``python tests/test_op_fuzz.py --seed 3 --cases 2000`` (prints each case first).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field

import torch
from test_build import OPS  # every op; test_build checks the list against csrc/schemas.h

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NOT_FLOATS = [torch.int32, torch.int64, torch.bool, torch.complex64]
SEED, CASES = 20240611, 480


@dataclass
class Case:
    op: str
    args: list
    must_succeed: bool
    notes: list = field(default_factory=list)
    variances: tuple = ()  # indices of the outputs that are variances (>= 0)


class Generator:
    """Random arguments for every op, with optional mutations that may make them invalid."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        torch.manual_seed(seed)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def int(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def shape(self, rank_low=0, rank_high=4, size_high=9) -> tuple:
        return tuple(self.int(0 if self.chance(0.1) else 1, size_high) for _ in range(self.int(rank_low, rank_high)))

    def tensor(self, shape, dtype, positive=False, scale=1.0) -> torch.Tensor:
        """Random values, sometimes negative where `positive` (a bad variance), and a random
        layout: contiguous, or a view of a larger, transposed or strided buffer."""
        values = torch.randn(shape, dtype=torch.float64) * scale
        if positive and not self.chance(0.1):
            values = values.abs()
        t = values.to(dtype)
        layout = self.rng.choice(["contiguous", "contiguous", "strided", "transposed"])
        if layout == "strided" and t.dim() >= 1:
            wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=dtype)
            wide[..., 1::2] = t
            t = wide[..., 1::2]
        elif layout == "transposed" and t.dim() >= 2:
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        return t

    def mutate(self, case: Case, tensor_slots: list, scalar_mutations: list) -> Case:
        """With some chance, break one argument: its dtype, its shape, or a scalar."""
        if not self.chance(0.3):
            return case
        choices = [i for i in tensor_slots if case.args[i] is not None]
        kind = self.rng.choice(["dtype", "shape", "rank"] + (["scalar"] if scalar_mutations else []))
        if kind == "scalar":
            slot, value = self.rng.choice(scalar_mutations)
            case.args[slot] = value
            case.notes.append(f"arg {slot} := {value!r}")
        elif choices:
            slot = self.rng.choice(choices)
            t = case.args[slot]
            if kind == "dtype":
                dtype = self.rng.choice([d for d in FLOATS + NOT_FLOATS if d != t.dtype])
                case.args[slot] = t.to(dtype)
                case.notes.append(f"arg {slot} dtype := {dtype}")
            elif kind == "shape" and t.dim() >= 1:
                dim = self.int(0, t.dim() - 1)
                grown = torch.cat([t, t.narrow(dim, 0, min(1, t.shape[dim]))], dim=dim)
                case.args[slot] = grown if self.chance(0.5) or t.shape[dim] == 0 else t.narrow(dim, 0, t.shape[dim] - 1)
                case.notes.append(f"arg {slot} shape {tuple(t.shape)} -> {tuple(case.args[slot].shape)}")
            else:
                drop = t.dim() > 0 and t.shape[0] > 0 and self.chance(0.5)
                case.args[slot] = t[0] if drop else t.unsqueeze(0)
                case.notes.append(f"arg {slot} rank {t.dim()} -> {case.args[slot].dim()}")
        case.must_succeed = False
        return case

    def geometry(self):
        kernel = [self.int(1, 3), self.int(1, 3)]
        stride = [self.int(1, 3), self.int(1, 3)]
        padding = [self.int(0, 2), self.int(0, 2)]
        dilation = [self.int(1, 2), self.int(1, 2)]
        return kernel, stride, padding, dilation

    @staticmethod
    def fits(size, kernel, stride, padding, dilation) -> bool:
        return all(size[k] + 2 * padding[k] - dilation[k] * (kernel[k] - 1) - 1 >= 0 for k in range(2))

    def bad_geometry(self, case: Case, slots: dict) -> Case:
        """Sometimes an invalid stride, padding, dilation or kernel size."""
        if self.chance(0.1):
            minimums = {"stride": 1, "padding": 0, "dilation": 1, "kernel_size": 1}
            name, minimum = self.rng.choice([(n, m) for n, m in minimums.items() if n in slots])
            case.args[slots[name]] = [minimum - 1, self.int(minimum, 2)]
            case.notes.append(f"{name} := {case.args[slots[name]]}")
            case.must_succeed = False
        return case

    # --- one generator per op ------------------------------------------------------------------

    def moment_step(self) -> Case:
        shape, dtype = self.shape(), self.rng.choice(FLOATS)
        args = [
            self.tensor(shape, dtype),
            self.tensor(shape, dtype, positive=True),
            self.tensor(shape, dtype),
            self.tensor(shape, dtype, positive=True) if self.chance(0.7) else None,
            self.tensor(shape, dtype, scale=0.3) if self.chance(0.7) else None,
            self.rng.uniform(-2, 2),
            self.rng.uniform(-2, 2),
            self.rng.uniform(0, 1),
            self.chance(0.8),
        ]
        case = Case("moment_step", args, True, variances=(1,) if args[8] else ())
        bad_scalars = [(5, float("nan")), (6, float("inf")), (7, -0.5)]
        return self.mutate(case, [0, 1, 2, 3, 4], bad_scalars)

    def _samples(self, op: str, step: bool) -> Case:
        """mc_moments' arguments, and with `step` mc_moment_step's (var_x and the step's scalars)."""
        shape, dtype, samples = self.shape(), self.rng.choice(FLOATS), self.int(1, 6)
        stack = (samples, *shape)
        args = [
            self.tensor(stack, dtype),
            self.tensor(stack, dtype),
            self.tensor(stack, dtype, positive=True) if self.chance(0.7) else None,
            self.tensor(shape, dtype),
        ]
        if step:
            clamp = self.chance(0.8)
            args += [self.tensor(shape, dtype, positive=True), self.rng.uniform(-2, 2), self.rng.uniform(-2, 2)]
            args += [self.rng.uniform(0, 1), clamp]
        case = Case(op, args, True, variances=((1, 2) if args[-1] else (2,)) if step else (1,))
        if self.chance(0.05):
            case.args = [t[:0] if t is not None else None for t in args[:3]] + args[3:]
            case.notes.append("S := 0")
            case.must_succeed = False
        bad_scalars = [(5, float("nan")), (6, float("inf")), (7, -0.5)] if step else []
        return self.mutate(case, [0, 1, 2, 3, 4] if step else [0, 1, 2, 3], bad_scalars)

    def mc_moments(self) -> Case:
        return self._samples("mc_moments", step=False)

    def mc_moment_step(self) -> Case:
        return self._samples("mc_moment_step", step=True)

    def conv_head_mean_var(self) -> Case:
        groups = self.int(1, 3)
        c_in, c_out = groups * self.int(1, 3), groups * self.int(1, 3)
        batch, size = self.int(0, 3), (self.int(1, 9), self.int(1, 9))
        kernel, stride, padding, dilation = self.geometry()
        dtype = self.rng.choice(FLOATS)
        w_shape = (c_out, c_in // groups, *kernel)
        with_bias = self.chance(0.7)
        args = [
            self.tensor((batch, c_in, *size), dtype),
            self.tensor(w_shape, dtype, scale=0.5),
            self.tensor((c_out,), dtype) if with_bias else None,
            self.tensor(w_shape, dtype, positive=True, scale=0.1),
            self.tensor((c_out,), dtype, positive=True) if with_bias and self.chance(0.8) else None,
            stride,
            padding,
            dilation,
            groups,
        ]
        case = Case("conv_head_mean_var", args, self.fits(size, kernel, stride, padding, dilation), variances=(1,))
        if self.chance(0.05):
            case.args[8] = self.rng.choice([0, groups + 1])
            case.notes.append(f"groups := {case.args[8]}")
            case.must_succeed = False
        case = self.bad_geometry(case, {"stride": 5, "padding": 6, "dilation": 7})
        return self.mutate(case, [0, 1, 2, 3, 4], [])

    def linear_head_mean_var(self) -> Case:
        features, outputs = self.int(0, 40), self.rng.choice([self.int(1, 6), self.int(14, 24)])
        shape, dtype = (*self.shape(0, 3, 6), features), self.rng.choice(FLOATS)
        with_bias = self.chance(0.7)
        args = [
            self.tensor(shape, dtype),
            self.tensor((outputs, features), dtype, scale=0.5),
            self.tensor((outputs,), dtype) if with_bias else None,
            self.tensor((outputs, features), dtype, positive=True, scale=0.1),
            self.tensor((outputs,), dtype, positive=True) if with_bias and self.chance(0.8) else None,
        ]
        return self.mutate(Case("linear_head_mean_var", args, True, variances=(1,)), [0, 1, 2, 3, 4], [])

    def conv_head_var_factored(self) -> Case:
        c_in, channels, rank = self.int(1, 4), self.int(1, 4), self.int(1, 20)
        batch, size = self.int(0, 2), (self.int(1, 8), self.int(1, 8))
        kernel, stride, padding, dilation = self.geometry()
        dtype = self.rng.choice(FLOATS)
        args = [
            self.tensor((batch, c_in, *size), dtype),
            self.tensor((rank, c_in, *kernel), dtype, scale=0.5),
            self.tensor((rank,), dtype) if self.chance(0.7) else None,
            self.tensor((channels, rank), dtype, positive=True),
            self.tensor((channels,), dtype, positive=True) if self.chance(0.7) else None,
            stride,
            padding,
            dilation,
        ]
        case = Case("conv_head_var_factored", args, self.fits(size, kernel, stride, padding, dilation), variances=(0,))
        case = self.bad_geometry(case, {"stride": 5, "padding": 6, "dilation": 7})
        return self.mutate(case, [0, 1, 2, 3, 4], [])

    def _conv_curvature(self, op: str) -> Case:
        batch, c_in, size = self.int(0, 3), self.int(1, 4), (self.int(1, 9), self.int(1, 9))
        kernel, stride, padding, dilation = self.geometry()
        dtype = self.rng.choice(FLOATS)
        fits = self.fits(size, kernel, stride, padding, dilation)
        phi = self.tensor((batch, c_in, *size), dtype)
        geometry = [kernel, stride, padding, dilation]
        if op == "conv_diag_ef":
            out = [(size[k] + 2 * padding[k] - dilation[k] * (kernel[k] - 1) - 1) // stride[k] + 1 for k in range(2)]
            residual = self.tensor((batch, self.int(1, 9), *[max(o, 1) for o in out]), dtype)
            case = Case(op, [phi, residual, *geometry], fits, variances=(0,))
            slots = {"kernel_size": 2, "stride": 3, "padding": 4, "dilation": 5}
            tensors = [0, 1]
        else:
            case = Case(op, [phi, *geometry], fits, variances=(0,) if op == "conv_diag_ggn" else ())
            slots = {"kernel_size": 1, "stride": 2, "padding": 3, "dilation": 4}
            tensors = [0]
        return self.mutate(self.bad_geometry(case, slots), tensors, [])

    def conv_diag_ggn(self) -> Case:
        return self._conv_curvature("conv_diag_ggn")

    def conv_diag_ef(self) -> Case:
        return self._conv_curvature("conv_diag_ef")

    def conv_patch_gram(self) -> Case:
        return self._conv_curvature("conv_patch_gram")

    def _linear_curvature(self, op: str) -> Case:
        rank_low = 2 if op == "linear_diag_ef" else 1
        shape, dtype = (*self.shape(rank_low - 1, 3, 7), self.int(0, 40)), self.rng.choice(FLOATS)
        phi = self.tensor(shape, dtype)
        if op == "linear_diag_ef":
            case = Case(op, [phi, self.tensor((*shape[:-1], self.int(1, 10)), dtype)], True, variances=(0,))
            return self.mutate(case, [0, 1], [])
        return self.mutate(Case(op, [phi], True, variances=(0,) if op == "linear_diag_ggn" else ()), [0], [])

    def linear_diag_ggn(self) -> Case:
        return self._linear_curvature("linear_diag_ggn")

    def linear_diag_ef(self) -> Case:
        return self._linear_curvature("linear_diag_ef")

    def linear_gram(self) -> Case:
        return self._linear_curvature("linear_gram")




def _abs(args):
    return [a.abs() if isinstance(a, torch.Tensor) else a for a in args]


def rounding_scale(case: Case, reference) -> list[torch.Tensor]:
    """Per output, a bound on the magnitude of the terms it sums: rounding is relative to it."""
    ref = getattr(reference, case.op)
    args = case.args
    if case.op == "moment_step":
        a, b, c2 = abs(args[5]), abs(args[6]), args[7]
        return list(ref(*_abs(args[:5]), a, b, c2, False))
    if case.op in ("mc_moments", "mc_moment_step"):
        x, m, v, mean_x, *var_x = (0.0 if t is None or t.numel() == 0 else float(t.double().abs().max()) for t in args[:5])
        big = m * m + x * m + mean_x * m + v
        if case.op == "mc_moments":
            return [torch.full(args[3].shape, big, dtype=torch.float64)] * 3
        a, b, c2 = abs(args[5]), abs(args[6]), args[7]
        bounds = (a * mean_x + b * m, a * a * var_x[0] + (2 * a * b + b * b) * big + c2, big)
        return [torch.full(args[3].shape, bound, dtype=torch.float64) for bound in bounds]
    bound = ref(*_abs(args))
    bound = list(bound) if isinstance(bound, tuple) else [bound]
    return [2 * b for b in bound] if case.op == "conv_head_var_factored" else bound


def as_outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


CLEAR = re.compile(r"`\w+`|" + "|".join(OPS))


def run_case(case: Case, lib, reference) -> tuple[str | None, bool]:
    """(None if the case passes, else what went wrong; whether the op raised)."""
    op = getattr(lib, case.op)
    try:
        outputs = as_outputs(op(*case.args))
        error = None
    except (RuntimeError, ValueError, TypeError) as err:
        outputs, error = None, err
    meta_args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in case.args]
    try:
        meta = as_outputs(op(*meta_args))
        meta_error = None
    except (RuntimeError, ValueError, TypeError) as err:
        meta, meta_error = None, err
    if error is not None:
        message = str(error).splitlines()[0]
        if case.must_succeed:
            return f"valid arguments raised {type(error).__name__}: {message}", True
        if not CLEAR.search(str(error)):
            return f"unclear {type(error).__name__}: {message}", True
        if meta_error is None:
            return f"the fake accepted what the op rejects ({message})", True
        return None, True
    return check_result(case, outputs, meta, meta_error, reference), False


def check_result(case: Case, outputs, meta, meta_error, reference) -> str | None:
    if meta_error is not None:
        return f"the fake rejects what the op accepts: {str(meta_error).splitlines()[0]}"
    try:
        expected = as_outputs(getattr(reference, case.op)(*case.args))
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        return f"the op accepted arguments the reference rejects: {str(err).splitlines()[0]}"
    scales = rounding_scale(case, reference)
    for k, (out, ref, scale, fake) in enumerate(zip(outputs, expected, scales, meta)):
        if out.shape != ref.shape or fake.shape != out.shape or fake.dtype != out.dtype:
            return (
                f"output {k}: shape {tuple(out.shape)}, fake {tuple(fake.shape)} {fake.dtype}, "
                f"reference {tuple(ref.shape)}"
            )
        tol = 1e-10 if out.dtype == torch.float64 else 5e-5
        got = out.double()
        nan = torch.isnan(ref)
        if not torch.equal(torch.isnan(got), nan):
            return f"output {k}: NaN where the reference has none (or the reverse)"
        err = (got - ref).abs()[~nan]
        allowed = (tol * (scale.double().abs() + ref.abs()) + 1e-30)[~nan]
        if err.numel() and bool((err > allowed).any()):
            return f"output {k}: error {float((err / allowed).max()):.3g}× the tolerance"
        if k in case.variances and bool((got[~torch.isnan(got)] < 0).any()):
            return f"output {k} is a variance with a negative entry"
    return None


def describe(case: Case) -> str:
    def one(a) -> str:
        if not isinstance(a, torch.Tensor):
            return repr(a)
        return f"{tuple(a.shape)}:{str(a.dtype)[6:]}:{'c' if a.is_contiguous() else 'nc'}"

    parts = [one(a) for a in case.args]
    return f"{case.op}({', '.join(parts)}){' ' + '; '.join(case.notes) if case.notes else ''}"


def search(seed: int, cases: int) -> int:
    from bayesdiff_ext import emulation, ops, reference  # noqa: F401  (ops registers the library)

    torch.set_num_threads(1)
    libs = {"cpu": torch.ops.bayesdiff_ext, "emulated_cuda": emulation.load()}
    generator = Generator(seed)
    failures, raised = [], 0
    for i in range(cases):
        case = getattr(generator, OPS[i % len(OPS)])()
        backend = "cpu" if i % 3 else "emulated_cuda"
        print(f"CASE {i} {backend} {describe(case)}", flush=True)
        problem, error = run_case(case, libs[backend], reference)
        raised += error
        if problem is not None:
            failures.append(f"case {i} on {backend}: {describe(case)}: {problem}")
    print("SUMMARY " + json.dumps({"failures": failures, "cases": cases, "raised": raised}), flush=True)
    return 1 if failures else 0


def test_random_arguments_end_in_the_reference_or_a_clear_error():
    proc = subprocess.run(
        [sys.executable, __file__, "--seed", str(SEED), "--cases", str(CASES)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = proc.stdout.splitlines()
    summary = [line for line in lines if line.startswith("SUMMARY ")]
    if not summary:
        last = [line for line in lines if line.startswith("CASE ")][-1:]
        raise AssertionError(f"the search process died (exit {proc.returncode}) at {last}\n{proc.stderr[-3000:]}")
    failures = json.loads(summary[0][len("SUMMARY "):])["failures"]
    assert not failures, "\n".join(failures[:20])
    assert proc.returncode == 0, proc.stderr[-3000:]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--cases", type=int, default=CASES)
    options = parser.parse_args()
    sys.exit(search(options.seed, options.cases))
