"""Trajectory Monte Carlo: Var[x_0 | x_T] from whole trajectories with drawn head weights (docs/MATH.md §2.3).

The quantity the package reports is the spread of the final image over the posterior of the head's
weights and over the sampler's own noise. Its ground truth needs nothing from a scheduler but its
``step``: draw θ ~ q (and fresh sampler noise where the sampler is stochastic), run the scheduler's
own loop from the same x_T with those weights, take the spread. So every diffusers scheduler works —
multistep (DPM-Solver++ 2M, UniPC, PNDM), ancestral, flow matching, ``clip_sample``, thresholding —
and any model the :class:`~bayesdiff_ext.denoiser.Denoiser` calls.

How it runs:

* The returned image is the stock one: the model's own weights and the seeded noise, the same loop
  and the same pixels as the plain pipeline (its own B-row loop, bit-identical).
* The trajectories are copies of the batch (M·B rows and more), sent through the model in chunks of
  whole copies (``chunk_size`` rows at most per model call; each chunk has its own deep copy of the
  scheduler, so multistep state never mixes). Row r's head weights differ by a forward hook
  (:func:`~bayesdiff_ext.posterior.perturbation.perturbed_head`).
* Weight draws (and a stochastic sampler's trajectory noise) are by default the same for every image,
  from a seed (``shared_draws``, ``weight_seed``: common random numbers, docs/MATH.md §14.10), or
  else from each image's own streams (``'weights'``, ``'trajectory_noise'``, one sub-stream per noise
  stream); either way each image's result is the same in any batch (:mod:`bayesdiff_ext.randomness`).
* Deterministic samplers (no draw from the generator during the stock loop): one noise stream, the
  stock trajectory is the MAP trajectory, M weight draws. Stochastic samplers: J noise streams
  (``noise_samples``), each with its own MAP trajectory, the M weight draws sharing the noise of
  the first M/K streams (K = 1 or 2 per stream), so the law of total variance splits epistemic and
  aleatoric parts
  (:mod:`~bayesdiff_ext.sampler.trajectory_statistics` says how).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from bayesdiff_ext.denoiser import Denoiser
from bayesdiff_ext.guidance import ClassifierFreeGuidance
from bayesdiff_ext.posterior.draws import check_draws, image_weight_deviations
from bayesdiff_ext.posterior.perturbation import head_perturbation
from bayesdiff_ext.numerics import accumulation_dtype
from bayesdiff_ext.randomness import Generators, restartable
from bayesdiff_ext.sampler.initial_noise import initial_noise
from bayesdiff_ext.sampler.learned_variance import aleatoric_source, check_learned_variance
from bayesdiff_ext.sampler.results import BayesDiffOutput, TrajectoryDraws
from bayesdiff_ext.sampler.scheduler_loop import SchedulerLoop, generator_device, generator_states
from bayesdiff_ext.sampler.settings import UncertaintySettings, resolve_settings
from bayesdiff_ext.sampler.feedback_free import FeatureSum, accumulate_features, feedback_free_coefficients
from bayesdiff_ext.sampler.trajectory_statistics import controlled_spread, trajectory_moments

__all__ = ["TrajectorySampler"]



class TrajectorySampler:
    """Trajectory Monte Carlo with a posterior over a model's head.

    Args:
        model (`nn.Module`): a diffusers UNet or transformer (called through ``Denoiser``).
        scheduler: any diffusers scheduler; the stock loop runs on it, the trajectories on copies.
        posterior: a posterior on the model's head with ``head``, ``spec`` and ``sample(n, generator)``
            (e.g. :class:`~bayesdiff_ext.LastLayerLaplace`); antithetic and Sobol draws also need
            ``sample_from_normal(z)``.
    """

    def __init__(self, model, scheduler, posterior) -> None:
        for needed in ("head", "spec", "sample"):
            if not hasattr(posterior, needed):
                raise TypeError(f"the posterior needs `{needed}` for trajectory Monte Carlo; got {type(posterior).__name__}")
        self.model = model
        self.scheduler = scheduler
        for_model = getattr(posterior, "for_model", None)  # a posterior follows copies of its model
        self.posterior = posterior if for_model is None else for_model(model)
        self.denoiser = Denoiser(model)

    @torch.no_grad()
    def sample(
        self,
        batch_size: int | None = None,
        noise: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        generator: Generators = None,
        eta: float = 0.0,
        *,
        settings: UncertaintySettings | None = None,
        model_kwargs: dict[str, Any] | None = None,
        guidance: ClassifierFreeGuidance | None = None,
        scheduler_kwargs: dict[str, Any] | None = None,
        set_timesteps_kwargs: dict[str, Any] | None = None,
        progress: bool = True,
        return_draws: bool = False,
        **uncertainty: Any,
    ) -> BayesDiffOutput:
        """Sample B images and the variance of their final images over M weight draws.

        Args:
            batch_size, noise, num_inference_steps, generator, eta: as for
                :meth:`~bayesdiff_ext.BayesDiffSampler.sample` (``eta`` only where ``scheduler.step``
                takes it). A list of per-image generators makes every result independent of the batch.
            settings (`UncertaintySettings`, *optional*), uncertainty: the trajectory estimator's arguments
                (defaults in :mod:`~bayesdiff_ext.sampler.settings`), resolved with
                ``estimator='trajectories'``:

                * ``samples``: M, the weight draws per image (for a stochastic sampler, in all noise streams);
                * ``draws``: ``'independent'``, ``'antithetic'`` (± pairs, M even) or ``'sobol'``;
                * ``centre``: ``'map'`` (spread around each stream's MAP trajectory, the returned image
                  for a deterministic sampler) or ``'mean'`` (around the draws' own mean, unbiased for
                  independent draws; needs M/J ≥ 2);
                * ``noise_samples``: J noise streams of a stochastic sampler, each with its MAP
                  trajectory; the M draws go K to a stream (K = 2 for antithetic draws or
                  ``centre='mean'``, else 1) in the first M/K of them (default J = M/K); a
                  deterministic sampler has one stream and ignores it;
                * ``chunk_size``: rows per model call (default 256), rounded down to whole copies of
                  the batch (at least one);
                * ``control_variate``: correct the epistemic spread around the MAP trajectory by the
                  feedback-free response of each draw (:mod:`~bayesdiff_ext.sampler.feedback_free`);
                  None (default) where the run allows it, True to require it, False never;
                * ``shared_draws``: True (default): every image gets the same M weight draws (and, for a
                  stochastic sampler, the same trajectory noise streams), from ``weight_seed`` (default
                  0) — common random numbers, so the draws' Monte Carlo error is common to all images
                  and their scores rank as the true ones do (docs/MATH.md §14.10); False: each image's
                  own draws from its ``'weights'`` and ``'trajectory_noise'`` streams of ``generator``.
            model_kwargs, guidance, scheduler_kwargs, set_timesteps_kwargs, progress: as for the sampler.
            return_draws (`bool`): keep every trajectory's x_0 and weight deviation in ``draws``.

        Returns:
            :class:`~bayesdiff_ext.BayesDiffOutput`: ``images`` the stock sample, ``variance`` Var[x_0]
            (B, ...) ≥ 0 with its ``aleatoric_variance`` and ``epistemic_variance``, ``mean`` the draws'
            mean, ``timings`` with ``model_forwards_per_image``.
        """
        resolved = resolve_settings(settings=settings, estimator="trajectories", **uncertainty)
        samples, draws, centre = resolved.samples, resolved.draws, resolved.centre
        check_draws(draws, samples, self.posterior)
        blocked = self._control_blocked(centre, guidance)
        if resolved.control_variate and blocked:
            raise ValueError(f"control_variate=True: {blocked}")
        with tqdm(desc="trajectories", disable=not progress, unit="step") as bar:
            run = self.stock_run(
                batch_size, noise, num_inference_steps, generator, eta, model_kwargs, guidance, scheduler_kwargs,
                set_timesteps_kwargs, bar, features=resolved.control_variate is not False and not blocked,
            )
            if resolved.control_variate and run.features is None:
                raise ValueError(
                    f"control_variate=True needs a scheduler described by single-output affine steps (DDIM, DDPM, "
                    f"Euler, Euler-A, flow matching), got {type(self.scheduler).__name__}"
                )
            x_unit, batch, loop, draw_device, stochastic = run.x_unit, run.batch, run.loop, run.draw_device, run.stochastic
            images = run.images
            streams, with_draws, per_stream = _stream_layout(samples, resolved.noise_samples, stochastic, draws, centre)
            deviations = torch.stack(
                [
                    image_weight_deviations(
                        self.posterior, draws, per_stream, generator, batch, draw_device, resolved.weight_seed, j
                    )
                    for j in range(with_draws)
                ]
            )  # (J_w, K, B, P)
            maps_needed = [(j, None) for j in range(streams)] if stochastic else []
            copies = maps_needed + [(j, k) for j in range(with_draws) for k in range(per_stream)]
            finals = loop.run_copies(
                copies, x_unit, deviations, generator, draw_device, resolved.chunk_size, stochastic, resolved.weight_seed
            )

        shape = images.shape[1:]
        draws_final = torch.stack([finals[(j, k)] for j in range(with_draws) for k in range(per_stream)])
        draws_final = draws_final.reshape(with_draws, per_stream, batch, *shape)
        maps = torch.stack([finals[(j, None)] for j in range(streams)]) if stochastic else images[None]
        moments = trajectory_moments(draws_final, maps, draws, centre)
        epistemic = moments.epistemic
        if run.features is not None:
            epistemic = self._controlled_epistemic(run.features.total, draws_final, maps, deviations)
        return run.output(
            resolved, streams, epistemic + moments.aleatoric, moments.mean, moments.aleatoric, guidance,
            draws=TrajectoryDraws(draws_final, maps, deviations) if return_draws else None,
            record={"control_variate_used": run.features is not None}, chunks=loop.chunks,
        )

    def _control_blocked(self, centre: str, guidance) -> str | None:
        """Why the feedback-free control variate cannot serve this run (None: it can)."""
        if centre != "map":
            return "it corrects the spread around the MAP trajectory (centre='map')"
        if guidance is not None:
            return "it is not implemented with classifier-free guidance"
        if getattr(self.posterior, "layout", None) is not None:
            return "it is not implemented for a patch transformer's unpatchified head"
        if not hasattr(self.posterior, "sample_from_normal"):
            return "it needs draws centred on the head's weights (a Laplace posterior)"
        return None

    def _controlled_epistemic(self, phi_tilde, draws_final, maps, deviations) -> torch.Tensor:
        """:func:`controlled_spread` of the draws' squared deviations from their stream's MAP trajectory,
        controlled by head(φ̃; Δθ) (docs/MATH.md §14.5)."""
        spec = self.posterior.spec
        deviation_sq = (draws_final - maps[: draws_final.shape[0], None]).to(torch.float64).square().flatten(0, 1)
        control_sq = torch.stack(
            [head_perturbation(spec, phi_tilde, d).square() for d in deviations.flatten(0, 1)]
        )
        exact = self.posterior.predict(phi_tilde)[1]
        return controlled_spread(deviation_sq, control_sq.reshape(deviation_sq.shape), exact.reshape(deviation_sq.shape[1:]))

    def stock_run(
        self, batch_size, noise, num_inference_steps, generator, eta, model_kwargs, guidance, scheduler_kwargs,
        set_timesteps_kwargs, bar, features: bool = False,
    ) -> StockRun:
        """x_T, the stock loop (the returned image) and whether the sampler drew noise in it, with the
        loop that runs the copies; shared by the trajectory estimators. With ``features``, also φ̃ of
        the stock trajectory (:mod:`~bayesdiff_ext.sampler.feedback_free`) where the scheduler allows."""
        started = time.perf_counter()
        check_learned_variance(self.scheduler, self.model, guidance)
        kwargs = dict(model_kwargs or {})
        if guidance is not None:
            kwargs = guidance.branch_kwargs(kwargs)
        x_unit = initial_noise(self.denoiser, batch_size, noise, generator)
        template = copy.deepcopy(self.scheduler)
        loop = SchedulerLoop(self, template, num_inference_steps, eta, kwargs, guidance, scheduler_kwargs, set_timesteps_kwargs)
        loop.bar = bar
        before = generator_states(generator, x_unit.device)
        replay = restartable(generator, x_unit.device)
        betas = feedback_free_coefficients(template, float(eta), scheduler_kwargs) if features else None
        with contextlib.ExitStack() as stack:
            summed = None if betas is None else stack.enter_context(accumulate_features(self.posterior.head, betas))
            images = loop.run(self.scheduler, x_unit, generator, copies=1)
        if summed is not None and summed.calls != len(betas):
            summed = None  # the loop called the model otherwise than the description says
        stochastic = not all(map(torch.equal, generator_states(generator, x_unit.device), before))
        return StockRun(
            self, started, x_unit, loop, generator_device(generator, x_unit.device), images, stochastic, replay,
            num_inference_steps, float(eta), summed,
        )


@dataclass
class StockRun:
    """The stock trajectory of a trajectory estimator and what its copies need."""

    sampler: TrajectorySampler
    started: float
    x_unit: torch.Tensor  # the unit-variance x_T
    loop: SchedulerLoop
    draw_device: torch.device  # where the derived streams draw
    images: torch.Tensor  # the stock x_0
    stochastic: bool  # the sampler drew from the generator during the stock loop
    replay: Any  # generators at the stock loop's starting state (restartable)
    num_inference_steps: int
    eta: float
    features: FeatureSum | None = None  # φ̃ of the stock trajectory, for the control variate

    @property
    def batch(self) -> int:
        return self.x_unit.shape[0]

    def output(self, resolved, streams, variance, mean, aleatoric, guidance, draws=None, record=None, **timings) -> BayesDiffOutput:
        """The estimate as a BayesDiffOutput with the run's settings (and ``record``) and ``timings``."""
        if self.x_unit.device.type == "cuda":
            torch.cuda.synchronize(self.x_unit.device)
        template, sampler = self.loop.template, self.sampler
        settings = dict(
            resolved.describe(),
            num_inference_steps=self.num_inference_steps,
            eta=self.eta,
            noise_samples=streams,
            stochastic_sampler=self.stochastic,
            scheduler=type(sampler.scheduler).__name__,
            timesteps=template.timesteps.tolist() if template.timesteps is not None else None,
            posterior_structure=getattr(sampler.posterior, "structure", None),
            guidance=None if guidance is None else dict(scale=guidance.scale),
            aleatoric_source=aleatoric_source(sampler.scheduler, sampler.model, self.stochastic),
            **(record or {}),
        )
        timings = dict(
            total_s=time.perf_counter() - self.started, model_forwards_per_image=self.loop.model_rows / self.batch, **timings
        )
        dtype = accumulation_dtype(self.images)
        return BayesDiffOutput(
            images=self.images,
            variance=variance.to(dtype),
            mean=mean.to(dtype),
            settings=settings,
            timings=timings,
            aleatoric_variance=aleatoric.to(dtype),
            draws=draws,
        )


