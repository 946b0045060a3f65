"""The randomness rule: an image's random numbers depend only on (seed, its index, what is drawn).

Every random draw the package makes for an image — its x_T and the sampler's noise, the Monte Carlo
draws of the moment recurrence, its head-weight draws and their trajectories' noise, the fit's
(t, ε) — comes from a generator seeded by :func:`derived_seed` of the run's seed, the image's
*global* index and the name of the draw (a stream, plus sub-keys such as a noise stream number).
Nothing depends on which batch an image is in, on how many other images a call holds, or on the
order of the calls. The same rule serves batch-size invariance, ranks that sample disjoint global
indices, and a run resumed at image N.

Bit-identity with the stock diffusers pipelines: they accept a list of per-image generators
(``randn_tensor`` then draws each image's x_T and step noise from its own), so
``pipe(generator=image_generators(seed, range(B)))`` gives the same pixels as our sampler with the
same list, one image at a time or B at once.

A single generator (or None: the global one) still works, as in diffusers: x_T is then one draw
for the whole batch (it depends on the batch), and the derived streams are seeded from its state
without consuming it, so a seeded call is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "STREAMS",
    "ImageStreams",
    "antithetic_randn",
    "derived_seed",
    "image_generators",
    "independent_generator",
    "peek_seed",
    "restartable",
]

#: The named draws. ``image``: x_T and the sampler's own step noise, in the order the pipeline
#: draws them (the generator diffusers is given). The others never touch that generator.
STREAMS = {
    "image": 0,
    "monte_carlo": 1,
    "weights": 2,
    "trajectory_noise": 3,
    "fit": 4,
    "decode": 5,
    "bootstrap": 6,
    "probes": 7,
    "dropout": 8,
}

Generators = torch.Generator | list[torch.Generator] | None


def derived_seed(seed: int, index: int, stream: str, *key: int) -> int:
    """A 63-bit seed from (seed, global image index, stream, sub-keys), by NumPy's SeedSequence.

    SeedSequence hashes its entropy and spawn key so that nearby inputs give unrelated seeds
    (no overlap between index i of one seed and index i + 1 of another).
    """
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {sorted(STREAMS)}, got {stream!r}")
    if int(index) < 0 or any(int(k) < 0 for k in key) or int(seed) < 0:
        raise ValueError(f"seed, index and keys must be >= 0, got seed={seed}, index={index}, key={key}")
    sequence = np.random.SeedSequence(entropy=int(seed), spawn_key=(STREAMS[stream], int(index), *map(int, key)))
    high, low = (int(v) for v in sequence.generate_state(2, np.uint32))
    return ((high << 32) | low) & (2**63 - 1)


def image_generators(
    seed: int, indices: Iterable[int], device: str | torch.device = "cpu", stream: str = "image", *key: int
) -> list[torch.Generator]:
    """One generator per image index on ``device``: pass it as a diffusers pipeline's ``generator``.

    Args:
        seed (`int`): the run's seed (>= 0).
        indices (iterable of `int`): the images' global indices (e.g. ``range(first, first + B)``).
        device: where the generators draw (CPU draws are the same on every machine).
        stream, key: which draw (default ``'image'``: x_T and the sampler's step noise).

    Returns:
        `list[torch.Generator]` with one generator per index, in order.
    """
    return [
        torch.Generator(device=device).manual_seed(derived_seed(seed, i, stream, *key)) for i in indices
    ]


def peek_seed(generator: torch.Generator | None, device: torch.device | str = "cpu") -> int:
    """The next 62-bit integer ``generator`` would draw, without advancing it.

    None stands for the global generator of ``device`` (as in ``torch.randn(generator=None)``).
    """
    device = torch.device(device)
    source = generator
    if source is None:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            source = torch.cuda.default_generators[index]
        else:
            source = torch.default_generator
    replica = torch.Generator(device=source.device)
    replica.set_state(source.get_state())
    return int(torch.randint(0, 2**62, (1,), generator=replica, device=source.device))


def independent_generator(generator: Generators, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``generator``'s state without advancing it.

    The scheduler draws its own noise (DDPM, DDIM with η > 0) from ``generator``; derived draws must
    not consume from it, or the images would depend on the uncertainty settings and stop being
    bit-identical to the plain pipeline. The seed is what the next draw from ``generator`` (its
    first element for a list) would be, so a seeded run is reproducible and the streams independent.
    """
    source = generator[0] if isinstance(generator, list) else generator
    return torch.Generator(device=device).manual_seed(peek_seed(source, device))


def restartable(generator: Generators, device: torch.device) -> Callable[[], Generators]:
    """A function returning fresh copies of ``generator`` (a generator or a list) at its current state.

    Several passes that must draw the same sampler noise (MC dropout, ensembles, trajectories
    sharing a noise stream) each take a copy. None is replaced by a generator seeded at random.
    """
    if generator is None:
        generator = torch.Generator(device=device)
        generator.seed()
    sources = generator if isinstance(generator, list) else [generator]
    states = [(g.device, g.get_state()) for g in sources]

    def restart() -> Generators:
        copies = []
        for where, state in states:
            copy = torch.Generator(device=where)
            copy.set_state(state)
            copies.append(copy)
        return copies if isinstance(generator, list) else copies[0]

    return restart


class ImageStreams:
    """The generators of one derived stream for a batch of B images.

    Either one generator per image (``per_image``: every image's draws depend on its generator
    alone, so they are the same in any batch) or one generator for the batch (the draws of a batch
    are made at once and depend on the batch, as a single diffusers generator's do).
    """

    def __init__(self, generators: torch.Generator | Sequence[torch.Generator], batch: int) -> None:
        self.per_image = not isinstance(generators, torch.Generator)
        if self.per_image and len(generators) != batch:
            raise ValueError(f"expected one generator per image ({batch}), got {len(generators)}")
        self.generators = list(generators) if self.per_image else generators
        self.batch = batch

    @classmethod
    def derived(cls, generator: Generators, batch: int, device: torch.device, stream: str, *key: int) -> ImageStreams:
        """The ``stream`` draws of a batch whose x_T came from ``generator``, which is not consumed.

        A list of B per-image generators gives per-image streams, each seeded from its image's
        generator (so they follow the image whatever its batch). A single generator (or None) gives
        per-image streams seeded from its state and the image's place in the batch, except for the
        Monte Carlo stream, which stays the one batch stream the sampler always drew from, so
        single-generator runs keep their numbers.
        """
        if isinstance(generator, list):
            if len(generator) != batch:
                raise ValueError(f"generator is a list of {len(generator)} generators for {batch} images")
            seeds = [derived_seed(peek_seed(g, device), 0, stream, *key) for g in generator]
        elif stream == "monte_carlo" and not key:
            return cls(independent_generator(generator, device), batch)
        else:
            base = peek_seed(generator, device)
            seeds = [derived_seed(base, b, stream, *key) for b in range(batch)]
        return cls([torch.Generator(device=device).manual_seed(s) for s in seeds], batch)

    def randn(self, leading: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Standard normals of shape (*leading, B, *like.shape[1:]) in ``like``'s dtype and device."""
        if not self.per_image:
            return torch.randn((*leading, *like.shape), generator=self.generators, device=like.device, dtype=like.dtype)
        rows = [
            torch.randn((*leading, *like.shape[1:]), generator=g, device=like.device, dtype=like.dtype)
            for g in self.generators
        ]
        return torch.stack(rows, dim=len(leading))


def antithetic_randn(count: int, like: torch.Tensor, streams: ImageStreams) -> torch.Tensor:
    """``count`` standard normal draws shaped like ``like``, stacked, in antithetic pairs z_i, −z_i.

    Sample i and sample i + ⌈count/2⌉ are mirror images. For x^i = E[x] + √Var·z_i and even
    ``count`` the draws average to E[x] exactly, so the Monte Carlo covariance
    mean_i(x^i·m^i) − E[x]·mean_i(m^i) loses its (x̄ − E[x])·m̄ term (noise proportional to |E[ε]|
    rather than to the spread of ε) and the moments of a locally linear head come out exact, with
    no (S−1)/S shrinkage of the variance. Head noise drawn with the same pairing keeps that
    property through DPM-Solver-2's intermediate point.
    """
    half = streams.randn(((count + 1) // 2,), like)
    return torch.cat([half, -half])[:count]
