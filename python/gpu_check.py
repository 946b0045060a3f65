"""Checks that need a CUDA GPU, in one script of under 5 minutes (issue 22; unrun where no GPU exists).

1. The op tests on the device: every test parametrised by the ``backend`` fixture runs its ``cuda``
   case (``pytest -k cuda`` on the op, moment, curvature and head test files).
2. One step in a CUDA graph: a Monte Carlo step of the moment recurrence (model call, head closed
   form, Monte Carlo moments with the regression covariance, the fused moment update) and a
   trajectory model call with the per-row head perturbation are captured with ``torch.cuda.graph``
   and replayed; the replays must equal eager runs on the same inputs (the step takes its normals
   drawn beforehand and keeps one head capture for the loop: no host synchronisation inside).
3. ``python/bench_truth.py --device cuda`` on the digits model (DDIM, 8 images, 20 steps; results to
   a temporary folder, BENCHMARKS.md untouched) and the op benchmarks (``--no-write``, few repeats;
   they time the CPU kernels of that machine: the scripts have no device option).

Run on a machine with a GPU: ``.venv/bin/python python/gpu_check.py`` (exit status 0: all passed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OP_TESTS = ["tests/test_moment_ops.py", "tests/test_head_ops.py", "tests/test_curvature_ops.py", "tests/test_cuda_emulation.py"]
DEADLINE_S = 300


def run(command: list[str], label: str, timeout: float) -> bool:
    started = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
        ok, tail = done.returncode == 0, (done.stdout + done.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {timeout:.0f} s"
    print(f"[{'ok' if ok else 'FAILED'}] {label} ({time.perf_counter() - started:.0f} s)\n{tail}", flush=True)
    return ok


def graph_checks() -> bool:
    """Capture and replay one recurrence step and one perturbed trajectory call; compare with eager."""
    sys.path.insert(0, str(ROOT / "tests"))
    from diffusers import DDIMScheduler
    from tiny_models import tiny_unet

    from bayesdiff_ext import LastLayerLaplace
    from bayesdiff_ext.posterior.perturbation import perturbed_head
    from bayesdiff_ext.randomness import ImageStreams
    from bayesdiff_ext.sampler.engine import StepEngine
    from bayesdiff_ext.sampler.model_call import ModelCall
    from bayesdiff_ext.sampler.schedulers import describe
    from bayesdiff_ext.sampler.settings import resolve_settings

    device = torch.device("cuda")
    unet = tiny_unet().to(device)
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    posterior = LastLayerLaplace(unet, "diag").fit(images, DDIMScheduler(), batch_size=8, progress=False)
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(5)
    plan = describe(scheduler, 0.0).steps()
    settings = resolve_settings(uq_every=1, mc_samples=4, covariance="regression").describe()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)

    def engine():
        streams = ImageStreams([torch.Generator(device).manual_seed(i) for i in range(2)], 2)
        return StepEngine(plan, settings, moment_dtype=torch.float32, generator=streams)

    def step(eng, call, normals):
        t = scheduler.timesteps[1]
        prediction, head_var = call(x, t, {}, want_head=eng.wants_head(1))
        eng.advance(plan[1], t, prediction, head_var, lambda s: call.head_at(s, t, {}, torch.float32, index=1), normals)
        return eng.mean, eng.var

    ok = True
    with torch.no_grad():
        eager, captured = engine(), engine()
        eager_call, captured_call = ModelCall(unet, scheduler, posterior), ModelCall(unet, scheduler, posterior)
        with eager_call.capturing(), captured_call.capturing():
            for eng, call in ((eager, eager_call), (captured, captured_call)):
                eng.start(x)
                prediction, head_var = call(x, scheduler.timesteps[0], {}, want_head=True)
                eng.advance(plan[0], scheduler.timesteps[0], prediction, head_var, None)
            normals = eager.normals(plan[1])
            start = (captured.mean.clone(), captured.var.clone(), captured.aleatoric.clone(), captured.received.clone())
            expected = [t.clone() for t in step(eager, eager_call, normals)]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (workspace allocation)
                captured.mean, captured.var, captured.aleatoric, captured.received = (t.clone() for t in start)
                step(captured, captured_call, normals)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            captured.mean, captured.var, captured.aleatoric, captured.received = (t.clone() for t in start)
            inputs = (captured.mean, captured.var)
            with torch.cuda.graph(graph):
                outputs = step(captured, captured_call, normals)
            inputs[0].copy_(start[0])
            inputs[1].copy_(start[1])
            graph.replay()
            torch.cuda.synchronize()
            for got, want, name in zip(outputs, expected, ("mean", "var")):
                close = torch.allclose(got, want, rtol=1e-4, atol=1e-6)
                ok &= close
                print(f"[{'ok' if close else 'FAILED'}] CUDA graph replay of a recurrence step: {name}", flush=True)

        deviations = torch.randn(4, posterior.spec.num_params, generator=torch.Generator().manual_seed(2)).to(device) * 1e-2
        rows = torch.cat([x, x])
        t = torch.tensor(500, device=device)
        with perturbed_head(posterior.head, posterior.spec, deviations):
            want = unet(rows, t).sample
            static = rows.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                unet(static, t)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = unet(static, t).sample
            graph.replay()
            torch.cuda.synchronize()
        close = torch.allclose(out, want, rtol=1e-4, atol=1e-5)
        ok &= close
        print(f"[{'ok' if close else 'FAILED'}] CUDA graph replay of a perturbed trajectory model call", flush=True)
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (run this script on a machine with a GPU)")
        return 2
    started = time.perf_counter()
    python = sys.executable
    results = [run([python, "-m", "pytest", "-q", "-k", "cuda", *OP_TESTS], "op tests on the GPU", 120)]
    try:
        results.append(graph_checks())
    except Exception as err:  # a failed capture is a failed check, reported with the others
        print(f"[FAILED] CUDA graph checks: {type(err).__name__}: {err}", flush=True)
        results.append(False)
    with tempfile.TemporaryDirectory() as folder:
        results.append(run(
            [python, "python/bench_truth.py", "--config", "digits-ddim", "--images", "8", "--steps", "20",
             "--device", "cuda", "--results", folder],
            "bench_truth on the GPU (digits, DDIM 20 steps, 8 images)",
            max(30.0, DEADLINE_S - 60 - (time.perf_counter() - started)),
        ))
    for script in ("bench_recurrence.py", "bench_head.py"):
        left = DEADLINE_S - (time.perf_counter() - started)
        if left < 20:
            print(f"[skipped] {script}: the 5-minute budget is spent")
            continue
        results.append(run([python, f"python/{script}", "--no-write", "--repeats", "3"], f"{script} (CPU kernels)", left))
    total = time.perf_counter() - started
    print(f"{sum(results)} of {len(results)} checks passed in {total:.0f} s (budget {DEADLINE_S} s)")
    return 0 if all(results) and total <= DEADLINE_S else 1


if __name__ == "__main__":
    sys.exit(main())
