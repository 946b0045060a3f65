"""Score and map estimators compared on kept draws (docs/MATH.md §14.6 and §14.10).

`bench_truth.py --keep-draws DIR` keeps a run's draws; this script reads them back and measures, with
no model forwards, how estimators of Var[x_0 | x_T] built from a few of the truth's draws agree with
the rest of them: the package's control variate (β per image by regression) against β = 1, the ratio
score V·ΣD²/ΣL², the per-pixel ratio and an image-level regression, each judged against the plain rest
of the draws and against the controlled truth of the rest (the same draws with the control variate).
It also prints how the controlled truth agrees with the plain one and the two truths' halves.

    OMP_NUM_THREADS=1 .venv/bin/python python/bench_truth.py --config random-ddim --grid presets \\
        --truth-draws 256 --images 12 --keep-draws kept/
    .venv/bin/python python/score_estimators.py random-ddim kept/ --sizes 16 32

Columns: map r (Pearson over all pixels), map r within images (mean over images), Spearman ρ of the
per-image scores, mean ratio, the image-specific score error (std over images of log ŝ/s) and the
scores' Pearson r; each as the mean [minimum] over disjoint sets of draws.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import bench_truth
from bench_truth import controlled_truth, draw_controls
from bayesdiff_ext.sampler.trajectory_statistics import controlled_spread


def load_run(folder: Path, config: str, run: str):
    """A kept run: finals (M, B, ...), the MAP images (B, ...), weight deviations (M, P), φ̃."""
    kept = torch.load(folder / f"{config}.{run}.pt", weights_only=True)
    return kept["finals"][0].double(), kept["maps"][0].double(), kept["deviations"][0, :, 0], kept["phi_tilde"]


def estimators(dev_sq: torch.Tensor, control_sq: torch.Tensor, exact: torch.Tensor) -> dict[str, torch.Tensor]:
    """Epistemic estimates (B, ...) from M draws' squared deviations and squared controls (M, B, ...)."""
    pixel_dims = tuple(range(2, dev_sq.dim()))
    plain = dev_sq.mean(0)
    regression = controlled_spread(dev_sq, control_sq, exact)
    sums, control_sums = dev_sq.sum(pixel_dims), control_sq.sum(pixel_dims)
    exact_sums = exact.sum(tuple(range(1, exact.dim())))
    ratio = (sums.sum(0) / control_sums.sum(0)).view(-1, *([1] * (exact.dim() - 1)))
    ratio_score = exact_sums.view_as(ratio) * ratio
    centred, control_centred = sums - sums.mean(0), control_sums - control_sums.mean(0)
    image_slope = (centred * control_centred).sum(0) / control_centred.square().sum(0)
    image_score = (sums.mean(0) - image_slope * (control_sums.mean(0) - exact_sums)).view_as(ratio)

    def rescaled(estimate: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        return estimate * score / estimate.sum(tuple(range(1, estimate.dim()))).view_as(score)

    return {
        "plain": plain,
        "control variate (package)": regression,
        "control variate, β = 1": plain - (control_sq.mean(0) - exact),
        "control variate, β = ratio": plain - ratio * (control_sq.mean(0) - exact),
        "control variate map, ratio score": rescaled(regression, ratio_score),
        "per-pixel ratio": exact * plain / control_sq.mean(0),
        "control variate map, image regression": rescaled(regression, image_score),
    }


def agreement(estimate: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    row = bench_truth.compare(estimate, reference, None)
    scores, true_scores = estimate.flatten(1).sum(1), reference.flatten(1).sum(1)
    return {
        "map r": row["map_r"],
        "within": row["image_map_r"],
        "score ρ": row["spearman"],
        "mean ratio": row["ratio"],
        "image error": float(torch.log(scores / true_scores).std()),
        "score r": bench_truth.pearson(scores, true_scores),
    }


def print_table(rows: list[dict[str, dict[str, float]]], title: str) -> None:
    print(f"\n## {title}")
    names = list(rows[0])
    columns = list(rows[0][names[0]])
    print(f"{'estimator':40s} " + " ".join(f"{c:>16s}" for c in columns))
    for name in names:
        values = [[row[name][c] for row in rows] for c in columns]
        print(f"{name:40s} " + " ".join(f"{sum(v) / len(v):7.4f} [{min(v):6.3f}]" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", choices=sorted(bench_truth.CONFIGS))
    parser.add_argument("folder", type=Path, help="the --keep-draws folder of a deterministic-sampler run")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64], help="draws per estimate")
    parser.add_argument("--sets", type=int, default=8, help="the most disjoint sets of draws per size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    setup = bench_truth.digits_setup if args.config.startswith("digits") else bench_truth.random_setup
    posterior = setup()[2]
    finals, maps, deviations, phi = load_run(args.folder, args.config, "truth")
    exact = posterior.predict(phi)[1].double()
    draws = finals.shape[0]
    truth = finals.var(0)
    scores = truth.flatten(1).sum(1)
    print(f"truth: M = {draws}, {finals.shape[1]} images, true scores' coefficient of variation "
          f"{float(scores.std() / scores.mean()):.4f}")
    control = draw_controls(posterior.spec, phi, deviations)
    half = draws // 2
    print_table([{"controlled truth": agreement(controlled_truth(finals, control, exact), truth)}],
                "the controlled truth against the plain truth")
    print_table([{"plain truth": agreement(finals[:half].var(0), finals[half:].var(0)),
                  "controlled truth": agreement(controlled_truth(finals[:half], control[:half], exact),
                                                controlled_truth(finals[half:], control[half:], exact))}],
                "the truths' halves")
    dev_sq, control_sq = (finals - maps).square(), control.square()
    for size in args.sizes:
        plain_rows, controlled_rows = [], []
        for k in range(min(args.sets, draws // size - 1)):
            chosen = torch.arange(k * size, (k + 1) * size)
            rest = torch.ones(draws, dtype=torch.bool)
            rest[chosen] = False
            candidates = estimators(dev_sq[chosen], control_sq[chosen], exact)
            reference = finals[rest].var(0)
            controlled_reference = controlled_truth(finals[rest], control[rest], exact)
            plain_rows.append({n: agreement(e, reference) for n, e in candidates.items()})
            controlled_rows.append({n: agreement(e, controlled_reference) for n, e in candidates.items()})
        if not plain_rows:
            continue
        print_table(plain_rows, f"sets of {size} draws against the other {draws - size} (plain)")
        print_table(controlled_rows, f"sets of {size} draws against the controlled truth of the other {draws - size}")


if __name__ == "__main__":
    main()
