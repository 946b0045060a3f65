// The Python extension module. Loading it registers the ops (TORCH_LIBRARY in register_ops.cpp
// and the backend files); the module itself exposes only facts about the build.
#include <pybind11/pybind11.h>

#ifndef BDX_CUDA_ARCHS
#define BDX_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "bayesdiff_ext compiled ops (registered as torch.ops.bayesdiff_ext.*)";
  m.def("build_info", [] {
    pybind11::dict info;
    info["torch_version"] = BDX_TORCH_VERSION;
    info["cuda_mode"] = BDX_CUDA_MODE;
#if defined(BDX_WITH_CUDA)
    info["cuda_kernels"] = true;
#else
    info["cuda_kernels"] = false;
#endif
    info["cuda_archs"] = BDX_CUDA_ARCHS;
    return info;
  });
}
