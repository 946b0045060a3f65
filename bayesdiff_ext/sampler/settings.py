"""One settings object for the uncertainty: which estimator, its arguments, their defaults and presets.

Every front door — :class:`~bayesdiff_ext.BayesDiffSampler`, the pipeline wrappers,
:class:`~bayesdiff_ext.UncertaintyCallback` and the ``bayesdiff`` command — turns its arguments into
an :class:`UncertaintySettings` with :func:`resolve_settings`, so the defaults and the rules live
here and nowhere else.

Estimators of Var[x_0 | x_T] (docs/MATH.md §2.3):

* ``'trajectories'``: trajectory Monte Carlo (the reference; ``samples`` weight draws per image).
* ``'linearised'``: the forward-mode linearisation along the one stock trajectory.
* ``'recurrence'``: BayesDiff's moment recurrence (``uq_every``, ``mc_samples``, ``covariance``...).

Presets (measured against trajectory Monte Carlo with M ≥ 64 in ``python/BENCHMARKS.md``, docs/MATH.md §14.7):

* ``'accurate'``: trajectories with enough draws for a per-pixel map r ≥ 0.95 against the truth (met on
  the digits model and on a random-init UNet's DDIM, 0.967 against a truth of M = 512);
* ``'fast'``: the cheapest estimator on the table with map r ≥ 0.9 wherever the truth can see it; with
  the draws shared by all images (``shared_draws``, the default: docs/MATH.md §14.10) its per-image
  scores rank as the truth's at Spearman ρ 0.97 on digits DDIM and 0.89 on a random-init UNet's DDIM
  against a truth of 256 shared draws (0.96 against the same draws with the control variate, a truth
  that sees the ranks: docs/MATH.md §14.6); on DDPM the truth itself cannot rank the images (ρ ≤ 0.81);
* ``'paper'``: BayesDiff's recurrence with the paper's settings (Skip 5, S = 10), as in its
  reproduction — it does not track the truth (docs/MATH.md §2.3).

Rules: explicit arguments override the preset's; an argument of another estimator is refused,
naming it; without a preset, recurrence arguments select the recurrence (with the paper's values
for the rest) and otherwise :data:`DEFAULT_PRESET` applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bayesdiff_ext.posterior.draws import DRAWS
from bayesdiff_ext.sampler.trajectory_statistics import CENTRES
from bayesdiff_ext.validation import check_count

__all__ = [
    "DEFAULT_PRESET",
    "DEFAULT_WEIGHT_SEED",
    "ESTIMATORS",
    "PRESETS",
    "UNCERTAINTY_ARGUMENTS",
    "UncertaintySettings",
    "resolve_settings",
]

ESTIMATORS = ("trajectories", "linearised", "recurrence")
TRAJECTORY_ARGUMENTS = (
    "samples", "draws", "centre", "noise_samples", "chunk_size", "control_variate", "shared_draws", "weight_seed"
)
LINEARISED_ARGUMENTS = ("samples", "draws", "noise_samples", "chunk_size", "shared_draws", "weight_seed")
RECURRENCE_ARGUMENTS = ("uq_every", "mc_samples", "covariance", "eps_variance", "skip", "mode", "clamp")
#: Every keyword a front door accepts for the uncertainty (besides ``preset`` and ``settings``).
UNCERTAINTY_ARGUMENTS = ("estimator", *TRAJECTORY_ARGUMENTS, *RECURRENCE_ARGUMENTS)
ARGUMENTS = {
    "trajectories": TRAJECTORY_ARGUMENTS,
    "linearised": LINEARISED_ARGUMENTS,
    "recurrence": RECURRENCE_ARGUMENTS,
}
CHOICES = {
    "draws": DRAWS,
    "centre": CENTRES,
    "covariance": ("mc", "regression", "none"),
    "eps_variance": ("total", "bayesdiff"),
    "skip": ("all", "covariance"),
    "mode": ("deterministic", "bayesdiff"),
}
#: The seed of the draws every image shares (``shared_draws=True``) when none is given; the ``bayesdiff``
#: command passes its ``--seed``.
DEFAULT_WEIGHT_SEED = 0
#: Each estimator's values for what neither the preset nor the caller sets.
DEFAULTS = {
    "trajectories": dict(samples=16, draws="sobol", centre="map", noise_samples=32, chunk_size=None, control_variate=None,
                         shared_draws=True, weight_seed=DEFAULT_WEIGHT_SEED),
    "linearised": dict(samples=8, draws="sobol", noise_samples=None, chunk_size=None, shared_draws=True,
                       weight_seed=DEFAULT_WEIGHT_SEED),
    "recurrence": dict(uq_every=5, mc_samples=10, covariance="mc", eps_variance="total", skip="all", mode="deterministic", clamp=True),
}
PRESETS = {
    # 64 draws: against a truth of M = 128, digits DDIM reaches map r 0.948 with 32 (0.973 with 64). A
    # stochastic sampler's map is limited by its noise streams more than by the draws (digits DDIM η = 1:
    # M = 32 in J = 32 streams 0.942, in J = 64 streams 0.961): 64 streams.
    "accurate": dict(estimator="trajectories", samples=64, draws="sobol", centre="map", noise_samples=64),
    "fast": dict(estimator="trajectories", **DEFAULTS["trajectories"]),
    "paper": dict(estimator="recurrence", **DEFAULTS["recurrence"]),
}
#: The cheapest preset that meets the part of the truth bar the table can show (map r ≥ 0.9).
DEFAULT_PRESET = "fast"


@dataclass(frozen=True)
class UncertaintySettings:
    """The resolved uncertainty settings of one run (build it with :func:`resolve_settings`).

    Only the fields of ``estimator`` are set; the others are None. ``preset`` records where the
    values came from (None: explicit arguments only).
    """

    estimator: str
    preset: str | None = None
    samples: int | None = None
    draws: str | None = None
    centre: str | None = None
    noise_samples: int | None = None
    chunk_size: int | None = None
    control_variate: bool | None = None
    shared_draws: bool | None = None
    weight_seed: int | None = None
    uq_every: int | None = None
    mc_samples: int | None = None
    covariance: str | None = None
    eps_variance: str | None = None
    skip: str | None = None
    mode: str | None = None
    clamp: bool | None = None

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        for name in ARGUMENTS[self.estimator]:
            _check_field(name, getattr(self, name))
        if self.estimator == "recurrence":
            _check_recurrence(self)
        else:
            _check_draws(self)

    def arguments(self) -> dict[str, Any]:
        """The estimator's own arguments, as keyword arguments."""
        return {name: getattr(self, name) for name in ARGUMENTS[self.estimator]}

    def describe(self) -> dict[str, Any]:
        """What a run records (summary.json, ``BayesDiffOutput.settings``)."""
        return {"estimator": self.estimator, "preset": self.preset, **self.arguments()}


