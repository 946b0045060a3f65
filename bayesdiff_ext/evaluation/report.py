"""EVALUATION.md: one generated section per model (tables, figures, settings, cost, warnings and a
plain conclusion), and above them the goal, answered over every model whose section is there."""

from __future__ import annotations

import numpy as np

from bayesdiff_ext.evaluation.analysis import REFERENCE
from bayesdiff_ext.evaluation.cost import PLAIN
from bayesdiff_ext.evaluation.ranking import advantage, kept_count

__all__ = [
    "BEATS",
    "GOAL_AUROC",
    "GOAL_SIGMAS",
    "MIN_SEEDS_FOR_SIGMA",
    "assemble",
    "goal_summary",
    "render_section",
    "table_metrics",
]

#: A score beats random removal when its metric is better than the random mean by this many stds.
BEATS = 2.0
#: The goal: detection of the oracle's worst images at this AUROC, and FID better than random
#: removal by this many random-subset stds, on every bundled model.
GOAL_AUROC = 0.8
GOAL_SIGMAS = 3.0
#: Below this many random subsets their std is too rough to measure advantages in: no σ is printed.
MIN_SEEDS_FOR_SIGMA = 5
#: Below this many images per feature dimension FID's bias (it grows like d/N) dominates small differences.
FID_IMAGES_PER_DIMENSION = 10
#: KID is unbiased, but its spread over subsets is large below this many images.
KID_MIN_IMAGES = 1000
#: Fewer bad images than this make the AUROC's bootstrap std large.
MIN_BAD_IMAGES = 20
CONCLUSION_FRACTION = "0.84"
BUNDLED = ("digits", "photos")
TITLE = "# Does the uncertainty find bad images? Filtering evaluation"
ORACLE_NAMES = {"confidence": "classifier confidence", "realism": "k-NN realism"}


def table_metrics(extractors) -> dict[str, tuple[str, ...]]:
    """Metrics per extractor: every metric in the primary (first) space, FID and CMMD in the others."""
    names = list(extractors)
    return {e: ("fid", "kid", "cmmd", "precision", "recall") if e == names[0] else ("fid", "cmmd") for e in names}


def _fmt(value: float) -> str:
    return "nan" if not np.isfinite(value) else f"{value:.4g}"


def _z(results, entry, metric, extractor, fraction=CONCLUSION_FRACTION):
    """The entry's advantage over random removal at ``fraction``, in random-subset stds."""
    random = results["random"][str(entry["n"])][extractor][fraction][metric]
    return advantage(metric, entry["filtering"][extractor][fraction][metric], random)


def _judged(results, scores_judged):
    return {name: entry for name, entry in results["methods"].items() if name in scores_judged}


def _with_std(detection: dict, statistic: str, sign: str = "") -> str:
    return f"{detection[statistic]:{sign}.3f} ± {detection[statistic + '_std']:.3f}"


def _filter_table(results, labels, extractor, metric, fractions, sigma: bool) -> list[str]:
    cut = [str(f) for f in fractions if f != 1.0]
    lines = [
        f"| {metric} ({extractor}) | n | all | " + " | ".join(f"kept {f}" for f in cut) + " |",
        "|---|---|---|" + "---|" * len(cut),
    ]
    for name, entry in results["methods"].items():
        values = entry["filtering"][extractor]
        cells = [
            _fmt(values[f][metric]) + (f" ({_z(results, entry, metric, extractor, f):+.1f}σ)" if sigma else "")
            for f in cut
        ]
        lines.append(f"| {labels[name]} | {entry['n']} | {_fmt(values['1.0'][metric])} | " + " | ".join(cells) + " |")
    for n, per_extractor in results["random"].items():
        cells = []
        for f in cut:
            runs = np.asarray(per_extractor[extractor][f][metric])
            cells.append(f"{_fmt(runs.mean())} ± {_fmt(runs.std(ddof=1))}")
        lines.append(f"| random removal (mean ± std over seeds) | {n} | — | " + " | ".join(cells) + " |")
    return lines


