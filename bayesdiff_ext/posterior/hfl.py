"""Hessian-free Laplace (McInerney & Kallus 2024) on the head: the predictive variance, no Hessian.

HFL reads the variance of a prediction f(x*) off the MAP θ̂ and the optimum θ_ε of the loss
regularised by the prediction itself,

    θ_ε = argmin_θ L(θ) − ε·vᵀf(x*; θ),     vᵀΣ_f v ≈ vᵀ(f(x*; θ_ε) − f(x*; θ̂)) / ε,

with L the negative log posterior (Gaussian likelihood with weight s = 1/(σ²·T) plus the prior δ).
For a whole map of predictions the diagonal of Σ_f comes from random ±1 probes v_k
(Hutchinson): var_p ≈ mean_k v_k,p·(f(θ_ε,k) − f(θ̂))_p / ε, one regularised optimum per probe.

On a last layer f is linear in θ and L is quadratic, so with θ̂ the optimum of L (the Laplace
approximation's own assumption) θ_ε solves (s·A_aug + δ·I)(θ_ε − θ̂) = ε·J*ᵀv per ε channel.
That system is solved here by preconditioned conjugate gradients on Hessian-vector products
u ↦ s·A_aug·u + δ·u of L, where A_aug = Σ [φ_p; 1][φ_p; 1]ᵀ is the data's sufficient statistic
(the Gram matrix the 'full' structure also accumulates): no Hessian is factorised or inverted,
and f(θ_ε) − f(θ̂) = J*(θ_ε − θ̂) is evaluated exactly (the head is linear). The estimate is
unbiased for the exact full-GGN variance (``structure='full'``) before it is clamped at 0, and
converges to it as 1/√K in the number of probes K; ``probes='basis'`` probes every output position with its unit vector,
which reproduces the closed form up to the CG tolerance. It costs K·(CG iterations) products with
A_aug per image, far more than the closed form: the point is the comparison, not speed (see
``python/bench_hfl.py``). The hyperparameters (σ, δ by MacKay/marglik) use the Gram spectrum, as
for 'full'.

Not the "isotropic" structure (Σ = λ⁻¹·I), which the student reproduction called Hessian-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from bayesdiff_ext.posterior import head_ops
from bayesdiff_ext.posterior.full import gram_scale_normal, require_ungrouped
from bayesdiff_ext.posterior.heads import HeadSpec
from bayesdiff_ext.posterior.structure import OpInputs, PosteriorStructure
from bayesdiff_ext.randomness import derived_seed

DEFAULT_PROBES = 64
#: Rows (probes × images × ε channels) per conjugate-gradient solve.
SOLVE_ROWS = 2048


class HessianFreePosterior(PosteriorStructure):
    """HFL predictive variance with ``probes`` Rademacher probes per image (or ``'basis'``).

    ``epsilon`` is the regularisation strength ε; ``tolerance`` the CG stopping rule
    ‖residual‖ ≤ tolerance·‖right-hand side‖ (at most ``2·(D+1)`` iterations). The probes come
    from a CPU generator seeded with ``seed`` at construction, so a run is reproducible. Only the
    Gram matrix is saved; the probe settings are prediction settings (defaults on ``load``).
    """

    name = "hfl"
    curvatures = ("ggn",)

    def __init__(
        self,
        spec: HeadSpec,
        gram: torch.Tensor,
        *,
        probes: int | str = DEFAULT_PROBES,
        epsilon: float = 1.0,
        tolerance: float = 1e-8,
        seed: int = 0,
    ):
        super().__init__(spec)
        require_ungrouped(spec, "hfl")
        size = spec.taps + int(spec.has_bias)
        if tuple(gram.shape) != (size, size):
            raise ValueError(
                f"the Gram matrix of this head must be ({size}, {size}), got {tuple(gram.shape)}"
            )
        if probes != "basis" and not (isinstance(probes, int) and probes >= 1):
            raise ValueError(f"probes must be an integer >= 1 or 'basis', got {probes!r}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.gram = gram.to(torch.float64)
        self.probes, self.epsilon, self.tolerance = probes, float(epsilon), float(tolerance)
        self.generator = torch.Generator().manual_seed(seed)
        self.image_generators: list[torch.Generator] | None = None  # per image, once seeded so
        self.last_iterations = 0  # CG iterations of the latest predict, for benchmarks
        self._device_gram: dict[torch.device, torch.Tensor] = {}
        self._gram_eig: tuple[torch.Tensor, torch.Tensor] | None = None

    def seed_probes(self, seed: int | Sequence[int]) -> None:
        """Restart the probes at ``seed``: one generator for every row of a predict call, or, for a sequence
        of B per-image seeds, one generator per image — row r of a call draws from image r mod B's (the
        samplers lay their rows out sample-major, r = s·B + b), so an image's probes depend on its seed
        alone, not on its batch or the calls before it."""
        if isinstance(seed, int):
            self.generator.manual_seed(seed)
            self.image_generators = None
        else:
            self.image_generators = [torch.Generator().manual_seed(int(s)) for s in seed]

    @classmethod
    def from_augmented_gram(cls, spec: HeadSpec, gram: torch.Tensor) -> HessianFreePosterior:
        return cls(spec, gram if spec.has_bias else gram[:-1, :-1])

    def spectrum(self):
        values = torch.linalg.eigvalsh(self.gram).clamp_min(0.0)
        return values, torch.full_like(values, float(self.spec.eps_channels))

    def op_inputs(self, s, delta) -> OpInputs:
        return {"precision_scale": torch.tensor(float(s)), "prior_precision": torch.tensor(float(delta))}

    def predict_with(self, phi, weight, bias, inputs):
        mean = head_ops.head_mean(self.spec, phi, weight, bias)
        device = phi.device
        if device not in self._device_gram:
            self._device_gram[device] = self.gram.to(device)
        var, self.last_iterations = hfl_variance(
            self.spec,
            phi,
            self._device_gram[device],
            float(inputs["precision_scale"]),
            float(inputs["prior_precision"]),
            probes=self.probes,
            epsilon=self.epsilon,
            tolerance=self.tolerance,
            generator=self.image_generators or self.generator,
        )
        return mean, var.to(mean.dtype)

    def scale_normal(self, z, s, delta):
        """Draws from the posterior HFL approximates, the full-GGN Laplace N(θ_MAP, (s·A_aug + δ)⁻¹)
        of the same Gram matrix (HFL itself predicts variances; it has no draws of its own)."""
        if self._gram_eig is None:
            values, vectors = torch.linalg.eigh(self.gram)
            self._gram_eig = (values.clamp_min(0.0), vectors)
        return gram_scale_normal(self.spec, *self._gram_eig, z, s, delta)

    def tensors(self):
        return {"gram": self.gram}

    @classmethod
    def from_tensors(cls, spec, tensors):
        return cls(spec, tensors["gram"])


def output_patches(spec: HeadSpec, phi: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """J* of one ε channel: [φ_p; 1] per output position, (B, D+1, P) in float64, and the output shape
    (B, H_out, W_out) or the Linear head's leading dimensions."""
    phi = phi.to(torch.float64)
    if spec.is_conv:
        patches = F.unfold(phi, spec.kernel_size, spec.dilation, spec.padding, spec.stride)
        h, w = (
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(
                phi.shape[2:], spec.kernel_size, spec.stride, spec.padding, spec.dilation
            )
        )
        shape = (phi.shape[0], h, w)
    else:
        shape = tuple(phi.shape[:-1])
        patches = phi.reshape(-1, spec.in_channels, 1)
    if spec.has_bias:
        patches = torch.cat([patches, patches.new_ones(patches.shape[0], 1, patches.shape[2])], dim=1)
    return patches, shape


