"""Per-sample quality oracles: the digits classifier's confidence and a k-NN realism score."""

from __future__ import annotations

import numpy as np
import torch

from bayesdiff_ext.metrics.knn_manifold import euclidean_distances, knn_radii

__all__ = ["classifier_confidence", "knn_realism"]


@torch.no_grad()
def classifier_confidence(classifier, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Max softmax probability (N,) of the classifier on images at model scale."""
    probs = [classifier(x).softmax(dim=1).amax(dim=1) for x in images.split(batch_size)]
    return torch.cat(probs).to(torch.float64).numpy()


def knn_realism(real: np.ndarray, fake: np.ndarray, k: int) -> np.ndarray:
    """Realism score of Kynkäänniemi et al. (2019): max_i r_k(real_i) / ‖fake − real_i‖ (N_fake,).

    r_k is the distance of a real sample to its k-th nearest real neighbour; > 1 means inside some
    real sample's k-NN ball. Higher is more realistic.
    """
    radii = knn_radii(real, k)
    dist = euclidean_distances(fake, real, np.einsum("ij,ij->i", real, real))
    return (radii[None, :] / np.maximum(dist, 1e-12)).max(axis=1)
