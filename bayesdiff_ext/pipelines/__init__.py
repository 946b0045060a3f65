"""Front doors into diffusers: a wrapper around an existing pipeline, and a callback for your own loop.

``BayesDiffPipeline.from_pipe(pipe, posterior)`` wraps a DDPMPipeline, DDIMPipeline or
StableDiffusionPipeline (stock call signature plus uncertainty arguments);
``UncertaintyCallback`` tracks the moments as a pipeline's ``callback_on_step_end``.
"""

from bayesdiff_ext.pipelines.base import BayesDiffPipeline
from bayesdiff_ext.pipelines.callback import UncertaintyCallback
from bayesdiff_ext.pipelines.outputs import BayesDiffPipelineOutput

# Defining the wrappers registers the stock pipelines they wrap with BayesDiffPipeline.from_pipe.
from bayesdiff_ext.pipelines import pixel, stable_diffusion  # noqa: F401

__all__ = ["BayesDiffPipeline", "BayesDiffPipelineOutput", "UncertaintyCallback"]
