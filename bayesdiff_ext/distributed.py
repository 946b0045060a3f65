"""Scale-out on torch.distributed: which images a process takes, results gathered, failures shared.

A run is a list of global image indices cut into batches of ``batch_size`` (:func:`global_batches`);
process r of W takes batches r, r + W, r + 2W, … (:func:`shard_batches`). Every random draw of an
image comes from (seed, its global index) (:mod:`bayesdiff_ext.randomness`) and every batch is the
same batch whatever W is, so the results of 1, 2 or N processes are identical, and a fit's
statistics are sums over images that one all-reduce combines (docs/MATH.md §13).

Processes are those of the initialised default process group (``torchrun``, ``accelerate launch``,
or your own ``torch.distributed.init_process_group``); without one, everything here is the
one-process case and makes no collective call. Each helper also takes ``state``: an object with
``process_index`` and ``num_processes`` (accelerate's ``PartialState`` or ``Accelerator``; accelerate
itself is not needed here), checked against the process group accelerate initialised.

Failures: every collective call here first exchanges a status (:func:`exchange_status`); a process
that fails inside :func:`failing_together` reports its error in that exchange, so every process
stops with :class:`RankFailed` naming it instead of waiting for it until the timeout. The helpers'
own messages travel on a gloo group (the default group when it has gloo for CPU tensors, e.g.
``init_process_group("cpu:gloo,cuda:nccl")``, else one made for them), so they need no GPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "RankFailed",
    "all_reduce_sum",
    "barrier",
    "broadcast",
    "exchange_status",
    "failing_together",
    "gather",
    "gather_by_index",
    "global_batches",
    "init_from_environment",
    "is_distributed",
    "is_main_process",
    "one_process",
    "rank_and_world",
    "report_failure",
    "shard_batches",
    "shard_indices",
]

#: How long a process waits for the others at one collective call before failing (seconds): the
#: longest a batch may take on the slowest process. ``BAYESDIFF_TIMEOUT_S`` overrides it.
DEFAULT_TIMEOUT_S = 1800.0


class RankFailed(RuntimeError):
    """Another process of the group failed; the message names it and its error."""


_ALONE = 0  # depth of the one_process() blocks being run


@contextlib.contextmanager
def one_process() -> Iterator[None]:
    """Run a block as if this process were the only one: inside it every helper here sees process 0
    of 1 and makes no collective call.

    For work every process repeats in full so that each holds the same result bit for bit, e.g. a
    posterior fitted on all the data (a fit in a process group otherwise sums the processes' shards,
    which equals one process's fit only to round-off).
    """
    global _ALONE
    _ALONE += 1
    try:
        yield
    finally:
        _ALONE -= 1


def rank_and_world(state: Any = None) -> tuple[int, int]:
    """(this process's rank, the number of processes).

    Args:
        state: None for the default torch.distributed group (or one process when none is
            initialised), or an object with ``process_index`` and ``num_processes`` (accelerate's
            ``PartialState``).

    Inside :func:`one_process`, (0, 1) whatever ``state`` says.
    """
    if _ALONE:
        return 0, 1
    if state is not None:
        rank, world = int(state.process_index), int(state.num_processes)
        if world > 1:
            if not _group_active():
                raise RuntimeError(
                    f"`state` has {world} processes but torch.distributed is not initialised (this module "
                    "works with accelerate's torch.distributed backends, not XLA)"
                )
            if (dist.get_rank(), dist.get_world_size()) != (rank, world):
                raise RuntimeError(
                    f"`state` says process {rank} of {world}, torch.distributed says "
                    f"{dist.get_rank()} of {dist.get_world_size()}"
                )
        return rank, world
    if _group_active():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed(state: Any = None) -> bool:
    """Whether more than one process takes part."""
    return rank_and_world(state)[1] > 1


def is_main_process(state: Any = None) -> bool:
    """Whether this is process 0, the one that writes files."""
    return rank_and_world(state)[0] == 0


def global_batches(num_items: int, batch_size: int) -> list[range]:
    """The run's batches of global indices: [0, B), [B, 2B), …, the last one shorter."""
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [range(first, min(first + batch_size, num_items)) for first in range(0, num_items, batch_size)]


def shard_batches(num_items: int, batch_size: int, state: Any = None) -> list[range]:
    """This process's batches: batches r, r + W, r + 2W, … of :func:`global_batches`.

    Every batch holds the same images whatever the number of processes W, so a batch's results are
    bit-identical to those of a single process with the same ``batch_size``.
    """
    rank, world = rank_and_world(state)
    return global_batches(num_items, batch_size)[rank::world]


def shard_indices(num_items: int, batch_size: int = 1, state: Any = None) -> list[int]:
    """This process's global indices, in order: those of :func:`shard_batches`."""
    return [index for batch in shard_batches(num_items, batch_size, state) for index in batch]


# ---------------------------------------------------------------------------------------- collectives
def exchange_status(error: BaseException | None = None, state: Any = None) -> None:
    """Tell every process whether this one failed, and learn the same of them.

    Raises:
        `RankFailed`: on a process that did not fail, when another one did (naming each failed
        process and its error). A failed process (``error`` given) returns, to re-raise its own.
    """
    rank, world = rank_and_world(state)
    if world == 1:
        return
    status = None if error is None else _one_line(error)
    statuses: list = [None] * world
    with _collective("exchange its status"):
        dist.all_gather_object(statuses, status, group=_control_group())
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None and r != rank]
    if failed and error is None:
        raise RankFailed("; ".join(f"process {r} of {world} failed: {s}" for r, s in failed))


@contextlib.contextmanager
def failing_together(state: Any = None) -> Iterator[None]:
    """Run a block whose failure the other processes must hear of.

    When the block raises, this process reports the error in one :func:`exchange_status` (which the
    others are waiting in, at their next collective call of this module) and re-raises it. A
    failure of the exchange itself (a process already gone) is left out: the original error is
    re-raised.
    """
    try:
        yield
    except BaseException as error:
        report_failure(error, state)
        raise


def report_failure(error: BaseException, state: Any = None) -> None:
    """Tell the other processes that this one failed with ``error`` (the :func:`failing_together` of a
    block that has already ended). An error is reported once, and a :class:`RankFailed` (learnt from
    the others) never; a failure of the exchange itself is left out."""
    if isinstance(error, RankFailed) or getattr(error, "_reported_to_group", False):
        return
    with contextlib.suppress(Exception):
        error._reported_to_group = True
    with contextlib.suppress(Exception):
        exchange_status(error, state)


def barrier(state: Any = None) -> None:
    """Wait for every process (an :func:`exchange_status`: a failed process ends the wait)."""
    exchange_status(None, state)


def broadcast(obj: Any, state: Any = None) -> Any:
    """Process 0's ``obj`` on every process (any picklable object)."""
    rank, world = rank_and_world(state)
    if world == 1:
        return obj
    exchange_status(None, state)
    box = [obj if rank == 0 else None]
    with _collective("receive process 0's message"):
        dist.broadcast_object_list(box, src=0, group=_control_group())
    return box[0]


def gather(obj: Any, state: Any = None) -> list | None:
    """Every process's ``obj`` on process 0, in rank order; None on the others.

    ``obj`` is pickled: move tensors to the CPU first (:func:`gather_by_index` does).
    """
    rank, world = rank_and_world(state)
    if world == 1:
        return [obj]
    exchange_status(None, state)
    received = [None] * world if rank == 0 else None
    with _collective("gather the results"):
        dist.gather_object(obj, received, dst=0, group=_control_group())
    return received


def gather_by_index(
    indices: Sequence[int], values: torch.Tensor | Mapping[str, torch.Tensor], state: Any = None
) -> torch.Tensor | dict[str, torch.Tensor] | None:
    """Per-image results of every process on process 0, in global index order.

    Args:
        indices (sequence of `int`): the global indices this process computed (e.g.
            :func:`shard_indices`); together the processes' indices must be distinct.
        values (`torch.Tensor` or mapping of them): this process's results, each of shape
            `(len(indices), ...)`.

    Returns:
        On process 0, the results of all processes ordered by index (`(total, ...)`, on the CPU, a
        dict when ``values`` is one); None on the others.
    """
    named = dict(values) if isinstance(values, Mapping) else {"": values}
    for name, tensor in named.items():
        if tensor.shape[0] != len(indices):
            raise ValueError(f"values{f'[{name!r}]' if name else ''} has {tensor.shape[0]} rows for {len(indices)} indices")
    parts = gather((list(map(int, indices)), {k: v.detach().cpu() for k, v in named.items()}), state)
    if parts is None:
        return None
    order = torch.tensor([i for part_indices, _ in parts for i in part_indices], dtype=torch.long)
    if len(set(order.tolist())) != len(order):
        raise ValueError("the processes' indices overlap: each image must be computed by one process")
    permutation = torch.argsort(order)
    merged = {k: torch.cat([part[k] for _, part in parts])[permutation] for k in named}
    return merged if isinstance(values, Mapping) else merged[""]


def all_reduce_sum(tensors: Sequence[torch.Tensor], state: Any = None) -> list[torch.Tensor]:
    """Element-wise sums over the processes of ``tensors``, in float64 on the CPU, one call for all.

    Returns:
        New float64 CPU tensors of the inputs' shapes (the inputs themselves in one process,
        converted).
    """
    tensors = [t.detach().to("cpu", torch.float64) for t in tensors]
    if not is_distributed(state):
        return tensors
    exchange_status(None, state)
    flat = torch.cat([t.flatten() for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)
    with _collective("sum the statistics"):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=_control_group())
    sizes = [t.numel() for t in tensors]
    return [part.reshape(t.shape) for part, t in zip(flat.split(sizes), tensors)]


# ---------------------------------------------------------------------------------------- launching
def init_from_environment(timeout_s: float | None = None) -> torch.device | None:
    """Join the process group ``torchrun`` (or ``accelerate launch``) describes in the environment.

    Does nothing when ``WORLD_SIZE`` is unset or 1, or a group is already initialised. The backend
    is gloo for CPU tensors and, when CUDA is available, NCCL for CUDA tensors
    (``"cpu:gloo,cuda:nccl"``); each process then uses the GPU ``LOCAL_RANK``.

    Args:
        timeout_s: how long a collective call waits (default ``BAYESDIFF_TIMEOUT_S`` or
            :data:`DEFAULT_TIMEOUT_S`).

    Returns:
        This process's CUDA device when it has one, else None.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _group_active():
        return None
    timeout = datetime.timedelta(seconds=_timeout_s() if timeout_s is None else timeout_s)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout)
        return device
    dist.init_process_group("gloo", timeout=timeout)
    return None


def _timeout_s() -> float:
    text = os.environ.get("BAYESDIFF_TIMEOUT_S")
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"BAYESDIFF_TIMEOUT_S must be a positive number of seconds, got {text!r}")
    return value


def _group_active() -> bool:
    return dist.is_available() and dist.is_initialized()


_CONTROL_GROUPS: dict[int, Any] = {}


def _control_group():
    """A group with gloo for the helpers' CPU messages: the default one when it has gloo."""
    default = dist.group.WORLD
    if "gloo" in str(dist.get_backend(default)):
        return default
    key = id(default)
    if key not in _CONTROL_GROUPS:
        _CONTROL_GROUPS.clear()
        _CONTROL_GROUPS[key] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=_timeout_s()))
    return _CONTROL_GROUPS[key]


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """A collective call: its failure (a process gone, the timeout) is a RankFailed on this process."""
    try:
        yield
    except RankFailed:
        raise
    except Exception as error:
        raise RankFailed(f"could not {what} with the other processes: {_one_line(error)}") from error


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
