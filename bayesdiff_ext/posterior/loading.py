"""``load_posterior``: one loader for every posterior file, whichever inference wrote it.

Every file has the Laplace layout (``serialization``): safetensors with the JSON metadata entry
``bayesdiff_ext.posterior``. A file without ``inference`` in it is a Laplace posterior; otherwise
``inference`` names the class that saved it (``inference.INFERENCES``).
"""

from __future__ import annotations

from torch import nn

from bayesdiff_ext.posterior.inference import INFERENCES, LastLayerPosterior
from bayesdiff_ext.posterior.last_layer_laplace import LastLayerLaplace
from bayesdiff_ext.posterior.serialization import damaged_file, read_posterior_file

__all__ = ["load_posterior"]


def load_posterior(path, model: nn.Module, *, head: nn.Module | None = None) -> LastLayerLaplace | LastLayerPosterior:
    """The posterior saved in ``path`` on ``model``'s head, as the object that fitted it: a
    ``LastLayerLaplace``, ``LastLayerVI``, ``LastLayerMCMC`` or ``LastLayerHeadEnsemble``.

    ValueError if the file is not a posterior of a known kind or was fitted for a head of another
    shape; a warning if the head's weights differ from those it was fitted at.
    """
    meta, _ = read_posterior_file(path, prefix=None)
    inference = meta.get("inference", "laplace")
    if inference == "laplace":
        return LastLayerLaplace.load(path, model, head=head)
    if inference not in INFERENCES:
        known = ", ".join(["laplace", *INFERENCES])
        raise ValueError(f"{path} holds a posterior of unknown inference {inference!r}; known: {known}")
    with damaged_file(path):
        return INFERENCES[inference].load(path, model, head=head)
