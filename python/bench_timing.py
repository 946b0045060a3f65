"""Timing helpers shared by the benchmarks: medians over repeats, after warm-up."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

from bayesdiff_ext.io.atomic import atomic_write


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the `## name` section of a markdown file, leaving the others alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nMeasured numbers; each section is written by its script.\n"
    heading = f"## {name}"
    section = f"{heading}\n\n{body.strip()}\n"
    start = text.find(heading + "\n")
    if start == -1:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if end == -1 else text[end:])
    atomic_write(path, text)
