"""Settings of one filtering evaluation run (importable without torch: the CLI's help reads them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

__all__ = ["ANALYSIS_SETTINGS", "BUILTIN_MODELS", "EvaluationConfig", "GENERATION_SETTINGS", "default_settings"]

#: ``model`` values that name a bundled model instead of a folder.
BUILTIN_MODELS = ("builtin:digits", "builtin:photos")

#: Settings that change what is generated and cached: a ``--reuse`` of a cached run takes them from the
#: cache, and refuses a call that asks for other values (naming the setting).
GENERATION_SETTINGS = (
    "model",
    "scheduler",
    "data",
    "features",
    "posterior",
    "num_images",
    "steps",
    "batch_size",
    "seed",
    "costly_images",
    "mc_samples",
    "uq_every",
    "weight_samples",
    "dropout_passes",
    "drift_last_steps",
    "hfl_probes",
    "fit_images",
    "fit_batch_size",
    "cost_images",
    "cost_repeats",
    "sweep_images",
    "sweep_sigmas",
    "sweep_priors",
)
#: Settings of the analysis only: a ``--reuse`` may change them freely.
ANALYSIS_SETTINGS = ("classifier", "fractions", "random_seeds", "bad_fraction", "knn_k")


@dataclass
class EvaluationConfig:
    """What to generate and how to compare (defaults: the documented run, docs/MATH.md §3).

    * ``model``: ``builtin:digits`` or ``builtin:photos`` (the bundled models), or a local diffusers
      model folder (an unconditional UNet2DModel pipeline folder, or a bare UNet folder with
      ``scheduler`` its scheduler folder); ``data`` its real images (a folder of PNG/JPG, or a .npy/.pt tensor; the bundled models bring
      theirs); ``features`` the feature space of FID/KID/PRDC and of the k-NN realism oracle:
      ``random_conv``, or a TorchScript file mapping images at model scale (N, C, H, W) to (N, d)
      (None: the bundled classifier's embedding for a bundled model, ``random_conv`` otherwise);
      ``classifier`` a TorchScript classifier (logits) whose confidence is a second oracle (None: the
      bundled classifier for a bundled model, none otherwise); ``posterior`` a posterior file from
      ``bayesdiff fit`` (None: the bundled one, or a diag GGN fitted on ``data``).
    * ``num_images`` N samples, DDIM (η = 0) with ``steps`` steps, in batches of ``batch_size``; x_T
      from ``seed``.
    * ``costly_images``: how many of the N (the first ones) the methods that need extra model calls
      score; None = all N.
    * ``mc_samples`` S and ``uq_every`` (Skip) of the Monte Carlo methods; ``weight_samples`` M of the
      fixed-weight trajectories; ``dropout_passes`` T of MC dropout; ``drift_last_steps`` L of x̂₀
      drift; ``hfl_probes`` the Rademacher probes per image of Hessian-free Laplace.
    * ``fractions`` kept fractions; ``random_seeds`` random subsets per fraction (fewer than
      ``MIN_SEEDS_FOR_SIGMA`` gives no σ advantages); ``bad_fraction`` the share of images the oracle
      calls bad (AUROC); ``knn_k`` the k of PRDC and the realism score.
    * ``fit_images``: how many real images (the first ones) the fitted posteriors see; None = all.
    * ``cost_images`` the batch on which every method is timed (median of ``cost_repeats`` rounds).
    * ``sweep_images``, ``sweep_sigmas``, ``sweep_priors``: the hyperparameter sweep (small batch).
    """

    out_dir: Path = Path("eval-out")
    model: str = "builtin:digits"
    scheduler: str | None = None
    data: str | None = None
    features: str | None = None
    classifier: str | None = None
    posterior: str | None = None
    num_images: int = 2000
    steps: int = 20
    batch_size: int = 250
    seed: int = 0
    costly_images: int | None = None
    mc_samples: int = 10
    uq_every: int = 5
    weight_samples: int = 4
    dropout_passes: int = 4
    drift_last_steps: int = 5
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
        self.fractions = tuple(float(f) for f in self.fractions)
        self.sweep_sigmas = tuple(float(s) for s in self.sweep_sigmas)
        self.sweep_priors = tuple(float(p) for p in self.sweep_priors)
        for name in ("model", "scheduler", "data", "features", "classifier", "posterior"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, str(value))
        if self.model.startswith("builtin:") and self.model not in BUILTIN_MODELS:
            raise ValueError(f"model must be a folder or one of {', '.join(BUILTIN_MODELS)}, got {self.model!r}")
        if self.model not in BUILTIN_MODELS and self.data is None:
            raise ValueError(f"model {self.model!r} is not bundled: pass data (its real images) as well")
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
        if not 0 < self.bad_fraction < 1:
            raise ValueError(f"bad_fraction must lie in (0, 1), got {self.bad_fraction}")
        if not 2 <= self.drift_last_steps <= self.steps:
            raise ValueError(f"drift_last_steps must be in [2, steps={self.steps}], got {self.drift_last_steps}")
        for name in ("dropout_passes", "weight_samples"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be at least 2 (a variance needs two), got {getattr(self, name)}")
        for name in (
            "batch_size",
            "mc_samples",
            "uq_every",
            "hfl_probes",
            "knn_k",
            "cost_images",
            "cost_repeats",
            "fit_batch_size",
            "sweep_images",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")

    @property
    def costly_count(self) -> int:
        return self.num_images if self.costly_images is None else self.costly_images

    @property
    def builtin(self) -> str | None:
        """The bundled model's name (``digits``, ``photos``), or None for a model folder."""
        return self.model.split(":", 1)[1] if self.model in BUILTIN_MODELS else None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["out_dir"] = str(self.out_dir)
        out["docs_dir"] = None if self.docs_dir is None else str(self.docs_dir)
        for name in ("fractions", "sweep_sigmas", "sweep_priors"):
            out[name] = list(out[name])
        return out

    def generation(self) -> dict:
        """The settings that make the cached run (:data:`GENERATION_SETTINGS`), JSON-ready."""
        settings = self.as_dict()
        return {name: settings[name] for name in GENERATION_SETTINGS}


def default_settings() -> dict:
    """Every setting's default, by name (for help texts)."""
    defaults = {}
    for f in fields(EvaluationConfig):
        defaults[f.name] = f.default_factory() if callable(f.default_factory) else f.default
    return defaults
