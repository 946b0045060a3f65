"""Draws of the head's weights for trajectory Monte Carlo: independent, antithetic or quasi-random.

Either every image gets its own draws from its own generator, or all images share one set of draws
from a seed (common random numbers, docs/MATH.md §14.10; bayesdiff_ext.randomness), as deviations
Δθ = θ − θ_head from the head's current ε parameters (``parameters_to_vector`` order), in float64:

* ``'independent'``: θ ~ q by ``posterior.sample`` (any posterior with ``sample``);
* ``'antithetic'``: pairs θ = μ ± Σ^{1/2}·z (the odd part of the response cancels in the pair
  mean, its even part in the pair difference), an even count;
* ``'sobol'``: z = Φ⁻¹(u) with u the first points of a scrambled Sobol sequence in P dimensions
  (randomised quasi-Monte Carlo: each point is a N(0, I) draw, the points fill the space more
  evenly than independent ones), seeded per image; P ≤ 21201 (SciPy's and torch's direction
  numbers), a power-of-two count is balanced.

The last two need a Gaussian posterior that maps normals to draws, ``sample_from_normal(z)``.
"""

from __future__ import annotations

import torch
from torch.quasirandom import SobolEngine

from bayesdiff_ext.posterior.heads import eps_parameter_vector
from bayesdiff_ext.randomness import Generators, ImageStreams, image_generators

__all__ = ["DRAWS", "image_weight_deviations", "weight_deviations"]

DRAWS = ("independent", "antithetic", "sobol")
# Keeps Φ⁻¹(u) finite: a Sobol coordinate can be exactly 0.
_OPEN_INTERVAL = 1e-12


def _standard_normals(kind: str, count: int, num_params: int, generator: torch.Generator) -> torch.Tensor:
    """(count, P) float64 standard normals of the given kind from one image's generator."""
    if kind == "independent":
        return torch.randn(count, num_params, generator=generator, dtype=torch.float64, device=generator.device)
    if kind == "antithetic":
        half = torch.randn(count // 2, num_params, generator=generator, dtype=torch.float64, device=generator.device)
        return torch.cat([half, -half])
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    points = SobolEngine(num_params, scramble=True, seed=seed).draw(count, dtype=torch.float64)
    return torch.special.ndtri(points.clamp(_OPEN_INTERVAL, 1 - _OPEN_INTERVAL)).to(generator.device)


def check_draws(kind: str, count: int, posterior) -> None:
    """ValueError naming the argument when ``count`` draws of ``kind`` cannot come from ``posterior``."""
    if kind not in DRAWS:
        raise ValueError(f"draws must be one of {DRAWS}, got {kind!r}")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of weight draws must be an integer >= 1, got {count!r}")
    if kind == "antithetic" and count % 2:
        raise ValueError(f"draws='antithetic' needs an even number of weight draws, got {count}")
    if kind != "independent" and not hasattr(posterior, "sample_from_normal"):
        raise ValueError(
            f"draws={kind!r} needs a Gaussian posterior with sample_from_normal(z); "
            f"{type(posterior).__name__} only samples: use draws='independent'"
        )
    if kind == "sobol" and posterior.spec.num_params > SobolEngine.MAXDIM:
        raise ValueError(
            f"draws='sobol' supports heads of at most {SobolEngine.MAXDIM} parameters, this one has "
            f"{posterior.spec.num_params}: use draws='antithetic' or 'independent'"
        )


def weight_deviations(posterior, kind: str, count: int, generators: list[torch.Generator]) -> torch.Tensor:
    """Δθ = θ − θ_head for ``count`` draws per image, (count, B, P) float64, one generator per image.

    Args:
        posterior: a posterior on a head (``head``, ``spec``) with ``sample(n, generator)``, and for
            antithetic or Sobol draws ``sample_from_normal(z)``.
        kind (`str`): one of :data:`DRAWS`.
        count (`int`): draws per image.
        generators (`list[torch.Generator]`): image b's draws come from ``generators[b]`` alone.
    """
    check_draws(kind, count, posterior)
    center = eps_parameter_vector(posterior.head, posterior.spec)
    rows = []
    for generator in generators:
        if hasattr(posterior, "sample_from_normal"):
            theta = posterior.sample_from_normal(_standard_normals(kind, count, posterior.spec.num_params, generator))
        else:
            theta = posterior.sample(count, generator=generator)
        rows.append(theta.to(torch.float64) - center.to(theta.device))
    return torch.stack(rows, dim=1)


def image_weight_deviations(
    posterior, kind: str, count: int, generator: Generators, batch: int, device: torch.device,
    shared_seed: int | None, *key: int,
) -> torch.Tensor:
    """The ``'weights'`` draws (sub-stream ``key``) of B images, (count, B, P) float64.

    Args:
        posterior, kind, count: as for :func:`weight_deviations`.
        generator: the batch's image generator(s); with ``shared_seed`` None, image b's draws come
            from its own ``'weights'`` stream derived from it (:class:`~bayesdiff_ext.randomness.ImageStreams`).
        batch (`int`): B.
        device: where the generators draw.
        shared_seed (`int`, *optional*): every image gets the same draws, those of image index 0 of
            this seed (common random numbers: the draws' Monte Carlo error is then common to all
            images and their scores compare, docs/MATH.md §14.10).
    """
    if shared_seed is not None:
        return weight_deviations(posterior, kind, count, image_generators(shared_seed, [0], device, "weights", *key)).expand(
            -1, batch, -1
        )
    return weight_deviations(posterior, kind, count, ImageStreams.derived(generator, batch, device, "weights", *key).generators)