def _warnings(config, results, info) -> list[str]:
    """Small-sample warnings, each with the threshold it is judged by."""
    notes = []
    smallest = min(entry["n"] for entry in results["methods"].values())
    kept = kept_count(smallest, min(config.fractions))
    d = info["feature_dims"][info["primary"]]
    if kept < FID_IMAGES_PER_DIMENSION * d:
        notes.append(
            f"FID from as few as {kept} images in a {d}-dimensional feature space: below N = "
            f"{FID_IMAGES_PER_DIMENSION}·d = {FID_IMAGES_PER_DIMENSION * d} its upward bias (∝ d/N) is large. Every "
            "comparison here is between sets of the same size, so the bias is shared, but the values are not "
            "comparable with FIDs of other sizes."
        )
    if kept < KID_MIN_IMAGES:
        notes.append(
            f"KID from as few as {kept} images: the estimator is unbiased, but below N = {KID_MIN_IMAGES} its spread "
            "over subsets is large (compare its σ, not its values)."
        )
    if config.random_seeds < MIN_SEEDS_FOR_SIGMA:
        notes.append(
            f"Random removal was repeated with {config.random_seeds} seeds: a std from fewer than "
            f"{MIN_SEEDS_FOR_SIGMA} seeds is too rough to measure advantages in, so the tables give no σ and the "
            "conclusion judges no score against random removal."
        )
    bad = max(1, int(round(config.bad_fraction * smallest)))
    if bad < MIN_BAD_IMAGES:
        notes.append(
            f"AUROC from as few as {bad} bad images (the worst {config.bad_fraction:.0%} of {smallest}): below "
            f"{MIN_BAD_IMAGES} its bootstrap std is large and its value rough."
        )
    if config.costly_count < config.num_images:
        notes.append(
            f"Methods that need extra model calls, except the paper's configuration, score the first "
            f"{config.costly_count} of the {config.num_images} images; their random baseline is drawn from those same images."
        )
    return notes


def goal_summary(config, results, labels, info, judged) -> dict:
    """Per judged score: AUROC (± std) by the primary oracle and the FID advantage at kept 0.84."""
    primary, oracle = info["primary"], info["primary_oracle"]
    sigma = config.random_seeds >= MIN_SEEDS_FOR_SIGMA
    rows = {}
    for name, entry in _judged(results, judged).items():
        det = entry["detection"][oracle]
        rows[name] = {
            "label": labels[name],
            "auroc": det["auroc"],
            "auroc_std": det["auroc_std"],
            "fid_sigma": _z(results, entry, "fid", primary) if sigma else None,
        }
    return {"model": info["name"], "description": info["description"], "oracle": oracle, "num_images": config.num_images, "scores": rows}


def _goal_lines(summaries: dict) -> list[str]:
    """The goal answered over the models in ``summaries`` (name -> goal_summary)."""
    models = [m for m in (*BUNDLED, *sorted(summaries)) if m in summaries]
    models = list(dict.fromkeys(models))
    if not models:
        return []
    lines = [
        "## The goal",
        "",
        f"Wanted: a score with AUROC ≥ {GOAL_AUROC} for the primary oracle's worst images, and a score that beats "
        f"random removal on FID (primary features, kept {CONCLUSION_FRACTION}) by ≥ {GOAL_SIGMAS:g} random-subset "
        "stds, on " + ("both bundled models" if set(BUNDLED) <= set(models) else "every model below") + ".",
        "",
        "| model (oracle) | best AUROC | AUROC ≥ " + f"{GOAL_AUROC} | best FID advantage | FID ≥ {GOAL_SIGMAS:g}σ |",
        "|---|---|---|---|---|",
    ]
    auroc_met, fid_met = [], []
    for model in models:
        s = summaries[model]
        rows = s["scores"]
        best_a = max(rows, key=lambda n: rows[n]["auroc"])
        met_a = sorted(n for n in rows if rows[n]["auroc"] >= GOAL_AUROC)
        judged_fid = {n: r for n, r in rows.items() if r["fid_sigma"] is not None}
        best_f = max(judged_fid, key=lambda n: judged_fid[n]["fid_sigma"]) if judged_fid else None
        met_f = sorted(n for n in judged_fid if judged_fid[n]["fid_sigma"] >= GOAL_SIGMAS)
        auroc_met.append(set(met_a))
        fid_met.append(set(met_f) if judged_fid else None)
        best_fid = f"{rows[best_f]['label']}: {rows[best_f]['fid_sigma']:+.1f}σ" if best_f else "not judged (σ from too few seeds)"
        lines.append(
            f"| {s['description']} ({ORACLE_NAMES[s['oracle']]}, N = {s['num_images']}) | {rows[best_a]['label']}: "
            f"{rows[best_a]['auroc']:.3f} ± {rows[best_a]['auroc_std']:.3f} | {_names(rows, met_a)} | {best_fid} | "
            f"{_names(rows, met_f) if judged_fid else '—'} |"
        )
    both_a = set.intersection(*auroc_met)
    lines += ["", _verdict_line("AUROC", both_a, summaries, models, "auroc", GOAL_AUROC, "{:.3f}")]
    if any(f is None for f in fid_met):
        lines += ["", "FID: not judged on every model (a run with fewer than "
                  f"{MIN_SEEDS_FOR_SIGMA} random seeds gives no σ)."]
    else:
        both_f = set.intersection(*fid_met)
        lines += ["", _verdict_line("FID", both_f, summaries, models, "fid_sigma", GOAL_SIGMAS, "{:+.1f}σ")]
    return lines + [""]


