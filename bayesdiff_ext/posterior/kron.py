"""KFAC posterior as laplace-torch forms it: H ≈ G ⊗ A for the weight, G_b for the bias (docs/MATH.md §1.1).

With eig(G) = (Q_G, g), eig(A) = (Q_A, a), eig(G_b) = (Q_b, g_b) and laplace-torch's default
undamped inverse of s·H + δ (``laplace_convert.factored_from_kron`` builds the op inputs):

    var[c,p] = Σ_j mix[c,j]·(q_{A,j}·φ_p)² + bias_var[c],
    mix[c,j] = Σ_i Q_G[c,i]² / (s·g_i·a_j + δ),   bias_var[c] = Σ_i Q_b[c,i]² / (s·g_b,i + δ).

Fitting. For the GGN, laplace-torch's factors (CurvlinopsGGN) are closed forms of the patch Gram
matrix A_aug (``curvature_layout.laplace_kron_factors``): G = √2·N·P·I, A = A_D/(√2·N·P),
G_b = N·P·I, so they come from the fused accumulator without unfolding a batch. The KFAC of the
empirical Fisher has no such form: it is fitted by laplace-torch's ``KronLaplace`` (CurvlinopsEF)
on ``Sequential(ε head, Flatten)`` fed the captured (φ, target) batches one at a time (its
incremental fit sums the factors exactly as one fit over all batches would).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesdiff_ext.numerics import accumulation_dtype
from bayesdiff_ext.posterior.curvature_layout import laplace_kron_factors
from bayesdiff_ext.posterior.full import require_ungrouped
from bayesdiff_ext.posterior.heads import HeadSpec
from bayesdiff_ext.posterior.laplace_convert import factored_from_kron
from bayesdiff_ext.posterior.structure import FactoredPosterior, OpInputs


def eps_head_module(spec: HeadSpec, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A standalone copy of the head restricted to its ε channels, with the given parameters."""
    if spec.is_conv:
        module = nn.Conv2d(
            spec.in_channels,
            spec.eps_channels,
            spec.kernel_size,
            stride=spec.stride,
            padding=spec.padding,
            dilation=spec.dilation,
            bias=spec.has_bias,
            device=weight.device,
            dtype=weight.dtype,
        )
    else:
        module = nn.Linear(
            spec.in_channels, spec.eps_channels, bias=spec.has_bias, device=weight.device, dtype=weight.dtype
        )
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module


class KronEFCurvature:
    """Accumulates laplace-torch's KFAC factors of the empirical Fisher of the ε head, batch by batch."""

    def __init__(self, spec: HeadSpec, weight: torch.Tensor, bias: torch.Tensor | None):
        require_ungrouped(spec, "kron")
        self.spec = spec
        self._weight, self._bias = weight, bias
        self.laplace = None

    def update(self, phi: torch.Tensor, residual: torch.Tensor) -> None:
        from laplace import KronLaplace
        from laplace.curvature import CurvlinopsEF

        dtype = accumulation_dtype(phi)
        phi = phi.to(dtype)
        first = self.laplace is None
        if first:
            bias = None if self._bias is None else self._bias.to(phi.device, dtype)
            head = eps_head_module(self.spec, self._weight.to(phi.device, dtype), bias)
            self.laplace = KronLaplace(nn.Sequential(head, nn.Flatten()), "regression", backend=CurvlinopsEF)
        model = self.laplace.model
        with torch.no_grad():
            target = (model(phi) - residual.to(dtype).flatten(1)).detach()
        batch = DataLoader(TensorDataset(phi, target), batch_size=len(phi))
        with torch.enable_grad():  # curvlinops differentiates the ε-head copy (the model stays gradient-free)
            self.laplace.fit(batch, override=first)

    def finish(self) -> KronPosterior:
        if self.laplace is None:
            raise ValueError("no data was given to fit the kron curvature")
        return KronPosterior.from_kron_factors(self.spec, self.laplace.H_facs.kfacs)


class KronPosterior(FactoredPosterior):
    name = "kron"
    curvatures = ("ggn", "ef")

    def __init__(self, spec: HeadSpec, g: torch.Tensor, a: torch.Tensor, g_bias: torch.Tensor | None):
        super().__init__(spec)
        require_ungrouped(spec, "kron")
        c, d = spec.eps_channels, spec.taps
        shapes = {"G": (g, (c, c)), "A": (a, (d, d))}
        if spec.has_bias:
            shapes["G_bias"] = (g_bias, (c, c))
        for name, (factor, shape) in shapes.items():
            if factor is None or tuple(factor.shape) != shape:
                got = None if factor is None else tuple(factor.shape)
                raise ValueError(f"kron factor {name} of this head must be {shape}, got {got}")
        self.g, self.a = g.to(torch.float64), a.to(torch.float64)
        self.g_bias = None if g_bias is None else g_bias.to(torch.float64)
        self._eig = [_psd_eigh(f) for f in (self.g, self.a, self.g_bias) if f is not None]

    @classmethod
    def from_augmented_gram(cls, spec: HeadSpec, gram: torch.Tensor) -> KronPosterior:
        """laplace-torch's GGN factors (CurvlinopsGGN) from the accumulated A_aug."""
        kfacs = laplace_kron_factors(gram, spec.eps_channels, n_images=0, backend="curvlinops")  # N: BackPACK only
        return cls.from_kron_factors(spec, kfacs if spec.has_bias else kfacs[:1])

    @classmethod
    def from_kron_factors(cls, spec: HeadSpec, kfacs) -> KronPosterior:
        """From laplace-torch's ``Kron.kfacs`` of ``Sequential(head, Flatten)``: [[G, A], [G_b]]."""
        if len(kfacs) != 1 + int(spec.has_bias) or len(kfacs[0]) != 2:
            raise ValueError(
                f"expected laplace-torch Kron factors [[G, A]{', [G_b]' if spec.has_bias else ''}] of a "
                f"single head, got {[len(f) for f in kfacs]} factors per block"
            )
        g_bias = kfacs[1][0].detach() if spec.has_bias else None
        return cls(spec, kfacs[0][0].detach(), kfacs[0][1].detach(), g_bias)

    def spectrum(self):
        (g, _), (a, _) = self._eig[:2]
        values = torch.outer(g, a).flatten()
        if self.g_bias is not None:
            values = torch.cat([values, self._eig[2][0]])
        return values, torch.ones_like(values)

    def op_inputs(self, s, delta) -> OpInputs:
        # laplace-torch's KronDecomposed convention: each factor's eigenvalues carry √s (s for the
        # one-factor bias block), so their products are the eigenvalues of s·H.
        root = math.sqrt(s)
        (g, q_g), (a, q_a) = self._eig[:2]
        vectors, values = [[q_g, q_a]], [[root * g, root * a]]
        if self.g_bias is not None:
            g_b, q_b = self._eig[2]
            vectors.append([q_b])
            values.append([s * g_b])
        deltas = torch.full((len(vectors),), float(delta), dtype=torch.float64)
        return factored_from_kron(vectors, values, deltas, self.spec.eps_weight_shape, self.g_bias is not None)

    def tensors(self):
        out = {"G": self.g, "A": self.a}
        if self.g_bias is not None:
            out["G_bias"] = self.g_bias
        return out

    @classmethod
    def from_tensors(cls, spec, tensors):
        return cls(spec, tensors["G"], tensors["A"], tensors.get("G_bias"))


def _psd_eigh(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(factor)
    # Curvature factors are PSD; round-off below zero would let s·g·a + δ approach 0 for tiny δ.
    return values.clamp_min(0.0), vectors
