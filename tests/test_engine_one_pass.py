"""The step engine's one-pass Monte Carlo step (``ops.mc_moment_step``) is the two-op step
(``ops.mc_moments`` then ``ops.moment_step``) it replaces where the step needs no more than the next
moments: the same moments and the same bookkeeping, step after step."""

import torch
from test_compile_step import _engine_and_call, _noise, _recurrence_step


def test_the_one_pass_monte_carlo_step_is_the_two_op_step():
    (one_pass, call, scheduler, plan), (two_op, other_call, _, _) = (_engine_and_call("mc") for _ in range(2))
    assert one_pass.one_pass_monte_carlo  # covariance='mc', eps_variance='total', DDIM η = 0
    two_op.one_pass_monte_carlo = False
    x = _noise()
    with torch.no_grad(), call.capturing(), other_call.capturing():
        for engine in (one_pass, two_op):
            engine.start(x)
        for index, t in enumerate(scheduler.timesteps):
            normals = one_pass.normals(plan[index])
            got = _recurrence_step(one_pass, call, plan, index, x, t, normals)
            expected = _recurrence_step(two_op, other_call, plan, index, x, t, normals)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            assert torch.equal(one_pass.received, two_op.received)
    assert one_pass.monte_carlo_calls == two_op.monte_carlo_calls > 0