def _names(rows: dict, names) -> str:
    return "; ".join(rows[n]["label"] for n in names) or "none"


def _verdict_line(what, met, summaries, models, key, target, fmt) -> str:
    if met:
        rows = summaries[models[0]]["scores"]
        values = "; ".join(
            f"{rows[n]['label']}: " + ", ".join(f"{m} {fmt.format(summaries[m]['scores'][n][key])}" for m in models)
            for n in sorted(met)
        )
        return f"**{what}: met** on every model — {values}."
    parts = []
    for m in models:
        rows = {n: r for n, r in summaries[m]["scores"].items() if r[key] is not None}
        best = max(rows, key=lambda n: rows[n][key])
        gap = target - rows[best][key]
        parts.append(f"on {m} the best is {rows[best]['label']} ({fmt.format(rows[best][key])}, "
                     + (f"{gap:.3f} short" if key == "auroc" else f"{gap:.1f}σ short") + ")"
                     if gap > 0 else f"on {m} {rows[best]['label']} meets it ({fmt.format(rows[best][key])})")
    return f"**{what}: not met** by any one score on every model — " + "; ".join(parts) + "."


def _conclusion(config, results, labels, info, judged) -> list[str]:
    primary = info["primary"]
    oracles = info["oracles"]
    lines = []
    if config.random_seeds >= MIN_SEEDS_FOR_SIGMA:
        verdicts = sorted(((_z(results, e, "fid", primary), n) for n, e in _judged(results, judged).items()), reverse=True)
        beats = [(z, n) for z, n in verdicts if z >= BEATS]
        fails = [(z, n) for z, n in verdicts if z < BEATS]
        lines += [
            f"A score *beats random removal* when the FID ({primary} features) of its kept {CONCLUSION_FRACTION} "
            f"(BayesDiff's μ + σ rule keeps ≈ 84%) is lower than the random subsets' mean by at least {BEATS:g} "
            "random-subset stds.",
            "",
            ("Beat random removal: " + "; ".join(f"{labels[n]} ({z:+.1f}σ)" for z, n in beats) + ".")
            if beats
            else "No uncertainty score beat random removal.",
            "",
        ]
        if fails:
            lines += ["Did not beat random removal: " + "; ".join(f"{labels[n]} ({z:+.1f}σ)" for z, n in fails) + ".", ""]
        lines += [_trade_off(results, labels, primary, judged), ""]
    else:
        lines += [f"No verdict against random removal: its std comes from {config.random_seeds} seeds (fewer than {MIN_SEEDS_FOR_SIGMA}).", ""]
    scores = _judged(results, judged)
    oracle = info["primary_oracle"]
    best = max(scores, key=lambda n: scores[n]["detection"][oracle]["auroc"])
    det = scores[best]["detection"]
    by = ", ".join(f"{_with_std(det[o], 'auroc')} by {ORACLE_NAMES[o]}" for o in oracles)
    lines += [
        f"Best at finding the worst images by {ORACLE_NAMES[oracle]} (the primary oracle): {labels[best]} (AUROC {by}; "
        "0.5 = chance, ± the bootstrap std over images).",
        "",
    ]
    if config.random_seeds >= MIN_SEEDS_FOR_SIGMA:
        ref_z = _z(results, results["methods"][REFERENCE], "fid", primary)
        lines += [
            f"For scale: removing images by the oracle itself ({ORACLE_NAMES[oracle]}) "
            + ("beats" if ref_z >= 0 else "does worse than")
            + f" random removal on FID ({ref_z:+.1f}σ at the same fraction) — FID rewards diversity as well as "
            "quality, so a filter that finds bad images need not lower it.",
            "",
        ]
    lines += [
        "Not compared: the epistemic/aleatoric split — DDIM η = 0 has no sampler noise, so all variance here is epistemic.",
        "",
    ]
    return lines


