"""The run's clock: its time estimated before generation starts, refined after the first batch, and
a progress bar that counts estimated seconds of work done (so its ETA is the estimate's)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from tqdm.auto import tqdm

from bayesdiff_ext.distributed import global_batches
from bayesdiff_ext.evaluation.sources import rows_of

__all__ = ["RunClock", "planned_images"]


def planned_images(sources, config, batches=None) -> dict[str, int]:
    """How many images each source will score over ``batches`` (ranges of indices; default the whole run)."""
    if batches is None:
        batches = global_batches(config.num_images, config.batch_size)
    return {source.name: sum(rows_of(source, config, b.start, b.stop).stop for b in batches) for source in sources}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class RunClock:
    """``rates``: seconds per image of each source (the cost measurement); ``planned``: images each
    source scores; ``extra_s``: work outside the sources (the sweep). ``start()`` states the estimate
    and opens the bar; ``done(...)`` after each source's batch; ``first_batch_done(...)`` replaces the
    rates by the first batch's own and states the refined estimate."""

    def __init__(self, rates: dict[str, float], planned: dict[str, int], extra_s: float, progress: bool) -> None:
        self.rates, self.planned, self.extra_s = dict(rates), dict(planned), extra_s
        self.progress = progress
        self.measured = {name: [0, 0.0] for name in planned}
        self.bar = None
        self.started = None

    def estimate(self) -> float:
        return sum(self.rates[name] * count for name, count in self.planned.items()) + self.extra_s

    def say(self, message: str) -> None:
        (tqdm.write if self.bar is not None else print)(message)

    def start(self, what: str) -> None:
        total = self.estimate()
        self.started = time.perf_counter()
        finish = datetime.now() + timedelta(seconds=total)
        print(
            f"estimated generation time: {_minutes(total)} (finishes ≈ {finish:%H:%M}), from timing every method "
            f"on {what}; refined after the first batch",
            flush=True,
        )
        self.bar = tqdm(
            total=round(total),
            desc="generation",
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s of estimated work [{elapsed}<{remaining}]",
            disable=not self.progress,
        )

    def done(self, name: str, images: int, seconds: float) -> None:
        count = self.measured.setdefault(name, [0, 0.0])
        count[0] += images
        count[1] += seconds
        if self.bar is not None:
            self.bar.update(round(images * self.rates.get(name, 0.0)))

    def first_batch_done(self, extra_s: float) -> None:
        """Rates from the first batch (real work, with replay); the remaining time from them."""
        for name, (images, seconds) in self.measured.items():
            if images:
                self.rates[name] = seconds / images
        remaining = sum(self.rates[name] * (self.planned[name] - self.measured[name][0]) for name in self.planned)
        elapsed = time.perf_counter() - self.started
        self.say(
            f"first batch: {_minutes(elapsed)} (sweep {_minutes(extra_s)}); remaining generation ≈ {_minutes(remaining)} "
            f"(finishes ≈ {datetime.now() + timedelta(seconds=remaining):%H:%M})"
        )
        if self.bar is not None:
            self.bar.n = round(elapsed)
            self.bar.total = round(elapsed + remaining)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
