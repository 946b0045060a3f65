"""Wall time of BayesDiffSampler relative to plain DDIM on the same UNet, batch, noise and steps.

Modes (DDIM η = 0, 50 steps, deterministic images, diag posterior):
  (a) the paper's defaults: uncertainty every 5th step (`uq_every=5`) with S = 10 Monte Carlo
      samples through the UNet in one batched call (target ≤ 3.0× plain);
  (b) no covariance, the head's closed-form variance at every step (`covariance='none'`,
      `mc_samples=0`, `uq_every=1`): no extra UNet calls (target ≤ 1.15× plain).
The baseline is the scheduler's own loop `x = scheduler.step(unet(x, t).sample, t, x).prev_sample`
(what DDIMPipeline runs). All three run alternately, round after round, so that load from other
processes on the shared machine falls on every mode alike; the ratios are of medians. Every timed run
is instrumented (forward hooks, timing wrappers: microseconds per call): UNet calls and images, and
its time split into UNet calls (image path / Monte Carlo batch), head ops, moment ops,
`scheduler.step` and the rest. The Monte Carlo batch's UNet cost is also measured against the same
images in calls of the image batch size, with a profile of what grows. Spearman's ρ compares (a)'s
and (b)'s image scores over the timed batch and further batches.

Configurations: the bundled digits UNet (16×16, 1 channel, its fitted diag posterior) and a
random-init UNet2DModel at 32×32 with 3 channels (diag posterior fitted on random images: the
numbers are meaningless, the cost is the real one).

Run: .venv/bin/python python/bench_sampler.py   (writes the `bench_sampler` section of BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from scipy.stats import spearmanr

import bayesdiff_ext
from bayesdiff_ext import BayesDiffSampler, LastLayerLaplace, ops
from bayesdiff_ext.digits import bundled_dir, load_bundled_scheduler, load_bundled_unet
from bench_timing import add_paused_flag, markdown_table, paused_note, verdict, write_section

STEPS = 50
SAMPLES = 10
MODES = {
    f"(a) paper defaults: uq_every=5, S={SAMPLES}, covariance='mc'": (
        {"uq_every": 5, "mc_samples": SAMPLES, "covariance": "mc"},
        3.0,
    ),
    "(b) closed-form head variance every step, covariance='none', mc_samples=0": (
        {"uq_every": 1, "mc_samples": 0, "covariance": "none"},
        1.15,
    ),
}
PLAIN = "plain DDIM (scheduler loop)"


@dataclass
class Setup:
    name: str
    unet: UNet2DModel
    scheduler: DDIMScheduler
    posterior: LastLayerLaplace


def digits_setup() -> Setup:
    unet = load_bundled_unet()
    scheduler = DDIMScheduler.from_config(load_bundled_scheduler().config, clip_sample=False)
    posterior = LastLayerLaplace.load(bundled_dir() / "posterior_diag.safetensors", unet)
    return Setup("digits 16×16×1 (bundled, 1.1 M params)", unet, scheduler, posterior)


def random32_setup(seed: int) -> Setup:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    ).eval()
    images = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    posterior = LastLayerLaplace(unet).fit(
        images,
        DDPMScheduler(num_train_timesteps=1000, clip_sample=False),
        generator=torch.Generator().manual_seed(seed),
        progress=False,
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    return Setup(f"random-init 32×32×3 ({params:.1f} M params)", unet, scheduler, posterior)


def plain_ddim(setup: Setup, noise: torch.Tensor) -> torch.Tensor:
    scheduler = setup.scheduler
    scheduler.set_timesteps(STEPS)
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(setup.unet(x, t).sample, t, x).prev_sample
    return x


def bayesdiff(setup: Setup, noise: torch.Tensor, seed: int, settings: dict, posterior=None):
    sampler = BayesDiffSampler(setup.unet, setup.scheduler, posterior or setup.posterior)
    return sampler.sample(
        noise=noise,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        progress=False,
        **settings,
    )


class Stopwatch:
    """Seconds spent inside labelled calls; nested labels are not subtracted from their callers."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        return timed


