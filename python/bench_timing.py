"""Timing helpers shared by the benchmarks: medians over repeats, after warm-up."""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Hashable, Sequence

import torch

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


class Medians(dict):
    """``interleaved_medians``' result: the medians; every kept round's seconds, in round order
    (``rounds``, same keys), for ratios within a round; and how many rounds were timed again because
    other processes used the CPU during them (``disturbed``)."""

    disturbed: int = 0
    rounds: dict


def _cpu_ticks() -> tuple[int, int] | None:
    """Busy clock ticks of the whole machine and of this process so far (Linux /proc), else None."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:]]
        with open("/proc/self/stat") as own:
            fields = own.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(ticks) - ticks[3] - ticks[4], int(fields[11]) + int(fields[12])  # less idle, iowait; utime + stime


def _others_share(before: tuple[int, int] | None, seconds: float) -> float:
    """The share of one CPU's time that other processes used since ``before`` (0 without /proc)."""
    after = _cpu_ticks()
    if before is None or after is None:
        return 0.0
    others = (after[0] - before[0]) - (after[1] - before[1])
    return others / (seconds * os.sysconf("SC_CLK_TCK"))


def interleaved_medians(
    fns: dict[Hashable, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    threads: Sequence[int] | None = None,
    before: Callable[[], object] | None = None,
    max_others: float | None = None,
) -> Medians:
    """Median seconds of each function, timed in rounds: one call of each per round, and with
    ``threads`` one call of each at every thread count per round. A change of load on a shared
    machine then falls on every candidate alike, so ratios within a round stay fair. Each round
    calls them in a new random order (seeded), so that every candidate follows every other equally
    often on average (a memory-bound candidate is faster after one that left its inputs in cache,
    slower after one that evicted them or freed memory it must fault in again).

    ``before``, when given, runs untimed before every timed call (e.g. to put the inputs in a known
    cache state). ``max_others``, when given, drops a round (every candidate's time in it) in which
    other processes used more than that share of one CPU, and times another in its place, up to
    2·``repeats`` of them (a process that starts during the run is not paused by a caller that paused
    the others: its round would time a candidate on a shared core, and a candidate that synchronises
    its threads more often loses more; the CPU time comes in clock ticks, 10 ms, so rounds should last
    ≥ 0.5 s). Returns ``{name: seconds}``, or ``{(threads, name): seconds}``
    when ``threads`` is given, with ``disturbed`` = the number of rounds dropped.
    """
    counts = list(threads) if threads is not None else [None]
    keys = [(n, name) for n in counts for name in fns]
    for n, name in keys:
        if n is not None:
            torch.set_num_threads(n)
        for _ in range(warmup):
            fns[name]()
    times = {key: [] for key in keys}
    order = random.Random(0)
    disturbed = 0
    kept = 0
    while kept < repeats:
        ticks, round_start = _cpu_ticks(), time.perf_counter()
        round_times = {}
        # A fresh order each round: a rotation would keep each candidate behind the same one (the
        # one whose temporaries evicted its inputs, or whose freed memory it must fault in again).
        for n, name in order.sample(keys, len(keys)):
            if n is not None:
                torch.set_num_threads(n)
            if before is not None:
                before()
            start = time.perf_counter()
            fns[name]()
            round_times[(n, name)] = time.perf_counter() - start
        share = _others_share(ticks, time.perf_counter() - round_start)
        if max_others is not None and share > max_others and disturbed < 2 * repeats:
            disturbed += 1
            continue
        kept += 1
        for key, seconds in round_times.items():
            times[key].append(seconds)
    medians = {key: statistics.median(t) for key, t in times.items()}
    result = Medians(medians if threads is not None else {name: medians[(None, name)] for name in fns})
    result.disturbed = disturbed
    result.rounds = times if threads is not None else {name: times[(None, name)] for name in fns}
    return result


def resident_mib() -> float:
    """This process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rise_mib(fn: Callable[[], object]) -> float:
    """The peak rise of the resident set over its level before ``fn()``, sampled every 0.2 ms
    while ``fn`` runs once. Meaningful for a first call in a fresh process (later calls reuse
    memory the allocator keeps), so the scripts measure it in a child process per method."""
    baseline = peak = resident_mib()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_mib())
            time.sleep(2e-4)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak, resident_mib()) - baseline


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, as a table caption wants them."""
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the `## name` section of a markdown file, leaving the others alone."""
    header = "# Benchmarks\n\nMeasured numbers; each section is written by its script.\n"
    text = path.read_text() if path.exists() else header
    heading = f"## {name}"
    section = f"{heading}\n\n{body.strip()}\n"
    start = text.find(heading + "\n")
    if start == -1:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if end == -1 else text[end:])
    atomic_write(path, text)


def verdict(met: bool) -> str:
    """A target's outcome as every benchmark table prints it."""
    return "met" if met else "**missed**"


def thread_scaling(times: dict, threads: list[int], keys) -> list[str]:
    """Each candidate's time at the fewest threads over its time at the most (``times`` keyed (threads, key))."""
    lo, hi = threads[0], threads[-1]
    return [f"{times[(lo, k)] / times[(hi, k)]:.2f}×" for k in keys]


def add_paused_flag(parser) -> None:
    """`--others-paused`: the run was made with every other compute process of the machine paused."""
    parser.add_argument(
        "--others-paused",
        action="store_true",
        help="say in the section that every other compute process was paused (SIGSTOP) during the run",
    )


def paused_note(args) -> str:
    if not args.others_paused:
        return ""
    return " Every other compute process on the machine was paused (SIGSTOP) for the run."