def seed_image_probes(posterior, seed: int, indices: Iterable[int]) -> None:
    """Restart the probes of ``posterior`` (a ``LastLayerLaplace``; nothing happens unless its structure
    is HFL) at each image's stream (``seed``, its global index, ``"probes"``) of
    :mod:`bayesdiff_ext.randomness`: an image's probes then depend neither on its batch nor on the
    calls before it (any batch size, a resumed run, a batch of another process)."""
    structure = getattr(posterior, "posterior", None)
    if isinstance(structure, HessianFreePosterior):
        structure.seed_probes([derived_seed(seed, index, "probes") for index in indices])


def draw_probes(probes, batch: int, channels: int, positions: int, generator, device, rows: int | None = None) -> torch.Tensor:
    """(K, B, C, P) probes: Rademacher ±1, or for 'basis' the unit vector of each position (K = P).

    ``generator`` is one generator, or one per image: then each of the ``rows`` rows of φ (B/rows
    patches each) draws its block from the generator of image ``row mod len(generator)``."""
    if probes == "basis":
        eye = torch.eye(positions, dtype=torch.float64, device=device)
        return eye[:, None, None, :].expand(positions, batch, channels, positions)
    if isinstance(generator, list):
        if rows is None or rows % len(generator):
            raise ValueError(
                f"a prediction of {rows} rows cannot take its probes from {len(generator)} images' streams: the "
                "rows must be a multiple of the images, laid out sample-major"
            )
        block = (probes, batch // rows, channels, positions)
        signs = torch.cat(
            [torch.randint(0, 2, block, generator=generator[r % len(generator)], dtype=torch.int8) for r in range(rows)],
            dim=1,
        )
    else:
        signs = torch.randint(0, 2, (probes, batch, channels, positions), generator=generator, dtype=torch.int8)
    return (signs.to(device, torch.float64) * 2 - 1)


def hfl_variance(
    spec: HeadSpec,
    phi: torch.Tensor,
    gram: torch.Tensor,
    s: float,
    delta: float,
    *,
    probes: int | str,
    epsilon: float,
    tolerance: float,
    generator: torch.Generator | list[torch.Generator],
) -> tuple[torch.Tensor, int]:
    """The HFL estimate of the head's per-output variance at φ (float64, the head output's shape)
    and the most CG iterations one group of images took."""
    patches, shape = output_patches(spec, phi)
    batch, size, positions = patches.shape
    channels = spec.eps_channels
    v = draw_probes(probes, batch, channels, positions, generator, patches.device, rows=shape[0])

    def hessian_vector_product(u):
        return s * (u @ gram) + delta * u

    preconditioner = 1.0 / (s * gram.diagonal() + delta)
    # CG is memory-bound: images go through it in groups whose vectors stay in cache.
    group = max(1, SOLVE_ROWS // (v.shape[0] * channels))
    responses, iterations = [], 0
    for start in range(0, batch, group):
        v_group, patches_group = v[:, start : start + group], patches[start : start + group]
        # ∇_θ of ε·vᵀf: the force the regularisation puts on each channel's weights.
        force = epsilon * torch.einsum("kbcp,brp->kbcr", v_group, patches_group)
        shift, used = conjugate_gradients(
            hessian_vector_product, force.reshape(-1, size), preconditioner, tolerance, max_iterations=2 * size
        )
        responses.append(torch.einsum("kbcr,brp->kbcp", shift.reshape(force.shape), patches_group) / epsilon)
        iterations = max(iterations, used)
    response = torch.cat(responses, dim=1)
    var = (v * response).sum(0) if probes == "basis" else (v * response).mean(0)
    var = var.clamp_min(0)  # a Hutchinson estimate of a variance can come out below 0
    if spec.is_conv:
        return var.reshape(batch, channels, *shape[1:]), iterations
    return var.reshape(*shape, channels), iterations


def conjugate_gradients(apply, rhs, preconditioner, tolerance: float, max_iterations: int):
    """Solve apply(x) = rhs for every row of rhs (N, R), apply symmetric positive definite.

    Jacobi-preconditioned CG, all rows in lockstep until every row meets the tolerance.
    Returns the solution and the number of iterations.
    """
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = r * preconditioner
    p = z.clone()
    rz = (r * z).sum(-1, keepdim=True)
    threshold = tolerance * rhs.norm(dim=-1, keepdim=True)
    iterations = 0
    while iterations < max_iterations and bool((r.norm(dim=-1, keepdim=True) > threshold).any()):
        ap = apply(p)
        curvature = (p * ap).sum(-1, keepdim=True)
        alpha = torch.where(curvature > 0, rz / curvature, torch.zeros_like(rz))
        x += alpha * p
        r -= alpha * ap
        z = r * preconditioner
        rz_next = (r * z).sum(-1, keepdim=True)
        beta = torch.where(rz > 0, rz_next / rz, torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_next
        iterations += 1
    return x, iterations
