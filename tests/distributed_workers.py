"""What the processes of tests/test_distributed.py do (a module of its own: spawned processes import it).

Each process fits, samples and fails on purpose inside one gloo process group, then saves what it
got; the test compares that with the same calls in one process (the functions below, no group).
"""

from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist
from diffusers import DDIMScheduler, DDPMScheduler
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from bayesdiff_ext import BayesDiffSampler, LastLayerLaplace
from bayesdiff_ext.distributed import (
    RankFailed,
    gather_by_index,
    one_process,
    rank_and_world,
    shard_batches,
    shard_indices,
)
from bayesdiff_ext.posterior.inference import _StatisticsLaplace
from bayesdiff_ext.posterior.linear_gaussian import HeadStatistics
from bayesdiff_ext.randomness import image_generators
from tiny_models import tiny_unet

#: (structure, curvature) of the fits compared; 11 images in batches of 3: shards of 6 and 5 images.
FITS = [("diag", "ggn"), ("diag", "ef"), ("full", "ggn"), ("kron", "ggn"), ("kron", "ef"), ("isotropic", "ggn")]
NUM_FIT, FIT_BATCH = 11, 3
NUM_SAMPLES, SAMPLE_BATCH, STEPS, SEED = 5, 2, 3, 7
FAILURE = "process one cannot read its images"


def model():
    return tiny_unet(seed=3, add_attention=False)


def images() -> torch.Tensor:
    return torch.rand(NUM_FIT, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def fit(unet, structure: str, curvature: str, data, **options) -> LastLayerLaplace:
    return LastLayerLaplace(unet, structure, curvature).fit(
        data,
        DDPMScheduler(clip_sample=False),
        batch_size=FIT_BATCH,
        generator=torch.Generator().manual_seed(1),
        progress=False,
        **options,
    )


def head_statistics(unet) -> HeadStatistics:
    """The data pass of the VI, MCMC and head-ensemble posteriors: (A, B) sums beside the Laplace fit."""
    laplace = _StatisticsLaplace(unet, "full")
    laplace.fit(images(), DDPMScheduler(clip_sample=False), batch_size=FIT_BATCH,
                generator=torch.Generator().manual_seed(1), progress=False)
    return laplace.statistics


def summary(posterior: LastLayerLaplace) -> dict:
    return {
        "tensors": {k: v.clone() for k, v in posterior.posterior.tensors().items()},
        "sigma": posterior.sigma_noise,
        "delta": posterior.prior_precision,
        "stats": dataclasses.asdict(posterior.fit_stats),
    }


def sample(unet, posterior, indices) -> dict[str, torch.Tensor]:
    out = BayesDiffSampler(unet, DDIMScheduler(clip_sample=False), posterior).sample(
        batch_size=len(indices), generator=image_generators(SEED, indices), num_inference_steps=STEPS, progress=False
    )
    return {"images": out.images, "variance": out.variance, "scores": out.scores}


class AccelerateLikeState:
    """The two attributes of accelerate's PartialState the helpers read."""

    def __init__(self, process_index: int, num_processes: int) -> None:
        self.process_index, self.num_processes = process_index, num_processes


def work(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        results: dict = {"fits": {}}
        unet = model()
        for structure, curvature in FITS:
            results["fits"][f"{structure}/{curvature}"] = summary(fit(unet, structure, curvature, images()))
        statistics = head_statistics(unet)
        results["statistics"] = {"gram": statistics.gram, "cross": statistics.cross}
        dataset = TensorDataset(images())
        loader = DataLoader(dataset, batch_size=FIT_BATCH, sampler=DistributedSampler(dataset, shuffle=True, seed=4))
        results["loader"] = summary(fit(unet, "diag", "ggn", loader))
        with one_process():  # every process fits on all the images alone
            results["alone"] = summary(fit(unet, "diag", "ggn", images()))
            results["alone_world"] = rank_and_world(AccelerateLikeState(rank, world))

        posterior = fit(unet, "diag", "ggn", images())
        parts = [sample(unet, posterior, batch) for batch in shard_batches(NUM_SAMPLES, SAMPLE_BATCH)]
        mine = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        results["samples"] = gather_by_index(shard_indices(NUM_SAMPLES, SAMPLE_BATCH), mine)

        state = AccelerateLikeState(rank, world)
        results["state"] = (rank_and_world(state), shard_indices(NUM_SAMPLES, SAMPLE_BATCH, state))

        def refuse_on_rank_one(x0):
            if rank == 1:
                raise ValueError(FAILURE)
            return {}

        try:
            fit(unet, "diag", "ggn", images(), model_kwargs=refuse_on_rank_one)
            results["failure"] = None
        except (RankFailed, ValueError) as error:
            results["failure"] = (type(error).__name__, str(error))
        torch.save(results, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
