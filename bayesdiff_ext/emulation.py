"""The CUDA kernels' source run on host threads (for tests on machines without a GPU).

``load()`` returns ``torch.ops.bayesdiff_ext_emu``: the same schemas as ``torch.ops.bayesdiff_ext``,
implemented on CPU tensors by the .cu kernels and the CUDA glue compiled against a host emulation
of the CUDA execution model (csrc/emulation/cuda_emulation.h). Slow; no timing meaning.
"""

import functools

import torch

from bayesdiff_ext._fake_ops import register_fakes


@functools.cache
def load():
    try:
        from bayesdiff_ext import _cuda_emu  # noqa: F401  (registers bayesdiff_ext_emu)
    except ImportError as err:
        raise RuntimeError(
            "the CUDA emulation library was not built; rebuild with BAYESDIFF_CUDA_EMULATION=ON "
            "(the default): `make build`"
        ) from err
    register_fakes("bayesdiff_ext_emu")
    return torch.ops.bayesdiff_ext_emu
