"""Step coefficients against the schedulers themselves, probed with basis inputs."""

import copy

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from bayesdiff_ext.sampler.schedulers import check_supported, step_coefficients

SHAPE = (1, 1, 1, 1)


def _scalar(value: float) -> torch.Tensor:
    return torch.full(SHAPE, value, dtype=torch.float64)


def _in_float64(scheduler):
    """A copy whose tables are float64, so the probes carry no float32 rounding of the coefficients."""
    copied = copy.deepcopy(scheduler)
    for name, value in vars(copied).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(copied, name, value.double())
    return copied


def _assert_close(ours: float, probed: float, what: str) -> None:
    assert abs(ours - probed) <= 1e-9 * max(1.0, abs(probed)), f"{what}: ours {ours!r}, scheduler {probed!r}"


def _probe_ddim(scheduler, t, x, out, eta, noise):
    step = copy.deepcopy(scheduler).step(_scalar(out), t, _scalar(x), eta=eta, variance_noise=_scalar(noise))
    return float(step.prev_sample)


def _probe_ddpm(scheduler, t, x, out):
    """One DDPM step; also returns the noise z it drew, replayed from the same seed."""
    prev = copy.deepcopy(scheduler).step(
        _scalar(out), t, _scalar(x), generator=torch.Generator().manual_seed(7)
    )
    z = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return float(prev.prev_sample), float(z)


def _probe_dpm(scheduler, k, origin, x_s, out_s, out_mid):
    """Run a fresh copy through steps 0..k; step ``origin`` gets (x_s, out_s), step k gets out_mid."""
    sched = copy.deepcopy(scheduler)
    timesteps = sched.timesteps
    for j in range(origin):
        sched.step(_scalar(0.0), timesteps[j], _scalar(0.0))
    sample = sched.step(_scalar(out_s), timesteps[origin], _scalar(x_s)).prev_sample
    if k != origin:
        sample = sched.step(_scalar(out_mid), timesteps[k], sample).prev_sample
    return float(sample)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(
    "steps,spacing,offset,set_alpha_to_one",
    [(10, "leading", 0, True), (7, "leading", 1, False), (9, "trailing", 0, True), (6, "linspace", 0, False)],
)
def test_ddim_coefficients_match_the_scheduler(
    prediction_type, eta, steps, spacing, offset, set_alpha_to_one
):
    scheduler = DDIMScheduler(
        num_train_timesteps=100,
        clip_sample=False,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=offset,
        set_alpha_to_one=set_alpha_to_one,
        beta_schedule="squaredcos_cap_v2",
    )
    scheduler.set_timesteps(steps)
    plan = step_coefficients(scheduler, eta)
    scheduler = _in_float64(scheduler)
    assert [s.timestep for s in plan] == scheduler.timesteps.tolist()
    for s in plan:
        assert s.origin == s.index and len(s.b) == 1
        _assert_close(s.a, _probe_ddim(scheduler, s.timestep, 1.0, 0.0, eta, 0.0), f"a at t={s.timestep}")
        _assert_close(s.b[0], _probe_ddim(scheduler, s.timestep, 0.0, 1.0, eta, 0.0), f"b at t={s.timestep}")
        std = _probe_ddim(scheduler, s.timestep, 0.0, 0.0, eta, 1.0)
        _assert_close(s.c2, std**2, f"c2 at t={s.timestep}")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("steps,spacing", [(8, "leading"), (5, "trailing"), (50, "linspace")])
