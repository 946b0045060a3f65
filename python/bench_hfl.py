"""Hessian-free Laplace (structure='hfl') against the exact full-GGN closed form (structure='full').

On the bundled digits model: the head conv_out (Conv2d 32 -> 1, 3x3, D+1 = 289 parameters), its
full-GGN posterior (``assets/digits/posterior_full.safetensors``), and φ captured from the UNet at
timestep 500 on a batch of noise. For K Rademacher probes per image (and for 'basis' probes, one
per output pixel) it measures the HFL variance map's error against the closed form (mean and 95th
percentile of |hfl - full| / full over the pixels) and the time of ``predict`` (median over
repeats, the closed form measured in the same run).

Run: .venv/bin/python python/bench_hfl.py   (writes the `bench_hfl` section of BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bayesdiff_ext import LastLayerLaplace, digits  # noqa: E402
from bayesdiff_ext.methods.selection import laplace_posterior_for  # noqa: E402
from bench_timing import markdown_table, median_seconds, write_section  # noqa: E402


def captured_phi(unet, batch: int, seed: int) -> torch.Tensor:
    posterior_like = LastLayerLaplace(unet, "diag")
    size = unet.config.sample_size
    x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), posterior_like.capture() as cap:
        unet(x, torch.full((batch,), 500))
    return cap.phi.clone()


def errors(estimate: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    relative = ((estimate.double() - exact.double()).abs() / exact.double()).flatten()
    return float(relative.mean()), float(relative.quantile(0.95))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--probes", type=int, nargs="+", default=[4, 16, 64, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args(argv)

    root = digits.bundled_dir()
    unet = digits.load_bundled_unet()
    full = LastLayerLaplace.load(root / "posterior_full.safetensors", unet)
    hfl = laplace_posterior_for("hfl", full)
    phi = captured_phi(unet, args.batch, args.seed)
    with torch.no_grad():
        exact = full.predict(phi)[1]
        full_s = median_seconds(lambda: full.predict(phi), repeats=max(args.repeats, 7))

    rows = [["full (closed form)", "-", "-", f"{full_s * 1e3:.2f}", "1", "0", "0"]]
    settings: list[int | str] = [*args.probes, "basis"]
    for probes in settings:
        hfl.posterior.probes = probes
        with torch.no_grad():
            estimate = hfl.predict(phi)[1]
            iterations = hfl.posterior.last_iterations
            seconds = median_seconds(lambda: hfl.predict(phi), repeats=args.repeats, warmup=1)
        mean_err, p95_err = errors(estimate, exact)
        label = "basis (one per pixel, 256)" if probes == "basis" else str(probes)
        timing = [f"{seconds * 1e3:.1f}", f"{seconds / full_s:.0f}"]
        rows.append(["hfl", label, str(iterations), *timing, f"{mean_err:.3g}", f"{p95_err:.3g}"])
        print(rows[-1], flush=True)

    spec = full.spec
    body = "\n".join(
        [
            "`python/bench_hfl.py`: Hessian-free Laplace (`structure='hfl'`, McInerney & Kallus 2024) vs the "
            "exact full-GGN closed form (`structure='full'`) on the bundled digits head "
            f"({spec.shape_text()}, D+1 = {spec.taps + 1}); φ from the UNet at t = 500, batch {args.batch}, "
            f"16x16 maps, float32 φ; σ = {full.sigma_noise:.4g}, δ = {full.prior_precision:.4g}. Error: "
            "|hfl − full| / full over all pixels (one draw of the probes); time: `predict` median over "
            f"{args.repeats} repeats (closed form: {max(args.repeats, 7)}), the same process and machine.",
            "",
            markdown_table(
                ["method", "probes K per image", "CG iterations", "median ms", "× full"]
                + ["mean rel. error", "95th pct rel. error"],
                rows,
            ),
            "",
            "Rademacher probes are unbiased with an error ∝ 1/√K (each pixel's estimate carries the "
            "off-diagonal covariances of the whole map as noise); 'basis' probes (every pixel's unit "
            "vector) reproduce the closed form to the CG tolerance. Each probe needs one regularised "
            "optimum (a CG solve with loss Hessian-vector products, Jacobi-preconditioned), so HFL "
            "costs K·(CG iterations) products with the (D+1)² Gram matrix per image, against one "
            "factored convolution for the closed form: on a last layer, HFL is a check of the closed "
            "form, not a speed-up.",
            "",
            f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
            f"load average at the end {tuple(round(v, 1) for v in os.getloadavg())} (shared machine).",
        ]
    )
    print(body)
    if not args.no_write:
        write_section(Path(__file__).resolve().parent / "BENCHMARKS.md", "bench_hfl", body)


if __name__ == "__main__":
    main()
