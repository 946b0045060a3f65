"""The options of each non-Laplace inference, with their defaults and checks in one place."""

from __future__ import annotations

import dataclasses

from bayesdiff_ext.validation import check_count

FAMILIES = ("diag", "full")


@dataclasses.dataclass(frozen=True)
class VISettings:
    """Variational inference (docs/MATH.md §10.1): the ``family`` ('diag' = mean-field, 'full' = one
    K×K covariance shared by the channels), Adam ``steps`` with ``samples`` reparameterised draws
    each, at learning rate ``lr`` (in units of the posterior's width)."""

    family: str = "diag"
    steps: int = 3000
    samples: int = 16
    lr: float = 0.05

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        check_count("steps", self.steps, 4)
        check_count("samples", self.samples, 1)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


@dataclasses.dataclass(frozen=True)
class HMCSettings:
    """Hamiltonian Monte Carlo (docs/MATH.md §10.2): ``chains`` chains, ``warmup`` adaptation
    iterations, ``draws`` kept per chain (every ``thin``-th iteration), at most ``leapfrog_steps``
    per trajectory, step size adapted to an acceptance of ``target_accept``."""

    chains: int = 4
    warmup: int = 1000
    draws: int = 1000
    thin: int = 1
    leapfrog_steps: int = 16
    target_accept: float = 0.8

    def __post_init__(self):
        check_count("chains", self.chains, 1)
        check_count("warmup", self.warmup, 0)
        check_count("draws", self.draws, 4)
        check_count("thin", self.thin, 1)
        check_count("leapfrog_steps", self.leapfrog_steps, 1)
        if not (isinstance(self.target_accept, (int, float)) and 0 < self.target_accept < 1):
            raise ValueError(f"target_accept must be in (0, 1), got {self.target_accept!r}")


@dataclasses.dataclass(frozen=True)
class EnsembleSettings:
    """Head ensembles (docs/MATH.md §10.3): ``members`` heads, each trained on a Poisson bootstrap
    replicate of the data (``bootstrap``) or on all of it, for ``steps`` gradient-descent steps
    (None = to convergence)."""

    members: int = 8
    bootstrap: bool = True
    steps: int | None = None

    def __post_init__(self):
        check_count("members", self.members, 2)
        if not isinstance(self.bootstrap, bool):
            raise ValueError(f"bootstrap must be True or False, got {self.bootstrap!r}")
        if self.steps is not None:
            check_count("steps", self.steps, 0)
