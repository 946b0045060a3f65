"""Last-layer Laplace posteriors on a diffusion model's noise-prediction head."""

from bayesdiff_ext.posterior.capture import HeadInputCapture, capture_head_input

__all__ = ["HeadInputCapture", "capture_head_input"]
