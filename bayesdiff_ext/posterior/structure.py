"""The interface every posterior structure (diag, full, kron, isotropic) implements."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from bayesdiff_ext.numerics import accumulation_dtype
from bayesdiff_ext.posterior import head_ops
from bayesdiff_ext.posterior.heads import HeadSpec

OpInputs = dict[str, torch.Tensor | None]


class PosteriorStructure(abc.ABC):
    """A Gaussian posterior N(θ_MAP, Σ) over the ε weights of a head, Σ = (s·H + δ·I)⁻¹.

    A structure holds the fitted curvature H (without s = 1/(σ²·T) or δ, so the hyperparameters
    can change after fitting), turns (s, δ) into the inputs of a fused op, and predicts through it.
    The op inputs of the latest (s, δ, device, dtype) are cached: the sampler calls predict with
    the same hyperparameters at every step.
    """

    name: ClassVar[str]
    #: The curvatures it can be fitted with (``LastLayerLaplace``'s ``curvature``).
    curvatures: ClassVar[tuple[str, ...]]

    def __init__(self, spec: HeadSpec):
        self.spec = spec
        self._cache_key: tuple | None = None
        self._cache: OpInputs = {}

    @abc.abstractmethod
    def spectrum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues of H over the posterior's parameters and their multiplicities (float64),
        for the evidence: log det(s·H + δ) = Σ count·log(s·value + δ)."""

    @abc.abstractmethod
    def op_inputs(self, s: float, delta: float) -> OpInputs:
        """The fused op's posterior inputs for these hyperparameters, float64 on the CPU."""

    @abc.abstractmethod
    def predict_with(
        self, phi: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, inputs: OpInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) of the ε channels at φ given op inputs already on φ's device."""

    @abc.abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The curvature, for saving; ``from_tensors`` inverts it."""

    @classmethod
    @abc.abstractmethod
    def from_tensors(cls, spec: HeadSpec, tensors: dict[str, torch.Tensor]) -> PosteriorStructure: ...

    def predict(self, phi, weight, bias, s: float, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = accumulation_dtype(phi)
        # The ops take their parameters in φ's dtype; posterior variances span many decades (float16
        # would flush small ones to zero), so 16-bit φ is computed in float32. No-op otherwise.
        phi, weight = phi.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        key = (float(s), float(delta), phi.device, dtype)
        if key != self._cache_key:
            inputs = self.op_inputs(s, delta)
            self._cache = {k: None if v is None else v.to(phi.device, dtype) for k, v in inputs.items()}
            self._cache_key = key
        return self.predict_with(phi, weight, bias, self._cache)


class FactoredPosterior(PosteriorStructure):
    """A structure predicted through the project–square–mix op (full, kron; docs/MATH.md §1.1): its
    ``op_inputs`` are ``proj_weight``, ``proj_bias``, ``mix`` and ``bias_var``."""

    def predict_with(self, phi, weight, bias, inputs):
        mean = head_ops.head_mean(self.spec, phi, weight, bias)
        var = head_ops.factored_var(
            self.spec, phi, inputs["proj_weight"], inputs["proj_bias"], inputs["mix"], inputs["bias_var"]
        )
        return mean, var
