"""run_evaluation: generate (or reuse) the scored samples, then metrics, figures and the report."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bayesdiff_ext import metrics
from bayesdiff_ext.batch_runner import run_batches
from bayesdiff_ext.distributed import is_main_process, shard_batches
from bayesdiff_ext.evaluation import figures
from bayesdiff_ext.evaluation.analysis import REFERENCE, analyse
from bayesdiff_ext._version import library_versions
from bayesdiff_ext.evaluation.cache import CACHE_NAME, cached_settings, check_settings, load_cache, save_cache
from bayesdiff_ext.evaluation.cost import PLAIN, PLAIN_RUN, measure_costs, score_costs, seconds
from bayesdiff_ext.evaluation.generation import NOISE_RULE, Generated, generate, initial_noise
from bayesdiff_ext.evaluation.oracle import classifier_confidence, knn_realism
from bayesdiff_ext.evaluation.posteriors import Posteriors
from bayesdiff_ext.evaluation.progress import RunClock, planned_images
from bayesdiff_ext.evaluation.report import ORACLE_NAMES, assemble, goal_summary, render_section, table_metrics
from bayesdiff_ext.evaluation.scores import forwards, registered
from bayesdiff_ext.evaluation.sources import RECORDING, Batch, Context, Derived, SamplerRun, batch_sources
from bayesdiff_ext.evaluation.subject import load_subject
from bayesdiff_ext.io.atomic import atomic_write

__all__ = ["run_evaluation"]

FIGURES = {
    "sweep": "hyperparameter_sweep.png",
    "timestep": "uncertainty_vs_timestep.png",
    "extremes": "extremes.png",
}
SUMMARY_NAME = "summary.json"


def _subject_info(subject, features) -> dict:
    return dict(
        name=subject.name,
        description=subject.description,
        real_description=subject.real_description,
        extractor_notes=subject.extractor_notes,
        primary=subject.primary,
        feature_dims={name: int(f.shape[1]) for name, f in features.items()},
        oracles=list(subject.oracles),
        primary_oracle=subject.primary_oracle,
        posterior_note=subject.posterior_note,
    )


def _generate(context, scores, started, run) -> tuple[Generated, dict, dict] | None:
    """The run's images and scores (through ``run``, see :func:`generate`), the cost of each source
    and the run's description; None on a process other than 0, which measures no cost and writes
    nothing."""
    config, subject = context.config, context.subject
    sources = batch_sources(scores)
    main = is_main_process()
    with torch.no_grad():
        for source in (PLAIN_RUN, *sources):
            if isinstance(source, SamplerRun):
                context.posteriors.get(source.posterior)
        fitted = time.perf_counter()
        rates, source_costs, sweep_s = {source.name: 0.0 for source in sources}, {}, 0.0
        if main:
            noise = initial_noise(config, subject.shape, range(config.cost_images))
            print(f"timing every method on the same batch of {len(noise)} images", flush=True)
            source_costs = measure_costs(context, sources, noise)
            plain = source_costs[PLAIN]
            # In the run, the sources on the recorded path skip its UNet calls (replay): their time on
            # their own less plain sampling's.
            rates = {
                s.name: source_costs[s.name] - plain if s.shares_path and s is not RECORDING else source_costs[s.name]
                for s in sources
            }
            rates = {name: max(rate, 0.0) for name, rate in rates.items()}
            sweep_s = len(config.sweep_sigmas) * len(config.sweep_priors) * config.sweep_images * rates[RECORDING.name]
        # this process's share of the batches (the progress bar is process 0's)
        planned = planned_images(sources, config, shard_batches(config.num_images, config.batch_size))
        clock = RunClock(rates, planned, sweep_s, config.progress)
        if main:
            clock.start(f"a batch of {config.cost_images} images")
        generation_started = time.perf_counter()
        generated = generate(context, scores, clock, run)
    if generated is None:
        return None
    meta = dict(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        versions=dict(library_versions(), threads=torch.get_num_threads()),
        posteriors=context.posteriors.descriptions(),
        phases_s=dict(
            fitting=fitted - started,
            cost_measurement=generation_started - fitted,
            generation=time.perf_counter() - generation_started,
        ),
        config=config.as_dict(),
        x_T=NOISE_RULE,
    )
    return generated, source_costs, meta


def _supplement(context, scores, generated: Generated, source_costs: dict, meta: dict) -> bool:
    """Score a cached run by the registered scores it lacks (added since it was made), on its own x_T."""
    config = context.config
    missing = [s for s in scores if s.name not in generated.scores]
    if not missing:
        return False
    shape = generated.images.shape[1:]
    if meta.get("x_T") == NOISE_RULE:
        noise = initial_noise(config, shape, range(config.num_images))
    else:  # a cache made before x_T was drawn per image: its N images from one stream
        noise = torch.randn((config.num_images, *shape), generator=torch.Generator().manual_seed(config.seed))
    for source in batch_sources([s for s in missing if not isinstance(s.source, Derived)]):
        if source is RECORDING or source.name in source_costs:
            continue
        print(f"supplementing the cached run with {source.name!r}", flush=True)
        started = time.perf_counter()
        rows = config.num_images if source.all_images or not source.costly else config.costly_count
        outputs = [
            source.run(context, Batch(noise[i : min(i + config.batch_size, rows)], start=i))
            for i in range(0, rows, config.batch_size)
        ]
        for score in missing:
            if score.source is source:
                values = np.full(config.num_images, np.nan)
                values[:rows] = torch.cat([score.reduce(out, context) for out in outputs]).numpy()
                generated.scores[score.name] = values
        # Timed now, interleaved with plain sampling, and scaled to the cached plain-sampling cost,
        # so that its ratio to plain sampling does not depend on the load of either moment.
        batch = Batch(noise[: config.cost_images])
        ratios = [
            seconds(lambda: source.run(context, batch)) / seconds(lambda: PLAIN_RUN.run(context, batch))
            for _ in range(config.cost_repeats)
        ]
        source_costs[source.name] = float(np.median(ratios)) * source_costs[PLAIN]
        generated.seconds[source.name] = time.perf_counter() - started
        meta.setdefault("supplemented", []).append(source.name)
    for score in missing:
        if isinstance(score.source, Derived):
            generated.scores[score.name] = score.source.combine(generated.scores, config)
    meta["posteriors"] = {**meta["posteriors"], **context.posteriors.descriptions()}
    return True


def _read_summaries(figure_root: Path) -> dict:
    found = {}
    for path in sorted(figure_root.glob(f"*/{SUMMARY_NAME}")):
        summary = json.loads(path.read_text())
        found[summary["model"]] = summary
    return found


def run_evaluation(config, reuse: bool = False, label: str | None = None, run=run_batches) -> Path | None:
    """Run the filtering evaluation (docs/MATH.md §3) with ``config``; returns the report's path.

    The generation's batches go through ``run`` (:func:`~bayesdiff_ext.batch_runner.run_batches`, or
    a command session's, which keeps them in a work folder for ``--resume``); in a process group the
    processes share them and process 0 alone measures costs, analyses and writes (the others return
    None). The images and scores do not depend on how the batches were shared or resumed.

    Writes ``config.out_dir``/``filtering_run.npz`` (the generated images, scores, maps, traces,
    sweep, costs and the settings that made them: ``reuse=True`` starts from it instead of sampling,
    after checking that ``config`` asks for the same generation settings), ``results.json``, and the
    model's section of ``EVALUATION.md`` in ``config.docs_dir`` (default ``out_dir``), with its
    figures and goal summary under ``evaluation/<model>/``. ``label`` is printed at the top of the
    section (e.g. to mark a reduced run).
    """
    started = time.perf_counter()
    out_dir = Path(config.out_dir)
    if reuse:
        check_settings(config, cached_settings(out_dir))
    subject = load_subject(config)
    scores = registered(subject)
    context = Context(subject, config, Posteriors(subject, config))
    cache = out_dir / CACHE_NAME
    if reuse:
        generated, source_costs, meta = load_cache(cache)
        if _supplement(context, scores, generated, source_costs, meta):
            save_cache(cache, generated, source_costs, meta)
    else:
        made = _generate(context, scores, started, run)
        if made is None:  # another process than 0: process 0 writes the cache and the report
            return None
        generated, source_costs, meta = made
        save_cache(cache, generated, source_costs, meta)
    analysis_started = time.perf_counter()
    docs_dir = Path(config.docs_dir) if config.docs_dir is not None else out_dir
    figure_root = docs_dir / "evaluation"
    figure_dir = figure_root / subject.name
    figure_dir.mkdir(parents=True, exist_ok=True)

    # Metrics and oracles see the images a pipeline outputs: clamped to the data range.
    fake = torch.from_numpy(generated.images).clamp(-1, 1)
    real = {name: metrics.extract_features(m, subject.real) for name, m in subject.extractors.items()}
    features = {name: metrics.extract_features(m, fake) for name, m in subject.extractors.items()}
    quality = {}
    if subject.classifier is not None:
        quality["confidence"] = classifier_confidence(subject.classifier, fake)
    quality["realism"] = knn_realism(real[subject.primary], features[subject.primary], config.knn_k)
    values = {s.name: generated.scores[s.name] for s in scores}
    results = analyse(config, values, features, real, quality, subject.primary_oracle)

    labels = {s.name: s.label(config) for s in scores}
    labels[REFERENCE] = f"reference: the oracle's own ranking ({ORACLE_NAMES[subject.primary_oracle]})"
    figure_paths = {}
    for extractor, metric_names in table_metrics(subject.extractors).items():
        name = f"filtering_curves_{extractor}.png"
        figures.filtering_curves(results, config.fractions, labels, extractor, metric_names, figure_dir / name)
        figure_paths[f"filtering curves, {extractor} features"] = f"evaluation/{subject.name}/{name}"
    figures.sweep_figure(generated.sweep, figure_dir / FIGURES["sweep"])
    source_labels = {}
    for s in scores:
        source_labels.setdefault(s.source.name, labels[s.name])
    figures.timestep_figure(generated.trace_timesteps, generated.traces, source_labels, figure_dir / FIGURES["timestep"])
    figures.extremes_figure(
        generated.images, generated.maps["paper"], generated.scores["paper"], labels["paper"], figure_dir / FIGURES["extremes"]
    )
    captions = {"sweep": "Laplace hyperparameter sweep", "timestep": "uncertainty against timestep", "extremes": "most and least uncertain samples"}
    figure_paths.update({captions[k]: f"evaluation/{subject.name}/{v}" for k, v in FIGURES.items()})

    phases = dict(meta["phases_s"], analysis_and_report=time.perf_counter() - analysis_started)
    meta = dict(meta, phases_s=phases, wall_s=sum(phases.values()), label=label, subject=_subject_info(subject, features))
    judged = {s.name for s in scores if s.verdict}
    costs = score_costs(scores, source_costs)
    section = render_section(
        config=config,
        results=results,
        labels=labels,
        costs=costs,
        forwards={s.name: forwards(s, config) for s in scores},
        meta=meta,
        figures=figure_paths,
        judged=judged,
    )
    summary = goal_summary(config, results, labels, meta["subject"], judged)
    atomic_write(figure_dir / SUMMARY_NAME, json.dumps(summary, indent=1))
    report_path = docs_dir / "EVALUATION.md"
    existing = report_path.read_text() if report_path.is_file() else None
    text = assemble(existing, subject.name, section, _read_summaries(figure_root))
    atomic_write(report_path, text)
    out = dict(results, costs=costs, meta=meta, quality={k: v.tolist() for k, v in quality.items()})
    atomic_write(out_dir / "results.json", json.dumps(out, indent=1, default=float))
    return report_path
