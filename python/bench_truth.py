"""One yardstick for every estimator of Var[x_0 | x_T]: trajectory Monte Carlo with M = 64 as the truth.

For one model and scheduler (``--config``), on the same x_T for every estimator:

* truth: :class:`TrajectorySampler` with 64 independent weight draws around their own mean (a
  stochastic sampler: 32 noise streams × 2 draws, the aleatoric part from 32 fresh-noise runs at the
  posterior mean — the brute force of the sampler's noise);
* by default every trajectory estimator and the truth give all images the same draws (weights and
  noise streams, from the run's seed: the package's default, docs/MATH.md §14.10), the truth from
  seed 100 and the estimators from seeds 1 and 2; ``--per-image-draws``: each image's own;
* the moment recurrence (BayesDiff): the paper's defaults (Skip 5, S = 10), Monte Carlo at every
  step, each with the plain and the regression covariance, and the closed form without covariance;
* trajectories with M = 2 … 32 weight draws — independent, antithetic (up to 16), Sobol — each
  around the draws' mean and around the MAP trajectory; a stochastic sampler: M = 2 … 16 draws
  with J = M or 2M noise streams (smaller M and J are the first draws and streams of one run: the
  first points of the same streams, what a run with that M draws for independent and Sobol draws,
  its first pairs for antithetic ones);
* forward-mode linearisation (M = 4 Sobol directions: on a CPU each tangent costs several forwards);
* deterministic samplers only: a control variate (the trajectories' squared deviations against the
  closed-form response without feedback, whose variance is known), and the top eigen-directions of
  the posterior in the data's metric (± pairs along the R directions with the largest s·h·v).

Deterministic samplers also get a second yardstick, the *controlled truth*: the truth's own draws around
their mean with the feedback-free control variate (docs/MATH.md §14.6), unbiased up to O(1/M), independent
of the estimators' draws and far less noisy where the control tracks the trajectories.

Columns: mean Var / truth; per-pixel Pearson r of the map against the truth (all pixels of all
images); Spearman's ρ of the per-image sums against the truth's; between-seed map r (the same
estimator with another seed, "—" where it has no randomness); model forwards per image
(tangent passes count one each); wall time relative to plain sampling (the pipeline's loop) in the
same process — for the trajectory subsets, from the largest run's time per trajectory.

Run one configuration per call (each ≤ ~20 min on one thread; results to
python/bench_truth_results/<config>.json), then ``--report`` to write the `bench_truth` section of
BENCHMARKS.md from every result file:

    OMP_NUM_THREADS=1 .venv/bin/python python/bench_truth.py --config digits-ddim
    .venv/bin/python python/bench_truth.py --report

``--keep-draws DIR`` keeps the truth's and the trajectory runs' draws (with their forwards and time);
``--reuse-draws DIR`` loads the kept runs of the same configuration instead of running them again (the
other rows are computed), e.g. to add an estimator or split a long truth from the rest of the table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from scipy.stats import spearmanr

from bayesdiff_ext import BayesDiffSampler, LastLayerLaplace
from bayesdiff_ext.digits import bundled_dir, load_bundled_scheduler, load_bundled_unet
from bayesdiff_ext.io.atomic import atomic_write
from bayesdiff_ext.randomness import image_generators
from bayesdiff_ext.sampler.linearised import LinearisedSampler
from bayesdiff_ext.sampler.feedback_free import accumulate_features, feedback_free_coefficients
from bayesdiff_ext.sampler.scheduler_loop import SchedulerLoop
from bayesdiff_ext.sampler.trajectories import TrajectorySampler
from bayesdiff_ext.sampler.results import TrajectoryDraws
from bayesdiff_ext.posterior.perturbation import head_perturbation
from bayesdiff_ext.sampler.trajectory_statistics import controlled_spread, trajectory_moments

sys.path.insert(0, str(Path(__file__).parent))
from bench_timing import write_section  # noqa: E402

RESULTS = Path(__file__).with_name("bench_truth_results")
CONFIGS = {
    "digits-ddim": dict(model="digits", scheduler="ddim", eta=0.0, steps=50, images=12),
    "digits-ddpm": dict(model="digits", scheduler="ddpm", eta=0.0, steps=20, images=12),
    "digits-ddim-eta1": dict(model="digits", scheduler="ddim", eta=1.0, steps=20, images=12),
    "random-ddim": dict(model="random", scheduler="ddim", eta=0.0, steps=20, images=6),
    "random-ddpm": dict(model="random", scheduler="ddpm", eta=0.0, steps=20, images=6),
}
TRUTH_DRAWS, SEEDS = 64, (1, 2)
#: What a run measures: every estimator, or only what decides the presets and the bars (the truth, the
#: paper recurrence and the closed form, Sobol trajectories around the MAP up to M = 32 (--max-draws) with the
#: control variate; a stochastic sampler: up to M = 32 draws in up to J = 64 noise streams).
GRIDS = ("full", "presets")
X_T_SEED = 0


# ------------------------------------------------------------------------------------------ models
def digits_setup():
    unet = load_bundled_unet().eval()
    posterior = LastLayerLaplace.load(bundled_dir() / "posterior_diag.safetensors", unet)
    described = "bundled digits UNet (16×16×1) and its bundled diag posterior"
    return unet, load_bundled_scheduler().config, posterior, described


def smooth_images(count: int, size: int, seed: int) -> torch.Tensor:
    """Gaussian-blurred white noise (σ = 2 px), scaled to [-1, 1] per image: smooth random images."""
    noise = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))
    radius = 6
    grid = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-grid.square() / (2 * 2.0**2))
    kernel = kernel / kernel.sum()
    blurred = F.conv2d(noise.reshape(-1, 1, size, size), kernel.view(1, 1, 1, -1), padding=(0, radius))
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1), padding=(radius, 0)).reshape(noise.shape)
    low = blurred.amin(dim=(1, 2, 3), keepdim=True)
    high = blurred.amax(dim=(1, 2, 3), keepdim=True)
    return (blurred - low) / (high - low) * 2 - 1


def random_setup():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
    ).eval()
    config = DDPMScheduler(num_train_timesteps=1000, clip_sample=False).config
    posterior = LastLayerLaplace(unet, "diag").fit(
        smooth_images(64, 32, seed=0),
        DDPMScheduler.from_config(config),
        batch_size=16,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    described = (
        f"random-init UNet2DModel 32×32×3 ({params:.1f} M params, blocks 32/64/64, attention at 16×16); diag "
        f"posterior fitted (σ ML, δ MacKay: σ = {posterior.sigma_noise:.3g}, δ = {posterior.prior_precision:.3g}) "
        "on 64 smooth random images (white noise blurred with a σ = 2 px Gaussian, scaled to [-1, 1])"
    )
    return unet, config, posterior, described


def make_scheduler(config, kind: str):
    family = DDIMScheduler if kind == "ddim" else DDPMScheduler
    return family.from_config(config, clip_sample=False)


# ------------------------------------------------------------------------------------------ metrics
def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def compare(estimate: torch.Tensor, truth: torch.Tensor, other_seed: torch.Tensor | None) -> dict:
    # on the host: a GPU run's estimates, kept (host) truths and scipy's ranks meet there
    estimate, truth = estimate.cpu(), truth.cpu()
    other_seed = None if other_seed is None else other_seed.cpu()
    scores, truth_scores = estimate.flatten(1).sum(1), truth.flatten(1).sum(1)
    return dict(
        ratio=float(estimate.double().mean() / truth.double().mean()),
        map_r=pearson(estimate, truth),
        # blind to each image's level (a per-image scale): the maps' shapes alone
        image_map_r=sum(pearson(e, t) for e, t in zip(estimate, truth)) / len(truth),
        spearman=float(spearmanr(scores.numpy(), truth_scores.numpy()).statistic),
        seed_r=None if other_seed is None else pearson(estimate, other_seed),
    )



def draw_controls(spec, phi_tilde: torch.Tensor, deviations: torch.Tensor) -> torch.Tensor:
    """L_m = head(φ̃; Δθ_m), every draw's response without feedback (docs/MATH.md §14.5), float64 (M, B, ...);
    `deviations` (M, B, P), or (M, 1, P) / (M, P) for draws shared by all images."""
    batch = phi_tilde.shape[0]
    return torch.stack(
        [head_perturbation(spec, phi_tilde, d.expand(batch, -1).contiguous()) for d in deviations]
    ).to(torch.float64)


def controlled_truth(finals: torch.Tensor, controls: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """The controlled truth (docs/MATH.md §14.6): the draws' spread around their mean with the feedback-free
    control, n/(n − 1)·(mean (x − x̄)² − β·(mean (L − L̄)² − (n − 1)/n·V)), β per image (the package's
    :func:`controlled_spread`). `finals` and `controls` (M, B, ...), `exact` = V (B, ...)."""
    count = finals.shape[0]
    spread = (finals - finals.mean(0)).square()
    control = (controls - controls.mean(0)).square()
    return count / (count - 1) * controlled_spread(spread, control, exact * (count - 1) / count)

# ------------------------------------------------------------------------------------------ the bench
class Bench:
    def __init__(self, name: str, device: torch.device, truth_draws: int = TRUTH_DRAWS, grid: str = "full", save=None,
                 max_draws: int = 32, shared_draws: bool = True, keep_draws: Path | None = None,
                 reuse_draws: Path | None = None):
        self.name, self.config = name, CONFIGS[name]
        self.keep_draws, self.reuse_draws, self.reused_runs = keep_draws, reuse_draws, {}
        self.shared_draws = shared_draws
        self.truth_draws, self.grid, self.save, self.max_draws = truth_draws, grid, save, max_draws
        setup = digits_setup if self.config["model"] == "digits" else random_setup
        self.unet, self.scheduler_config, self.posterior, self.described = setup()
        self.unet.to(device)
        self.batch, self.steps, self.eta = self.config["images"], self.config["steps"], self.config["eta"]
        self.x_t = torch.cat([torch.randn(1, *self.shape, generator=g) for g in image_generators(X_T_SEED, range(self.batch))])
        self.x_t = self.x_t.to(device)
        self.rows: list[dict] = []

    @property
    def shape(self):
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def scheduler(self):
        return make_scheduler(self.scheduler_config, self.config["scheduler"])

    def generators(self, seed: int):
        return image_generators(seed, range(self.batch))

    def plain_seconds(self) -> float:
        """Median of 3 plain runs: the scheduler's loop as the pipelines run it."""
        times = []
        for _ in range(3):
            scheduler, generator = self.scheduler(), self.generators(X_T_SEED)
            started = time.perf_counter()
            scheduler.set_timesteps(self.steps)
            x = self.x_t
            kwargs = {"eta": self.eta} if isinstance(scheduler, DDIMScheduler) else {}
            with torch.no_grad():
                for t in scheduler.timesteps:
                    x = scheduler.step(self.unet(x, t).sample, t, x, generator=generator, **kwargs).prev_sample
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - started)
        return sorted(times)[1]

    def draw_options(self, seed: int) -> dict:
        """The trajectory estimators' draws for ``seed``: shared by all images (from ``seed``), or each image's own."""
        return dict(shared_draws=True, weight_seed=seed) if self.shared_draws else dict(shared_draws=False)

    def trajectories(self, seed, samples, draws, centre, noise_samples=None, return_draws=False, kept=None):
        """One trajectory run; with ``reuse_draws`` and a kept run ``kept`` of it there, that run instead."""
        if kept is not None and self.reuse_draws is not None and (self.reuse_draws / f"{self.name}.{kept}.pt").exists():
            return self.reused(kept, centre, draws)
        sampler = TrajectorySampler(self.unet, self.scheduler(), self.posterior)
        started = time.perf_counter()
        out = sampler.sample(
            noise=self.x_t, num_inference_steps=self.steps, generator=self.generators(seed), eta=self.eta,
            samples=samples, draws=draws, centre=centre, noise_samples=noise_samples, progress=False,
            return_draws=return_draws, **self.draw_options(seed),
        )
        seconds = time.perf_counter() - started
        if kept is not None:
            self.keep(kept, out, seconds)
        return out, seconds

    def reused(self, name: str, centre: str, draws: str):
        """A kept run (:meth:`keep`) as the run's output: its draws, moments, forwards and time (scaled by this
        process's plain loop over the keeping process's, so that its time ratio is the keeping run's)."""
        kept = torch.load(self.reuse_draws / f"{self.name}.{name}.pt", weights_only=True)
        if not torch.equal(kept["x_t"], self.x_t.cpu()):
            raise ValueError(f"{name}: kept for other x_T (another --images or config)")
        deviations = kept["deviations"].expand(-1, -1, self.batch, -1) if self.shared_draws else kept["deviations"]
        kept_draws = TrajectoryDraws(kept["finals"], kept["maps"], deviations)
        moments = trajectory_moments(kept["finals"], kept["maps"], draws, centre)
        out = SimpleNamespace(
            draws=kept_draws, variance=moments.variance, aleatoric_variance=moments.aleatoric,
            settings={"stochastic_sampler": kept["stochastic"]}, timings={"model_forwards_per_image": kept["forwards"]},
        )
        self.reused_runs[name] = kept["seconds"]
        print(f"reused {name} (kept {kept['seconds']:.0f} s)", flush=True)
        return out, kept["seconds"] * self.plain / kept["plain_s"]

    def keep(self, name: str, out, seconds: float) -> None:
        """With ``keep_draws``: a run's draws to <keep_draws>/<config>.<name>.pt (finals and maps in float32, the
        weight deviations once where all images share them, its forwards and time), and φ̃ (deterministic
        samplers), for analyses of other estimators on them and for ``--reuse-draws``."""
        if self.keep_draws is None:
            return
        draws = out.draws
        deviations = draws.deviations
        if self.shared_draws:
            deviations = deviations[:, :, :1]
        kept = dict(finals=draws.finals.float().cpu(), maps=draws.maps.float().cpu(), deviations=deviations.cpu(),
                    x_t=self.x_t.cpu(), stochastic=out.settings["stochastic_sampler"], seconds=seconds, plain_s=self.plain,
                    forwards=out.timings["model_forwards_per_image"])
        if not kept["stochastic"]:
            kept["phi_tilde"] = self.feedback_free_features().cpu()
        buffer = io.BytesIO()
        torch.save(kept, buffer)
        self.keep_draws.mkdir(parents=True, exist_ok=True)
        atomic_write(self.keep_draws / f"{self.name}.{name}.pt", buffer.getvalue())

    def add(self, family, setting, estimate, seconds, forwards, other=None, aleatoric=None):
        truth = self.truth
        row = dict(estimator=family, setting=setting, forwards=forwards, time_ratio=seconds / self.plain)
        row.update(compare(estimate, truth.variance, other))
        if self.controlled is not None and family != "truth":
            against = compare(estimate, self.controlled, None)
            row["vs_controlled"] = {key: against[key] for key in ("ratio", "map_r", "image_map_r", "spearman")}
        if aleatoric is not None and self.stochastic:
            row["aleatoric_ratio"] = float(aleatoric.double().mean() / truth.aleatoric_variance.double().mean())
        self.rows.append(row)
        print(f"{family:24s} {setting:34s} " + " ".join(
            f"{k}={v:.3g}" for k, v in row.items() if isinstance(v, float)), flush=True)

    def run(self) -> dict:
        """Every stage in turn; after each, the result so far goes to ``save`` (``partial`` until the end)."""
        self.started, self.load_start = time.perf_counter(), os.getloadavg()
        self.plain = self.plain_seconds()
        stochastic_config = not (self.config["scheduler"] == "ddim" and not self.eta)
        truth, truth_s = self.trajectories(
            100, self.truth_draws, "independent", "mean", return_draws=True,
            noise_samples=self.truth_draws // 2 if stochastic_config else None, kept="truth",
        )
        self.truth, self.stochastic = truth, truth.settings["stochastic_sampler"]
        self.reliability = _split_half_reliability(truth.draws, self.stochastic)
        self.controlled, self.controlled_reliability = None, None
        if not self.stochastic:
            self.controlled_truth(truth.draws)
        label = f"trajectories M={self.truth_draws}" + (f", J={self.truth_draws // 2} noise streams" if self.stochastic else "")
        self.add("truth", label, truth.variance, truth_s, truth.timings["model_forwards_per_image"],
                 aleatoric=truth.aleatoric_variance)
        stages = [self.recurrence, self.trajectory_table]
        if self.grid == "full":
            stages.append(self.linearised)
            if not self.stochastic:
                stages.append(self.principal_directions)
        for stage in stages:
            self.checkpoint(partial=True)
            stage()
        return self.checkpoint(partial=False)

    def checkpoint(self, partial: bool) -> dict:
        truth = self.truth
        result = dict(
            config=self.name, settings=self.config, described=self.described, plain_s=self.plain, grid=self.grid,
            truth_draws=self.truth_draws, shared_draws=self.shared_draws, truth_mean=float(truth.variance.double().mean()),
            truth_aleatoric_mean=float(truth.aleatoric_variance.double().mean()), truth_reliability=self.reliability,
            controlled_truth=self.controlled_reliability, reused_runs=self.reused_runs,
            stochastic=self.stochastic, rows=self.rows, wall_s=time.perf_counter() - self.started,
            load_start=self.load_start, load_end=os.getloadavg(), threads=torch.get_num_threads(),
            torch=torch.__version__, machine=platform.machine(), device=str(self.x_t.device), partial=partial,
        )
        if self.save is not None:
            self.save(result)
        return result

    def controlled_truth(self, draws) -> None:
        """A second yardstick from the truth's own draws: their spread around their mean with the feedback-free
        control, n/(n − 1)·(mean (x − x̄)² − β·(mean (L − L̄)² − (n − 1)/n·V)), β per image (the package's
        :func:`controlled_spread`; docs/MATH.md §14.5). Its expectation is the plain truth's up to the O(1/M)
        bias of the fitted β; its draws are independent of the estimators', so it shares no Monte Carlo error
        with them. Also its halves' agreement, against the plain truth and as ceilings."""
        phi_tilde = self.feedback_free_features()
        exact = self.posterior.predict(phi_tilde)[1].to(torch.float64)
        finals = draws.finals[0].to(torch.float64)
        controls = draw_controls(self.posterior.spec, phi_tilde, draws.deviations[0])

        def controlled(rows):
            return controlled_truth(finals[rows], controls[rows], exact)

        everything, half = torch.arange(finals.shape[0]), finals.shape[0] // 2
        self.controlled = controlled(everything)
        halves = compare(controlled(everything[:half]), controlled(everything[half:]), None)
        whole = 2 * halves["map_r"] / (1 + halves["map_r"])
        against = compare(self.controlled, self.truth.variance, None)
        self.controlled_reliability = dict(
            half_map_r=halves["map_r"], half_spearman=halves["spearman"], whole_map_r=whole, ceiling=whole**0.5,
            mean_ratio=against["ratio"], map_r=against["map_r"], spearman=against["spearman"],
        )

    # -------------------------------------------------------------- the moment recurrence
    def recurrence(self):
        settings = {"paper (Skip 5, S=10)": dict(uq_every=5, mc_samples=10)}
        if self.grid == "full":
            settings["every step, S=10"] = dict(uq_every=1, mc_samples=10)
        for label, base in settings.items():
            for covariance in ("mc", "regression"):
                runs = []
                for seed in SEEDS:
                    sampler = BayesDiffSampler(self.unet, self.scheduler(), self.posterior)
                    started = time.perf_counter()
                    out = sampler.sample(noise=self.x_t, num_inference_steps=self.steps, generator=self.generators(seed),
                                         eta=self.eta, covariance=covariance, progress=False, **base)
                    runs.append((out, time.perf_counter() - started))
                (out, seconds), (other, _) = runs
                forwards = out.timings["image_unet_calls"] + out.timings["mc_unet_calls"] * base["mc_samples"]
                name = "recurrence" if covariance == "mc" else "recurrence, regression cov."
                self.add(name, label, out.variance, seconds, forwards, other.variance, out.aleatoric_variance)
        sampler = BayesDiffSampler(self.unet, self.scheduler(), self.posterior)
        started = time.perf_counter()
        out = sampler.sample(noise=self.x_t, num_inference_steps=self.steps, generator=self.generators(SEEDS[0]),
                             eta=self.eta, covariance="none", mc_samples=0, uq_every=1, progress=False)
        self.add("closed form", "no covariance, every step", out.variance, time.perf_counter() - started,
                 out.timings["image_unet_calls"], None, out.aleatoric_variance)

    # -------------------------------------------------------------- trajectories and the control variate
    def trajectory_table(self):
        """One run per kind of draws and seed with the most draws; smaller M are its first draws.

        Deterministic: M up to 32 (antithetic 16), around the mean and around the MAP trajectory.
        Stochastic: 16 draws around their stream's MAP trajectory in the first 16 of 32 noise streams;
        subsets (M, J) = (M draws, J noise streams) with J = M and J = 2M.
        """
        kinds = {"independent": 32, "antithetic": 16, "sobol": 32}
        if self.stochastic:
            kinds = {"independent": 16, "sobol": 16}
        if self.grid == "presets":
            kinds = {"sobol": self.max_draws}
        for draws, most in kinds.items():
            streams = 2 * most if self.stochastic else None
            centre = "map" if self.stochastic else "mean"
            runs = [self.trajectories(seed, most, draws, centre, streams, return_draws=True, kept=f"{draws}-seed{seed}")
                    for seed in SEEDS]
            copies_run = runs[0][0].timings["model_forwards_per_image"] / self.steps - 1
            seconds_per_copy = (runs[0][1] - self.plain) / copies_run
            for samples, streams_used in _subsets(most, self.stochastic):
                if self.grid == "presets" and not self.stochastic and samples < 8:
                    continue
                subsets = [_first_draws(out.draws, samples, streams_used, draws) for out, _ in runs]
                copies = samples + (streams_used if self.stochastic else 0)
                seconds, forwards = self.plain + copies * seconds_per_copy, (1 + copies) * self.steps
                label = f"M={samples}" + (f", J={streams_used} noise streams" if self.stochastic else "")
                for centre in ("map",) if self.stochastic or self.grid == "presets" else ("mean", "map"):
                    moments = [trajectory_moments(f, m, draws, centre) for f, m, _ in subsets]
                    self.add(f"trajectories, {draws}", f"{label}, around the {centre}", moments[0].variance, seconds,
                             forwards, moments[1].variance, moments[0].aleatoric)
                if not self.stochastic and draws != "antithetic":
                    self.control_variate(draws, samples, subsets, seconds, forwards)

    def control_variate(self, draws, samples, subsets, seconds, forwards):
        """Σ_m D_m² / M − β·(Σ_m L_m² / M − V): D_m = x_m − x_MAP, L_m the response without feedback
        head(φ̃; Δθ_m) (φ̃ = Σ_k β_k φ_k along the stock trajectory), V its exact variance, β per image
        (the package's estimator, :func:`~bayesdiff_ext.sampler.trajectory_statistics.controlled_spread`)."""
        sampler = TrajectorySampler(self.unet, self.scheduler(), self.posterior)
        phi_tilde = self.feedback_free_features()
        estimates = [sampler._controlled_epistemic(phi_tilde, f, m, d) for f, m, d in subsets]
        self.add(f"control variate, {draws}", f"M={samples}, around the map", estimates[0], seconds, forwards, estimates[1])

    def feedback_free_features(self) -> torch.Tensor:
        """φ̃ = Σ_k β_k φ_k along the stock trajectory (the package's own accumulation)."""
        scheduler = self.scheduler()
        scheduler.set_timesteps(self.steps)
        betas = feedback_free_coefficients(scheduler, self.eta)
        with torch.no_grad(), accumulate_features(self.posterior.head, betas) as summed:
            x = self.x_t
            for t in scheduler.timesteps:
                x = scheduler.step(self.unet(x, t).sample, t, x, eta=self.eta).prev_sample
        return summed.total

    # -------------------------------------------------------------- linearisation, eigen-directions
    def linearised(self):
        for samples in (4,):
            runs = []
            for seed in SEEDS:
                sampler = LinearisedSampler(self.unet, self.scheduler(), self.posterior)
                started = time.perf_counter()
                out = sampler.sample(noise=self.x_t, num_inference_steps=self.steps, generator=self.generators(seed),
                                     eta=self.eta, samples=samples, draws="sobol", progress=False, **self.draw_options(seed))
                runs.append((out, time.perf_counter() - started))
            (out, seconds), (other, _) = runs
            forwards = out.timings["model_forwards_per_image"] + out.timings["tangents_per_image"]
            self.add("linearised (JVP)", f"M={samples} Sobol directions", out.variance, seconds, forwards, other.variance,
                     out.aleatoric_variance)

    def principal_directions(self):
        """± pairs along the R directions of the largest s·h·v = h/(h + δ/s): the posterior's top
        eigen-directions in the data's metric (the directions with the largest prior-dominated v
        have φ ≈ 0 in the fit and barely move the output)."""
        post = self.posterior
        inputs = post.posterior.op_inputs(post.precision_scale, post.prior_precision)
        variance = torch.cat([inputs["weight_var"].flatten(), inputs["bias_var"]])
        curvature = torch.cat([post.posterior.h_weight.flatten(), post.posterior.h_bias])
        order = torch.argsort(post.precision_scale * curvature * variance, descending=True)
        for rank in (4, 8):
            deviations = torch.zeros(2 * rank, post.spec.num_params, dtype=torch.float64)
            top = order[:rank]
            deviations[torch.arange(rank), top] = variance[top].sqrt()
            deviations[rank + torch.arange(rank), top] = -variance[top].sqrt()
            stacked = deviations[None, :, None].expand(1, 2 * rank, self.batch, -1)
            sampler = TrajectorySampler(self.unet, self.scheduler(), post)
            loop = SchedulerLoop(sampler, self.scheduler(), self.steps, self.eta, {}, None, None, None)
            started = time.perf_counter()
            finals = loop.run_copies([(0, k) for k in range(2 * rank)], self.x_t, stacked, None, torch.device("cpu"),
                                     None, False)
            plus = torch.stack([finals[(0, k)] for k in range(rank)]).double()
            minus = torch.stack([finals[(0, rank + k)] for k in range(rank)]).double()
            estimate = ((plus - minus) / 2).square().sum(0)
            seconds = self.plain + time.perf_counter() - started
            self.add("top eigen-directions", f"R={rank} (±, {2 * rank} trajectories)", estimate, seconds,
                     (1 + 2 * rank) * self.steps)


