"""Record the input φ of a model's head on every forward, without modifying the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from bayesdiff_ext.denoiser import Denoiser


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


class TokenGridCapture(HeadInputCapture):
    """A capture whose ``phi`` is a patch transformer's head input on its token grid, (B, h, w, D).

    The grid (h, w) is read from the model's input at each forward (a pre-hook on the model), so
    non-square inputs unpatchify as the model unpatchifies them.
    """

    def __init__(self, layout) -> None:
        super().__init__()
        self.layout = layout
        self.grid: tuple[int, int] | None = None

    def _record_input(self, module: nn.Module, args: tuple, kwargs: dict, sample_argument: str) -> None:
        sample = args[0] if args else kwargs[sample_argument]
        self.grid = self.layout.grid(sample.shape)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        super()._record(module, args, kwargs)
        if self.grid is None:
            raise RuntimeError(
                "the head of a patch transformer was called outside the model's forward: its token grid is unknown"
            )
        self.phi = self.phi.unflatten(1, self.grid)


@contextlib.contextmanager
def capture_token_grid(model: nn.Module, head: nn.Module, layout) -> Iterator[TokenGridCapture]:
    """:func:`capture_head_input` for a patch transformer's head: ``cap.phi`` is (B, h, w, D)."""
    cap = TokenGridCapture(layout)
    sample_argument = Denoiser(model).sample_argument
    handles = [
        model.register_forward_pre_hook(
            lambda module, args, kwargs: cap._record_input(module, args, kwargs, sample_argument), with_kwargs=True
        ),
        head.register_forward_pre_hook(cap._record, with_kwargs=True),
    ]
    try:
        yield cap
    finally:
        for handle in handles:
            handle.remove()