def resolve_settings(preset: str | None = None, settings: UncertaintySettings | None = None, **explicit: Any) -> UncertaintySettings:
    """The settings a front door runs with.

    Args:
        preset (`str`, *optional*): ``'accurate'``, ``'fast'`` or ``'paper'``.
        settings (`UncertaintySettings`, *optional*): settings made before; ``preset`` and the
            explicit arguments then override them.
        explicit: ``estimator`` and the estimator's arguments (see :data:`UNCERTAINTY_ARGUMENTS`);
            None means "not given".

    Returns:
        :class:`UncertaintySettings`. ValueError names an argument that is unknown, belongs to
        another estimator than the one chosen, or does not combine with the others.
    """
    unknown = sorted(set(explicit) - set(UNCERTAINTY_ARGUMENTS))
    if unknown:
        raise TypeError(f"unknown uncertainty argument(s) {unknown}; expected some of {UNCERTAINTY_ARGUMENTS}")
    given = {name: value for name, value in explicit.items() if value is not None}
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    if settings is not None and not isinstance(settings, UncertaintySettings):
        raise TypeError(f"settings must be an UncertaintySettings, got {type(settings).__name__}")
    if preset is not None:
        base = dict(PRESETS[preset])
    elif settings is not None:
        preset, base = settings.preset, {"estimator": settings.estimator, **settings.arguments()}
    elif "estimator" in given:
        base = {"estimator": given["estimator"]}
    elif any(name in RECURRENCE_ARGUMENTS for name in given):
        base = {"estimator": "recurrence"}  # recurrence arguments can only mean the recurrence
    else:
        preset, base = DEFAULT_PRESET, dict(PRESETS[DEFAULT_PRESET])
    estimator = given.pop("estimator", base["estimator"])
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator != base["estimator"]:  # an explicit estimator overrides the preset's altogether
        preset, base = None, {"estimator": estimator}
    foreign = sorted(name for name in given if name not in ARGUMENTS[estimator])
    if foreign:
        where = f"preset={preset!r} runs" if preset else "the run uses"
        raise ValueError(
            f"{', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not an argument of the {estimator!r} "
            f"estimator ({where} estimator={estimator!r}, whose arguments are {', '.join(ARGUMENTS[estimator])})"
        )
    values = {**DEFAULTS[estimator], **{k: v for k, v in base.items() if k in ARGUMENTS[estimator]}, **given}
    if values.get("shared_draws") is False:
        if "weight_seed" in given:
            raise ValueError(
                "weight_seed seeds the draws every image shares; shared_draws=False draws each image's own "
                "from its generator: pass one or the other"
            )
        values["weight_seed"] = None
    elif values.get("shared_draws") and values.get("weight_seed") is None:  # shared again after settings without
        values["weight_seed"] = DEFAULT_WEIGHT_SEED
    if estimator == "recurrence" and "covariance" in given and given["covariance"] == "none" and "mc_samples" not in given:
        values["mc_samples"] = 0  # no covariance: the closed form at the image sample, no Monte Carlo
    return UncertaintySettings(estimator=estimator, preset=preset, **values)


