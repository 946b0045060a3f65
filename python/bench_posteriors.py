"""VI, HMC and head ensembles on the bundled digits head against the Laplace closed forms.

Every posterior is fitted with its public ``fit`` on the 1,797 digits (one timestep draw per image,
seed 0, batch 64: the same data pass as the Laplace fit), and timed: the whole fit, and the
inference after the data pass (``record['inference_seconds']``). The Laplace fits ('diag', the
default, and 'full') are the baselines of the same run. Agreement is measured where the theory
says what to expect, at the fitted σ and δ (chosen as for the full Laplace):

* per parameter: mean-field VI's variances against 1/diag(Λ) (its exact optimum), full-covariance
  VI, HMC and the bootstrap ensemble against diag(Λ⁻¹) (the full-GGN marginal variances);
* per output pixel: ``predict``'s variance on φ from the UNet at t = 500 against the Laplace
  closed form that should match it (mean-field VI: the diagonal GGN Laplace at the same σ, δ;
  the others: the full GGN Laplace);
* HMC's ESS and split-R̂, VI's KL(q ‖ posterior) against the mean-field optimum's.

Run: .venv/bin/python python/bench_posteriors.py   (writes the `bench_posteriors` section of BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bayesdiff_ext import LastLayerHeadEnsemble, LastLayerLaplace, LastLayerMCMC, LastLayerVI, digits  # noqa: E402
from bench_timing import markdown_table, write_section  # noqa: E402

POSTERIORS = {
    "VI diag (3000 steps)": (LastLayerVI, dict(family="diag", steps=3000)),
    "VI diag (30000 steps)": (LastLayerVI, dict(family="diag", steps=30000)),
    "VI full (3000 steps)": (LastLayerVI, dict(family="full", steps=3000)),
    "VI full (3000 steps, 128 draws)": (LastLayerVI, dict(family="full", steps=3000, samples=128)),
    "HMC (4 chains, 1000 + 1000)": (LastLayerMCMC, {}),
    "head ensemble (8, bootstrap)": (LastLayerHeadEnsemble, {}),
    "head ensemble (8, plain)": (LastLayerHeadEnsemble, dict(bootstrap=False)),
}


def fit_timed(post, images, scheduler):
    started = time.perf_counter()
    post.fit(images, scheduler, batch_size=64, generator=torch.Generator().manual_seed(0), progress=False)
    return post, time.perf_counter() - started


def captured_phi(unet, batch: int) -> torch.Tensor:
    size = unet.config.sample_size
    x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), LastLayerLaplace(unet).capture() as cap:
        unet(x, torch.full((batch,), 500))
    return cap.phi.clone()


def spread(ratio: torch.Tensor) -> str:
    ratio = ratio.flatten().double()
    low, mid, high = ratio.quantile(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)).tolist()
    return f"{mid:.3f} [{low:.3f}, {high:.3f}]"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=None, help="names of POSTERIORS to run (default all)")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args(argv)

    unet, scheduler = digits.load_bundled_unet(), digits.load_bundled_scheduler()
    images = digits.load_digits_images(unet.config.sample_size)[0]
    phi = captured_phi(unet, 8).double()
    diag, diag_s = fit_timed(LastLayerLaplace(unet, "diag"), images, scheduler)
    full, full_s = fit_timed(LastLayerLaplace(unet, "full"), images, scheduler)
    rows = [
        ["Laplace diag (baseline)", f"{diag_s:.1f}", "-", "1", "-", "-", "-"],
        ["Laplace full", f"{full_s:.1f}", "-", f"{full_s / diag_s:.2f}", "-", "-", "-"],
    ]
    with torch.no_grad():
        full_var = full.predict(phi)[1]
    notes = []
    for name, (cls, options) in POSTERIORS.items():
        if args.only and name not in args.only:
            continue
        post, seconds = fit_timed(cls(unet, **options), images, scheduler)
        exact, record = post.exact, post.record
        marginal = post.distribution.marginal_variance()
        with torch.no_grad():
            var = post.predict(phi)[1]
        if name.startswith("VI diag"):
            parameter_ratio = marginal * exact.precision.diagonal()
            reference = diag.set_hyperparameters(sigma_noise=post.sigma_noise, prior_precision=post.prior_precision)
            with torch.no_grad():
                output_ratio = var / reference.predict(phi)[1]
            against = "1/diag(Λ); diag Laplace"
        else:
            parameter_ratio = marginal / exact.covariance().diagonal()
            output_ratio = var / full_var
            against = "diag(Λ⁻¹); full Laplace"
        extra = []
        if "kl_to_posterior" in record:
            extra.append(f"KL(q‖p) {record['kl_to_posterior']:.1f} nats")
        if "ess_min" in record:
            extra.append(
                f"ESS min {record['ess_min']:.0f}, median {record['ess_median']:.0f} of "
                f"{post.options.chains * post.options.draws}; R̂ max {record['rhat_max']:.4f}; accept "
                f"{record['accept_rate']:.2f}, step {record['step_size']:.3f}, "
                f"{record['gradient_evaluations']} gradients"
            )
        sd = exact.covariance().diagonal().sqrt()
        mean_error = ((post.distribution.mean_rows - exact.posterior_mean()) / sd).abs()
        extra.append(f"mean off Θ* by {float(mean_error.median()):.2f} sd (max {float(mean_error.max()):.2f})")
        rows.append(
            [
                name,
                f"{seconds:.1f}",
                f"{record['inference_seconds']:.1f}",
                f"{seconds / diag_s:.2f}",
                f"{against}: {spread(parameter_ratio)}",
                spread(output_ratio),
                "; ".join(extra),
            ]
        )
        print(rows[-1], flush=True)
    lam = full.posterior.gram * full.precision_scale + full.prior_precision * torch.eye(len(full.posterior.gram))
    optimum_kl = 0.5 * float(lam.diagonal().log().sum() - torch.logdet(lam))
    offset = ((post.exact.theta_hat - post.exact.posterior_mean()) / post.exact.covariance().diagonal().sqrt()).abs()
    notes.append(
        f"The exact posterior on this data: σ = {full.sigma_noise:.4g}, δ = {full.prior_precision:.4g} (MacKay, "
        f"full-GGN spectrum), condition number of Λ = s·A + δ·I {float(torch.linalg.cond(lam)):.3g}; the "
        f"mean-field optimum's KL(q‖p) = ½(Σ log Λ_jj − log det Λ) = {optimum_kl:.1f} nats, and its variances "
        f"1/Λ_jj are {spread(1 / lam.diagonal() / torch.linalg.inv(lam).diagonal())} of the marginal ones; the "
        f"head's weights Θ̂ sit {float(offset.median()):.2f} posterior sd (max {float(offset.max()):.2f}) from the "
        "posterior mean Θ* (the head was trained on far more draws than this one pass)."
    )
    notes.append(
        "Reading: HMC reproduces the full closed form (variance ratios within the ±11% its ESS allows, "
        "R̂ ≈ 1); mean-field VI converges to its known optimum (the diagonal GGN-Laplace variances) but "
        "slowly: κ(Λ) makes the reparameterised Adam steps slow in the flat directions (mean and KL still "
        "moving at 30,000 steps), and the full family has not converged at 3,000 steps (its variances "
        "are too small). A plain head ensemble collapses to Θ* (zero spread, as the convex loss says); "
        "the bootstrap ensemble's spread is of the posterior's order but not equal to it: 8 members leave "
        "a ±50% error per variance, and the bootstrap estimates the sandwich covariance, which differs "
        "from Λ⁻¹ when the residuals' size varies across the data (here probably with the timestep; not "
        "measured). Timings: a loaded shared machine (real time ≈ 3× CPU time in this run)."
    )
    body = "\n".join(
        [
            "`python/bench_posteriors.py`: each posterior's `fit` on the bundled digits (1,797 images, one "
            f"timestep draw each, batch 64) on the head {full.spec.shape_text()} (K = D+1 = {full.spec.taps + 1}); "
            "one run each; fit = the data pass (the same for all, as in the Laplace full fit; the bootstrap "
            "ensemble's also accumulates 8 replicates) + the inference column. "
            "Ratios: median [min, max] over the 289 parameters and over the 8×256 output pixels of φ from the "
            "UNet at t = 500 (float64).",
            "",
            markdown_table(
                ["posterior", "fit s", "inference s", "× Laplace diag fit", "parameter variance ratio vs",
                 "output variance ratio", "notes"],
                rows,
            ),
            "",
            *notes,
            "",
            f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
            f"load average at the end {tuple(round(v, 1) for v in os.getloadavg())} (shared machine).",
        ]
    )
    print(body)
    if not args.no_write:
        write_section(Path(__file__).resolve().parent / "BENCHMARKS.md", "bench_posteriors", body)


if __name__ == "__main__":
    main()
