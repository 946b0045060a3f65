// Host emulation of the CUDA kernels, for tests: the CUDA kernel source and glue compiled with
// cuda_emulation.h and registered as torch.ops.bayesdiff_ext_emu.* on the CPU key.
#include <pybind11/pybind11.h>

#include "schemas.h"

TORCH_LIBRARY(bayesdiff_ext_emu, m) { bdx::define_schemas(m); }

PYBIND11_MODULE(_cuda_emu, m) {
  m.doc() = "CUDA kernel source run on host threads (tests only); ops in torch.ops.bayesdiff_ext_emu";
}
