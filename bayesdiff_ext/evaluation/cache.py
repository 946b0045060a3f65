"""The cached run (``filtering_run.npz``): the generated images, scores, maps, traces, sweep, costs,
and the settings that made them, so that ``--reuse`` can take its settings from the cache and refuse
a call that asks for other ones (naming the setting)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from bayesdiff_ext.evaluation.config import ANALYSIS_SETTINGS, GENERATION_SETTINGS, EvaluationConfig
from bayesdiff_ext.evaluation.generation import Generated
from bayesdiff_ext.io.atomic import atomic_write

__all__ = ["CACHE_NAME", "cached_settings", "check_settings", "load_cache", "save_cache"]

CACHE_NAME = "filtering_run.npz"


def save_cache(path: Path, generated: Generated, costs: dict, meta: dict) -> None:
    arrays = {"images": generated.images, "trace_timesteps": generated.trace_timesteps}
    arrays.update({f"score__{k}": v for k, v in generated.scores.items()})
    arrays.update({f"map__{k}": v for k, v in generated.maps.items()})
    arrays.update({f"trace__{k}": v for k, v in generated.traces.items()})
    arrays.update({f"sweep__{k}": v for k, v in generated.sweep.items()})
    arrays["meta"] = np.array(json.dumps(dict(meta, costs=costs, seconds=generated.seconds)))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())


def load_cache(path: Path) -> tuple[Generated, dict, dict]:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))

        def pick(prefix):
            return {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}

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


def cached_settings(out_dir: Path) -> dict:
    """The settings of the run cached in ``out_dir``, generation and analysis (FileNotFoundError if
    none): a ``--reuse`` starts from all of them, and may change only the analysis ones."""
    path = Path(out_dir) / CACHE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--reuse: no cached run at {path}; run once without --reuse first")
    with np.load(path, allow_pickle=False) as data:
        settings = json.loads(str(data["meta"]))["config"]
    missing = [name for name in GENERATION_SETTINGS if name not in settings]
    if missing:
        raise ValueError(
            f"--reuse: the cached run at {path} predates settings {', '.join(missing)}; run again without --reuse"
        )
    return {name: settings[name] for name in (*GENERATION_SETTINGS, *ANALYSIS_SETTINGS) if name in settings}


def check_settings(config: EvaluationConfig, cached: dict) -> None:
    """Raise ValueError naming the first generation setting where ``config`` differs from the cache."""
    asked = config.generation()
    for name in GENERATION_SETTINGS:
        if asked[name] != cached[name]:
            raise ValueError(
                f"--reuse: the cached run used {name}={cached[name]!r} but this call asks for "
                f"{asked[name]!r}; drop the option to reuse the cache, or run without --reuse"
            )
