# Import targets for torch's headers and libraries straight from the installed torch package.
# torch's own CMake config (find_package(Torch)) wants a complete CUDA toolkit (nvrtc, cuBLAS
# headers) and an arch list before it configures even a CPU-only target; we need none of that.
find_package(Threads REQUIRED)
execute_process(
  COMMAND ${Python_EXECUTABLE} -c
    "import os, torch; from torch.utils import cpp_extension as c; print(','.join(c.include_paths())); print(os.path.join(os.path.dirname(torch.__file__), 'lib')); print(int(torch.compiled_with_cxx11_abi())); print(torch.__version__); print(torch.version.cuda or '')"
  OUTPUT_VARIABLE _bdx_torch_info
  RESULT_VARIABLE _bdx_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _bdx_torch_rc EQUAL 0)
  message(FATAL_ERROR "bayesdiff_ext: `import torch` failed in ${Python_EXECUTABLE}. Install torch first, "
                      "then build with `pip install --no-build-isolation -e .` (or run `make build`).")
endif()
string(REPLACE "\n" ";" _bdx_torch_info "${_bdx_torch_info}")
list(LENGTH _bdx_torch_info _n)
list(GET _bdx_torch_info 0 _bdx_inc)
list(GET _bdx_torch_info 1 BDX_TORCH_LIBDIR)
list(GET _bdx_torch_info 2 _bdx_abi)
list(GET _bdx_torch_info 3 BDX_TORCH_VERSION)
set(BDX_TORCH_CUDA "")
if(_n GREATER 4)
  list(GET _bdx_torch_info 4 BDX_TORCH_CUDA)
endif()
string(REPLACE "," ";" _bdx_inc "${_bdx_inc}")
message(STATUS "bayesdiff_ext: torch ${BDX_TORCH_VERSION} (CUDA '${BDX_TORCH_CUDA}') in ${BDX_TORCH_LIBDIR}")

add_library(bdx_torch INTERFACE)
target_include_directories(bdx_torch SYSTEM INTERFACE ${_bdx_inc})
target_compile_definitions(bdx_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_bdx_abi})
target_link_directories(bdx_torch INTERFACE ${BDX_TORCH_LIBDIR})
target_link_libraries(bdx_torch INTERFACE c10 torch_cpu Threads::Threads)
# The extension loads after `import torch`, which has already mapped these libraries; the rpath
# only matters for tools that open the .so on their own.
set(CMAKE_BUILD_RPATH "${BDX_TORCH_LIBDIR}")
set(CMAKE_INSTALL_RPATH "${BDX_TORCH_LIBDIR}")
