"""One yardstick for every estimator of Var[x_0 | x_T]: trajectory Monte Carlo with M = 64 as the truth.

For one model and scheduler (``--config``), on the same x_T for every estimator:

* truth: :class:`TrajectorySampler` with 64 independent weight draws around their own mean (a
  stochastic sampler: 32 noise streams × 2 draws, the aleatoric part from 32 fresh-noise runs at the
  posterior mean — the brute force of the sampler's noise);
* the moment recurrence (BayesDiff): the paper's defaults (Skip 5, S = 10), Monte Carlo at every
  step, each with the plain and the regression covariance, and the closed form without covariance;
* trajectories with M = 2, 4, 8, 16 weight draws — independent, antithetic, Sobol — each around
  the draws' mean and around the MAP trajectory (M < 16 are the first draws of one M = 16 run:
  the first points of the same streams, exactly what a run with that M draws for independent and
  Sobol draws, and its first pairs for antithetic ones);
* forward-mode linearisation (M = 4 Sobol directions: on a CPU each tangent costs several forwards);
* deterministic samplers only: a control variate (the trajectories' squared deviations against the
  closed-form response without feedback, whose variance is known), and the top eigen-directions of
  the posterior in the data's metric (± pairs along the R directions with the largest s·h·v).

Columns: mean Var / truth; per-pixel Pearson r of the map against the truth (all pixels of all
images); Spearman's ρ of the per-image sums against the truth's; between-seed map r (the same
estimator with another seed, "—" where it has no randomness); model forwards per image
(tangent passes count one each); wall time relative to plain sampling (the pipeline's loop) in the
same process — for M < 16 trajectories estimated from the M = 16 run's time per trajectory.

Run one configuration per call (each ≤ ~20 min on one thread; results to
python/bench_truth_results/<config>.json), then ``--report`` to write the `bench_truth` section of
BENCHMARKS.md from every result file:

    OMP_NUM_THREADS=1 .venv/bin/python python/bench_truth.py --config digits-ddim
    .venv/bin/python python/bench_truth.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from scipy.stats import spearmanr

from bayesdiff_ext import BayesDiffSampler, LastLayerLaplace
from bayesdiff_ext.digits import bundled_dir, load_bundled_scheduler, load_bundled_unet
from bayesdiff_ext.posterior.perturbation import head_perturbation
from bayesdiff_ext.randomness import image_generators
from bayesdiff_ext.sampler.linearised import LinearisedSampler
from bayesdiff_ext.sampler.schedulers import describe
from bayesdiff_ext.sampler.scheduler_loop import SchedulerLoop
from bayesdiff_ext.sampler.trajectories import TrajectorySampler
from bayesdiff_ext.sampler.trajectory_statistics import trajectory_moments

sys.path.insert(0, str(Path(__file__).parent))
from bench_timing import write_section  # noqa: E402

RESULTS = Path(__file__).with_name("bench_truth_results")
CONFIGS = {
    "digits-ddim": dict(model="digits", scheduler="ddim", eta=0.0, steps=50, images=16),
    "digits-ddpm": dict(model="digits", scheduler="ddpm", eta=0.0, steps=20, images=16),
    "digits-ddim-eta1": dict(model="digits", scheduler="ddim", eta=1.0, steps=20, images=16),
    "random-ddim": dict(model="random", scheduler="ddim", eta=0.0, steps=20, images=8),
    "random-ddpm": dict(model="random", scheduler="ddpm", eta=0.0, steps=20, images=8),
}
TRUTH_DRAWS, TRAJECTORY_DRAWS, SEEDS = 64, 16, (1, 2)
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
    scores, truth_scores = estimate.flatten(1).sum(1), truth.flatten(1).sum(1)
    return dict(
        ratio=float(estimate.double().mean() / truth.double().mean()),
        map_r=pearson(estimate, truth),
        spearman=float(spearmanr(scores.numpy(), truth_scores.numpy()).statistic),
        seed_r=None if other_seed is None else pearson(estimate, other_seed),
    )


# ------------------------------------------------------------------------------------------ the bench
class Bench:
    def __init__(self, name: str):
        self.name, self.config = name, CONFIGS[name]
        setup = digits_setup if self.config["model"] == "digits" else random_setup
        self.unet, self.scheduler_config, self.posterior, self.described = setup()
        self.batch, self.steps, self.eta = self.config["images"], self.config["steps"], self.config["eta"]
        self.x_t = torch.cat([torch.randn(1, *self.shape, generator=g) for g in image_generators(X_T_SEED, range(self.batch))])
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
            times.append(time.perf_counter() - started)
        return sorted(times)[1]

    def trajectories(self, seed, samples, draws, centre, noise_samples=None, return_draws=False):
        sampler = TrajectorySampler(self.unet, self.scheduler(), self.posterior)
        started = time.perf_counter()
        out = sampler.sample(
            noise=self.x_t, num_inference_steps=self.steps, generator=self.generators(seed), eta=self.eta,
            samples=samples, draws=draws, centre=centre, noise_samples=noise_samples, progress=False,
            return_draws=return_draws,
        )
        return out, time.perf_counter() - started

    def add(self, family, setting, estimate, seconds, forwards, other=None, aleatoric=None):
        truth = self.truth
        row = dict(estimator=family, setting=setting, forwards=forwards, time_ratio=seconds / self.plain)
        row.update(compare(estimate, truth.variance, other))
        if aleatoric is not None and self.stochastic:
            row["aleatoric_ratio"] = float(aleatoric.double().mean() / truth.aleatoric_variance.double().mean())
        self.rows.append(row)
        print(f"{family:24s} {setting:34s} " + " ".join(
            f"{k}={v:.3g}" for k, v in row.items() if isinstance(v, float)), flush=True)

    def run(self) -> dict:
        started, load_start = time.perf_counter(), os.getloadavg()
        self.plain = self.plain_seconds()
        truth, truth_s = self.trajectories(
            100, TRUTH_DRAWS, "independent", "mean", noise_samples=None if self.config["scheduler"] == "ddim" and not self.eta else TRUTH_DRAWS // 2
        )
        self.truth, self.stochastic = truth, truth.settings["stochastic_sampler"]
        self.add("truth", f"trajectories M={TRUTH_DRAWS}", truth.variance, truth_s, truth.timings["model_forwards_per_image"],
                 aleatoric=truth.aleatoric_variance)
        self.recurrence()
        self.trajectory_table()
        self.linearised()
        if not self.stochastic:
            self.principal_directions()
        return dict(
            config=self.name, settings=self.config, described=self.described, plain_s=self.plain,
            truth_mean=float(truth.variance.double().mean()), truth_aleatoric_mean=float(truth.aleatoric_variance.double().mean()),
            stochastic=self.stochastic, rows=self.rows, wall_s=time.perf_counter() - started,
            load_start=load_start, load_end=os.getloadavg(), threads=torch.get_num_threads(),
            torch=torch.__version__, machine=platform.machine(),
        )

    # -------------------------------------------------------------- the moment recurrence
    def recurrence(self):
        settings = {
            "paper (Skip 5, S=10)": dict(uq_every=5, mc_samples=10),
            "every step, S=10": dict(uq_every=1, mc_samples=10),
        }
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
        # a stochastic sampler: 2 draws per noise stream (both centres and antithetic pairs work)
        streams = TRAJECTORY_DRAWS // 2 if self.stochastic else None
        for draws in ("independent", "antithetic", "sobol"):
            runs = [self.trajectories(seed, TRAJECTORY_DRAWS, draws, "map", streams, return_draws=True) for seed in SEEDS]
            seconds_per_copy = (runs[0][1] - self.plain) / (runs[0][0].timings["model_forwards_per_image"] / self.steps - 1)
            for samples in (2, 4, 8, 16):
                subsets = [_first_draws(out.draws, samples, draws, self.stochastic) for out, _ in runs]
                if subsets[0] is None:
                    continue
                copies = samples + (subsets[0][1].shape[0] if self.stochastic else 0)
                seconds, forwards = self.plain + copies * seconds_per_copy, (1 + copies) * self.steps
                for centre in ("mean", "map"):
                    try:
                        moments = [trajectory_moments(f, m, draws, centre) for f, m, _ in subsets]
                    except ValueError:
                        continue
                    self.add(f"trajectories, {draws}", f"M={samples}, around the {centre}", moments[0].variance, seconds,
                             forwards, moments[1].variance, moments[0].aleatoric)
                if not self.stochastic and draws != "antithetic":
                    self.control_variate(draws, samples, subsets, seconds, forwards)

    def control_variate(self, draws, samples, subsets, seconds, forwards):
        """Σ_m D_m² / M − β·(Σ_m L_m² / M − V): D_m = x_m − x_MAP, L_m the response without feedback
        head(φ̃; Δθ_m) (φ̃ = Σ_k β_k φ_k along the stock trajectory), V its exact variance, β per image."""
        phi_tilde = self.feedback_free_features()
        estimates = []
        for finals, maps, deviations in subsets:
            deviation_sq = (finals[0] - maps[0]).double().square()  # (K, B, ...)
            responses = torch.stack([head_perturbation(self.posterior.spec, phi_tilde, d.float()) for d in deviations[0]])
            control = responses.double().square()
            exact = self.posterior.predict(phi_tilde)[1].double()
            centred_d, centred_c = deviation_sq - deviation_sq.mean(0), control - control.mean(0)
            dims = tuple(range(2, control.dim()))
            slope = (centred_d * centred_c).sum((0, *dims)) / centred_c.square().sum((0, *dims)).clamp_min(1e-300)
            slope = slope.view(-1, *([1] * len(dims)))
            estimates.append((deviation_sq.mean(0) - slope * (control.mean(0) - exact)).clamp_min(0))
        self.add(f"control variate, {draws}", f"M={samples}, around the map", estimates[0], seconds, forwards, estimates[1])

    def feedback_free_features(self) -> torch.Tensor:
        """φ̃ = Σ_k β_k φ_k, β_k the coefficient of ε_k in x_0 when the steps are not fed back."""
        scheduler = self.scheduler()
        scheduler.set_timesteps(self.steps)
        plan = describe(scheduler, self.eta).steps()
        phis, x = [], self.x_t
        with torch.no_grad():
            for step in plan:
                t = scheduler.timesteps[step.index]
                with self.posterior.capture() as cap:
                    out = self.unet(x, t).sample
                phis.append(cap.phi)
                x = scheduler.step(out, t, x, eta=self.eta).prev_sample
        total, carry = torch.zeros_like(phis[0], dtype=torch.float64), 1.0
        for step, phi in zip(reversed(plan), reversed(phis)):
            total += carry * step.b[-1] * phi.double()
            carry *= step.a
        return total.float()

    # -------------------------------------------------------------- linearisation, eigen-directions
    def linearised(self):
        for samples in (4,):
            runs = []
            for seed in SEEDS:
                sampler = LinearisedSampler(self.unet, self.scheduler(), self.posterior)
                started = time.perf_counter()
                out = sampler.sample(noise=self.x_t, num_inference_steps=self.steps, generator=self.generators(seed),
                                     eta=self.eta, samples=samples, draws="sobol", progress=False)
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


def _first_draws(draws, samples: int, kind: str, stochastic: bool):
    """The first ``samples`` draws of a run: (finals (J, K, B, ...), maps (J, B, ...), deviations).

    Deterministic: the first draws of the one stream (antithetic: the first samples/2 pairs).
    Stochastic (2 draws per stream): the first samples/2 streams; None where fewer than 2 streams.
    """
    finals, maps, deviations = draws.finals, draws.maps, draws.deviations
    if stochastic:
        streams = samples // 2
        if streams < 2:
            return None
        return finals[:streams], maps[:streams], deviations[:streams]
    count = finals.shape[1]
    if kind == "antithetic":
        index = torch.cat([torch.arange(samples // 2), count // 2 + torch.arange(samples // 2)])
    else:
        index = torch.arange(samples)
    return finals[:, index], maps, deviations[:, index]


# ------------------------------------------------------------------------------------------ report
COLUMNS = "| estimator | setting | mean Var / truth | map r | score ρ | between-seed r | forwards / image | time / plain |"


def render(results: list[dict]) -> str:
    lines = [
        "`python/bench_truth.py` — every estimator of Var[x_0 | x_T] against trajectory Monte Carlo with "
        f"M = {TRUTH_DRAWS} independent weight draws (docs/MATH.md §2.3). Per configuration one process, one "
        "thread (OMP_NUM_THREADS=1), the same x_T for every estimator (image k drawn from (seed 0, k)); "
        "\"time / plain\" is wall time over the plain loop's in the same process (M < 16 trajectories: "
        "from the M = 16 run's time per trajectory), on a shared machine (load averages below). "
        "\"forwards / image\": model calls per image, a JVP tangent counted as one. \"score ρ\": Spearman "
        "of the per-image sums; \"between-seed r\": the map of seed 1 against seed 2 (— : no randomness).",
        "",
    ]
    for result in results:
        settings = result["settings"]
        sampler = f"DDIM η={settings['eta']:g}" if settings["scheduler"] == "ddim" else "DDPM"
        lines += [
            f"### {result['config']}: {sampler}, {settings['steps']} steps, {settings['images']} images",
            "",
            f"{result['described']}. Truth: mean Var {result['truth_mean']:.4g}"
            + (f", of which the sampler's noise {result['truth_aleatoric_mean']:.4g}" if result["stochastic"] else "")
            + f". Plain loop {result['plain_s']:.2f} s; whole run {result['wall_s'] / 60:.1f} min; load average "
            f"{result['load_start'][0]:.1f} at the start, {result['load_end'][0]:.1f} at the end; torch {result['torch']}, "
            f"{result['threads']} thread.",
            "",
            COLUMNS + (" sampler-noise part / truth's |" if result["stochastic"] else ""),
            "|---|---|---|---|---|---|---|---|" + ("---|" if result["stochastic"] else ""),
        ]
        for row in result["rows"]:
            seed_r = "—" if row["seed_r"] is None else f"{row['seed_r']:.2f}"
            cells = [row["estimator"], row["setting"], f"{row['ratio']:.3g}", f"{row['map_r']:.3f}",
                     f"{row['spearman']:.2f}", seed_r, f"{row['forwards']:.0f}", f"{row['time_ratio']:.1f}×"]
            if result["stochastic"]:
                cells.append(f"{row['aleatoric_ratio']:.3g}" if "aleatoric_ratio" in row else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS))
    parser.add_argument("--images", type=int, default=None, help="override the configuration's image count")
    parser.add_argument("--steps", type=int, default=None, help="override the configuration's steps (smoke tests)")
    parser.add_argument("--report", action="store_true", help="write the bench_truth section from the result files")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.config:
        for key in ("images", "steps"):
            if getattr(args, key):
                CONFIGS[args.config][key] = getattr(args, key)
        result = Bench(args.config).run()
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{args.config}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
        print(f"wrote {path} in {result['wall_s'] / 60:.1f} min")
    if args.report:
        results = [json.loads((RESULTS / f"{name}.json").read_text()) for name in CONFIGS if (RESULTS / f"{name}.json").exists()]
        write_section(Path(__file__).with_name("BENCHMARKS.md"), "bench_truth", render(results))
        print(render(results))


if __name__ == "__main__":
    with torch.no_grad():
        main()
