"""End-to-end time of `bayesdiff demo` (the issue's budget: under 60 s on 2 CPU cores).

Each repeat runs the command in a fresh process, exactly as a user would (imports, model and
posterior loading, sampling with uncertainty, scoring, writing the output folder). The baseline,
measured in the same run, is a fresh process that imports the same packages and makes the same 64
images with the plain diffusers DDIM loop (50 steps, same UNet, no uncertainty, no files). Reports
medians of wall time and of CPU time (user + system of the child), and the load average, because
on a shared machine other processes inflate wall time.

Run: .venv/bin/python python/bench_demo.py   (writes the `bench_demo` section of BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_timing import markdown_table, write_section


def plain_ddim(num_images: int, steps: int, seed: int) -> None:
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    import bayesdiff_ext  # noqa: F401  (the same imports as the command)
    from bayesdiff_ext.digits import load_bundled_scheduler, load_bundled_unet

    unet = load_bundled_unet()
    scheduler = DDIMScheduler.from_config(load_bundled_scheduler().config, clip_sample=False)
    scheduler.set_timesteps(steps)
    size = unet.config.sample_size
    x = randn_tensor(
        (num_images, unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample


def timed_child(argv: list[str], threads: int | None) -> tuple[float, float]:
    """Wall and CPU seconds of a child process running argv."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of the child processes (default: torch's choice, one per core)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--plain-ddim", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_ddim:
        plain_ddim(num_images=64, steps=50, seed=0)
        return

    load_before = os.getloadavg()[0]
    demo_wall, demo_cpu, plain_wall, plain_cpu, sampling = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            out = Path(tmp) / f"run{i}"
            demo = [sys.executable, "-m", "bayesdiff_ext.cli", "demo", "--no-progress", "--out", str(out)]
            wall, cpu = timed_child(demo, args.threads)
            demo_wall.append(wall)
            demo_cpu.append(cpu)
            sampling.append(json.loads((out / "summary.json").read_text())["timings"]["sample_s"])
            wall, cpu = timed_child([sys.executable, __file__, "--plain-ddim"], args.threads)
            plain_wall.append(wall)
            plain_cpu.append(cpu)
    load_after = os.getloadavg()[0]

    med = statistics.median
    rows = [
        [
            "`bayesdiff demo` (64 images, DDIM 50, uq_every 5, S = 10)",
            f"{med(demo_wall):.1f}",
            f"{med(demo_cpu):.1f}",
            f"{med(sampling):.1f}",
        ],
        [
            "plain diffusers DDIM 50, same 64 images, no files",
            f"{med(plain_wall):.1f}",
            f"{med(plain_cpu):.1f}",
            "–",
        ],
        [
            "ratio demo / plain",
            f"{med(demo_wall) / med(plain_wall):.2f}×",
            f"{med(demo_cpu) / med(plain_cpu):.2f}×",
            "",
        ],
    ]
    table = markdown_table(["process", "wall (s)", "CPU user+sys (s)", "sampling inside (s)"], rows)
    threads = args.threads or torch.get_num_threads()
    body = (
        f"`python/bench_demo.py` — fresh process per run, median of {args.repeats}; "
        f"torch {torch.__version__} with {threads} threads, {os.cpu_count()} CPUs, {platform.machine()}; "
        f"load average {load_before:.1f} before, {load_after:.1f} after (above ~2, other processes compete "
        "for the cores and wall time overstates the cost).\n\n" + table
    )
    print(body)
    if not args.no_write:
        section = "bench_demo" if args.threads is None else f"bench_demo --threads {args.threads}"
        write_section(Path(__file__).with_name("BENCHMARKS.md"), section, body)


if __name__ == "__main__":
    main()
