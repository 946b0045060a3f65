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

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from bayesdiff_ext.posterior.draws import image_weight_deviations
from bayesdiff_ext.posterior.perturbation import perturbed_head
from bayesdiff_ext.randomness import Generators
from bayesdiff_ext.sampler.results import BayesDiffOutput
from bayesdiff_ext.sampler.settings import UncertaintySettings, resolve_settings
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
        *,
        settings: UncertaintySettings | None = None,
        model_kwargs=None,
        guidance=None,
        scheduler_kwargs=None,
        set_timesteps_kwargs=None,
        progress: bool = True,
        **uncertainty,
    ) -> BayesDiffOutput:
        """Sample B images and the linearised variance of x_0 over M weight directions.

        Args:
            settings, uncertainty: the linearised estimator's arguments, resolved with
                ``estimator='linearised'`` (:mod:`~bayesdiff_ext.sampler.settings`):

                * ``samples``: M, the weight directions per image;
                * ``draws``: ``'independent'`` or ``'sobol'`` (``'antithetic'`` would repeat each
                  direction with its sign flipped: the linearisation is odd in it);
                * ``noise_samples``: J fresh-noise MAP trajectories for a stochastic sampler's
                  aleatoric part (default 8, at least 2);
                * ``chunk_size``: directions per tangent pass (default 16); each pass recomputes
                  the primal;
                * ``shared_draws``, ``weight_seed``: the same M directions (and noise streams) for
                  every image, from ``weight_seed`` (default), or each image's own, as for
                  :meth:`TrajectorySampler.sample`.
            The other arguments are those of :meth:`TrajectorySampler.sample`.

        Returns:
            :class:`~bayesdiff_ext.BayesDiffOutput` (``timings`` also counts ``tangent_passes``).
        """
        resolved = resolve_settings(settings=settings, estimator="linearised", **uncertainty)
        samples, draws, chunk_size = resolved.samples, resolved.draws, resolved.chunk_size
        per_pass = DEFAULT_TANGENTS if chunk_size is None else chunk_size
        with tqdm(desc="linearised", disable=not progress, unit="step") as bar:
            run = self.stock_run(
                batch_size, noise, num_inference_steps, generator, eta, model_kwargs, guidance, scheduler_kwargs,
                set_timesteps_kwargs, bar,
            )
            loop, x_unit, images = run.loop, run.x_unit, run.images
            streams = _noise_streams(resolved.noise_samples, run.stochastic)
            directions = image_weight_deviations(
                self.posterior, draws, samples, generator, run.batch, run.draw_device, resolved.weight_seed, 0
            ).to(x_unit.device)

            def trajectory(deviation):
                with perturbed_head(self.posterior.head, self.posterior.spec, deviation):
                    return loop.run(copy.deepcopy(loop.template), x_unit, run.replay(), copies=1, fresh=True)

            def tangent(direction):
                return torch.func.jvp(trajectory, (torch.zeros_like(direction),), (direction,))[1]

            squares, passes = torch.zeros(images.shape, dtype=torch.float64, device=images.device), 0
            with sdpa_kernel(SDPBackend.MATH):
                for first in range(0, samples, per_pass):
                    tangents = torch.func.vmap(tangent, randomness="same")(directions[first : first + per_pass])
                    squares += tangents.to(torch.float64).square().sum(dim=0)
                    passes += 1
            epistemic = squares / samples
            if run.stochastic:
                zeros = torch.zeros((1, 1, *directions.shape[1:]), dtype=torch.float64)
                finals = loop.run_copies([(j, None) for j in range(streams)], x_unit, zeros, generator, run.draw_device,
                                         None, True, resolved.weight_seed)
                maps = torch.stack([finals[(j, None)] for j in range(streams)]).to(torch.float64)
                aleatoric, mean = maps.var(dim=0), maps.mean(dim=0)
            else:
                aleatoric, mean = torch.zeros_like(epistemic), images.to(torch.float64)
        return run.output(
            resolved, streams, epistemic + aleatoric, mean, aleatoric, guidance,
            tangent_passes=passes, tangents_per_image=samples * len(loop.template.timesteps),
        )


def _noise_streams(noise_samples: int | None, stochastic: bool) -> int:
    """J MAP trajectories with fresh noise for a stochastic sampler (a deterministic one ignores it)."""
    if not stochastic:
        return 1
    streams = 8 if noise_samples is None else noise_samples
    if not isinstance(streams, int) or streams < 2:
        raise ValueError(f"noise_samples must be an integer >= 2 for a stochastic sampler, got {noise_samples!r}")
    return streams