def _split_half_reliability(draws, stochastic: bool) -> dict:
    """How much the truth's own Monte Carlo noise limits every comparison: the map r and the score ρ
    of its two halves (draws or noise streams 1..32 against 33..64), and the map r of the whole truth
    against a repetition (Spearman–Brown: 2r/(1 + r)); an estimator cannot correlate with the truth
    above √(that), even if it were exact."""
    finals, maps = draws.finals, draws.maps
    if stochastic:
        half = finals.shape[0] // 2
        parts = [trajectory_moments(finals[s], maps[s], "independent", "mean").variance for s in (slice(0, half), slice(half, None))]
    else:
        half = finals.shape[1] // 2
        parts = [trajectory_moments(finals[:, s], maps, "independent", "mean").variance for s in (slice(0, half), slice(half, None))]
    halves = compare(parts[0], parts[1], None)
    whole = 2 * halves["map_r"] / (1 + halves["map_r"])
    return dict(half_map_r=halves["map_r"], half_spearman=halves["spearman"], whole_map_r=whole, ceiling=whole**0.5)


def corrected(row: dict, reliability: dict | None) -> tuple[float | None, float | None]:
    """Map r and score ρ divided by the truth's own ceiling (Spearman's correction for attenuation, for the
    truth's Monte Carlo noise only: the estimator's own noise stays in): what the estimator would show
    against an exact truth. None where the truth's halves do not agree at all (ρ ≤ 0: no ceiling)."""
    if not reliability or row["estimator"] == "truth":
        return None, None
    ceiling = score_ceiling(reliability)
    return row["map_r"] / reliability["ceiling"], None if ceiling is None else row["spearman"] / ceiling


