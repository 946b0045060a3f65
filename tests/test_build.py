"""The compiled library: what was built, and that every op has a kernel for every backend built."""

import os
import shutil

import pytest
import torch

import bayesdiff_ext

OPS = [
    "moment_step",
    "mc_moments",
    "mc_moment_step",
    "conv_head_mean_var",
    "linear_head_mean_var",
    "conv_head_var_factored",
    "conv_diag_ggn",
    "conv_diag_ef",
    "conv_patch_gram",
    "linear_diag_ggn",
    "linear_diag_ef",
    "linear_gram",
]


def test_every_schema_is_listed_here():
    """A new op added to csrc/schemas.h must be added to OPS (and so get its backend checks)."""
    import re
    from pathlib import Path

    schemas = Path(__file__).resolve().parents[1] / "csrc" / "schemas.h"
    defined = re.findall(r'"([a-z_0-9]+)\(', schemas.read_text())
    assert sorted(defined) == sorted(OPS)


def _nvcc_available() -> bool:
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    return any(r and os.path.exists(os.path.join(r, "bin", "nvcc")) for r in roots) or bool(shutil.which("nvcc"))


def test_build_info_reports_the_torch_it_was_built_against():
    info = bayesdiff_ext.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["cuda_mode"] in {"LINK", "COMPILE_ONLY", "OFF"}


@pytest.mark.skipif(not (torch.version.cuda and _nvcc_available()), reason="needs a CUDA build of torch and nvcc")
def test_cuda_kernels_are_linked_with_a_cuda_torch():
    info = bayesdiff_ext.build_info()
    assert info["cuda_kernels"] and info["cuda_mode"] == "LINK", info


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_cpu_and_emulated_cuda_kernels(op):
    from bayesdiff_ext import emulation

    emulation.load()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bayesdiff_ext::{op}", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bayesdiff_ext_emu::{op}", "CPU")
    if bayesdiff_ext.build_info()["cuda_kernels"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bayesdiff_ext::{op}", "CUDA")
