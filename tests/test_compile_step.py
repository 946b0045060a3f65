"""One step of each estimator compiles as one graph: no host synchronisation, no data-dependent branch.

``torch.compile(fullgraph=True)`` fails on ``.item()``, ``float(tensor)``, a Python branch on a tensor
value or a random draw from a ``torch.Generator`` object: what would break a CUDA graph capture. The
backend is ``aot_eager`` (the graph is traced through AOTAutograd, with the package ops' fake
implementations, and run eagerly: no C++ compilation in the tests). The scheduler's own ``step`` is
diffusers' code (its DDIM step branches on ``prev_timestep >= 0``) and is not part of the step here:
the step is the model call, the head's closed form and Monte Carlo moments and the moment update of
the recurrence, and the model call with the per-row head perturbation of the trajectories.
"""

import torch
from diffusers import DDIMScheduler
from test_trajectories import LinearDenoiser, _linear_posterior

from bayesdiff_ext.posterior.perturbation import perturbed_head
from bayesdiff_ext.randomness import ImageStreams
from bayesdiff_ext.sampler.engine import StepEngine
from bayesdiff_ext.sampler.model_call import ModelCall
from bayesdiff_ext.sampler.schedulers import describe
from bayesdiff_ext.sampler.settings import resolve_settings


class SmallDenoiser(LinearDenoiser):
    """A non-linear denoiser small enough to trace in a second (the model is the user's; the step is ours)."""

    def forward(self, sample, timestep):
        t = torch.as_tensor(timestep, dtype=sample.dtype) / 1000
        return self.head(torch.nn.functional.silu(self.features(sample) + t))


def _noise(batch=2):
    return torch.randn(batch, 2, 5, 5, generator=torch.Generator().manual_seed(batch))


def _engine_and_call(covariance):
    model = SmallDenoiser().eval()
    posterior = _linear_posterior(model, prior_precision=10.0)
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(5)
    plan = describe(scheduler, 0.0).steps()
    settings = resolve_settings(uq_every=1, mc_samples=4, covariance=covariance).describe()
    streams = ImageStreams([torch.Generator().manual_seed(i) for i in range(2)], 2)
    engine = StepEngine(plan, settings, moment_dtype=torch.float32, generator=streams)
    return engine, ModelCall(model, scheduler, posterior), scheduler, plan


def _recurrence_step(engine, model_call, plan, index, x, t, normals):
    prediction, head_var = model_call(x, t, {}, want_head=engine.wants_head(index))
    engine.advance(plan[index], t, prediction, head_var, lambda s: model_call.head_at(s, t, {}, torch.float32, index=index), normals)
    return engine.mean, engine.var, engine.clamped()


def test_a_monte_carlo_step_of_the_recurrence_compiles_as_one_graph():
    for covariance in ("mc", "regression"):
        engines = [_engine_and_call(covariance) for _ in range(2)]
        x = _noise()
        (eager, call, scheduler, plan), (other, other_call, _, _) = engines
        with torch.no_grad(), call.capturing(), other_call.capturing():
            for engine, model_call in ((eager, call), (other, other_call)):
                engine.start(x)
                _recurrence_step(engine, model_call, plan, 0, x, scheduler.timesteps[0], None)
            normals = eager.normals(plan[1])
            expected = _recurrence_step(eager, call, plan, 1, x, scheduler.timesteps[1], normals)
            compiled = torch.compile(_recurrence_step, fullgraph=True, backend="aot_eager")
            got = compiled(other, other_call, plan, 1, x, scheduler.timesteps[1], normals)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_perturbed_model_call_of_the_trajectories_compiles_as_one_graph():
    model = SmallDenoiser().eval()
    posterior = _linear_posterior(model, prior_precision=10.0)
    deviations = torch.randn(4, posterior.spec.num_params, generator=torch.Generator().manual_seed(0)) * 1e-2
    x, t = torch.cat([_noise(), _noise(6)]), torch.tensor(500)

    def call(sample):
        return model(sample, t)

    with torch.no_grad(), perturbed_head(posterior.head, posterior.spec, deviations):
        expected = call(x)
        got = torch.compile(call, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
