"""Run a list of image batches over the processes of a group, keeping every finished batch.

The run is :func:`~bayesdiff_ext.distributed.global_batches` of ``num_images``; each batch is a call
``sample_batch(indices)`` whose random draws follow the images' global indices. Process r takes the
r-th batch of each round of W; after each round, process 0 gathers the round's results and keeps
them in the work folder (:mod:`bayesdiff_ext.io.work_folder`), so a run killed at any moment loses
at most the round in flight and a resumed run computes only the missing batches. The results are
those of one process, batch by batch, whatever the number of processes or the interruptions.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bayesdiff_ext.distributed import broadcast, failing_together, gather, global_batches, rank_and_world
from bayesdiff_ext.io.work_folder import WorkFolder, as_json

__all__ = ["BatchResult", "run_batches"]


class BatchResult(types.SimpleNamespace):
    """A batch's outputs as the caller reads them: each tensor an attribute (``images``, ``variance``,
    …), beside ``settings`` and ``timings`` as JSON gives them back, so they are the same whether
    the batch was just sampled or read from the work folder."""

    @classmethod
    def build(cls, tensors: dict[str, torch.Tensor], meta: dict) -> BatchResult:
        return cls(**tensors, settings=meta["settings"], timings=meta["timings"])


def _portable(output: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """A sampler output's tensor attributes on the CPU, and its settings and timings."""
    tensors = {name: value.detach().cpu() for name, value in vars(output).items() if isinstance(value, torch.Tensor)}
    meta = {"settings": as_json(getattr(output, "settings", {})), "timings": as_json(getattr(output, "timings", {}))}
    return tensors, meta


def run_batches(
    sample_batch: Callable[[range], Any],
    num_images: int,
    batch_size: int,
    work: WorkFolder | None = None,
    state: Any = None,
) -> list[BatchResult] | None:
    """Every batch of the run, computed or read back from ``work``.

    Args:
        sample_batch: computes one batch from its global indices (a ``range``); returns an object whose
            tensor attributes (``images``, ``variance``, …) have one row per image, with ``settings``
            and ``timings`` dicts (a ``BayesDiffOutput``).
        num_images, batch_size: the run.
        work: process 0's work folder (None: nothing kept; other processes pass None).
        state: the processes (see :mod:`bayesdiff_ext.distributed`).

    Returns:
        On process 0, one :class:`BatchResult` per batch in order; None on the others.
    """
    batches = global_batches(num_images, batch_size)
    rank, world = rank_and_world(state)
    done = set(broadcast(work.finished() if work is not None else [], state))
    pending = [number for number in range(len(batches)) if number not in done]
    kept: dict[int, BatchResult] = {}
    for first in range(0, len(pending), world):
        round_numbers: Sequence[int] = pending[first : first + world]
        number = round_numbers[rank] if rank < len(round_numbers) else None
        with failing_together(state):
            result = None if number is None else _portable(sample_batch(batches[number]))
        received = gather((number, result), state)
        with failing_together(state):
            for number, result in received or ():
                if number is None:
                    continue
                if work is not None:
                    work.save_batch(number, *result)
                kept[number] = BatchResult.build(*result)
    if rank != 0:
        return None
    for number in done:
        kept[number] = BatchResult.build(*work.load_batch(number))
    return [kept[number] for number in range(len(batches))]
