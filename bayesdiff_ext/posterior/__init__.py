"""Last-layer Laplace posteriors on a diffusion model's noise-prediction head.

``LastLayerLaplace`` is the public face; the modules below it, one job each:
``heads`` (find the head, its geometry, refusals), ``capture`` (the φ hook), ``head_ops`` (the
fused ops on a conv or Linear head), ``diag``/``full``/``kron``/``isotropic`` (curvature → op
inputs → predictive), ``hyperparameters`` (σ, MacKay, evidence), ``fitting`` (the data loop),
``serialization`` (save/load), ``laplace_torch`` (adopting laplace-torch posteriors).
"""

from bayesdiff_ext.posterior.capture import HeadInputCapture, capture_head_input
from bayesdiff_ext.posterior.heads import HeadSpec
from bayesdiff_ext.posterior.last_layer_laplace import LastLayerLaplace

__all__ = ["HeadInputCapture", "HeadSpec", "LastLayerLaplace", "capture_head_input"]
