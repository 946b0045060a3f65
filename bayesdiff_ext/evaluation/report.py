"""docs/EVALUATION.md from the results: tables, figures, settings, cost and a plain conclusion."""

from __future__ import annotations

import numpy as np

from bayesdiff_ext.evaluation.analysis import REFERENCE
from bayesdiff_ext.evaluation.cost import PLAIN
from bayesdiff_ext.evaluation.methods import score_specs, unet_forwards
from bayesdiff_ext.evaluation.ranking import advantage

__all__ = ["BEATS", "TABLE_METRICS", "render_report"]

#: A score beats random removal when its metric is better than the random mean by this many stds.
BEATS = 2.0
TABLE_METRICS = {"classifier": ("fid", "kid", "cmmd", "precision", "recall"), "random_conv": ("fid", "cmmd")}
CONCLUSION_FRACTION = "0.84"


def _fmt(value: float) -> str:
    return "nan" if not np.isfinite(value) else f"{value:.4g}"


def _random(results, entry, extractor, fraction, metric):
    return results["random"][str(entry["n"])][extractor][fraction][metric]


def _z(results, entry, metric, extractor="classifier", fraction=CONCLUSION_FRACTION):
    """The entry's advantage over random removal at ``fraction``, in random-subset stds."""
    return advantage(
        metric, entry["filtering"][extractor][fraction][metric], _random(results, entry, extractor, fraction, metric)
    )


def _scores(results):
    return {name: entry for name, entry in results["methods"].items() if name not in (REFERENCE, "random")}


def _filter_table(results, labels, extractor, metric, fractions) -> list[str]:
    cut = [str(f) for f in fractions if f != 1.0]
    lines = [
        f"| {metric} ({extractor}) | n | all | " + " | ".join(f"kept {f}" for f in cut) + " |",
        "|---|---|---|" + "---|" * len(cut),
    ]
    for name, entry in results["methods"].items():
        values = entry["filtering"][extractor]
        cells = []
        for f in cut:
            cells.append(f"{_fmt(values[f][metric])} ({_z(results, entry, metric, extractor, f):+.1f}σ)")
        lines.append(
            f"| {labels[name]} | {entry['n']} | {_fmt(values['1.0'][metric])} | " + " | ".join(cells) + " |"
        )
    for n, per_extractor in results["random"].items():
        cells = []
        for f in cut:
            runs = np.asarray(per_extractor[extractor][f][metric])
            cells.append(f"{_fmt(runs.mean())} ± {_fmt(runs.std(ddof=1))}")
        lines.append(f"| random removal (mean ± std over seeds) | {n} | — | " + " | ".join(cells) + " |")
    return lines


def _verdicts(results, labels, extractor="classifier", metric="fid"):
    beats, fails = [], []
    for name, entry in _scores(results).items():
        z = _z(results, entry, metric, extractor)
        (beats if z >= BEATS else fails).append((z, name))
    return sorted(beats, reverse=True), sorted(fails, reverse=True)


def _trade_off(results, labels) -> str:
    """Which scores buy precision with recall at the conclusion's fraction, from the tables."""
    scores = _scores(results)
    sharper = sorted(
        ((_z(results, e, "precision"), _z(results, e, "recall"), n) for n, e in scores.items()),
        reverse=True,
    )
    sharper = [row for row in sharper if row[0] >= BEATS]
    if not sharper:
        return f"No score raises precision (classifier features) by {BEATS:g} stds at kept {CONCLUSION_FRACTION}."
    poorer = sum(1 for _, r, _ in sharper if r <= -BEATS)
    listed = "; ".join(f"{labels[n]} (precision {p:+.1f}σ, recall {r:+.1f}σ)" for p, r, n in sharper)
    return (
        f"Precision and recall at kept {CONCLUSION_FRACTION}: {len(sharper)} of {len(scores)} scores raise "
        f"precision by at least {BEATS:g} stds over random removal, and {poorer} of them lower recall by at "
        f"least {BEATS:g} stds — {listed}. Such a score removes atypical images, which raises precision, but also "
        "thins the tails of the distribution, which FID and recall count against it."
    )


def _with_std(detection: dict, statistic: str, sign: str = "") -> str:
    return f"{detection[statistic]:{sign}.3f} ± {detection[statistic + '_std']:.3f}"


def _best_detector(results, labels) -> str:
    scores = _scores(results)
    name = max(scores, key=lambda n: scores[n]["detection"]["confidence"]["auroc"])
    det = scores[name]["detection"]
    return (
        f"Best at finding the oracle's worst images: {labels[name]} (AUROC {_with_std(det['confidence'], 'auroc')} "
        f"by classifier confidence, {_with_std(det['realism'], 'auroc')} by k-NN realism; 0.5 = chance, ± the "
        "bootstrap std over images)."
    )


def _coverage(config) -> str:
    if config.costly_count == config.num_images:
        return f"* Every method scores all {config.num_images} images."
    return (
        f"* Methods that need extra UNet calls, except the paper's configuration, score the first "
        f"{config.costly_count} images; their random baseline is drawn from those same images."
    )


