"""A random stream for the Monte Carlo draws that leaves the caller's stream untouched."""

from __future__ import annotations

import torch

__all__ = ["independent_generator"]


def independent_generator(
    generator: torch.Generator | list[torch.Generator] | None, device: torch.device
) -> torch.Generator:
    """A generator on ``device`` seeded from ``generator``'s current state without advancing it.

    The scheduler draws its own noise (DDPM, DDIM with η > 0) from ``generator``; the uncertainty
    draws must not consume from it, or the images would depend on the uncertainty settings and stop
    being bit-identical to the plain pipeline. The seed is what the next draw from ``generator``
    (its first element for a list; the global generator of ``device`` for None) would be, so a
    seeded run is reproducible and the two streams are independent.
    """
    source = generator[0] if isinstance(generator, list) else generator
    if source is None:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            source = torch.cuda.default_generators[index]
        else:
            source = torch.default_generator
    replica = torch.Generator(device=source.device)
    replica.set_state(source.get_state())
    seed = int(torch.randint(0, 2**62, (1,), generator=replica, device=source.device))
    return torch.Generator(device=device).manual_seed(seed)


def antithetic_randn(count: int, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``count`` standard normal draws shaped like ``like``, stacked, in antithetic pairs z_i, −z_i.

    Sample i and sample i + ⌈count/2⌉ are mirror images. For x^i = E[x] + √Var·z_i and even
    ``count`` the draws average to E[x] exactly, so the Monte Carlo covariance
    mean_i(x^i·m^i) − E[x]·mean_i(m^i) loses its (x̄ − E[x])·m̄ term (noise proportional to |E[ε]|
    rather than to the spread of ε) and the moments of a locally linear head come out exact, with
    no (S−1)/S shrinkage of the variance. Head noise drawn with the same pairing keeps that
    property through DPM-Solver-2's intermediate point.
    """
    half = torch.randn(
        ((count + 1) // 2, *like.shape), generator=generator, device=like.device, dtype=like.dtype
    )
    return torch.cat([half, -half])[:count]
