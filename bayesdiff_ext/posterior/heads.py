"""Find a model's noise-prediction head, describe its geometry, and refuse heads whose output is not ε."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.modules.utils import _pair

SUPPORTED = (
    "a diffusers UNet2DModel or UNet2DConditionModel (head: conv_out), DiTTransformer2DModel (proj_out_2), "
    "PixArtTransformer2DModel, SD3Transformer2DModel or FluxTransformer2DModel (proj_out), a bare nn.Conv2d "
    "or nn.Linear head, or any model together with head=<its nn.Conv2d/nn.Linear output layer> whose output "
    "is the model's output"
)
# Transformers and their head: the top-level output layer (Flux's single blocks have a proj_out too).
TRANSFORMER_HEADS = {
    "DiTTransformer2DModel": "proj_out_2",  # proj_out_1 makes the AdaLN shift and scale
    "PixArtTransformer2DModel": "proj_out",
    "SD3Transformer2DModel": "proj_out",
    "FluxTransformer2DModel": "proj_out",
}


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """What a posterior needs to know about the head: its kind, shape, geometry and ε channels.

    For a conv head the weight is (out_channels, in_channels/groups, *kernel_size); for a Linear head
    it is (out_channels, in_channels) and the geometry fields keep their neutral values.
    ``eps_channels`` output channels are ε (all of them unless the head also predicts a variance):
    the leading ones, or for a patch transformer the rows ``eps_rows``; the posterior covers only
    their weights.
    """

    kind: str  # "conv2d" or "linear"
    in_channels: int
    out_channels: int
    eps_channels: int
    has_bias: bool
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    eps_rows: tuple[int, ...] | None = None  # the ε outputs when they are not the leading ones

    @property
    def is_conv(self) -> bool:
        return self.kind == "conv2d"

    @property
    def eps_weight_shape(self) -> tuple[int, ...]:
        if self.is_conv:
            return (self.eps_channels, self.in_channels // self.groups, *self.kernel_size)
        return (self.eps_channels, self.in_channels)

    @property
    def taps(self) -> int:
        """Weights per output channel: D = C_in/groups·kh·kw (docs/MATH.md §1.1), or in_features."""
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    @property
    def num_params(self) -> int:
        """Parameters of the posterior: the ε channels' weights and biases."""
        return self.eps_channels * (self.taps + int(self.has_bias))

    @property
    def geometry(self) -> dict:
        """Keyword arguments of the conv ops (stride, padding, dilation) for this head."""
        return {"stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation)}

    def describe(self) -> dict:
        return dataclasses.asdict(self)

    def shape_text(self) -> str:
        if self.is_conv:
            return (
                f"Conv2d({self.in_channels}->{self.out_channels}, kernel={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.has_bias}, "
                f"eps_channels={self.eps_channels})"
            )
        return (
            f"Linear({self.in_channels}->{self.out_channels}, bias={self.has_bias}, eps_channels={self.eps_channels})"
        )

    @classmethod
    def from_description(cls, d: dict) -> HeadSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
        return cls(**values)


def locate_head(model: nn.Module, head: nn.Module | None = None) -> nn.Module:
    """The head of ``model``: ``head`` when given, the model itself if it is a Conv2d/Linear, or
    ``conv_out`` of a diffusers UNet after checking that nothing post-processes its output."""
    if head is not None:
        if not any(m is head for m in model.modules()):
            raise ValueError(f"head={type(head).__name__} is not a submodule of the model {type(model).__name__}")
        _check_head_type(head)
        return head
    if isinstance(model, (nn.Conv2d, nn.Linear)):
        _check_head_type(model)
        return model
    name = type(model).__name__
    if name in TRANSFORMER_HEADS:
        head = getattr(model, TRANSFORMER_HEADS[name])
        _check_head_type(head)
        return head
    if name == "UNet2DModel":
        _check_unet2d_output_is_head(model)
    elif name != "UNet2DConditionModel":
        raise ValueError(f"cannot locate the noise-prediction head of a {name}; supported: {SUPPORTED}")
    _check_head_type(model.conv_out)
    return model.conv_out


def _check_unet2d_output_is_head(unet: nn.Module) -> None:
    if unet.config.time_embedding_type == "fourier":
        raise ValueError(
            "UNet2DModel with time_embedding_type='fourier' divides conv_out's output by the noise level, "
            "so its output is not the head's output and the head posterior does not describe ε; "
            f"supported: {SUPPORTED}"
        )
    skip_blocks = [type(b).__name__ for b in unet.up_blocks if hasattr(b, "skip_conv")]
    if skip_blocks:
        raise ValueError(
            f"UNet2DModel with skip up-blocks ({', '.join(skip_blocks)}) adds a skip_sample to conv_out's "
            f"output, so ε is not the head's output; supported: {SUPPORTED}"
        )


def _check_head_type(head: nn.Module) -> None:
    if isinstance(head, nn.Conv2d):
        if head.padding_mode != "zeros":
            raise ValueError(f"head Conv2d uses padding_mode={head.padding_mode!r}; only 'zeros' is supported")
        if isinstance(head.padding, str) and head.padding == "same" and _same_is_asymmetric(head):
            raise ValueError("head Conv2d uses padding='same' with an even dilated kernel (asymmetric padding)")
        return
    if isinstance(head, nn.Linear):
        return
    raise ValueError(f"the head must be an nn.Conv2d or nn.Linear, got {type(head).__name__}")


def _same_is_asymmetric(conv: nn.Conv2d) -> bool:
    return any(d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation))


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return _pair(conv.padding)