def render_report(*, config, results, labels, costs, meta, figures) -> str:
    fractions = config.fractions
    lines = [
        "# Does the uncertainty find bad images? Filtering evaluation on the bundled digits model",
        "",
        "Generated by `python/experiments/filtering.py` (`bayesdiff eval`) from one run; every number below",
        "comes from that run (re-render with `--reuse` from the cached `.npz`).",
        "",
    ]
    if meta.get("label"):
        lines += [f"**{meta['label']}**", ""]
    lines += [
        "## Settings",
        "",
        f"* N = {config.num_images} samples of the bundled 16×16 digits UNet, DDIM η = 0, {config.steps} steps "
        f"(chosen to fit the time budget on a shared 2-core CPU), batches of {config.batch_size}, x_T seed {config.seed}.",
        "* Every method scores the same images: one deterministic image path per x_T, recorded once and "
        "replayed for the other posteriors (checked bit for bit); Monte Carlo draws use the real UNet.",
        _coverage(config),
        f"* Kept fractions {', '.join(str(f) for f in fractions)}; random removal: {config.random_seeds} seeds "
        "per fraction. Cells: metric (advantage over random removal in random-subset stds, + = better).",
        f"* Real set: all {meta['real_images']} scikit-learn digits (16×16). Features: the bundled digits classifier's "
        "128-d embedding (primary) and a fixed-seed random conv net (sanity check). "
        f"KID (raw, not ×1000): unbiased MMD² on min(N_real, N_kept) rows; PRDC and realism: k = {config.knn_k}; CMMD: σ = 10, ×1000 "
        "(random conv features: FID and CMMD only).",
        f"* Oracles: classifier max-softmax confidence; k-NN realism score (Kynkäänniemi et al.) against the "
        f"training set in classifier-feature space. AUROC: detecting the worst {config.bad_fraction:.0%} by the oracle. "
        "AUROC and Spearman ± their std over bootstrap resamples of the images.",
        f"* Wall time of the run: {meta['wall_s']:.0f} s ("
        + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in meta["phases_s"].items())
        + "; generation includes the sweep and replays). "
        f"Date {meta['date']}. Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        f"* Posteriors: default = the bundled posterior ({meta['posteriors']['default']}); "
        + "; ".join(f"{k}: {v}" for k, v in meta["posteriors"].items() if k != "default")
        + ".",
        "",
        "## Methods, cost and detection",
        "",
        f"Cost: wall seconds per image of each method on the same batch of {config.cost_images} images with the "
        f"real UNet, median of {config.cost_repeats} interleaved rounds on the shared machine (plain sampling: "
        f"{_fmt(costs[PLAIN])} s/image). Aggregations of one run share its cost; the mean ranks the images "
        "exactly as the sum (every image has the same number of pixels), so its rows repeat the sum's.",
        "",
        "Wall times on a shared machine move with the load of other jobs, and for MC dropout and the "
        "ensemble include loading their weights; the UNet forwards per image are the load-independent "
        "cost. Hessian-free Laplace makes no extra UNet calls: its cost is the conjugate-gradient solves "
        "in the head.",
        "",
        "| method | n | UNet forwards/image | s/image | × plain | AUROC conf. | AUROC k-NN | Spearman conf. "
        "| Spearman k-NN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    late = set(meta.get("supplemented", []))
    forwards = {spec.name: unet_forwards(spec.source, config) for spec in score_specs(config)}
    for name, entry in results["methods"].items():
        det = entry["detection"]
        cost = costs.get(name)
        mark = " (timed in a later pass)" if name in late else ""
        cost_cells = "— | —" if cost is None else f"{cost:.3g}{mark} | {cost / costs[PLAIN]:.2f}"
        lines.append(
            f"| {labels[name]} | {entry['n']} | {forwards.get(name, '—')} | {cost_cells} | "
            + " | ".join(
                _with_std(det[oracle], statistic, sign)
                for statistic, sign in (("auroc", ""), ("spearman", "+"))
                for oracle in ("confidence", "realism")
            )
            + " |"
        )
    lines += ["", "## Filtering against random removal", ""]
    for extractor, metric_names in TABLE_METRICS.items():
        for metric in metric_names:
            lines += _filter_table(results, labels, extractor, metric, fractions) + [""]
    lines += [
        "## Figures",
        "",
        f"![filtering curves, classifier features]({figures['curves']})",
        "",
        f"![filtering curves, random conv features]({figures['curves_random']})",
        "",
        f"![Laplace hyperparameter sweep]({figures['sweep']})",
        "",
        f"![uncertainty against timestep]({figures['timestep']})",
        "",
        f"![most and least uncertain samples]({figures['extremes']})",
        "",
        "## Conclusion",
        "",
    ]
    beats, fails = _verdicts(results, labels)
    rule = (
        f"A score *beats random removal* when the FID (classifier features) of its kept {CONCLUSION_FRACTION} "
        f"(BayesDiff's μ + σ rule keeps ≈ 84%) is lower than the random subsets' mean by at least {BEATS:g} random-subset stds."
    )
    lines += [rule, ""]
    if beats:
        lines.append("Beat random removal: " + "; ".join(f"{labels[n]} ({z:+.1f}σ)" for z, n in beats) + ".")
    else:
        lines.append("No uncertainty score beat random removal.")
    lines.append("")
    if fails:
        lines.append(
            "Did not beat random removal: " + "; ".join(f"{labels[n]} ({z:+.1f}σ)" for z, n in fails) + "."
        )
    ref_z = _z(results, results["methods"][REFERENCE], "fid")
    lines += [
        "",
        _trade_off(results, labels),
        "",
        _best_detector(results, labels),
        "",
        "For scale: removing images by the oracle itself (classifier confidence, which shares the FID features) "
        + ("beats" if ref_z >= 0 else "does worse than")
        + f" random removal on FID ({ref_z:+.1f}σ at the same fraction) — FID rewards diversity as well as "
        "quality, so a filter that finds bad images need not lower it.",
        "",
        "Not compared: the epistemic/aleatoric split — DDIM η = 0 has no sampler noise, so all variance "
        "here is epistemic.",
        "",
    ]
    text = "\n".join(lines)
    return text
