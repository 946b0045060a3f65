"""Full GGN posterior: Σ = I_C ⊗ (s·A_aug + δ·I)⁻¹, exact for a Gaussian likelihood (docs/MATH.md §1.1).

With A_aug = Q·diag(a)·Qᵀ, var[c,p] = Σ_r (Q[:, r]·[φ_p; 1])² / (s·a_r + δ): the factored op with
proj = Qᵀ (its last row as the projection bias) and mix[c, r] = 1/(s·a_r + δ). One eigendecomposition
of the (D+1)×(D+1) Gram matrix serves every (s, δ).
"""

from __future__ import annotations

import torch

from bayesdiff_ext.posterior import head_ops
from bayesdiff_ext.posterior.heads import HeadSpec
from bayesdiff_ext.posterior.structure import FactoredPosterior, OpInputs, PosteriorStructure


def require_ungrouped(spec: HeadSpec, structure: str) -> None:
    if spec.groups != 1:
        raise ValueError(f"structure {structure!r} needs an ungrouped head (groups=1), got groups={spec.groups}")


class GramCurvature:
    """Accumulates A_aug = Σ_{n,p} [φ_p; 1][φ_p; 1]ᵀ (bias row/column last), in float64.

    ``build(spec, gram)`` turns the finished Gram matrix into a posterior structure.
    """

    def __init__(self, spec: HeadSpec, structure: str, build):
        require_ungrouped(spec, structure)
        self.spec, self.build = spec, build
        self.gram = torch.zeros(spec.taps + 1, spec.taps + 1, dtype=torch.float64)

    def update(self, phi: torch.Tensor, residual: torch.Tensor) -> None:
        self.gram += head_ops.patch_gram(self.spec, phi).to("cpu", torch.float64)

    def finish(self) -> PosteriorStructure:
        return self.build(self.spec, self.gram)


class FullPosterior(FactoredPosterior):
    name = "full"
    curvatures = ("ggn",)

    def __init__(self, spec: HeadSpec, gram: torch.Tensor):
        super().__init__(spec)
        require_ungrouped(spec, "full")
        size = spec.taps + int(spec.has_bias)
        if tuple(gram.shape) != (size, size):
            raise ValueError(f"the Gram matrix of this head must be ({size}, {size}), got {tuple(gram.shape)}")
        self.gram = gram.to(torch.float64)
        eigenvalues, self.eigenvectors = torch.linalg.eigh(self.gram)
        # A Gram matrix is PSD; round-off below zero would let s·a + δ approach 0 for tiny δ.
        self.eigenvalues = eigenvalues.clamp_min(0.0)

    def spectrum(self):
        counts = torch.full_like(self.eigenvalues, float(self.spec.eps_channels))
        return self.eigenvalues, counts

    def op_inputs(self, s, delta) -> OpInputs:
        projection = self.eigenvectors.T  # (R, D[+1])
        mix = (1.0 / (s * self.eigenvalues + delta)).expand(self.spec.eps_channels, -1).contiguous()
        taps = self.spec.taps
        proj_bias = projection[:, taps].contiguous() if self.spec.has_bias else None
        return {"proj_weight": projection[:, :taps].contiguous(), "proj_bias": proj_bias, "mix": mix, "bias_var": None}

    def tensors(self):
        return {"gram": self.gram}

    @classmethod
    def from_tensors(cls, spec, tensors):
        return cls(spec, tensors["gram"])

    @classmethod
    def from_augmented_gram(cls, spec: HeadSpec, gram: torch.Tensor) -> FullPosterior:
        """From the accumulated A_aug; a head without bias keeps only its D×D patch block."""
        return cls(spec, gram if spec.has_bias else gram[:-1, :-1])
