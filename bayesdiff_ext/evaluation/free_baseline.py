"""The free baseline: how much the predicted x̂_0 still moves over the last steps of one trajectory.

It uses only the trajectory's own ε predictions (no posterior, no extra UNet call):
x̂_0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t at each of the last L steps; the score is the per-pixel variance over
those L predictions, summed over the image.
"""

from __future__ import annotations

import torch

from bayesdiff_ext.numerics import per_image_sum
__all__ = ["free_scores", "predicted_x0"]


def predicted_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return (x_t.to(torch.float64) - (1 - alpha_bar).sqrt() * eps.to(torch.float64)) / alpha_bar.sqrt()


def free_scores(calls, alphas_cumprod: torch.Tensor, last_steps: int, channels: int) -> torch.Tensor:
    """Scores (B,) from the recorded image-path calls (x_t, t, output) of one trajectory."""
    if last_steps < 2:
        raise ValueError(
            f"last_steps must be at least 2 (a variance needs two predictions), got {last_steps}"
        )
    if len(calls) < last_steps:
        raise ValueError(f"the trajectory has {len(calls)} steps, fewer than last_steps={last_steps}")
    predictions = torch.stack(
        [
            predicted_x0(c.x, c.output[:, :channels], float(alphas_cumprod[c.timestep]))
            for c in calls[-last_steps:]
        ]
    )
    return per_image_sum(predictions.var(dim=0))
