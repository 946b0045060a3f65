"""All numbers of the report from the generated scores, features and oracles (no sampling here)."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from bayesdiff_ext.evaluation.ranking import detection, kept_by_score, random_subsets, set_metrics
from bayesdiff_ext.evaluation.scores import scored_prefix

__all__ = ["REFERENCE", "analyse"]

#: Ranking by the primary quality oracle itself: how much filtering could gain at best (not a method).
REFERENCE = "oracle_reference"


def analyse(config, scores: dict[str, np.ndarray], features: dict, real: dict, quality: dict, primary_oracle: str) -> dict:
    """Filtering and detection results.

    ``scores``: name -> (N,) (NaN = not scored); ``features``/``real``: extractor -> (N, d) / (M, d),
    the primary extractor first (it gets every metric, the others FID and CMMD); ``quality``:
    oracle -> (N,) higher = better, ``primary_oracle`` the one whose own ranking is the reference
    row. Returns a JSON-ready dict with ``methods`` (per method: n, detection per oracle, filtering
    per extractor and fraction) and ``random`` (per subset size n: extractor -> fraction -> metric ->
    list over seeds).
    """
    scores = dict(scores)
    scores[REFERENCE] = -quality[primary_oracle]
    primary = next(iter(features))

    def evaluate(extractor, rows):
        return set_metrics(
            real[extractor], features[extractor][rows], k=config.knn_k, full=extractor == primary
        )

    full_set: dict = {}
    methods: dict = {}
    sizes = sorted({scored_prefix(s) for s in scores.values()})
    jobs = (len(scores) + len(sizes) * config.random_seeds) * len(features) * len(config.fractions)
    bar = tqdm(total=jobs, desc="metrics", disable=not config.progress)
    for name, values in scores.items():
        n = scored_prefix(values)
        values = values[:n]
        entry = {
            "n": n,
            "detection": {
                oracle: detection(values, q[:n], config.bad_fraction) for oracle, q in quality.items()
            },
            "filtering": {},
        }
        for extractor in features:
            per_fraction = {}
            for fraction in config.fractions:
                if fraction == 1.0:
                    key = (extractor, n)
                    if key not in full_set:
                        full_set[key] = evaluate(extractor, np.arange(n))
                    per_fraction[str(fraction)] = full_set[key]
                else:
                    per_fraction[str(fraction)] = evaluate(extractor, kept_by_score(values, fraction))
                bar.update()
            entry["filtering"][extractor] = per_fraction
        methods[name] = entry
    random: dict = {}
    for n in sizes:
        random[str(n)] = {}
        for extractor in features:
            random[str(n)][extractor] = {}
            for fraction in config.fractions:
                runs = []
                for rows in random_subsets(n, fraction, config.random_seeds, base_seed=config.seed):
                    # Keeping everything is the same set for every seed.
                    cached = full_set.get((extractor, n)) if len(rows) == n else None
                    runs.append(cached if cached is not None else evaluate(extractor, rows))
                    bar.update()
                random[str(n)][extractor][str(fraction)] = {m: [r[m] for r in runs] for m in runs[0]}
    bar.close()
    return {"methods": methods, "random": random}
