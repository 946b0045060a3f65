"""The evaluation's figures (matplotlib, small PNGs), each written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from bayesdiff_ext.io.atomic import atomic_write

__all__ = ["extremes_figure", "filtering_curves", "sweep_figure", "timestep_figure"]

DPI = 80


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def _show(ax, image: np.ndarray) -> None:
    """An image (C, H, W) at model scale [-1, 1]: grey for one channel, colour for three."""
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=-1, vmax=1)
    else:
        ax.imshow(np.clip((image.transpose(1, 2, 0) + 1) / 2, 0, 1))


def filtering_curves(
    results: dict, fractions, labels: dict, extractor: str, metric_names, path: Path
) -> None:
    """Metric vs kept fraction: each method a line, random removal mean ± std as a band per subset size."""
    fig, axes = plt.subplots(1, len(metric_names), figsize=(4 * len(metric_names), 3.6), squeeze=False)
    axes = axes[0]
    colours = plt.get_cmap("tab20")
    x = np.asarray(fractions)
    for ax, metric in zip(axes, metric_names):
        for n, per_extractor in results["random"].items():
            values = np.array([per_extractor[extractor][str(f)][metric] for f in fractions])
            mean, std = values.mean(axis=1), values.std(axis=1, ddof=1)
            ax.fill_between(x, mean - std, mean + std, color="grey", alpha=0.3)
            ax.plot(x, mean, color="black", lw=1.5, ls="--", label=f"random removal, n={n} (mean ± std)")
        for i, (name, entry) in enumerate(results["methods"].items()):
            curve = [entry["filtering"][extractor][str(f)][metric] for f in fractions]
            ax.plot(x, curve, marker="o", ms=3, lw=1, color=colours(i % 20), label=labels.get(name, name))
        ax.set_title(f"{metric} ({extractor} features)")
        ax.set_xlabel("kept fraction")
        ax.invert_xaxis()
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7)
    _save(fig, path)


def sweep_figure(sweep: dict, path: Path) -> None:
    """Example Var[x_0] map per (σ, δ) and the distribution of the batch's summed variances."""
    sigmas, priors, maps, scores = sweep["sigmas"], sweep["priors"], sweep["maps"], sweep["scores"]
    rows, cols = len(sigmas), len(priors)
    fig = plt.figure(figsize=(2.0 * cols + 5, 2.0 * rows))
    grid = fig.add_gridspec(rows, cols + 3)
    for i, sigma in enumerate(sigmas):
        for j, delta in enumerate(priors):
            ax = fig.add_subplot(grid[i, j])
            ax.imshow(maps[i, j].mean(axis=0), cmap="inferno")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"σ={sigma:g}, δ={delta:g}\nΣ={maps[i, j].sum():.2e}", fontsize=7)
    ax = fig.add_subplot(grid[:, cols:])
    flat = scores.reshape(rows * cols, -1)
    ax.boxplot(np.log10(np.maximum(flat, 1e-30)).T, orientation="horizontal")
    ax.set_yticks(
        range(1, rows * cols + 1), [f"σ={s:g}, δ={d:g}" for s in sigmas for d in priors], fontsize=7
    )
    ax.yaxis.tick_right()
    ax.set_xlabel("log10 summed Var[x_0] (batch)")
    ax.set_title(
        f"fitted: σ={float(sweep['fitted_sigma']):.3g}, δ={float(sweep['fitted_prior']):.3g}", fontsize=8
    )
    _save(fig, path)


def timestep_figure(timesteps: np.ndarray, traces: dict, labels: dict, path: Path) -> None:
    """Σ Var[x_t] after each step (median and 10–90% band over the first batch) against the timestep."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, trace in traces.items():
        low, mid, high = np.percentile(trace, [10, 50, 90], axis=1)
        ax.plot(timesteps, mid, marker="o", ms=3, label=labels.get(name, name))
        ax.fill_between(timesteps, np.maximum(low, 1e-30), np.maximum(high, 1e-30), alpha=0.2)
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("timestep t (sampling runs right to left → x_0)")
    ax.set_ylabel("Σ Var[x_t] after the step")
    ax.legend(fontsize=7)
    _save(fig, path)


def extremes_figure(
    images: np.ndarray, maps: np.ndarray, scores: np.ndarray, label: str, path: Path, count: int = 8
):
    """The ``count`` least and most uncertain samples by ``scores``, each with its Var[x_0] map."""
    scored = np.flatnonzero(np.isfinite(scores))
    order = scored[np.argsort(scores[scored], kind="stable")]
    picks = [("least uncertain", order[:count]), ("most uncertain", order[-count:][::-1])]
    vmax = np.nanpercentile(maps[scored].mean(axis=1), 99)
    fig, axes = plt.subplots(4, count, figsize=(1.1 * count, 4.8))
    for block, (title, indices) in enumerate(picks):
        for c, index in enumerate(indices):
            ax_img, ax_map = axes[2 * block, c], axes[2 * block + 1, c]
            _show(ax_img, images[index])
            ax_map.imshow(maps[index].mean(axis=0), cmap="inferno", vmin=0, vmax=vmax)
            ax_img.set_title(f"{scores[index]:.2e}", fontsize=6)
            for ax in (ax_img, ax_map):
                ax.set_xticks([])
                ax.set_yticks([])
        axes[2 * block, 0].set_ylabel(title, fontsize=7)
    fig.suptitle(f"{label}: images and Var[x_0] maps (one colour scale)", fontsize=8)
    _save(fig, path)
