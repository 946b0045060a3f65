"""run_evaluation: generate (or reuse) the scored samples, then metrics, figures and the report."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bayesdiff_ext import metrics
from bayesdiff_ext._version import library_versions
from bayesdiff_ext.evaluation import figures
from bayesdiff_ext.evaluation.analysis import REFERENCE, analyse
from bayesdiff_ext.evaluation.cost import PLAIN, measure_costs, plain_sampling
from bayesdiff_ext.evaluation.cost import seconds as _seconds
from bayesdiff_ext.evaluation.generation import Generated, generate, initial_noise
from bayesdiff_ext.evaluation.methods import score_specs
from bayesdiff_ext.evaluation.oracle import classifier_confidence, knn_realism
from bayesdiff_ext.evaluation.posteriors import build_posteriors, fitting_features
from bayesdiff_ext.evaluation.repeated import REPEATED, repeated_scores
from bayesdiff_ext.evaluation.report import TABLE_METRICS, render_report
from bayesdiff_ext.io.atomic import atomic_write

__all__ = ["CACHE_NAME", "run_evaluation"]

CACHE_NAME = "filtering_run.npz"
FIGURES = {
    "curves": "filtering_curves.png",
    "curves_random": "filtering_curves_random_conv.png",
    "sweep": "hyperparameter_sweep.png",
    "timestep": "uncertainty_vs_timestep.png",
    "extremes": "extremes.png",
}


def _describe(posterior) -> str:
    return f"{posterior.structure}/{posterior.curvature}, σ = {posterior.sigma_noise:.4g}, δ = {posterior.prior_precision:.4g}"


def _save_cache(path: Path, generated: Generated, costs: dict, meta: dict) -> None:
    arrays = {"images": generated.images, "trace_timesteps": generated.trace_timesteps}
    arrays.update({f"score__{k}": v for k, v in generated.scores.items()})
    arrays.update({f"map__{k}": v for k, v in generated.maps.items()})
    arrays.update({f"trace__{k}": v for k, v in generated.traces.items()})
    arrays.update({f"sweep__{k}": v for k, v in generated.sweep.items()})
    arrays["meta"] = np.array(json.dumps(dict(meta, costs=costs, seconds=generated.seconds)))
    buffer = __import__("io").BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write(path, buffer.getvalue())


def _load_cache(path: Path) -> tuple[Generated, dict, dict]:
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        pick = lambda prefix: {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}
        generated = Generated(
            images=data["images"],
            scores=pick("score__"),
            maps=pick("map__"),
            trace_timesteps=data["trace_timesteps"],
            traces=pick("trace__"),
            sweep=pick("sweep__"),
            seconds=meta.pop("seconds"),
        )
    return generated, meta.pop("costs"), meta


def _check_cached_config(config, meta) -> None:
    cached = meta["config"]
    keys = ("num_images", "steps", "seed", "costly_images", "mc_samples", "uq_every", "weight_samples", "hfl_probes")
    for key in keys:
        if cached.get(key) != getattr(config, key):
            raise ValueError(
                f"--reuse: the cached run used {key}={cached.get(key)!r} but this call asks for {getattr(config, key)!r}"
            )


def _supplement(config, generated: Generated, costs: dict, meta: dict) -> bool:
    """Score a cached run by the repeated-sampling methods it lacks (their weights appeared later)."""
    missing = [spec.name for spec in score_specs(config) if spec.name not in generated.scores]
    if not missing:
        return False
    unknown = [name for name in missing if name not in REPEATED]
    if unknown:
        raise ValueError(f"the cached run has no scores for {unknown}; run again without --reuse")
    from diffusers import DDIMScheduler

    from bayesdiff_ext.digits import load_bundled_scheduler

    scheduler = DDIMScheduler.from_config(load_bundled_scheduler().config)
    noise = initial_noise(config, generated.images.shape[1:])
    costly = noise[: config.costly_count]
    cost_batch = noise[: config.cost_images]
    for name in missing:
        print(f"supplementing the cached run with {name!r}", flush=True)
        started = time.perf_counter()
        values = np.full(config.num_images, np.nan)
        values[: len(costly)] = repeated_scores(name, config, scheduler, costly, config.progress).numpy()
        generated.scores[name] = values
        generated.seconds[name] = time.perf_counter() - started
        # Timed now, interleaved with plain sampling, and scaled to the cached plain-sampling cost,
        # so that its ratio to plain sampling does not depend on the load of either moment.
        ratios = []
        for _ in range(config.cost_repeats):
            method_s = _seconds(lambda: repeated_scores(name, config, scheduler, cost_batch, progress=False))
            ratios.append(method_s / _seconds(lambda: plain_sampling(config, scheduler, cost_batch)))
        costs[name] = float(np.median(ratios)) * costs[PLAIN]
        meta.setdefault("supplemented", []).append(name)
        meta.setdefault("phases_s", {})[f"supplement {name}"] = time.perf_counter() - started
    return True


def _generate(config, started) -> tuple[Generated, dict, dict]:
    from diffusers import DDIMScheduler

    from bayesdiff_ext.digits import (
        bundled_dir,
        load_bundled_scheduler,
        load_bundled_unet,
        load_digits_images,
    )
    from bayesdiff_ext.posterior import LastLayerLaplace

    unet = load_bundled_unet()
    scheduler = DDIMScheduler.from_config(load_bundled_scheduler().config)
    real_images, _ = load_digits_images(unet.config.sample_size)
    default_path = bundled_dir() / "posterior_diag.safetensors"
    with torch.no_grad():
        features = fitting_features(
            unet,
            scheduler,
            real_images[: config.fit_images],
            batch_size=config.fit_batch_size,
            seed=config.seed,
            progress=config.progress,
        )
        posteriors = build_posteriors(unet, default_path, features, hfl_probes=config.hfl_probes)
        del features
        sweep_posterior = LastLayerLaplace.load(default_path, unet)
        fitted = time.perf_counter()
        size = unet.config.sample_size
        noise = initial_noise(config, (unet.config.in_channels, size, size))
        print("timing every method on the same batch", flush=True)
        costs = measure_costs(config, unet, scheduler, posteriors, noise[: config.cost_images])
        generation_started = time.perf_counter()
        generated = generate(config, unet, scheduler, posteriors, sweep_posterior)
    meta = dict(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        versions=dict(library_versions(), threads=torch.get_num_threads()),
        posteriors={name: _describe(p) for name, p in posteriors.items()},
        phases_s=dict(
            fitting=fitted - started,
            cost_measurement=generation_started - fitted,
            generation=time.perf_counter() - generation_started,
        ),
        config=config.as_dict(),
    )
    return generated, costs, meta


def run_evaluation(config, reuse: bool = False, label: str | None = None) -> Path:
    """Run the filtering evaluation of docs/MATH.md §3 with ``config``; returns the report's path.

    Writes ``config.out_dir``/``filtering_run.npz`` (the generated images, scores, maps, traces,
    sweep, costs: ``reuse=True`` starts from it instead of sampling), ``results.json``, and the
    report ``EVALUATION.md`` with its figures under ``evaluation/`` in ``config.docs_dir`` (default:
    ``out_dir``). ``label`` is printed at the top of the report (e.g. to mark a reduced run).
    """
    from bayesdiff_ext.digits import load_bundled_classifier, load_digits_images

    started = time.perf_counter()
    out_dir = Path(config.out_dir)
    cache = out_dir / CACHE_NAME
    if reuse:
        if not cache.is_file():
            raise FileNotFoundError(f"--reuse: no cached run at {cache}; run once without --reuse first")
        generated, costs, meta = _load_cache(cache)
        _check_cached_config(config, meta)
        if _supplement(config, generated, costs, meta):
            _save_cache(cache, generated, costs, meta)
    else:
        generated, costs, meta = _generate(config, started)
        out_dir.mkdir(parents=True, exist_ok=True)
        _save_cache(cache, generated, costs, meta)
    analysis_started = time.perf_counter()
    docs_dir = Path(config.docs_dir) if config.docs_dir is not None else out_dir
    figure_dir = docs_dir / "evaluation"
    figure_dir.mkdir(parents=True, exist_ok=True)

    real_images, _ = load_digits_images(generated.images.shape[-1])
    fake = torch.from_numpy(generated.images)
    classifier = load_bundled_classifier()
    extractors = {
        "classifier": metrics.FeatureModule(classifier),
        "random_conv": metrics.RandomConvFeatures(seed=0),
    }
    real = {name: metrics.extract_features(m, real_images) for name, m in extractors.items()}
    features = {name: metrics.extract_features(m, fake) for name, m in extractors.items()}
    quality = {
        "confidence": classifier_confidence(classifier, fake),
        "realism": knn_realism(real["classifier"], features["classifier"], config.knn_k),
    }
    results = analyse(config, generated.scores, features, real, quality)

    labels = {spec.name: spec.label for spec in score_specs(config)}
    labels[REFERENCE] = "reference: the oracle's own ranking (classifier confidence)"
    figure_paths = {key: f"evaluation/{name}" for key, name in FIGURES.items()}
    for extractor, key in (("classifier", "curves"), ("random_conv", "curves_random")):
        figures.filtering_curves(
            results, config.fractions, labels, extractor, TABLE_METRICS[extractor], figure_dir / FIGURES[key]
        )
    figures.sweep_figure(generated.sweep, figure_dir / FIGURES["sweep"])
    figures.timestep_figure(
        generated.trace_timesteps,
        generated.traces,
        labels | {"default_closed": labels["covariance_none"], "default_mc": labels["default"]},
        figure_dir / FIGURES["timestep"],
    )
    figures.extremes_figure(
        generated.images,
        generated.maps["paper"],
        generated.scores["paper"],
        labels["paper"],
        figure_dir / FIGURES["extremes"],
    )
    phases = dict(meta["phases_s"], analysis_and_report=time.perf_counter() - analysis_started)
    meta = dict(
        meta,
        phases_s=phases,
        wall_s=sum(phases.values()),
        real_images=len(real_images),
        label=label,
    )
    text = render_report(
        config=config, results=results, labels=labels, costs=costs, meta=meta, figures=figure_paths
    )
    report_path = docs_dir / "EVALUATION.md"
    atomic_write(report_path, text)
    summary = dict(results, costs=costs, meta=meta, quality={k: v.tolist() for k, v in quality.items()})
    atomic_write(out_dir / "results.json", json.dumps(summary, indent=1, default=float))
    return report_path
