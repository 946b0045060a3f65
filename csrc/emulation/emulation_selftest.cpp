// Test-only kernels that pin down each primitive of the CUDA host emulation (cuda_emulation.h):
// __shared__ + __syncthreads, every warp shuffle, atomicAdd, early-returning threads, thread and
// block indexing, launch-configuration checks. Compiled only into _cuda_emu and registered as
// torch.ops.bayesdiff_ext_emu.emulation_selftest; tests/test_cuda_emulation.py drives it.
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <chrono>
#include <string>
#include <thread>

#include "kernels/platform.h"

namespace bdx::emulation_selftest {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxThreads = 1024;
constexpr int kIndexColumns = 9;

unsigned linear_thread() { return (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x; }
unsigned block_threads() { return blockDim.x * blockDim.y * blockDim.z; }

// Grid-stride sum: per-warp shuffle reduction, per-block shared-memory reduction, one atomicAdd
// per block. The block size must be a multiple of 32.
__global__ void block_sum_kernel(const double* x, int64_t n, double* out) {
  __shared__ double warp_sums[32];
  const unsigned t = linear_thread();
  double v = 0;
  for (int64_t i = int64_t(blockIdx.x) * block_threads() + t; i < n; i += int64_t(gridDim.x) * block_threads()) {
    v += x[i];
  }
  for (int offset = warpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset);
  if (t % warpSize == 0) warp_sums[t / warpSize] = v;
  __syncthreads();
  if (t < warpSize) {
    v = t < block_threads() / warpSize ? warp_sums[t] : 0.0;
    for (int offset = warpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset);
    if (t == 0) atomicAdd(out, v);
  }
}

// out[t] = the shuffle of x[t] (one block).
__global__ void shuffle_kernel(int which, const double* x, int arg, int width, double* out) {
  const unsigned t = linear_thread();
  const double v = x[t];
  double r = 0;
  switch (which) {
    case 0: r = __shfl_down_sync(kFullMask, v, static_cast<unsigned>(arg), width); break;
    case 1: r = __shfl_up_sync(kFullMask, v, static_cast<unsigned>(arg), width); break;
    case 2: r = __shfl_xor_sync(kFullMask, v, arg, width); break;
    default: r = __shfl_sync(kFullMask, v, arg, width); break;
  }
  out[t] = r;
}

// Reverses each block's slice through shared memory. Thread t stores last when t is lowest, so
// the threads reading the low slots run ahead; only __syncthreads makes them wait.
__global__ void reverse_kernel(const double* x, double* out) {
  __shared__ double tile[kMaxThreads];
  const unsigned t = linear_thread();
  const unsigned threads = block_threads();
  const int64_t base = int64_t(blockIdx.x) * threads;
  std::this_thread::sleep_for(std::chrono::microseconds(20 * (threads - 1 - t)));
  tile[t] = x[base + t];
  __syncthreads();
  out[base + t] = tile[threads - 1 - t];
}

// Threads t >= `stay` return at once; the rest keep using barriers and shuffles, which must not
// wait for the returned ones.
__global__ void early_exit_kernel(const double* x, int stay, double* out) {
  __shared__ double tile[kMaxThreads];
  const unsigned t = linear_thread();
  if (t >= static_cast<unsigned>(stay)) return;
  for (int round = 0; round < 2; ++round) {
    tile[t] = x[t] + round;
    __syncthreads();
    out[2 * t + round] = tile[(t + 1) % stay] + __shfl_xor_sync(kFullMask, 0.0, 1);
    __syncthreads();
  }
}

// Every thread adds 1, `repeats` times, to one counter of each atomicAdd type. The barrier first
// lines the threads up, so that their read-modify-writes overlap and a lost update would show.
__global__ void atomic_add_kernel(int repeats, double* as_double, float* as_float, unsigned long long* as_u64,
                                  int* as_int, unsigned* as_unsigned) {
  __syncthreads();
  for (int r = 0; r < repeats; ++r) {
    atomicAdd(as_double, 1.0);
    atomicAdd(as_float, 1.0f);
    atomicAdd(as_u64, 1ull);
    atomicAdd(as_int, 1);
    atomicAdd(as_unsigned, 1u);
  }
}

// Each thread's indices, and the linear index of its warp's lane 0: warps are runs of 32
// consecutive linear indices x + Dx·(y + Dy·z), which ties threadIdx to the lanes.
__global__ void thread_index_kernel(double* out) {
  const int64_t row = int64_t(blockIdx.x) * block_threads() + linear_thread();
  const double values[kIndexColumns] = {
      double(blockIdx.x), double(threadIdx.x), double(threadIdx.y), double(threadIdx.z), double(gridDim.x),
      double(blockDim.x), double(blockDim.y),  double(blockDim.z),  __shfl_sync(kFullMask, double(linear_thread()), 0)};
  for (int k = 0; k < kIndexColumns; ++k) out[row * kIndexColumns + k] = values[k];
}

// Lanes below 16 shuffle with a 16-lane mask while the others stay live: unsupported here.
__global__ void partial_mask_kernel(const double* x, double* out) {
  const unsigned t = linear_thread();
  if (t % warpSize < 16) out[t] = __shfl_sync(0x0000ffffu, x[t], 0);
}

at::Tensor selftest(c10::string_view kernel_name, const at::Tensor& x_in, at::IntArrayRef block, int64_t grid,
                    int64_t arg, int64_t width) {
  TORCH_CHECK(x_in.scalar_type() == at::kDouble && x_in.dim() == 1, "emulation_selftest: `x` must be 1-D float64");
  TORCH_CHECK(block.size() == 3 && grid >= 0, "emulation_selftest: `block` must have 3 entries");
  const at::Tensor x = x_in.contiguous();
  const std::string kernel(kernel_name);
  const dim3 block_dim(static_cast<unsigned>(block[0]), static_cast<unsigned>(block[1]),
                       static_cast<unsigned>(block[2]));
  const dim3 grid_dim(static_cast<unsigned>(grid));
  const int64_t threads = block[0] * block[1] * block[2];
  const double* xs = x.const_data_ptr<double>();
  const auto options = x.options();
  if (kernel == "block_sum") {
    at::Tensor out = at::zeros({1}, options);
    BDX_LAUNCH(block_sum_kernel, grid_dim, block_dim, nullptr, xs, x.numel(), out.data_ptr<double>());
    return out;
  }
  if (kernel == "shfl_down" || kernel == "shfl_up" || kernel == "shfl_xor" || kernel == "shfl_idx") {
    const int which = kernel == "shfl_down" ? 0 : kernel == "shfl_up" ? 1 : kernel == "shfl_xor" ? 2 : 3;
    TORCH_CHECK(x.numel() >= threads, "emulation_selftest: `x` needs one value per thread");
    at::Tensor out = at::zeros({threads}, options);
    BDX_LAUNCH(shuffle_kernel, dim3(1), block_dim, nullptr, which, xs, static_cast<int>(arg), static_cast<int>(width),
               out.data_ptr<double>());
    return out;
  }
  if (kernel == "reverse") {
    TORCH_CHECK(x.numel() >= grid * threads && threads <= kMaxThreads, "emulation_selftest: `x` too short");
    at::Tensor out = at::zeros({grid * threads}, options);
    BDX_LAUNCH(reverse_kernel, grid_dim, block_dim, nullptr, xs, out.data_ptr<double>());
    return out;
  }
  if (kernel == "early_exit") {
    TORCH_CHECK(arg >= 1 && arg <= threads && x.numel() >= threads, "emulation_selftest: bad `arg`");
    at::Tensor out = at::zeros({2 * arg}, options);
    BDX_LAUNCH(early_exit_kernel, dim3(1), block_dim, nullptr, xs, static_cast<int>(arg), out.data_ptr<double>());
    return out;
  }
  if (kernel == "atomic_add") {
    double as_double = 0;
    float as_float = 0;
    unsigned long long as_u64 = 0;
    int as_int = 0;
    unsigned as_unsigned = 0;
    BDX_LAUNCH(atomic_add_kernel, grid_dim, block_dim, nullptr, static_cast<int>(arg), &as_double, &as_float, &as_u64,
               &as_int, &as_unsigned);
    at::Tensor out = at::empty({5}, options);
    double* counts = out.data_ptr<double>();
    counts[0] = as_double;
    counts[1] = as_float;
    counts[2] = static_cast<double>(as_u64);
    counts[3] = as_int;
    counts[4] = as_unsigned;
    return out;
  }
  if (kernel == "thread_index") {
    at::Tensor out = at::full({grid * threads, kIndexColumns}, -1.0, options);
    BDX_LAUNCH(thread_index_kernel, grid_dim, block_dim, nullptr, out.data_ptr<double>());
    return out;
  }
  if (kernel == "partial_mask") {
    at::Tensor out = at::zeros({threads}, options);
    BDX_LAUNCH(partial_mask_kernel, dim3(1), block_dim, nullptr, xs, out.data_ptr<double>());
    return out;
  }
  TORCH_CHECK(false, "emulation_selftest: unknown kernel '", kernel, "'");
}

}  // namespace
}  // namespace bdx::emulation_selftest

TORCH_LIBRARY_FRAGMENT(bayesdiff_ext_emu, m) {
  m.def("emulation_selftest(str kernel, Tensor x, int[3] block, int grid, int arg, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(bayesdiff_ext_emu, CPU, m) { m.impl("emulation_selftest", &bdx::emulation_selftest::selftest); }