def _check_field(name: str, value: Any) -> None:
    if name in CHOICES:
        if value not in CHOICES[name]:
            raise ValueError(f"{name} must be one of {CHOICES[name]}, got {value!r}")
    elif name in ("clamp", "control_variate", "shared_draws"):
        if not isinstance(value, bool) and not (name == "control_variate" and value is None):
            raise ValueError(f"{name} must be True or False{' (or None: where available)' if name != 'clamp' else ''}, got {value!r}")
    elif name in ("noise_samples", "chunk_size") and value is None:
        return
    elif name == "weight_seed":
        if value is not None:
            check_count(name, value, minimum=0)
    else:
        check_count(name, value, minimum=0 if name == "mc_samples" else 1)


def _check_recurrence(s: UncertaintySettings) -> None:
    """covariance='mc'/'regression': Monte Carlo at every ``uq_every``-th step (S = mc_samples ≥ 1, ≥ 2).
    covariance='none': with mc_samples = 0 (its default) the head's closed form at the image sample;
    with mc_samples = S > 0 the Monte Carlo E[ε], Var[ε] with the covariance dropped (an ablation)."""
    if s.covariance == "none" and not s.mc_samples:
        if s.eps_variance != "total":
            raise ValueError(
                "eps_variance='bayesdiff' drops the Monte Carlo spread; covariance='none' with mc_samples=0 has none"
            )
        if s.skip == "covariance":
            raise ValueError(
                "skip='covariance' adds the closed form between Monte Carlo steps; covariance='none' with mc_samples=0 "
                "has none: pass uq_every=1 for the closed form at every step"
            )
    elif s.covariance != "none" and s.mc_samples < (2 if s.covariance == "regression" else 1):
        raise ValueError(
            f"covariance={s.covariance!r} needs mc_samples >= {2 if s.covariance == 'regression' else 1} "
            f"(got {s.mc_samples}); covariance='none' is the closed form without Monte Carlo"
        )


def _check_draws(s: UncertaintySettings) -> None:
    if s.shared_draws == (s.weight_seed is None):
        raise ValueError(
            f"shared_draws={s.shared_draws} with weight_seed={s.weight_seed}: shared draws need the seed they come "
            "from, an image's own draws (shared_draws=False) take none"
        )
    if s.draws == "antithetic":
        if s.estimator == "linearised":
            raise ValueError("draws='antithetic' repeats every direction of the linearisation; use 'independent' or 'sobol'")
        if s.samples % 2:
            raise ValueError(f"draws='antithetic' needs an even number of samples, got {s.samples}")
    if s.estimator == "trajectories" and s.centre == "mean" and s.samples < 2:
        raise ValueError("centre='mean' needs samples >= 2 (a spread around the draws' own mean)")
    if s.estimator == "trajectories" and s.centre == "mean" and s.control_variate:
        raise ValueError("control_variate=True corrects the spread around the MAP trajectory: use centre='map'")

