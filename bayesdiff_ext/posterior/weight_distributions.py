"""Distributions over the head's ε rows that the fused ops serve: what VI, HMC and head ensembles yield.

Unlike a Laplace structure (centred at the head's own weights, its covariance a function of σ and
δ), each of these carries its own mean and a covariance fixed at fitting time:

* ``DiagGaussian``: N(μ, diag(v)), predicted by the diagonal op (mean-field VI).
* ``FactoredGaussian``: N(μ, Σ) with every channel's covariance Σ_c = Σ_r mix[c,r]·q_r·q_rᵀ over
  shared directions q_r, predicted by the factored op (full-covariance VI).
* ``WeightSamples``: S parameter vectors (MCMC draws, ensemble members); predicted through the
  factored op with their mean and unbiased covariance (1/(S−1)), and ``sample`` returns them.

All hold float64 rows (C, K) (``linear_gaussian``); ``sample(n)`` returns (n, P) float64 vectors in
laplace-torch's parameter order.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from bayesdiff_ext.numerics import accumulation_dtype
from bayesdiff_ext.posterior import head_ops
from bayesdiff_ext.posterior.heads import HeadSpec
from bayesdiff_ext.posterior.linear_gaussian import row_size, rows_to_parameters, rows_to_vector, vector_to_rows
from bayesdiff_ext.posterior.structure import OpInputs
from bayesdiff_ext.validation import check_count


class WeightDistribution(abc.ABC):
    """A distribution over the ε rows (C, K) with its own mean; ``predict(φ)`` serves it in closed form."""

    name: ClassVar[str]

    def __init__(self, spec: HeadSpec, mean_rows: torch.Tensor):
        expected = (spec.eps_channels, row_size(spec))
        if tuple(mean_rows.shape) != expected:
            raise ValueError(f"the mean of this head's ε rows must be {expected}, got {tuple(mean_rows.shape)}")
        self.spec = spec
        self.mean_rows = mean_rows.to(torch.float64)
        self._device_inputs: tuple | None = None

    @abc.abstractmethod
    def op_inputs(self) -> OpInputs:
        """The fused op's inputs, float64 on the CPU."""

    @abc.abstractmethod
    def predict_with(self, phi, weight, bias, inputs: OpInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) of the ε channels at φ, with the mean parameters and op inputs on φ's device."""

    @abc.abstractmethod
    def covariance(self) -> torch.Tensor:
        """Every channel's K×K covariance, (C, K, K) float64 (the channels are independent)."""

    def marginal_variance(self) -> torch.Tensor:
        """Every parameter's variance as rows (C, K), float64."""
        return self.covariance().diagonal(dim1=-2, dim2=-1)

    @abc.abstractmethod
    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, P) float64 parameter vectors in laplace-torch's order."""

    @abc.abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """What a file stores; ``from_tensors`` inverts it."""

    @classmethod
    @abc.abstractmethod
    def from_tensors(cls, spec: HeadSpec, tensors: dict[str, torch.Tensor]) -> WeightDistribution: ...

    def mean_vector(self) -> torch.Tensor:
        return rows_to_vector(self.spec, self.mean_rows)

    def predict(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) at φ in the accumulation dtype (float32 for 16-bit φ), var ≥ 0."""
        dtype = accumulation_dtype(phi)
        key = (phi.device, dtype)
        if self._device_inputs is None or self._device_inputs[0] != key:
            weight, bias = rows_to_parameters(self.spec, self.mean_rows)
            on_device = {k: None if v is None else v.to(phi.device, dtype) for k, v in self.op_inputs().items()}
            bias = None if bias is None else bias.to(phi.device, dtype)
            self._device_inputs = (key, weight.to(phi.device, dtype), bias, on_device)
        _, weight, bias, inputs = self._device_inputs
        return self.predict_with(phi.to(dtype), weight, bias, inputs)


class DiagGaussian(WeightDistribution):
    """N(μ, diag(v)) over the ε rows: the diagonal op with μ as the weights."""

    name = "diag"

    def __init__(self, spec: HeadSpec, mean_rows: torch.Tensor, variance_rows: torch.Tensor):
        super().__init__(spec, mean_rows)
        if variance_rows.shape != self.mean_rows.shape or not bool((variance_rows >= 0).all()):
            raise ValueError(f"variances must be >= 0 with the mean's shape {tuple(self.mean_rows.shape)}")
        self.variance_rows = variance_rows.to(torch.float64)

    def op_inputs(self) -> OpInputs:
        weight_var, bias_var = rows_to_parameters(self.spec, self.variance_rows)
        return {"weight_var": weight_var.contiguous(), "bias_var": bias_var}

    def predict_with(self, phi, weight, bias, inputs):
        return head_ops.mean_and_diag_var(self.spec, phi, weight, bias, inputs["weight_var"], inputs["bias_var"])

    def covariance(self) -> torch.Tensor:
        return torch.diag_embed(self.variance_rows)

    def marginal_variance(self) -> torch.Tensor:
        return self.variance_rows

    def sample(self, n_samples, generator=None):
        shape = (check_count("n_samples", n_samples, 1), *self.mean_rows.shape)
        noise = torch.randn(shape, generator=generator, dtype=torch.float64)
        return rows_to_vector(self.spec, self.mean_rows + self.variance_rows.sqrt() * noise)

    def tensors(self):
        return {"mean": self.mean_vector(), "variance": rows_to_vector(self.spec, self.variance_rows)}

    @classmethod
    def from_tensors(cls, spec, tensors):
        return cls(spec, vector_to_rows(spec, tensors["mean"]), vector_to_rows(spec, tensors["variance"]))


class FactoredGaussian(WeightDistribution):
    """N(μ, Σ), Σ_c = Σ_r mix[c,r]·q_r·q_rᵀ: the factored op with ``proj`` = the q_r (R, K)."""

    name = "factored"

    def __init__(self, spec: HeadSpec, mean_rows: torch.Tensor, proj: torch.Tensor, mix: torch.Tensor):
        super().__init__(spec, mean_rows)
        k = row_size(spec)
        if proj.dim() != 2 or proj.shape[1] != k or tuple(mix.shape) != (spec.eps_channels, proj.shape[0]):
            raise ValueError(
                f"factors must be proj (R, {k}) and mix ({spec.eps_channels}, R), "
                f"got {tuple(proj.shape)} and {tuple(mix.shape)}"
            )
        if not bool((mix >= 0).all()):
            raise ValueError("the factor weights `mix` must be >= 0")
        self.proj, self.mix = proj.to(torch.float64), mix.to(torch.float64)

    def op_inputs(self) -> OpInputs:
        taps = self.spec.taps
        proj_bias = self.proj[:, taps].contiguous() if self.spec.has_bias else None
        return {"proj_weight": self.proj[:, :taps].contiguous(), "proj_bias": proj_bias, "mix": self.mix}

    def predict_with(self, phi, weight, bias, inputs):
        mean = head_ops.head_mean(self.spec, phi, weight, bias)
        var = head_ops.factored_var(self.spec, phi, inputs["proj_weight"], inputs["proj_bias"], inputs["mix"], None)
        return mean, var

    def covariance(self) -> torch.Tensor:
        return torch.einsum("cr,rk,rl->ckl", self.mix, self.proj, self.proj)

    def marginal_variance(self) -> torch.Tensor:
        return self.mix @ self.proj.square()

    def sample(self, n_samples, generator=None):
        shape = (check_count("n_samples", n_samples, 1), *self.mix.shape)
        noise = torch.randn(shape, generator=generator, dtype=torch.float64) * self.mix.sqrt()
        return rows_to_vector(self.spec, self.mean_rows + noise @ self.proj)

    def tensors(self):
        return {"mean": self.mean_vector(), "proj": self.proj, "mix": self.mix}

    @classmethod
    def from_tensors(cls, spec, tensors):
        return cls(spec, vector_to_rows(spec, tensors["mean"]), tensors["proj"], tensors["mix"])

    @classmethod
    def tied(cls, spec: HeadSpec, mean_rows: torch.Tensor, covariance: torch.Tensor) -> FactoredGaussian:
        """Every channel with the same K×K covariance (its eigenvectors as the directions)."""
        values, vectors = torch.linalg.eigh(covariance.to(torch.float64))
        mix = values.clamp_min(0.0).expand(spec.eps_channels, -1).contiguous()
        return cls(spec, mean_rows, vectors.T.contiguous(), mix)


def sample_factors(spec: HeadSpec, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean rows, ``proj`` and ``mix`` of S samples' unbiased covariance, per channel.

    With S ≤ K the centred samples of channel c are its directions (rank S−1, R = S·C); otherwise
    the eigenvectors of its K×K covariance (R = K·C): the smaller factorisation, the same variance.
    """
    rows = vector_to_rows(spec, samples.to(torch.float64))  # (S, C, K)
    count, channels, k = rows.shape
    mean = rows.mean(0)
    centred = rows - mean
    directions, weights = [], []
    for c in range(channels):
        if count <= k:
            directions.append(centred[:, c])
            weights.append(torch.full((count,), 1.0 / (count - 1), dtype=torch.float64))
        else:
            values, vectors = torch.linalg.eigh(centred[:, c].T @ centred[:, c] / (count - 1))
            directions.append(vectors.T)
            weights.append(values.clamp_min(0.0))
    proj = torch.cat(directions)
    mix = torch.block_diag(*[w.unsqueeze(0) for w in weights])
    return mean, proj, mix


