"""The scheduler's own loop over stacked copies of a batch, shared by the trajectory estimators.

Any diffusers scheduler: the loop is ``scheduler.step`` itself (with ``eta`` and ``generator`` where
the step takes them), on deep copies of a pristine template so that multistep state never mixes
between chunks. A head perturbation per row (:func:`~bayesdiff_ext.posterior.perturbation.perturbed_head`)
turns the copies into trajectories with drawn weights.
"""

from __future__ import annotations

import copy
import inspect

import torch

from bayesdiff_ext.denoiser import Denoiser, stepped_prediction
from bayesdiff_ext.posterior.perturbation import perturbed_head
from bayesdiff_ext.randomness import Generators, ImageStreams, derived_seed
from bayesdiff_ext.sampler.learned_variance import uses_learned_variance
from bayesdiff_ext.sampler.model_call import scaled_model_input

__all__ = ["DEFAULT_CHUNK_ROWS", "SchedulerLoop", "generator_device", "generator_states"]

#: Rows per model call when ``chunk_size`` is not given (rounded down to whole copies of the batch).
DEFAULT_CHUNK_ROWS = 256


class SchedulerLoop:
    """The scheduler's own loop for any number of stacked copies of the batch.

    ``sampler`` gives the ``denoiser`` and the ``posterior``; ``template`` is a pristine copy of the
    scheduler (every chunk runs on its own deep copy of it); ``kwargs`` are the B images'
    conditioning (guidance: its branch kwargs). ``model_rows`` counts the rows through the model.
    """

    def __init__(self, sampler, template, steps, eta, kwargs, guidance, scheduler_kwargs, set_timesteps_kwargs):
        self.sampler, self.template, self.steps = sampler, template, steps
        self.kwargs, self.guidance = kwargs, guidance
        self.set_timesteps_kwargs = dict(set_timesteps_kwargs or {})
        accepted = inspect.signature(template.step).parameters
        self.step_kwargs = dict(scheduler_kwargs or {})
        if "eta" in accepted:
            self.step_kwargs["eta"] = eta
        elif eta:
            raise ValueError(f"eta={eta} but {type(template).__name__}.step takes no eta")
        self.takes_generator = "generator" in accepted
        self.learned_variance = uses_learned_variance(template)
        self.model_rows = 0
        self.chunks = 0
        self.bar = None
        template.set_timesteps(steps, **self.set_timesteps_kwargs)

    def run(self, scheduler, x_unit: torch.Tensor, generator, copies: int, fresh: bool = False, observe=None) -> torch.Tensor:
        """x_0 of ``copies`` stacked copies of the batch (rows copy-major) on ``scheduler``. ``fresh``: it
        is a pristine copy of the template, its timesteps already set (so the loop can run inside a
        functorch transform, where DPM-Solver++'s ``set_timesteps`` cannot: it reads a tensor's data).
        ``observe(index, t, x, prediction)``, where given, sees every model call before its step: the
        sample x_t and the (guided) prediction shaped like it."""
        batch = x_unit.shape[0] // copies
        if not fresh:
            scheduler.set_timesteps(self.steps, **self.set_timesteps_kwargs)
        x = x_unit * scheduler.init_noise_sigma if hasattr(scheduler, "init_noise_sigma") else x_unit
        kwargs = Denoiser.tile(self.kwargs, batch, copies)
        step_kwargs = dict(self.step_kwargs, **({"generator": generator} if self.takes_generator else {}))
        if self.bar is not None:
            self.bar.total = (self.bar.total or 0) + len(scheduler.timesteps)
            self.bar.refresh()
        for index, t in enumerate(scheduler.timesteps):
            out = self.predict(scaled_model_input(scheduler, x, t), t, kwargs)
            prediction = out if self.learned_variance else stepped_prediction(out, x)
            if observe is not None:
                observe(index, t, x, stepped_prediction(out, x))
            x = scheduler.step(prediction, t, x, **step_kwargs).prev_sample
            if self.bar is not None:
                self.bar.update(1)
        return x

    def predict(self, x, t, kwargs):
        rows = x.shape[0] * (1 if self.guidance is None else 2)
        self.model_rows += rows
        if self.guidance is None:
            return self.sampler.denoiser(x, t, kwargs)
        return self.guidance.forward(self.sampler.denoiser, None, x, t, kwargs, want_head=False)[0]

    def run_copies(self, copies, x_unit, deviations, generator, draw_device, chunk_size, stochastic, shared_seed=None):
        """x_0 of every copy (stream j, draw k; k None for a stream's MAP trajectory), in chunks.

        A stochastic sampler's noise stream j is each image's own (``'trajectory_noise'`` of its
        generator) or, with ``shared_seed``, the same for every image (that of image index 0 of the seed).
        """
        batch = x_unit.shape[0]
        rows = DEFAULT_CHUNK_ROWS if chunk_size is None else chunk_size
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"chunk_size must be an integer >= 1 (rows per model call), got {chunk_size!r}")
        per_chunk = max(1, rows // batch)
        seeds = {}
        if stochastic:
            for j in sorted({j for j, _ in copies}):
                if shared_seed is not None:
                    seeds[j] = [derived_seed(shared_seed, 0, "trajectory_noise", j)] * batch
                    continue
                streams = ImageStreams.derived(generator, batch, draw_device, "trajectory_noise", j)
                seeds[j] = [g.initial_seed() for g in streams.generators]
        posterior = self.sampler.posterior
        finals = {}
        for first in range(0, len(copies), per_chunk):
            chunk = copies[first : first + per_chunk]
            parts = [deviations[j, k] if k is not None else torch.zeros_like(deviations[0, 0]) for j, k in chunk]
            row_generators = (
                [torch.Generator(device=draw_device).manual_seed(s) for j, _ in chunk for s in seeds[j]]
                if stochastic
                else None
            )
            x = x_unit.repeat(len(chunk), *([1] * (x_unit.dim() - 1)))
            with perturbed_head(posterior.head, posterior.spec, torch.cat(parts).to(x.device)):
                out = self.run(copy.deepcopy(self.template), x, row_generators, copies=len(chunk), fresh=True)
            self.chunks += 1
            for n, key in enumerate(chunk):
                finals[key] = out[n * batch : (n + 1) * batch]
        return finals


def generator_device(generator: Generators, fallback: torch.device) -> torch.device:
    """Where ``generator`` draws (its first element for a list), ``fallback`` for None."""
    source = generator[0] if isinstance(generator, list) else generator
    return source.device if source is not None else fallback


def generator_states(generator: Generators, device: torch.device) -> list[torch.Tensor]:
    """The generator states (the global generator of ``device`` for None), to see whether a loop drew."""
    if generator is None:
        if device.type == "cuda":
            return [torch.cuda.get_rng_state(device)]
        return [torch.get_rng_state()]
    sources = generator if isinstance(generator, list) else [generator]
    return [g.get_state() for g in sources]
