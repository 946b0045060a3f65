import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import bayesdiff_ext.ops  # noqa: E402,F401  (registers the ops and their fake kernels)

# The tests run tiny tensors, where intra-op threads cost more than they give: on a loaded 2-core
# machine a tiny conv took 22 ms with 2 threads and 0.26 ms with 1. Override to test threading.
torch.set_num_threads(int(os.environ.get("BAYESDIFF_TEST_THREADS", "1")))
from bayesdiff_ext import emulation  # noqa: E402


class Backend:
    """Where an op runs: the CPU kernels, the CUDA kernel source under host emulation, or a GPU."""

    def __init__(self, name: str, ops, device: str):
        self.name, self.ops, self.device = name, ops, device

    def __repr__(self) -> str:
        return self.name


def _backends():
    yield pytest.param(lambda: Backend("cpu", torch.ops.bayesdiff_ext, "cpu"), id="cpu")
    yield pytest.param(lambda: Backend("emulated_cuda", emulation.load(), "cpu"), id="emulated_cuda")
    yield pytest.param(
        lambda: Backend("cuda", torch.ops.bayesdiff_ext, "cuda"),
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    )


@pytest.fixture(params=list(_backends()))
def backend(request):
    return request.param()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
