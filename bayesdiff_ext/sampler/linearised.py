"""Forward-mode linearisation: the one trajectory's response to M weight directions (docs/MATH.md §2.3).

Trajectory Monte Carlo runs a whole trajectory per weight draw. Its first-order version carries M
random directions v_m = Σ^{1/2}·z_m of the head's weights along the *one* stock trajectory as
tangents (``torch.func.jvp``, batched over the directions by ``torch.func.vmap``): the primal
forward pass is shared, each tangent costs about one more forward pass, and the tangent of x_0 is
J·v_m with J = ∂x_0/∂θ through every step — including the functional feedback (a weight change
moves x_t, and the model's response to that moves the later steps), which the closed form without
feedback misses (docs/MATH.md §2.2). Estimator: epistemic = mean_m (J·v_m)², unbiased for the
linearised variance diag(J Σ Jᵀ) with M degrees of freedom; its bias against the truth is the
trajectory's non-linearity in θ. A stochastic sampler's aleatoric part comes from J MAP
trajectories with fresh noise, as in :class:`~bayesdiff_ext.sampler.trajectories.TrajectorySampler`.

Attention runs on PyTorch's math kernel inside the tangent passes (the fused CPU/flash kernels
have no forward-mode derivative); the returned image is still the stock loop's own.
"""

from __future__ import annotations

import copy
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from bayesdiff_ext.posterior.draws import weight_deviations
from bayesdiff_ext.posterior.perturbation import perturbed_head
from bayesdiff_ext.randomness import Generators, ImageStreams, restartable
from bayesdiff_ext.sampler.initial_noise import initial_noise
from bayesdiff_ext.sampler.results import BayesDiffOutput
from bayesdiff_ext.sampler.scheduler_loop import SchedulerLoop, generator_device, generator_states
from bayesdiff_ext.sampler.trajectories import TrajectorySampler

__all__ = ["LinearisedSampler"]

#: Directions per tangent pass when ``chunk_size`` is not given.
DEFAULT_TANGENTS = 16


