"""Record the input φ of a model's head on every forward, without modifying the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class HeadInputCapture:
    """What a capture saw: ``phi`` is the head input of the latest forward, ``calls`` counts them.

    ``phi`` is the tensor the head received (not a copy, not detached), so under ``torch.no_grad``
    it costs nothing and with autograd on, gradients can flow through a variance computed from it.
    """

    def __init__(self) -> None:
        self.phi: torch.Tensor | None = None
        self.calls = 0

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            phi = args[0]
        elif "input" in kwargs:
            phi = kwargs["input"]
        else:
            raise RuntimeError(f"{type(module).__name__} head was called without an input tensor to capture")
        self.phi = phi
        self.calls += 1


@contextlib.contextmanager
def capture_head_input(head: nn.Module) -> Iterator[HeadInputCapture]:
    """Context manager: inside it every forward through ``head`` records its input in ``cap.phi``.

    A forward *pre*-hook is used, so φ is recorded even when the head's own output is later
    discarded or post-processed. The hook is removed on exit, also when the body raises.
    """
    cap = HeadInputCapture()
    handle = head.register_forward_pre_hook(cap._record, with_kwargs=True)
    try:
        yield cap
    finally:
        handle.remove()
