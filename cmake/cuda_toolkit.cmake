# Decide BDX_CUDA_MODE (OFF, LINK or COMPILE_ONLY) from BAYESDIFF_CUDA, and enable CUDA if needed.
set(BDX_CUDA_MODE "OFF")
if(BAYESDIFF_CUDA STREQUAL "OFF")
  return()
endif()

# The nvcc first on PATH may be a wrapper script outside the toolkit; CMake must be given the
# toolkit's own nvcc so that it finds the headers and libraries beside it.
set(_bdx_nvcc "")
foreach(root $ENV{CUDA_HOME} $ENV{CUDA_PATH} /usr/local/cuda /usr/local/cuda-13.0)
  if(root AND EXISTS "${root}/bin/nvcc" AND NOT _bdx_nvcc)
    set(_bdx_nvcc "${root}/bin/nvcc")
  endif()
endforeach()
if(NOT _bdx_nvcc)
  file(GLOB _bdx_candidates /usr/local/cuda-*/bin/nvcc)
  if(_bdx_candidates)
    list(GET _bdx_candidates -1 _bdx_nvcc)
  endif()
endif()

if(NOT _bdx_nvcc)
  if(BAYESDIFF_CUDA STREQUAL "AUTO")
    message(STATUS "bayesdiff_ext: no nvcc found, building without CUDA kernels")
    return()
  endif()
  message(FATAL_ERROR "bayesdiff_ext: BAYESDIFF_CUDA=${BAYESDIFF_CUDA} but no nvcc was found; set CUDA_HOME")
endif()

if(BAYESDIFF_CUDA STREQUAL "COMPILE_ONLY")
  set(BDX_CUDA_MODE "COMPILE_ONLY")
elseif(BDX_TORCH_CUDA)
  set(BDX_CUDA_MODE "LINK")
elseif(BAYESDIFF_CUDA STREQUAL "ON")
  message(FATAL_ERROR "bayesdiff_ext: BAYESDIFF_CUDA=ON but torch ${BDX_TORCH_VERSION} is a CPU-only build")
else()
  message(STATUS "bayesdiff_ext: torch is CPU-only; CUDA kernels are compiled but not linked")
  set(BDX_CUDA_MODE "COMPILE_ONLY")
endif()

set(CMAKE_CUDA_COMPILER "${_bdx_nvcc}")
set(CMAKE_CUDA_ARCHITECTURES "${BAYESDIFF_CUDA_ARCHS}")
# The .cu files include no torch headers, so C++17 suffices (older CMake knows no C++20 for nvcc).
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
# Share the libcudart that torch loads instead of linking a second, static runtime.
set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
enable_language(CUDA)
# nvcc only warns when device code calls a host function; that is always a bug here.
set(CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS} --Werror=cross-execution-space-call --expt-relaxed-constexpr")
find_package(CUDAToolkit REQUIRED)
message(STATUS "bayesdiff_ext: CUDA kernels ${BDX_CUDA_MODE} with ${_bdx_nvcc} for sm ${BAYESDIFF_CUDA_ARCHS}")

if(BDX_CUDA_MODE STREQUAL "LINK")
  add_library(bdx_torch_cuda INTERFACE)
  target_link_libraries(bdx_torch_cuda INTERFACE c10_cuda torch_cuda bdx_torch)
  target_include_directories(bdx_torch_cuda SYSTEM INTERFACE ${CUDAToolkit_INCLUDE_DIRS})
endif()