def test_ddpm_coefficients_match_the_scheduler(prediction_type, variance_type, steps, spacing):
    scheduler = DDPMScheduler(
        num_train_timesteps=50,
        clip_sample=False,
        prediction_type=prediction_type,
        variance_type=variance_type,
        timestep_spacing=spacing,
    )
    scheduler.set_timesteps(steps)
    plan = step_coefficients(scheduler)
    scheduler = _in_float64(scheduler)
    for s in plan:
        a, _ = _probe_ddpm(scheduler, s.timestep, 1.0, 0.0)
        b, _ = _probe_ddpm(scheduler, s.timestep, 0.0, 1.0)
        noise_only, z = _probe_ddpm(scheduler, s.timestep, 0.0, 0.0)
        # the probes above also carry the noise term; strip it with the replayed z
        std = noise_only / z
        _assert_close(s.a, a - noise_only, f"a at t={s.timestep}")
        _assert_close(s.b[0], b - noise_only, f"b at t={s.timestep}")
        _assert_close(s.c2, std**2, f"c2 at t={s.timestep}")
    if plan[-1].timestep == 0:
        assert plan[-1].c2 == 0.0  # diffusers adds no noise on the step from t = 0


def test_ddpm_custom_timesteps_use_the_schedulers_previous_timestep():
    scheduler = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    scheduler.set_timesteps(timesteps=[90, 61, 30, 4, 0])
    plan = step_coefficients(scheduler)
    scheduler = _in_float64(scheduler)
    for s in plan:
        a, _ = _probe_ddpm(scheduler, s.timestep, 1.0, 0.0)
        noise_only, _ = _probe_ddpm(scheduler, s.timestep, 0.0, 0.0)
        _assert_close(s.a, a - noise_only, f"a at t={s.timestep}")