def _trade_off(results, labels, primary, judged) -> str:
    """Which scores buy precision with recall at the conclusion's fraction, from the tables."""
    scores = _judged(results, judged)
    sharper = sorted(
        ((_z(results, e, "precision", primary), _z(results, e, "recall", primary), n) for n, e in scores.items()),
        reverse=True,
    )
    sharper = [row for row in sharper if row[0] >= BEATS]
    if not sharper:
        return f"No score raises precision ({primary} features) by {BEATS:g} stds at kept {CONCLUSION_FRACTION}."
    poorer = sum(1 for _, r, _ in sharper if r <= -BEATS)
    listed = "; ".join(f"{labels[n]} (precision {p:+.1f}σ, recall {r:+.1f}σ)" for p, r, n in sharper)
    return (
        f"Precision and recall at kept {CONCLUSION_FRACTION}: {len(sharper)} of {len(scores)} scores raise precision by "
        f"at least {BEATS:g} stds over random removal, and {poorer} of them lower recall by at least {BEATS:g} stds — "
        f"{listed}. Such a score removes atypical images, which raises precision, but also thins the tails of the "
        "distribution, which FID and recall count against it."
    )


def _begin(name: str) -> str:
    return f"<!-- BEGIN generated section: {name} -->"


def _end(name: str) -> str:
    return f"<!-- END generated section: {name} -->"