def _stream_layout(samples: int, noise_samples: int | None, stochastic: bool, draws: str, centre: str) -> tuple[int, int, int]:
    """(J noise streams, J_w of them with weight draws, K draws in each) for M = ``samples`` draws.

    A deterministic sampler has one stream with all M draws (``noise_samples`` does not apply). A
    stochastic one puts K = 2 draws (an antithetic pair, or two for a spread around their mean) or
    K = 1 (around the MAP trajectory) in each of the first J_w = M/K streams, and runs J ≥ J_w MAP
    trajectories (default J_w): more streams sharpen the sampler-noise part at one trajectory each.
    """
    if not stochastic:
        return 1, 1, samples
    per_stream = 2 if draws == "antithetic" or centre == "mean" else 1
    if samples % per_stream:
        raise ValueError(f"draws={draws!r}, centre={centre!r} put 2 draws in each noise stream: samples must be even, got {samples}")
    with_draws = samples // per_stream
    streams = with_draws if noise_samples is None else noise_samples
    if not isinstance(streams, int) or streams < max(2, with_draws):
        raise ValueError(
            f"noise_samples must be an integer >= {max(2, with_draws)} for a stochastic sampler with samples={samples} "
            f"(the law of total variance needs 2 noise streams or more, and the {with_draws} streams with weight "
            f"draws are among them), got {noise_samples!r}"
        )
    return streams, with_draws, per_stream