def output_channels(head: nn.Module) -> int:
    """The outputs of a Conv2d (out_channels) or Linear (out_features) head."""
    return head.out_channels if isinstance(head, nn.Conv2d) else head.out_features


def default_eps_channels(model: nn.Module, head: nn.Module) -> int:
    """ε channels: half the head's outputs for a diffusers UNet that also predicts a variance
    (out_channels = 2·in_channels, "learned"/"learned_range" variance), otherwise all of them."""
    out = output_channels(head)
    config = getattr(model, "config", None)
    in_channels = getattr(config, "in_channels", None) if config is not None else None
    if head is getattr(model, "conv_out", None) and in_channels is not None and out == 2 * in_channels:
        return in_channels
    return out


def resolve_head(
    model: nn.Module, head: nn.Module | None = None, eps_channels: int | None = None
) -> tuple[nn.Module, HeadSpec]:
    """The head of ``model`` (:func:`locate_head`) and its spec, with the default ε channels
    (:func:`default_eps_channels`) unless ``eps_channels`` is given."""
    found = locate_head(model, head)
    if eps_channels is None:
        eps_channels = default_eps_channels(model, found)
    return found, head_spec(found, eps_channels)


def head_spec(head: nn.Module, eps_channels: int, eps_rows: tuple[int, ...] | None = None) -> HeadSpec:
    """The spec of ``head`` with ``eps_channels`` ε outputs: the leading ones, or the rows ``eps_rows``."""
    out = output_channels(head)
    if eps_rows is not None:
        eps_rows = tuple(int(r) for r in eps_rows)
        if not isinstance(head, nn.Linear) or len(eps_rows) != eps_channels or not all(0 <= r < out for r in eps_rows):
            raise ValueError(
                f"eps_rows must be {eps_channels} distinct rows of a Linear head with {out} outputs, got {eps_rows}"
            )
    if not 0 < eps_channels <= out:
        raise ValueError(f"eps_channels must be in 1..{out} (the head's outputs), got {eps_channels}")
    if isinstance(head, nn.Conv2d):
        if head.groups > 1 and eps_channels != out:
            raise ValueError(
                f"a grouped head (groups={head.groups}) is supported only with all {out} outputs as ε, "
                f"got eps_channels={eps_channels}"
            )
        return HeadSpec(
            kind="conv2d",
            in_channels=head.in_channels,
            out_channels=out,
            eps_channels=eps_channels,
            has_bias=head.bias is not None,
            kernel_size=_pair(head.kernel_size),
            stride=_pair(head.stride),
            padding=_conv_padding(head),
            dilation=_pair(head.dilation),
            groups=head.groups,
        )
    return HeadSpec(
        kind="linear",
        in_channels=head.in_features,
        out_channels=out,
        eps_channels=eps_channels,
        has_bias=head.bias is not None,
        eps_rows=eps_rows,
    )


def eps_parameters(head: nn.Module, spec: HeadSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """θ_MAP restricted to the ε outputs: (weight[:C_eps], bias[:C_eps]) as detached views, or the
    rows ``spec.eps_rows`` (copies)."""
    rows = slice(spec.eps_channels) if spec.eps_rows is None else list(spec.eps_rows)
    weight = head.weight.detach()[rows]
    bias = None if head.bias is None else head.bias.detach()[rows]
    return weight, bias


def head_of_copy(model: nn.Module, original: nn.Module, head: nn.Module, spec: HeadSpec) -> nn.Module:
    """``head`` (a module of ``original``) in ``model``: itself when it is a module of ``model``, else
    the module at its path in ``original`` (``model`` being a ``copy.deepcopy`` of ``original``, or one
    moved to another device or dtype), checked for kind, shape and weights (equal after casting
    ``head``'s to its dtype and device). ValueError saying what to do otherwise."""
    if any(m is head for m in model.modules()):
        return head
    path = next(name for name, m in original.named_modules() if m is head)
    where = f"`{path}`" if path else "the model itself"
    try:
        found = model.get_submodule(path)
    except AttributeError:
        found = None
    remedy = (
        "fit a posterior for this model, or load a saved one onto it with "
        "bayesdiff_ext.posterior.load_posterior(file, model) (which warns when the weights differ)"
    )
    kind = type(head).__name__
    if type(found) is not type(head):
        raise ValueError(
            f"the posterior's head is {where} ({kind}) of another model, and this {type(model).__name__} has "
            f"no {kind} there: {remedy}"
        )
    found_spec = head_spec(found, spec.eps_channels, spec.eps_rows)
    if found_spec != spec:
        raise ValueError(
            f"the posterior is for the head {spec.shape_text()}, but {where} of this {type(model).__name__} is "
            f"{found_spec.shape_text()}: {remedy}"
        )
    if not all(_cast_equal(mine, theirs) for mine, theirs in zip(head.parameters(), found.parameters())):
        raise ValueError(
            f"{where} of this {type(model).__name__} has other weights than the head the posterior was fitted "
            f"at (a copy cast to another dtype or device is fine, a changed one is not): {remedy}"
        )
    return found


def _cast_equal(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    return mine.shape == theirs.shape and torch.equal(mine.detach().to(theirs), theirs.detach())