def render_section(*, config, results, labels, costs, forwards, meta, figures, judged) -> str:
    """The model's section of EVALUATION.md (between its BEGIN/END markers)."""
    info = meta["subject"]
    sigma = config.random_seeds >= MIN_SEEDS_FOR_SIGMA
    oracles = info["oracles"]
    extractors = list(info["extractor_notes"])
    lines = [_begin(info["name"]), f"## {info['description'][0].upper()}{info['description'][1:]}", ""]
    if meta.get("label"):
        lines += [f"**{meta['label']}**", ""]
    lines += [
        "### Settings",
        "",
        f"* N = {config.num_images} samples, DDIM η = 0, {config.steps} steps, batches of {config.batch_size}, x_T seed "
        f"{config.seed}. Every method scores the same images: one deterministic image path per x_T, recorded once and "
        "replayed for the other posteriors (checked bit for bit); Monte Carlo draws and weight-sample trajectories use "
        "the real UNet.",
        f"* Kept fractions {', '.join(str(f) for f in config.fractions)}; random removal: {config.random_seeds} seeds per "
        "fraction. Cells: metric" + (" (advantage over random removal in random-subset stds, + = better)." if sigma else "."),
        "* Generated images are clamped to [-1, 1] (as a pipeline outputs them) before features and oracles.",
        f"* Real set: {info['real_description']}. Features: "
        + "; ".join(f"{e} — {note}" + (" (primary)" if e == extractors[0] else "") for e, note in info["extractor_notes"].items())
        + f". KID (raw, not ×1000): unbiased MMD² on min(N_real, N_kept) rows; PRDC and realism: k = {config.knn_k}; "
        "CMMD: σ = 10, ×1000 (other feature spaces than the primary: FID and CMMD only).",
        "* Oracles: "
        + "; ".join(
            ("classifier max-softmax confidence" if o == "confidence" else
             f"k-NN realism score (Kynkäänniemi et al.) against the real set in {extractors[0]} features")
            + (" (primary)" if o == info["primary_oracle"] else "")
            for o in oracles
        )
        + f". AUROC: detecting the worst {config.bad_fraction:.0%} by the oracle; AUROC and Spearman ± their std over "
        "bootstrap resamples of the images.",
        f"* Wall time of the run: {meta['wall_s']:.0f} s ("
        + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in meta["phases_s"].items())
        + f"). Date {meta['date']}. Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        f"* Posteriors: default = {info['posterior_note']} ({meta['posteriors']['default']}); "
        + "; ".join(f"{k}: {v}" for k, v in meta["posteriors"].items() if k != "default")
        + ".",
        "",
    ]
    notes = _warnings(config, results, info)
    if notes:
        lines += ["### Small samples: read with care", "", *[f"* {n}" for n in notes], ""]
    lines += [
        "### Methods, cost and detection",
        "",
        f"Cost: wall seconds per image of each method run on its own on the same batch of {config.cost_images} images, "
        f"median of {config.cost_repeats} interleaved rounds (plain sampling: {_fmt(costs[PLAIN])} s/image). Wall times on "
        "a shared machine move with the load of other jobs; the model forwards per image (the image path included) "
        "are the load-independent cost. Scores of one run share its cost; a rank mean pays for each of its parts.",
        "",
        "| method | n | forwards/image | s/image | × plain | "
        + " | ".join(f"AUROC {ORACLE_NAMES[o]}" for o in oracles)
        + " | "
        + " | ".join(f"Spearman {ORACLE_NAMES[o]}" for o in oracles)
        + " |",
        "|---|---|---|---|---|" + "---|" * (2 * len(oracles)),
    ]
    for name, entry in results["methods"].items():
        det = entry["detection"]
        cost = costs.get(name)
        cost_cells = "— | —" if cost is None else f"{cost:.3g} | {cost / costs[PLAIN]:.2f}"
        lines.append(
            f"| {labels[name]} | {entry['n']} | {forwards.get(name, '—')} | {cost_cells} | "
            + " | ".join(_with_std(det[o], "auroc") for o in oracles)
            + " | "
            + " | ".join(_with_std(det[o], "spearman", "+") for o in oracles)
            + " |"
        )
    lines += ["", "### Filtering against random removal", ""]
    for extractor, metric_names in table_metrics(extractors).items():
        for metric in metric_names:
            lines += _filter_table(results, labels, extractor, metric, config.fractions, sigma) + [""]
    lines += ["### Figures", ""]
    lines += [f"![{caption}]({path})\n" for caption, path in figures.items()]
    lines += ["### Conclusion", "", *_conclusion(config, results, labels, info, judged), _end(info["name"])]
    return "\n".join(lines)


def assemble(existing: str | None, name: str, section: str, summaries: dict) -> str:
    """EVALUATION.md with ``name``'s section replaced (or added), the other sections kept, and the goal
    answered over ``summaries`` (model name -> :func:`goal_summary`)."""
    sections = {}
    if existing:
        rest = existing
        while _begin_prefix() in rest:
            start = rest.index(_begin_prefix())
            other = rest[start + len(_begin_prefix()) :].split(" -->", 1)[0]
            end = rest.index(_end(other)) + len(_end(other))
            sections[other] = rest[start:end]
            rest = rest[end:]
    sections[name] = section
    order = [m for m in BUNDLED if m in sections] + sorted(m for m in sections if m not in BUNDLED)
    head = [
        TITLE,
        "",
        "Generated by `bayesdiff eval` (`python/experiments/filtering.py`), one section per model, each from one run "
        "(re-render a section with `--reuse` from its cached `.npz`). Each score ranks the images a model "
        "generates by its uncertainty; filtering keeps the most certain ones. A score is useful when filtering by it "
        "beats removing random images, and when it finds the images a quality oracle calls worst.",
        "",
        *_goal_lines({m: summaries[m] for m in order if m in summaries}),
    ]
    return "\n".join(head) + "\n" + "\n\n".join(sections[m] for m in order) + "\n"


def _begin_prefix() -> str:
    return "<!-- BEGIN generated section: "