class WeightSamples(FactoredGaussian):
    """S stored parameter vectors (S ≥ 2); their mean and covariance are what ``predict`` serves.

    ``sample(n)`` returns stored vectors in a random order from ``generator``: n ≤ S distinct ones
    (without replacement); for n > S whole shuffled passes over all S are concatenated (cycling), so
    every stored vector is used ⌊n/S⌋ or ⌈n/S⌉ times.
    """

    name = "samples"

    def __init__(self, spec: HeadSpec, samples: torch.Tensor):
        if samples.dim() != 2 or samples.shape[1] != spec.num_params or len(samples) < 2:
            raise ValueError(f"samples must be (S >= 2, {spec.num_params}), got {tuple(samples.shape)}")
        self.samples = samples.to(torch.float64)
        super().__init__(spec, *sample_factors(spec, self.samples))

    def sample(self, n_samples, generator=None):
        n, stored = check_count("n_samples", n_samples, 1), len(self.samples)
        passes = -(-n // stored)
        order = torch.cat([torch.randperm(stored, generator=generator) for _ in range(passes)])[:n]
        return self.samples[order]

    def tensors(self):
        return {"samples": self.samples}

    @classmethod
    def from_tensors(cls, spec, tensors):
        return cls(spec, tensors["samples"])


DISTRIBUTIONS: dict[str, type[WeightDistribution]] = {
    cls.name: cls for cls in (DiagGaussian, FactoredGaussian, WeightSamples)
}