@pytest.mark.parametrize(
    "algorithm_type,final_sigmas_type",
    [("dpmsolver", "sigma_min"), ("dpmsolver++", "zero"), ("dpmsolver++", "sigma_min")],
)
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("steps,lower_order_final", [(6, False), (7, True), (10, True)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpm_solver_2_coefficients_match_the_scheduler(
    algorithm_type, final_sigmas_type, solver_type, steps, lower_order_final, prediction_type
):
    scheduler = DPMSolverSinglestepScheduler(
        num_train_timesteps=200,
        solver_order=2,
        algorithm_type=algorithm_type,
        solver_type=solver_type,
        final_sigmas_type=final_sigmas_type,
        lower_order_final=lower_order_final,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(steps)
    plan = step_coefficients(scheduler)
    scheduler = _in_float64(scheduler)
    assert [s.timestep for s in plan] == scheduler.timesteps.tolist()
    assert any(len(s.b) == 2 for s in plan)
    for s in plan:
        basis = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)][: 1 + len(s.b)]
        ours = (s.a, *s.b)
        for value, args in zip(ours, basis):
            _assert_close(
                value, _probe_dpm(scheduler, s.index, s.origin, *args), f"step {s.index} basis {args}"
            )
        assert s.c2 == 0.0


@pytest.mark.parametrize(
    "scheduler,match",
    [
        (DDIMScheduler(), "clip_sample=False"),
        (DDPMScheduler(), "clip_sample=False"),
        (DDIMScheduler(clip_sample=False, thresholding=True), "thresholding"),
        (DDPMScheduler(clip_sample=False, variance_type="fixed_large_log"), "variance_type"),
        (DDIMScheduler(clip_sample=False, prediction_type="flow"), "prediction_type"),
        (DPMSolverSinglestepScheduler(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
        (DPMSolverSinglestepScheduler(solver_order=3), "solver_order"),
        (EulerAncestralDiscreteScheduler(prediction_type="sample"), "prediction_type='sample'"),
        (EulerDiscreteScheduler(prediction_type="flow"), "prediction_type"),
    ],
)
def test_non_affine_schedulers_are_rejected(scheduler, match):
    with pytest.raises(ValueError, match=match):
        check_supported(scheduler)


def test_eta_is_for_ddim_only():
    with pytest.raises(ValueError, match="DDIMScheduler only"):
        check_supported(DDPMScheduler(clip_sample=False), eta=0.5)


def test_step_settings_the_sampler_does_not_follow_are_named():
    with pytest.raises(ValueError, match="s_churn=0.5 is not a setting of FlowMatchEulerDiscreteScheduler.step"):
        check_supported(FlowMatchEulerDiscreteScheduler(), s_churn=0.5)
    with pytest.raises(ValueError, match="eta=0.5 applies to DDIMScheduler only"):
        check_supported(EulerDiscreteScheduler(), eta=0.5)
    with pytest.raises(ValueError, match="scheduler must be one of .*FlowMatchEulerDiscreteScheduler"):
        check_supported(object())


# ------------------------------------------------------------------ Euler family and flow matching
# Their step() upcasts the sample to float32 whatever its dtype, so a float64 probe carries float32
# rounding: the affine form must match to float32 precision on random tensors.


def _random_step_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2)]


def _assert_affine(scheduler, plan, step_kwargs=None, noise_dtype=torch.float64):
    """Every step: scheduler.step(out, t, x) = a·x + b·out + c·z on random x, out (z replayed from the seed)."""
    for s in plan:
        x, out = _random_step_inputs(s.index)
        stepped = copy.deepcopy(scheduler)
        stepped._step_index = s.index
        prev = stepped.step(
            out, scheduler.timesteps[s.index], x, generator=torch.Generator().manual_seed(11), **(step_kwargs or {})
        ).prev_sample
        z = randn_tensor(x.shape, generator=torch.Generator().manual_seed(11), dtype=noise_dtype).double()
        expected = s.a * x + s.b[0] * out + s.c2**0.5 * z
        assert s.origin == s.index and len(s.b) == 1
        torch.testing.assert_close(prev, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(
    "config",
    [
        dict(timestep_spacing="linspace"),
        dict(timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear"),
        dict(timestep_spacing="trailing", use_karras_sigmas=True),
        dict(timestep_spacing="linspace", final_sigmas_type="sigma_min", interpolation_type="log_linear"),
    ],
)
def test_euler_coefficients_match_the_scheduler(prediction_type, config):
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, prediction_type=prediction_type, **config)
    scheduler.set_timesteps(7)
    plan = step_coefficients(scheduler)
    assert [s.timestep for s in plan] == scheduler.timesteps.tolist()
    assert all(s.c2 == 0.0 for s in plan)
    _assert_affine(_in_float64(scheduler), plan)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_churn_is_affine_with_its_noise_as_c2(prediction_type):
    """s_churn > 0 adds noise after the model call and steps from σ̂ = σ(1 + γ): still affine."""
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    scheduler.set_timesteps(6)
    churn = dict(s_churn=2.0, s_tmin=0.5, s_tmax=8.0, s_noise=1.003)
    plan = step_coefficients(scheduler, **churn)
    churned = [s.index for s in plan if s.c2 > 0]
    assert churned and len(churned) < len(plan)  # s_tmin/s_tmax select some steps only
    _assert_affine(_in_float64(scheduler), plan, churn)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_euler_ancestral_coefficients_match_the_scheduler(prediction_type, spacing):
    scheduler = EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000, prediction_type=prediction_type, timestep_spacing=spacing
    )
    scheduler.set_timesteps(8)
    plan = step_coefficients(scheduler)
    assert plan[-1].c2 == 0.0 and all(s.c2 > 0 for s in plan[:-1])  # σ_up = 0 on the step to σ = 0
    _assert_affine(_in_float64(scheduler), plan)


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize(
    "config,set_timesteps",
    [
        (dict(shift=3.0), {}),
        (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), dict(mu=0.8)),
        (dict(shift=1.0, shift_terminal=0.05, use_karras_sigmas=True), {}),
        (dict(shift=2.0, invert_sigmas=True), {}),
    ],
)
def test_flow_match_euler_coefficients_match_the_scheduler(stochastic, config, set_timesteps):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, stochastic_sampling=stochastic, **config)
    scheduler.set_timesteps(6, **set_timesteps)
    plan = step_coefficients(scheduler)
    assert [s.timestep for s in plan] == scheduler.timesteps.tolist()
    assert all(s.c2 > 0 for s in plan[:-1]) == stochastic
    # the stochastic step draws its noise in float32 (it upcasts the sample to float32 first)
    _assert_affine(_in_float64(scheduler), plan, noise_dtype=torch.float32)
