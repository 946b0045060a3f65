"""Last-layer Laplace posteriors on a diffusion model's noise-prediction head.

``LastLayerLaplace`` is the public face; the modules below it, one job each:
``heads`` (find the head, its geometry, refusals), ``capture`` (the φ hook), ``head_ops`` (the
fused ops on a conv or Linear head), ``diag``/``full``/``kron``/``isotropic`` (curvature → op
inputs → predictive), ``hyperparameters`` (σ, MacKay, evidence), ``fitting`` (the data loop),
``serialization`` (save/load), ``laplace_torch`` (adopting laplace-torch posteriors).

The other inferences on the same head (``inference``: ``LastLayerVI``, ``LastLayerMCMC``,
``LastLayerHeadEnsemble``) run on its linear-Gaussian statistics (``linear_gaussian``) with
``variational``, ``hmc`` (+ ``mcmc_diagnostics``) and ``head_ensemble``, and yield the distributions
of ``weight_distributions``; ``load_posterior`` opens any saved posterior.
"""

from bayesdiff_ext.posterior.capture import HeadInputCapture, capture_head_input
from bayesdiff_ext.posterior.heads import HeadSpec
from bayesdiff_ext.posterior.inference import LastLayerHeadEnsemble, LastLayerMCMC, LastLayerPosterior, LastLayerVI
from bayesdiff_ext.posterior.last_layer_laplace import LastLayerLaplace
from bayesdiff_ext.posterior.loading import load_posterior

__all__ = [
    "HeadInputCapture",
    "HeadSpec",
    "LastLayerHeadEnsemble",
    "LastLayerLaplace",
    "LastLayerMCMC",
    "LastLayerPosterior",
    "LastLayerVI",
    "capture_head_input",
    "load_posterior",
]
