"""Settings of one filtering evaluation run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["EvaluationConfig"]


@dataclass
class EvaluationConfig:
    """What to generate and how to compare (defaults: the documented run, docs/MATH.md §3).

    * ``num_images`` N samples of the bundled digits model, DDIM (η = 0) with ``steps`` steps, in
      batches of ``batch_size``; x_T from ``seed``.
    * ``costly_images``: how many of the N (the first ones) the methods that need extra UNet calls
      (Monte Carlo covariance, fixed weight samples) score; None = all N.
    * ``mc_samples`` S and ``uq_every`` (Skip) of the Monte Carlo methods; ``weight_samples`` M of
      the fixed-weight baseline; ``dropout_passes`` T of MC dropout; ``free_last_steps`` how many final steps' x̂_0 the free baseline uses;
      ``hfl_probes`` the Rademacher probes per image of Hessian-free Laplace.
    * ``fractions`` kept fractions; ``random_seeds`` random subsets per fraction; ``bad_fraction``
      the share of images the oracle calls bad (AUROC); ``knn_k`` the k of PRDC and the realism score.
    * ``fit_images``: how many training digits (the first ones) the fitted posteriors see; None = all.
    * ``cost_images`` the batch on which every method is timed with the real UNet (median of
      ``cost_repeats`` rounds).
    * ``sweep_images``, ``sweep_sigmas``, ``sweep_priors``: the hyperparameter sweep (small batch).
    """

    out_dir: Path = Path("eval-out")
    num_images: int = 2000
    steps: int = 20
    batch_size: int = 250
    seed: int = 0
    costly_images: int | None = None
    mc_samples: int = 10
    uq_every: int = 5
    weight_samples: int = 4
    dropout_passes: int = 4
    free_last_steps: int = 5
    hfl_probes: int = 16
    fractions: tuple[float, ...] = (1.0, 0.95, 0.9, 0.84, 0.8)
    random_seeds: int = 10
    bad_fraction: float = 0.1
    knn_k: int = 5
    cost_images: int = 8
    cost_repeats: int = 3
    fit_batch_size: int = 256
    fit_images: int | None = None
    sweep_images: int = 32
    sweep_sigmas: tuple[float, ...] = (0.05, 0.2, 1.0)
    sweep_priors: tuple[float, ...] = (1e-2, 1.0, 1e2, 1e4)
    docs_dir: Path | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.docs_dir = None if self.docs_dir is None else Path(self.docs_dir)
        if self.num_images < 2 * self.knn_k + 2:
            raise ValueError(f"num_images must be at least {2 * self.knn_k + 2}, got {self.num_images}")
        if self.steps < 2:
            raise ValueError(f"steps must be at least 2, got {self.steps}")
        if self.costly_images is not None and not 2 * self.knn_k + 2 <= self.costly_images <= self.num_images:
            raise ValueError(
                f"costly_images must be between {2 * self.knn_k + 2} and num_images={self.num_images}, "
                f"got {self.costly_images}"
            )
        if self.fit_images is not None and self.fit_images < 1:
            raise ValueError(f"fit_images must be None (all) or a positive integer, got {self.fit_images}")
        if self.random_seeds < 2:
            raise ValueError(f"random_seeds must be at least 2 (a std needs two), got {self.random_seeds}")
        if not all(0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must lie in (0, 1], got {self.fractions}")
        if not 2 <= self.free_last_steps <= self.steps:
            raise ValueError(
                f"free_last_steps must be in [2, steps={self.steps}], got {self.free_last_steps}"
            )
        if self.dropout_passes < 2:
            raise ValueError(
                f"dropout_passes must be at least 2 (a variance needs two), got {self.dropout_passes}"
            )
        for name in (
            "batch_size",
            "mc_samples",
            "uq_every",
            "weight_samples",
            "hfl_probes",
            "cost_images",
            "cost_repeats",
            "sweep_images",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.weight_samples < 2:
            raise ValueError(
                f"weight_samples must be at least 2 (a variance needs two), got {self.weight_samples}"
            )

    @property
    def costly_count(self) -> int:
        return self.num_images if self.costly_images is None else self.costly_images

    def as_dict(self) -> dict:
        out = asdict(self)
        out["out_dir"] = str(self.out_dir)
        out["docs_dir"] = None if self.docs_dir is None else str(self.docs_dir)
        return out
