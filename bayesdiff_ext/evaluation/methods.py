"""The uncertainty scores the evaluation compares: which sampler run, which aggregation."""

from __future__ import annotations

from dataclasses import dataclass, field

from bayesdiff_ext.evaluation.repeated import ENSEMBLE_MEMBERS, available_repeated

__all__ = ["CLOSED_FORM", "RECORDING_RUN", "SamplerRun", "ScoreSpec", "sampler_runs", "score_specs"]

#: Closed-form head variance at every step, no covariance: no UNet calls beyond the image path.
CLOSED_FORM = dict(mc_samples=0, covariance="none", uq_every=1)
#: The run whose UNet calls are recorded and replayed by the others.
RECORDING_RUN = "default_closed"


@dataclass(frozen=True)
class SamplerRun:
    """One ``BayesDiffSampler.sample`` configuration: posterior name, options, and whether it needs
    extra UNet calls (then it may be limited to the first ``costly_images`` images)."""

    posterior: str
    options: dict
    costly: bool
    all_images: bool = False  # run on all N even when costly


@dataclass(frozen=True)
class ScoreSpec:
    """A per-image score: an aggregation of a sampler run's Var[x_0], or a score computed otherwise
    (``source`` 'free', 'weight_samples', 'random', or one of ``repeated.REPEATED``)."""

    name: str
    label: str
    source: str
    aggregation: str = "sum"
    params: dict = field(default_factory=dict)


def sampler_runs(config) -> dict[str, SamplerRun]:
    monte_carlo = dict(mc_samples=config.mc_samples, uq_every=config.uq_every, covariance="mc")
    return {
        RECORDING_RUN: SamplerRun("default", CLOSED_FORM, costly=False),
        "full_closed": SamplerRun("full", CLOSED_FORM, costly=False),
        "isotropic_closed": SamplerRun("isotropic", CLOSED_FORM, costly=False),
        "hfl_closed": SamplerRun("hfl", CLOSED_FORM, costly=False),
        # BayesDiff's code: γ² at the samples only (no spread of the head means), images deterministic.
        "paper": SamplerRun(
            "paper", dict(monte_carlo, eps_variance="bayesdiff"), costly=True, all_images=True
        ),
        "default_mc": SamplerRun("default", monte_carlo, costly=True),
    }


def score_specs(config) -> list[ScoreSpec]:
    skip = f"Skip {config.uq_every}, S = {config.mc_samples}"
    return (
        [
            ScoreSpec("paper", f"paper: diag EF×2, σ = δ = 1, {skip}, sum", "paper"),
            ScoreSpec("default", f"default: diag GGN, σ ML, δ MacKay, {skip}, sum", "default_mc"),
            ScoreSpec("default_mean", "default, mean", "default_mc", "mean"),
            ScoreSpec(
                "default_patch_max", "default, patch-max (4×4)", "default_mc", "patch_max", {"patch": 4}
            ),
            ScoreSpec(
                "default_percentile", "default, 95th percentile", "default_mc", "percentile", {"q": 95.0}
            ),
            ScoreSpec(
                "covariance_none",
                "default posterior, covariance='none' (closed form, every step)",
                RECORDING_RUN,
            ),
            ScoreSpec("full_ggn", "full GGN, closed form, every step", "full_closed"),
            ScoreSpec(
                "hfl",
                f"Hessian-free Laplace on the full GGN ({config.hfl_probes} probes, CG), every step",
                "hfl_closed",
            ),
            ScoreSpec(
                "isotropic",
                "isotropic (reproduction's baseline), closed form, every step",
                "isotropic_closed",
            ),
            ScoreSpec("free", f"free: variance of x̂_0 over the last {config.free_last_steps} steps", "free"),
            ScoreSpec(
                "weight_samples",
                f"{config.weight_samples} diag weight samples fixed along whole trajectories",
                "weight_samples",
            ),
        ]
        + [_REPEATED_SPECS[name](config) for name in available_repeated()]
        + [
            ScoreSpec("random", "random score (sanity: AUROC ≈ 0.5)", "random"),
        ]
    )


_REPEATED_SPECS = {
    "mc_dropout": lambda config: ScoreSpec(
        "mc_dropout",
        f"MC dropout: {config.dropout_passes} passes of the dropout-trained UNet, same x_T",
        "mc_dropout",
    ),
    "ensemble": lambda config: ScoreSpec(
        "ensemble", f"deep ensemble: {ENSEMBLE_MEMBERS} independently trained UNets, same x_T", "ensemble"
    ),
}


def unet_forwards(source: str, config) -> int:
    """UNet forwards per image of a score's source (load-independent cost): the image path, the Monte
    Carlo draws (S per uncertainty step but the first, where Var[x_T] = 0), or one trajectory per
    pass (+ the reference pass)."""
    steps = config.steps
    runs = sampler_runs(config)
    if source in runs:
        options = runs[source].options
        monte_carlo_steps = -(-steps // options["uq_every"]) - 1
        return steps + options["mc_samples"] * monte_carlo_steps
    passes = {
        "weight_samples": config.weight_samples,
        "mc_dropout": config.dropout_passes + 1,
        "ensemble": ENSEMBLE_MEMBERS + 1,
    }
    return steps * passes.get(source, 1)
