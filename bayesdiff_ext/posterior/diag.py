"""Diagonal posterior: Σ = diag(1/(s·h + δ)), predicted with one fused conv of φ² (docs/MATH.md §1.1)."""

from __future__ import annotations

import torch

from bayesdiff_ext.posterior import head_ops
from bayesdiff_ext.posterior.heads import HeadSpec
from bayesdiff_ext.posterior.structure import OpInputs, PosteriorStructure


class DiagCurvature:
    """Accumulates the diagonal GGN or EF of ½‖f − y‖² over the ε weights and biases, in float64.

    ``scale`` multiplies the result: 2 reproduces laplace-torch's EF convention (BayesDiff's code).
    """

    def __init__(self, spec: HeadSpec, kind: str, scale: float = 1.0):
        if kind not in ("ggn", "ef"):
            raise ValueError(f"diagonal curvature must be 'ggn' or 'ef', got {kind!r}")
        self.spec, self.kind, self.scale = spec, kind, scale
        self.weight = torch.zeros(spec.eps_weight_shape, dtype=torch.float64)
        self.bias = torch.zeros(spec.eps_channels, dtype=torch.float64)

    def update(self, phi: torch.Tensor, residual: torch.Tensor) -> None:
        if self.kind == "ggn":
            self.weight += head_ops.diag_ggn(self.spec, phi).to("cpu", torch.float64)
            self.bias += head_ops.output_positions(self.spec, phi)
        else:
            weight_ef, bias_ef = head_ops.diag_ef(self.spec, phi, residual)
            self.weight += weight_ef.to("cpu", torch.float64)
            self.bias += bias_ef.to("cpu", torch.float64)

    def finish(self) -> DiagPosterior:
        bias = self.bias * self.scale if self.spec.has_bias else None
        return DiagPosterior(self.spec, self.weight * self.scale, bias)


class DiagPosterior(PosteriorStructure):
    name = "diag"
    curvatures = ("ggn", "ef", "ef_bayesdiff")

    def __init__(self, spec: HeadSpec, h_weight: torch.Tensor, h_bias: torch.Tensor | None):
        super().__init__(spec)
        if tuple(h_weight.shape) != spec.eps_weight_shape:
            raise ValueError(
                f"diag curvature of the weight must be {spec.eps_weight_shape}, got {tuple(h_weight.shape)}"
            )
        if spec.has_bias and (h_bias is None or tuple(h_bias.shape) != (spec.eps_channels,)):
            raise ValueError(f"diag curvature of the bias must be ({spec.eps_channels},), got {h_bias}")
        self.h_weight = h_weight.to(torch.float64)
        self.h_bias = None if h_bias is None else h_bias.to(torch.float64)

    def spectrum(self):
        values = self.h_weight.flatten()
        if self.h_bias is not None:
            values = torch.cat([values, self.h_bias])
        return values, torch.ones_like(values)

    def op_inputs(self, s, delta) -> OpInputs:
        bias_var = None if self.h_bias is None else 1.0 / (s * self.h_bias + delta)
        return {"weight_var": 1.0 / (s * self.h_weight + delta), "bias_var": bias_var}

    def predict_with(self, phi, weight, bias, inputs):
        return head_ops.mean_and_diag_var(self.spec, phi, weight, bias, inputs["weight_var"], inputs["bias_var"])

    def tensors(self):
        out = {"h_weight": self.h_weight}
        if self.h_bias is not None:
            out["h_bias"] = self.h_bias
        return out

    @classmethod
    def from_tensors(cls, spec, tensors):
        return cls(spec, tensors["h_weight"], tensors.get("h_bias"))
