"""Isotropic posterior Σ = λ⁻¹·I, λ = s·h̄ + δ with h̄ the mean diagonal curvature.

The "Hessian-free" baseline of the student reproduction: the posterior keeps one number of the
curvature (its trace), so var[c,p] = (‖φ_p‖² + 1)/λ has no per-weight structure at all.
"""

from __future__ import annotations

import torch

from bayesdiff_ext.posterior import head_ops
from bayesdiff_ext.posterior.diag import DiagPosterior
from bayesdiff_ext.posterior.heads import HeadSpec
from bayesdiff_ext.posterior.structure import OpInputs, PosteriorStructure


class IsotropicPosterior(PosteriorStructure):
    name = "isotropic"
    curvatures = ("ggn", "ef")

    def __init__(self, spec: HeadSpec, mean_curvature: float | torch.Tensor):
        super().__init__(spec)
        self.mean_curvature = torch.as_tensor(mean_curvature, dtype=torch.float64).reshape(())

    @classmethod
    def from_diag(cls, diag: DiagPosterior) -> IsotropicPosterior:
        values, counts = diag.spectrum()
        return cls(diag.spec, (values * counts).sum() / counts.sum())

    def spectrum(self):
        return self.mean_curvature.reshape(1), torch.tensor([float(self.spec.num_params)], dtype=torch.float64)

    def op_inputs(self, s, delta) -> OpInputs:
        variance = 1.0 / (s * self.mean_curvature + delta)
        bias_var = variance.repeat(self.spec.eps_channels) if self.spec.has_bias else None
        return {"weight_var": variance.repeat(self.spec.eps_weight_shape), "bias_var": bias_var}

    def predict_with(self, phi, weight, bias, inputs):
        return head_ops.mean_and_diag_var(self.spec, phi, weight, bias, inputs["weight_var"], inputs["bias_var"])

    def tensors(self):
        return {"mean_curvature": self.mean_curvature}

    @classmethod
    def from_tensors(cls, spec, tensors):
        return cls(spec, tensors["mean_curvature"])
