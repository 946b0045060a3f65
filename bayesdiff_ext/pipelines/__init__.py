"""Front doors into diffusers: a wrapper around an existing pipeline, and a callback for its own loop.

``BayesDiffPipeline.from_pipe(pipe, posterior)`` wraps StableDiffusionPipeline,
StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline, PixArtSigmaPipeline, DiTPipeline,
DDPMPipeline and DDIMPipeline (the stock call signature plus uncertainty arguments);
``UncertaintyCallback`` tracks the moments as a pipeline's ``callback_on_step_end``.
"""

from bayesdiff_ext.pipelines.base import BayesDiffPipeline
from bayesdiff_ext.pipelines.callback import UncertaintyCallback

# Defining the wrappers registers the stock pipelines they wrap with BayesDiffPipeline.from_pipe.
from bayesdiff_ext.pipelines import dit, flux, pixart, pixel, sd3, stable_diffusion  # noqa: F401
from bayesdiff_ext.pipelines.fitting import fit_pipeline_posterior

__all__ = ["BayesDiffPipeline", "UncertaintyCallback", "fit_pipeline_posterior"]
