"""The interface every posterior structure (diag, full, kron, isotropic) implements."""

from __future__ import annotations

import abc
import copy
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
        return self.predict_with(phi, weight, bias, self.prepared_inputs(s, delta, phi.device, dtype))

    def prepared_inputs(self, s: float, delta: float, device: torch.device, dtype: torch.dtype) -> OpInputs:
        """The op inputs for (s, δ) on ``device`` in ``dtype``, cached for the next call."""
        key = (float(s), float(delta), torch.device(device), dtype)
        if key != self._cache_key:
            inputs = self.op_inputs(s, delta)
            self._cache = {k: None if v is None else v.to(device, dtype) for k, v in inputs.items()}
            self._cache_key = key
        return self._cache

    def to(self, device: torch.device | str) -> PosteriorStructure:
        """A copy with the curvature on ``device``, still float64: the curvature is a sum over the
        whole fit, and the variances computed from it span many decades.

        Every tensor the structure holds moves (directly, or in lists and tuples); caches keyed by
        device stay valid and are kept.
        """
        moved = copy.copy(self)
        for name, value in vars(self).items():
            setattr(moved, name, _on_device(value, device))
        moved._cache_key, moved._cache = None, {}
        return moved


def _on_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        items = [_on_device(item, device) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


class FactoredPosterior(PosteriorStructure):
    """A structure predicted through the project–square–mix op (full, kron; docs/MATH.md §1.1): its
    ``op_inputs`` are ``proj_weight``, ``proj_bias``, ``mix`` and ``bias_var``."""

    def predict_with(self, phi, weight, bias, inputs):
        mean = head_ops.head_mean(self.spec, phi, weight, bias)
        var = head_ops.factored_var(
            self.spec, phi, inputs["proj_weight"], inputs["proj_bias"], inputs["mix"], inputs["bias_var"]
        )
        return mean, var