def score_ceiling(reliability: dict) -> float | None:
    """The highest score ρ an exact estimator can show against the truth: √ of the whole truth's
    reliability 2ρ_h/(1 + ρ_h) (Spearman–Brown from its halves' ρ_h); None where ρ_h ≤ 0."""
    half = reliability["half_spearman"]
    return (2 * half / (1 + half)) ** 0.5 if half > 0 else None


def _subsets(most: int, stochastic: bool) -> list[tuple[int, int]]:
    """(M, J) pairs for the table: M draws, J noise streams (1 for a deterministic sampler)."""
    sizes = [m for m in (2, 4, 8, 16, 32, 64, 128) if m <= most]
    if not stochastic:
        return [(m, 1) for m in sizes]
    return sorted({(m, j) for m in sizes for j in (m, 2 * m) if j >= 2})


def _first_draws(draws, samples: int, streams: int, kind: str):
    """The first ``samples`` draws and ``streams`` noise streams of a run: (finals, maps, deviations).

    Deterministic (one stream): the first draws (antithetic: the first samples/2 pairs). Stochastic
    (one draw per stream): the first ``samples`` streams' draws and the first ``streams`` MAP runs.
    """
    finals, maps, deviations = draws.finals, draws.maps, draws.deviations
    if finals.shape[0] > 1 or maps.shape[0] > 1:
        return finals[:samples], maps[:streams], deviations[:samples]
    count = finals.shape[1]
    if kind == "antithetic":
        index = torch.cat([torch.arange(samples // 2), count // 2 + torch.arange(samples // 2)])
    else:
        index = torch.arange(samples)
    return finals[:, index], maps, deviations[:, index]


# ------------------------------------------------------------------------------------------ report
COLUMNS = ("| estimator | setting | mean Var / truth | map r | map r within images | score ρ | map r, corrected | "
           "score ρ, corrected | map r, controlled truth | score ρ, controlled truth | between-seed r | forwards / image | "
           "time / plain |")


def render(results: list[dict]) -> str:
    lines = [
        "`python/bench_truth.py` — every estimator of Var[x_0 | x_T] against trajectory Monte Carlo with "
        "M independent weight draws (M ≥ 64, per configuration below; docs/MATH.md §2.3). Per configuration one process, one "
        "thread (OMP_NUM_THREADS=1), the same x_T for every estimator (image k drawn from (seed 0, k)); "
        "\"time / plain\" is wall time over the plain loop's in the same process (trajectory subsets: "
        "from the largest run's time per trajectory), on a shared machine (load averages below). "
        "\"forwards / image\": model calls per image, a JVP tangent counted as one. \"map r within images\": the "
        "mean over images of each image's own map r, blind to the level of each image's map (— : not recorded by that "
        "run). \"score ρ\": Spearman "
        "of the per-image sums; \"between-seed r\": the map of seed 1 against seed 2 (— : no randomness). "
        "\"corrected\": map r and score ρ divided by the truth's own ceiling (the square root of the whole truth's "
        "reliability, from its split halves by Spearman–Brown): the value against an exact truth, correcting for the "
        "truth's Monte Carlo noise only; \"—\" where the truth's halves do not agree on the scores at all. \"controlled "
        "truth\" (deterministic samplers, runs since 2026-12-07): the same comparison against the truth's own draws "
        "with the feedback-free control variate (docs/MATH.md §14.6), a far less noisy yardstick of the same quantity. The bars "
        "of issue 22 are judged on the raw values; the corrected ones say whether a miss is the estimator's or the "
        "yardstick's. A \"presets\" grid runs only what decides the presets and the bars. \"Draws shared by all "
        "images\" (the package's default, docs/MATH.md §14.10): the truth and every trajectory estimator give all images "
        "the same weight draws and noise streams, from the run's seed (the truth's seed 100, the estimators' seeds 1 "
        "and 2, so the estimators' draws are independent of the truth's); \"each image's own draws\": from each image's "
        "streams, as before (the recurrence's Monte Carlo draws are each image's own in both).",
        "",
    ]
    for result in results:
        settings = result["settings"]
        sampler = f"DDIM η={settings['eta']:g}" if settings["scheduler"] == "ddim" else "DDPM"
        truth_draws = result.get("truth_draws", TRUTH_DRAWS)
        truth_label = f"M = {truth_draws}" + (f" in J = {truth_draws // 2} noise streams" if result["stochastic"] else "")
        lines += [
            f"### {result['config']}: {sampler}, {settings['steps']} steps, {settings['images']} images, truth M = "
            f"{truth_draws}, {result.get('grid', 'full')} grid, "
            + ("draws shared by all images" if result.get("shared_draws") else "each image's own draws"),
            "",
            f"{result['described']}. Truth: {truth_label}, mean Var {result['truth_mean']:.4g}"
            + (f", of which the sampler's noise {result['truth_aleatoric_mean']:.4g}" if result["stochastic"] else "")
            + (
                f"; the truth's own noise: its halves agree at map r {result['truth_reliability']['half_map_r']:.3f}, "
                f"score ρ {result['truth_reliability']['half_spearman']:.2f}, so a repeat of the whole truth would "
                f"agree at r ≈ {result['truth_reliability']['whole_map_r']:.3f} and no estimator can exceed map r ≈ "
                f"{result['truth_reliability']['ceiling']:.3f} against it"
                + (f", nor score ρ ≈ {score_ceiling(result['truth_reliability']):.2f}"
                   if score_ceiling(result["truth_reliability"]) else "")
                if "truth_reliability" in result else ""
            )
            + _controlled_sentence(result.get("controlled_truth"))
            + f". Plain loop {result['plain_s']:.2f} s; whole run {result['wall_s'] / 60:.1f} min"
            + "".join(f" + kept {name} run {seconds / 60:.1f} min" for name, seconds in result.get("reused_runs", {}).items())
            + "; load average "
            f"{result['load_start'][0]:.1f} at the start, {result['load_end'][0]:.1f} at the end; torch {result['torch']}, "
            f"{result['threads']} thread on {result.get('device', 'cpu')}; grid: {result.get('grid', 'full')}"
            + (" (stopped early: the rows so far)" if result.get("partial") else "") + ".",
            "",
        ]
        lines += _preset_lines(result) + [""] + _verdict(result) + ["", COLUMNS + (" sampler-noise part / truth's |" if result["stochastic"] else ""),
                                     "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if result["stochastic"] else "")]
        for row in result["rows"]:
            seed_r = "—" if row["seed_r"] is None else f"{row['seed_r']:.2f}"
            map_c, score_c = corrected(row, result.get("truth_reliability"))
            cells = [row["estimator"], row["setting"], f"{row['ratio']:.3g}", f"{row['map_r']:.3f}",
                     f"{row['image_map_r']:.3f}" if "image_map_r" in row else "—", f"{row['spearman']:.2f}", "—" if map_c is None else f"{map_c:.3f}",
                     "—" if score_c is None else f"{score_c:.2f}",
                     f"{row['vs_controlled']['map_r']:.3f}" if "vs_controlled" in row else "—",
                     f"{row['vs_controlled']['spearman']:.2f}" if "vs_controlled" in row else "—", seed_r, f"{row['forwards']:.0f}",
                     f"{row['time_ratio']:.1f}×"]
            if result["stochastic"]:
                cells.append(f"{row['aleatoric_ratio']:.3g}" if "aleatoric_ratio" in row else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


#: The table row each preset of ``bayesdiff_ext.sampler.settings.PRESETS`` runs, on a deterministic
#: sampler (False: the control variate is used where the run allows it) and a stochastic one (True).
PRESET_ROWS = {
    "fast": {False: ("control variate, sobol", "M=16, around the map"),
             True: ("trajectories, sobol", "M=16, J=32 noise streams, around the map")},
    "accurate": {False: ("control variate, sobol", "M=64, around the map"),
                 True: ("trajectories, sobol", "M=64, J=64 noise streams, around the map")},
    "paper": {False: ("recurrence", "paper (Skip 5, S=10)"), True: ("recurrence", "paper (Skip 5, S=10)")},
}


def _preset_lines(result: dict) -> list[str]:
    """Each preset's row with the bars it meets (raw; corrected in brackets)."""
    lines = []
    for preset, keys in PRESET_ROWS.items():
        row = next((r for r in result["rows"] if (r["estimator"], r["setting"]) == keys[result["stochastic"]]), None)
        if row is None:
            lines.append(f"* preset `{preset}`: not on this table")
            continue
        map_c, score_c = corrected(row, result.get("truth_reliability"))
        text = (f"* preset `{preset}` ({row['estimator']}, {row['setting']}): mean ratio {_ratio(row['ratio'])}, map r "
                f"{row['map_r']:.3f} (corrected {map_c:.3f}), score ρ {row['spearman']:.2f} (corrected "
                + ("—" if score_c is None else f"{score_c:.2f}") + f"), {row['forwards']:.0f} forwards per image, "
                f"{row['time_ratio']:.1f}× plain")
        if "aleatoric_ratio" in row:
            text += f", sampler-noise part {_ratio(row['aleatoric_ratio'])}× the truth's"
        if "vs_controlled" in row:
            against = row["vs_controlled"]
            text += (f"; against the controlled truth: mean ratio {_ratio(against['ratio'])}, map r {against['map_r']:.3f}, "
                     f"score ρ {against['spearman']:.2f}")
        lines.append(text)
    return lines


def _controlled_sentence(controlled: dict | None) -> str:
    """The controlled truth's own agreement (halves, ceilings) and its agreement with the plain truth."""
    if not controlled:
        return ""
    return (f". The same draws with the control variate (the controlled truth, docs/MATH.md §14.6): halves agree at map r "
            f"{controlled['half_map_r']:.3f}, score ρ {controlled['half_spearman']:.2f} (ceilings map r "
            f"{controlled['ceiling']:.3f}" + (f", score ρ {score_ceiling(controlled):.2f}" if score_ceiling(controlled) else "")
            + f"); against the plain truth: map r {controlled['map_r']:.3f}, score ρ {controlled['spearman']:.2f}, mean "
            f"ratio {_ratio(controlled['mean_ratio'])}")


def _ratio(value: float) -> str:
    """Two decimals near 1 (1.00, not 1), three significant digits far from it."""
    return f"{value:.2f}" if 0.1 <= value < 10 else f"{value:.3g}"


def _verdict(result: dict) -> list[str]:
    """The cheapest estimator (model forwards per image) that meets each bar of issue 22, from the rows."""
    rows = [r for r in result["rows"] if r["estimator"] != "truth"]
    bars = {
        "map r ≥ 0.95 (accurate)": lambda r: r["map_r"] >= 0.95,
        "map r ≥ 0.9 and score ρ ≥ 0.9 (fast)": lambda r: r["map_r"] >= 0.9 and r["spearman"] >= 0.9,
        "map r ≥ 0.9 alone": lambda r: r["map_r"] >= 0.9,
    }
    lines = []
    for bar, meets in bars.items():
        passing = sorted((r for r in rows if meets(r) and 0.5 <= r["ratio"] <= 2), key=lambda r: (r["forwards"], r["time_ratio"]))
        if passing:
            best = passing[0]
            lines.append(
                f"* {bar}: cheapest {best['estimator']}, {best['setting']} — map r {best['map_r']:.3f}, score ρ "
                f"{best['spearman']:.2f}, mean ratio {best['ratio']:.2f}, {best['forwards']:.0f} forwards per image, "
                f"{best['time_ratio']:.1f}× plain"
            )
        else:
            top = max(rows, key=lambda r: r["map_r"])
            lines.append(f"* {bar}: not met (the highest map r is {top['map_r']:.3f}, {top['estimator']}, {top['setting']})")
    reliability = result.get("truth_reliability")
    if reliability:
        for bar, meets in bars.items():
            def meets_corrected(r):
                map_c, score_c = corrected(r, reliability)
                return meets(dict(r, map_r=map_c, spearman=-1.0 if score_c is None else score_c))
            passing = sorted((r for r in rows if meets_corrected(r) and 0.5 <= r["ratio"] <= 2),
                             key=lambda r: (r["forwards"], r["time_ratio"]))
            if passing:
                best = passing[0]
                map_c, score_c = corrected(best, reliability)
                score_text = "—" if score_c is None else f"{score_c:.2f}"
                lines.append(f"* {bar}, corrected for the truth's noise: cheapest {best['estimator']}, {best['setting']} — "
                             f"map r {map_c:.3f}, score ρ {score_text} ({best['forwards']:.0f} forwards per image)")
            else:
                lines.append(f"* {bar}, corrected for the truth's noise: not met")
    if any("vs_controlled" in r for r in rows):
        for bar, meets in bars.items():
            passing = sorted((r for r in rows if "vs_controlled" in r and meets(r["vs_controlled"])
                              and 0.5 <= r["vs_controlled"]["ratio"] <= 2), key=lambda r: (r["forwards"], r["time_ratio"]))
            if passing:
                best, against = passing[0], passing[0]["vs_controlled"]
                lines.append(f"* {bar}, against the controlled truth: cheapest {best['estimator']}, {best['setting']} — "
                             f"map r {against['map_r']:.3f}, score ρ {against['spearman']:.2f} ({best['forwards']:.0f} "
                             "forwards per image)")
            else:
                lines.append(f"* {bar}, against the controlled truth: not met")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS))
    parser.add_argument("--images", type=int, default=None, help="override the configuration's image count")
    parser.add_argument("--steps", type=int, default=None, help="override the configuration's steps (smoke tests)")
    parser.add_argument("--report", action="store_true", help="write the bench_truth section from the result files")
    parser.add_argument("--device", default="cpu", help="torch device of the model and the samples (default cpu)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the result files")
    parser.add_argument("--truth-draws", type=int, default=TRUTH_DRAWS,
                        help="M of the truth (a stochastic sampler: M/2 noise streams, 2 draws each); default 64")
    parser.add_argument("--grid", choices=GRIDS, default="full", help="every estimator, or what decides the presets")
    parser.add_argument("--max-draws", type=int, choices=(32, 64, 128), default=32,
                        help="presets grid: the most Sobol draws (M = 8 … this; a stochastic sampler in up to 2M streams)")
    parser.add_argument("--per-image-draws", action="store_true",
                        help="every trajectory estimator and the truth with each image's own weight draws and noise streams "
                        "(default: the draws shared by all images, from each run's seed; results to <config>.per-image.json)")
    parser.add_argument("--keep-draws", type=Path, default=None,
                        help="folder for the truth's and the trajectory runs' draws (<config>.<run>.pt), for offline analyses")
    parser.add_argument("--reuse-draws", type=Path, default=None,
                        help="folder of kept runs (--keep-draws) of the same configuration: those found there are loaded, "
                        "not run again (the table's other rows are computed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.config:
        for key in ("images", "steps"):
            if getattr(args, key):
                CONFIGS[args.config][key] = getattr(args, key)
        if args.truth_draws < 64 or args.truth_draws % 4:
            parser.error("--truth-draws must be a multiple of 4, at least 64 (issue 22's truth)")
        args.results.mkdir(exist_ok=True)
        path = args.results / f"{args.config}{'.per-image' if args.per_image_draws else ''}.json"

        def save(result: dict) -> None:
            atomic_write(path, json.dumps(result, indent=1).encode())

        result = Bench(args.config, torch.device(args.device), args.truth_draws, args.grid, save, args.max_draws,
                       shared_draws=not args.per_image_draws, keep_draws=args.keep_draws,
                       reuse_draws=args.reuse_draws).run()
        print(f"wrote {path} in {result['wall_s'] / 60:.1f} min")
    if args.report:
        # every result file: <config>.json from the latest run, older runs kept beside it under other names
        results = [json.loads(path.read_text()) for path in args.results.glob("*.json")]
        order = list(CONFIGS)
        results.sort(key=lambda r: (order.index(r["config"]), not r.get("shared_draws", False),
                                    -r.get("truth_draws", TRUTH_DRAWS), r.get("grid", "full")))
        write_section(Path(__file__).with_name("BENCHMARKS.md"), "bench_truth", render(results))
        print(render(results))


if __name__ == "__main__":
    with torch.no_grad():
        main()