class LinearisedSampler(TrajectorySampler):
    """Var[x_0] to first order in the head's weights, from tangents along the stock trajectory.

    Same arguments as :class:`~bayesdiff_ext.sampler.trajectories.TrajectorySampler`.
    """

    @torch.no_grad()
    def sample(
        self,
        batch_size: int | None = None,
        noise: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        generator: Generators = None,
        eta: float = 0.0,
        samples: int = 8,
        draws: str = "independent",
        noise_samples: int | None = None,
        chunk_size: int | None = None,
        model_kwargs=None,
        guidance=None,
        scheduler_kwargs=None,
        set_timesteps_kwargs=None,
        progress: bool = True,
    ) -> BayesDiffOutput:
        """Sample B images and the linearised variance of x_0 over M weight directions.

        Args:
            samples (`int`): M, the weight directions per image.
            draws (`str`): ``'independent'`` or ``'sobol'`` (``'antithetic'`` would repeat each
                direction with its sign flipped: the linearisation is odd in it).
            noise_samples (`int`, *optional*): J fresh-noise MAP trajectories for a stochastic
                sampler's aleatoric part (default 8, at least 2).
            chunk_size (`int`, *optional*): directions per tangent pass (default 16); each pass
                recomputes the primal.
            The other arguments are those of :meth:`TrajectorySampler.sample`.

        Returns:
            :class:`~bayesdiff_ext.BayesDiffOutput` (``timings`` also counts ``tangent_passes``).
        """
        if draws == "antithetic":
            raise ValueError("draws='antithetic' repeats every direction with its sign flipped; use 'independent' or 'sobol'")
        started = time.perf_counter()
        kwargs = dict(model_kwargs or {})
        if guidance is not None:
            kwargs = guidance.branch_kwargs(kwargs)
        x_unit = initial_noise(self.denoiser, batch_size, noise, generator)
        batch = x_unit.shape[0]
        template = copy.deepcopy(self.scheduler)
        loop = SchedulerLoop(self, template, num_inference_steps, eta, kwargs, guidance, scheduler_kwargs, set_timesteps_kwargs)
        draw_device = generator_device(generator, x_unit.device)
        before = generator_states(generator, x_unit.device)
        replay = restartable(generator, x_unit.device)
        per_pass = DEFAULT_TANGENTS if chunk_size is None else chunk_size
        if not isinstance(per_pass, int) or per_pass < 1:
            raise ValueError(f"chunk_size must be an integer >= 1 (directions per tangent pass), got {chunk_size!r}")

        with tqdm(desc="linearised", disable=not progress, unit="step") as bar:
            loop.bar = bar
            images = loop.run(self.scheduler, x_unit, generator, copies=1)
            stochastic = not all(map(torch.equal, generator_states(generator, x_unit.device), before))
            streams = _noise_streams(noise_samples, stochastic)
            directions = weight_deviations(
                self.posterior, draws, samples, ImageStreams.derived(generator, batch, draw_device, "weights", 0).generators
            ).to(x_unit.device)

            def trajectory(deviation):
                with perturbed_head(self.posterior.head, self.posterior.spec, deviation):
                    return loop.run(copy.deepcopy(template), x_unit, replay(), copies=1)

            def tangent(direction):
                return torch.func.jvp(trajectory, (torch.zeros_like(direction),), (direction,))[1]

            squares, passes = torch.zeros(images.shape, dtype=torch.float64, device=images.device), 0
            with sdpa_kernel(SDPBackend.MATH):
                for first in range(0, samples, per_pass):
                    tangents = torch.func.vmap(tangent, randomness="same")(directions[first : first + per_pass])
                    squares += tangents.to(torch.float64).square().sum(dim=0)
                    passes += 1
            epistemic = squares / samples
            if stochastic:
                zeros = torch.zeros_like(directions[:1, None].expand(1, 1, -1, -1), dtype=torch.float64)
                finals = loop.run_copies([(j, None) for j in range(streams)], x_unit, zeros, generator, draw_device,
                                         None, True)
                maps = torch.stack([finals[(j, None)] for j in range(streams)]).to(torch.float64)
                aleatoric, mean = maps.var(dim=0), maps.mean(dim=0)
            else:
                aleatoric, mean = torch.zeros_like(epistemic), images.to(torch.float64)

        moment_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        settings = dict(
            method="linearised",
            num_inference_steps=num_inference_steps,
            eta=float(eta),
            samples=samples,
            draws=draws,
            noise_samples=streams,
            stochastic_sampler=stochastic,
            scheduler=type(self.scheduler).__name__,
            timesteps=template.timesteps.tolist() if template.timesteps is not None else None,
            posterior_structure=getattr(self.posterior, "structure", None),
        )
        steps = len(template.timesteps)
        timings = dict(
            total_s=time.perf_counter() - started,
            model_forwards_per_image=loop.model_rows / batch,
            tangent_passes=passes,
            tangents_per_image=samples * steps,
            clamped_pixels=0,
        )
        return BayesDiffOutput(
            images=images,
            variance=(epistemic + aleatoric).to(moment_dtype),
            mean=mean.to(moment_dtype),
            settings=settings,
            timings=timings,
            aleatoric_variance=aleatoric.to(moment_dtype),
        )


def _noise_streams(noise_samples: int | None, stochastic: bool) -> int:
    if not stochastic:
        if noise_samples not in (None, 1):
            raise ValueError(f"noise_samples={noise_samples} but the sampler drew no noise (deterministic)")
        return 1
    streams = 8 if noise_samples is None else noise_samples
    if not isinstance(streams, int) or streams < 2:
        raise ValueError(f"noise_samples must be an integer >= 2 for a stochastic sampler, got {noise_samples!r}")
    return streams
