"""Fit and sampling throughput with 1 and 2 processes (torch.distributed, gloo on the CPU).

Each measurement starts W fresh worker processes (this script with --worker) in one gloo group. A
worker uses one thread and loads the bundled digits model; between two barriers it fits a diag
posterior on its share of N_fit digits (LastLayerLaplace.fit in the process group: its shard, then
one float64 all-reduce), and between two more it samples its share of N_sample images (batches of B
by global index, bayesdiff_ext.distributed.shard_batches, then gather_by_index to process 0). The
time of a phase is the slowest process's; throughput = images / time; medians over repeats. Also
reported: what crosses between processes (the all-reduced accumulators, the gathered results).

This machine has 2 CPU cores shared with other work, so 2 processes can at best double the
throughput, and the load average says how much of the second core was free.

Run: .venv/bin/python python/bench_scaleout.py   (writes the `bench_scaleout` section of BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_timing import markdown_table, write_section

FIT_IMAGES, FIT_BATCH = 1024, 64
SAMPLE_IMAGES, SAMPLE_BATCH, STEPS = 32, 8, 10


def worker(rank: int, world: int, folder: str) -> None:
    import datetime

    import torch.distributed as dist
    from diffusers import DDIMScheduler

    from bayesdiff_ext import BayesDiffSampler, LastLayerLaplace, digits
    from bayesdiff_ext.distributed import barrier, gather_by_index, shard_batches, shard_indices
    from bayesdiff_ext.randomness import image_generators

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )
    unet, scheduler = digits.load_bundled_unet(), digits.load_bundled_scheduler()
    images = digits.load_digits_images(resolution=unet.config.sample_size)[0]
    images = images.repeat(-(-FIT_IMAGES // len(images)), 1, 1, 1)[:FIT_IMAGES]

    barrier()
    started = time.perf_counter()
    posterior = LastLayerLaplace(unet, "diag").fit(
        images, scheduler, batch_size=FIT_BATCH, generator=torch.Generator().manual_seed(0), progress=False
    )
    barrier()
    fit_s = time.perf_counter() - started

    sampler = BayesDiffSampler(unet, DDIMScheduler.from_config(scheduler.config, clip_sample=False), posterior)
    barrier()
    started = time.perf_counter()
    parts = [
        sampler.sample(batch_size=len(b), generator=image_generators(0, b), num_inference_steps=STEPS, progress=False)
        for b in shard_batches(SAMPLE_IMAGES, SAMPLE_BATCH)
    ]
    results = {k: torch.cat([getattr(p, k) for p in parts]) for k in ("images", "variance", "mean", "aleatoric_variance")}
    gathered = gather_by_index(shard_indices(SAMPLE_IMAGES, SAMPLE_BATCH), results)
    barrier()
    sample_s = time.perf_counter() - started
    if rank == 0:
        reduced = sum(t.numel() for t in posterior.posterior.tensors().values()) + 4
        gathered_bytes = sum(t.numel() * t.element_size() for t in gathered.values())
        print(json.dumps(dict(fit_s=fit_s, sample_s=sample_s, reduced=reduced, gathered_bytes=gathered_bytes)))
    dist.destroy_process_group()


def measure(world: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        children = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(rank), str(world), folder],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for rank in range(world)
        ]
        outputs = [child.communicate() for child in children]
    for child, (_, err) in zip(children, outputs):
        if child.returncode != 0:
            sys.exit(f"worker failed:\n{err}")
    return json.loads(outputs[0][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=3, metavar=("RANK", "WORLD", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(int(args.worker[0]), int(args.worker[1]), args.worker[2])
        return
    load_before = os.getloadavg()[0]
    runs = {world: [measure(world) for _ in range(args.repeats)] for world in (1, 2)}
    load_after = os.getloadavg()[0]
    median = {w: {k: statistics.median(r[k] for r in rs) for k in ("fit_s", "sample_s")} for w, rs in runs.items()}
    rows = []
    for phase, images, key in (("fit", FIT_IMAGES, "fit_s"), ("sample", SAMPLE_IMAGES, "sample_s")):
        one, two = median[1][key], median[2][key]
        rows.append([phase, f"{images / one:.1f}", f"{images / two:.1f}", f"{one / two:.2f}×"])
    extra = runs[1][0]
    body = f"""`python/bench_scaleout.py` — median of {args.repeats}; one thread per process, gloo on the CPU;
torch {torch.__version__}, {os.cpu_count()} CPUs shared with other work, {platform.machine()}; load average
{load_before:.1f} before, {load_after:.1f} after. Fit: diag GGN on {FIT_IMAGES} digits in batches of
{FIT_BATCH}; sample: {SAMPLE_IMAGES} images, DDIM {STEPS} steps, batches of {SAMPLE_BATCH} (the sampler's
default uncertainty settings), gathered to process 0. Times exclude starting the processes.

{markdown_table(["phase", "1 process (images/s)", "2 processes (images/s)", "speed-up"], rows)}

Between the processes: the fit all-reduces {extra["reduced"]} float64 numbers once (the diag
curvature of the digits head, the bias terms and 4 counts/sums); sampling exchanges nothing until the
end, then {extra["gathered_bytes"] / SAMPLE_IMAGES / 1e3:.1f} kB per image (image, mean, variance and
its aleatoric part, float32) go to process 0."""
    write_section(Path(__file__).with_name("BENCHMARKS.md"), "bench_scaleout", body)
    print(body)


if __name__ == "__main__":
    main()