class UNetMeter:
    """Forward hooks on the UNet: calls, images pushed through it and seconds, by batch size; also
    the Monte Carlo calls whose S samples are all the same images (nothing to average over)."""

    def __init__(self, unet: torch.nn.Module, image_batch: int) -> None:
        self.unet, self.image_batch = unet, image_batch
        self.calls = self.images = self.mc_calls = self.identical_mc_calls = 0
        self.seconds = {"image path": 0.0, "Monte Carlo": 0.0}
        self._started = 0.0

    def _before(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.calls += 1
        self.images += sample.shape[0]
        self._monte_carlo = sample.shape[0] != self.image_batch
        self.mc_calls += self._monte_carlo
        if self._monte_carlo:
            copies = sample.unflatten(0, (-1, self.image_batch))
            self.identical_mc_calls += bool((copies == copies[:1]).all())
        self._started = time.perf_counter()

    def _after(self, module, args, kwargs, output) -> None:
        key = "Monte Carlo" if self._monte_carlo else "image path"
        self.seconds[key] += time.perf_counter() - self._started

    @contextlib.contextmanager
    def attached(self) -> Iterator[UNetMeter]:
        handles = [
            self.unet.register_forward_pre_hook(self._before, with_kwargs=True),
            self.unet.register_forward_hook(self._after, with_kwargs=True),
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


class TimedPosterior:
    """The posterior as the sampler sees it (capture, predict, eps_channels, structure), with
    predict — the fused head ops — timed."""

    def __init__(self, posterior: LastLayerLaplace, watch: Stopwatch) -> None:
        self.capture = posterior.capture
        self.predict = watch.wrap("head ops", posterior.predict)
        self.eps_channels = posterior.eps_channels
        self.structure = posterior.structure


@dataclass
class Breakdown:
    """One run: its wall time, the UNet's calls and seconds, and seconds inside the labelled parts."""

    total: float
    unet: UNetMeter
    parts: dict[str, float]

    def seconds(self, part: str) -> float:
        if part in self.unet.seconds:
            return self.unet.seconds[part]
        if part == "rest":
            return self.total - sum(self.unet.seconds.values()) - sum(self.parts.values())
        return self.parts.get(part, 0.0)

    def over_image_path(self) -> float:
        """Wall time over the part plain DDIM also does (image-path UNet calls and scheduler.step),
        both measured inside this run, step by step alongside the extra work."""
        return self.total / (self.unet.seconds["image path"] + self.parts["scheduler.step"])


def instrumented(setup: Setup, noise: torch.Tensor, run: Callable[[object], object]) -> Breakdown:
    """Run `run(posterior)` with UNet time from forward hooks, head ops timed around the posterior's
    predict, moment ops and scheduler.step through timing wrappers around the real functions (a few
    microseconds per call)."""
    watch = Stopwatch()
    meter = UNetMeter(setup.unet, noise.shape[0])
    scheduler = setup.scheduler
    with contextlib.ExitStack() as stack:
        stack.enter_context(meter.attached())
        for name in ("moment_step", "mc_moments"):
            stack.enter_context(mock.patch.object(ops, name, watch.wrap("moment ops", getattr(ops, name))))
        stack.enter_context(
            mock.patch.object(scheduler, "step", watch.wrap("scheduler.step", scheduler.step))
        )
        start = time.perf_counter()
        run(TimedPosterior(setup.posterior, watch))
        total = time.perf_counter() - start
    return Breakdown(total, meter, watch.seconds)


def interleaved(runs: dict[str, Callable[[], Breakdown]], repeats: int, loads: list[float]):
    """Each run once to warm up, then `repeats` rounds of all of them in turn, so that load from
    other processes falls on every mode alike; the 1-minute load average is noted after each round."""
    for run in runs.values():
        run()
    rounds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            rounds[name].append(run())
        loads.append(os.getloadavg()[0])
    return rounds


def monte_carlo_batch_cost(setup: Setup, noise: torch.Tensor, repeats: int) -> dict:
    """One UNet call on the S·B Monte Carlo batch against the same images in S calls of B: median
    seconds of each (alternating), and the aten ops whose self time grows most in the single call."""
    images = noise.repeat(SAMPLES, 1, 1, 1)
    t = setup.scheduler.timesteps[len(setup.scheduler.timesteps) // 2]
    runs = {
        "one call": lambda: setup.unet(images, t),
        "chunks": lambda: [setup.unet(chunk, t) for chunk in images.split(noise.shape[0])],
    }
    seconds = {name: [] for name in runs}
    self_ms = {}
    with torch.no_grad():
        for name, run in runs.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                run()
            self_ms[name] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    growth = {op: ms - self_ms["chunks"].get(op, 0.0) for op, ms in self_ms["one call"].items()}
    grown = sorted(growth, key=growth.get, reverse=True)[:4]
    return {
        "one call": statistics.median(seconds["one call"]),
        "chunks": statistics.median(seconds["chunks"]),
        "ops": [(op, self_ms["one call"][op], self_ms["chunks"].get(op, 0.0)) for op in grown],
    }


def score_batches(
    setup: Setup, first_noise: torch.Tensor, batches: int, seed: int
) -> dict[str, torch.Tensor]:
    """Image scores of each mode over `batches` batches of fresh noise, the timed batch first."""
    scores = {name: [] for name in MODES}
    for k in range(batches):
        noise = (
            first_noise
            if k == 0
            else torch.randn(first_noise.shape, generator=torch.Generator().manual_seed(seed + 1000 + k))
        )
        for name, (settings, _) in MODES.items():
            scores[name].append(bayesdiff(setup, noise, seed + k, settings).scores)
    return {name: torch.cat(parts) for name, parts in scores.items()}


def bench(setup: Setup, args, loads: list[float]) -> tuple[list[list[str]], list[list[str]], list[str]]:
    unet = setup.unet
    shape = (args.batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))

    reference = plain_ddim(setup, noise)
    for name, (settings, _) in MODES.items():
        images = bayesdiff(setup, noise, args.seed, settings).images
        if not torch.equal(images, reference):
            raise SystemExit(f"{setup.name}, {name}: images differ from the plain DDIM loop")

    runs = {PLAIN: lambda: instrumented(setup, noise, lambda posterior: plain_ddim(setup, noise))}
    for name, (settings, _) in MODES.items():
        runs[name] = lambda s=settings: instrumented(
            setup, noise, lambda posterior: bayesdiff(setup, noise, args.seed, s, posterior)
        )
    rounds = interleaved(runs, args.repeats, loads)

    med = statistics.median
    plain = [r.total for r in rounds[PLAIN]]
    rows, split_rows = [], []
    for name, runs_of_mode in rounds.items():
        walls = [r.total for r in runs_of_mode]
        count = runs_of_mode[0].unet
        target = MODES[name][1] if name in MODES else None
        ratio = med(walls) / med(plain)
        per_round = [w / p for w, p in zip(walls, plain)]
        rows.append(
            [
                setup.name,
                name,
                f"{count.calls} ({count.mc_calls} MC)",
                f"{count.images} ({count.images / rounds[PLAIN][0].unet.images:.2f}×)",
                f"{med(walls):.2f} ({min(walls):.2f})",
                "1" if target is None else f"**{ratio:.2f}×**",
                "–" if target is None else f"{min(per_round):.2f}–{max(per_round):.2f}",
                f"{med(r.over_image_path() for r in runs_of_mode):.2f}×",
                "–" if target is None else f"≤ {target}×: {verdict(ratio <= target)}",
            ]
        )
        totals = sum(walls)
        split_rows.append(
            [setup.name, name, f"{totals / len(walls):.2f}"]
            + [
                f"{sum(r.seconds(part) for r in runs_of_mode) / len(walls):.3f} "
                f"({100 * sum(r.seconds(part) for r in runs_of_mode) / totals:.0f}%)"
                for part in PARTS
            ]
        )

    scores = score_batches(setup, noise, args.score_batches, args.seed)
    a, b = (scores[name].numpy() for name in MODES)
    rho = spearmanr(a, b)
    notes = [
        (
            f"{setup.name}: Spearman ρ of (a)'s and (b)'s image scores = **{rho.statistic:.3f}** over {len(a)} "
            f"images ({args.score_batches} batches of {args.batch}, the timed one first; p = {rho.pvalue:.1e})."
        )
    ]

    paper_runs = rounds[next(iter(MODES))]
    meter = paper_runs[0].unet
    mc_share = med(r.unet.seconds["Monte Carlo"] for r in paper_runs) / med(
        r.unet.seconds["image path"] for r in paper_runs
    )
    cost = monte_carlo_batch_cost(setup, noise, args.repeats)
    batch, mc_batch = args.batch, SAMPLES * args.batch
    notes.append(
        f"{setup.name}, (a): {meter.images} images through the UNet per run, {meter.images / (STEPS * batch):.2f}× "
        f"plain ({STEPS} + {meter.mc_calls}·S per image), so ≤ 3.0× needs a Monte Carlo image to cost no more "
        f"than an image-path one. Inside the runs the {meter.mc_calls} Monte Carlo calls took {mc_share:.2f}× the "
        f"time of the {STEPS} image-path calls for {meter.mc_calls * SAMPLES / STEPS:.1f}× their images. "
        f"Measured apart (median of {args.repeats}, alternating): one call on the {mc_batch}-image batch "
        f"{cost['one call']:.3f} s, the same images in {SAMPLES} calls of {batch} {cost['chunks']:.3f} s "
        f"(**{cost['one call'] / cost['chunks']:.2f}×**); largest growth of self CPU time in the single call "
        "(profiled once, one call / chunks): "
        + ", ".join(f"`{op}` {one:.0f} / {chunks:.0f} ms" for op, one, chunks in cost["ops"])
        + "."
    )
    if meter.identical_mc_calls:
        notes.append(
            f"{setup.name}, (a): {meter.identical_mc_calls} of the {meter.mc_calls} Monte Carlo calls per run "
            f"had all S samples identical — the first uncertainty step, where Var[x_T] = 0, so x^i = x_T for "
            f"every i: {meter.identical_mc_calls * mc_batch} of the {meter.images} images "
            f"({100 * meter.identical_mc_calls * mc_batch / meter.images:.0f}%) recompute the image path's "
            "output S times. BayesDiff's code starts its Monte Carlo at the second uncertainty step "
            "(50 + 9·S = 140 forwards per image: the issue's 2.8×)."
        )
    return rows, split_rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up each")
    parser.add_argument(
        "--score-batches", type=int, default=4, help="batches for Spearman's ρ (timed one first)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default="digits,random32", help="comma-separated: digits, random32")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    add_paused_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    setups = {"digits": digits_setup, "random32": lambda: random32_setup(args.seed)}
    loads = [os.getloadavg()[0]]
    rows, split_rows, notes = [], [], []
    for key in args.configs.split(","):
        r, s, n = bench(setups[key](), args, loads)
        rows += r
        split_rows += s
        notes += n
        print(markdown_table(HEADER, r), flush=True)

    body = (
        f"`python/bench_sampler.py` — CPU, {args.threads} threads, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, bayesdiff_ext {bayesdiff_ext.__version__}. DDIM η = 0, "
        f"{STEPS} steps, batch {args.batch}, the same x_T for every mode; diag posterior; `progress=False`. "
        f"Wall time: median (minimum) of {args.repeats} rounds after one warm-up, the three modes alternating "
        "within each round; the ratio to plain is of medians (what the target is judged on), with the range "
        "of the per-round ratios. '× own image path': a run's wall time over the time it spent, step by step "
        "inside the same run, on what plain DDIM does too (image-path UNet calls and `scheduler.step`), "
        "a ratio that a load change between runs cannot move. The images of (a) and (b) were checked "
        "bit-identical to the plain loop's. UNet calls and images: forward hooks on the UNet, per sampling "
        f"run of {args.batch} images. The machine is shared: 1-minute load average "
        f"{min(loads):.1f}–{max(loads):.1f} over the rounds on {os.cpu_count()} cores, and at 2 threads a "
        "descheduled thread stalls every parallel op, so absolute times move a lot with other processes' load."
        f"{paused_note(args)}\n\n"
        + markdown_table(HEADER, rows)
        + "\n\n"
        + "\n".join(f"* {line}" for line in notes)
        + "\n\nWhere the time goes (all timed rounds; seconds per run and share of the wall time; the UNet "
        "calls include the head's own conv; 'head ops' is `posterior.predict`, the fused mean/variance op):\n\n"
        + markdown_table(SPLIT_HEADER, split_rows)
    )
    print(body)
    if not args.no_write:
        every_config = args.configs == parser.get_default("configs")
        name = "bench_sampler" if every_config else f"bench_sampler: {args.configs}"
        write_section(Path(__file__).with_name("BENCHMARKS.md"), name, body)


HEADER = [
    "UNet",
    "mode",
    "UNet calls",
    "images through UNet (× plain)",
    "wall (s), median (min)",
    "× plain (medians)",
    "per-round ratios",
    "× own image path (median)",
    "target",
]
PARTS = ["image path", "Monte Carlo", "head ops", "moment ops", "scheduler.step", "rest"]
SPLIT_HEADER = [
    "UNet",
    "mode",
    "run (s)",
    "UNet, image path",
    "UNet, Monte Carlo batch",
    "head ops (predict)",
    "moment ops",
    "scheduler.step",
    "rest (Python, draws, capture)",
]


if __name__ == "__main__":
    main()
