// Host emulation of the CUDA execution model, so that the *same* kernel source (.cu) compiles with
// g++ and runs in the test suite on a machine without a GPU.
//
// Every launch is serialised; blocks run one after another; the threads of a block are real host
// threads, so `__shared__` (a function-local static here) is shared within the block, and
// __syncthreads and warp shuffles are barriers. There is no memory-model or race fidelity and no
// performance meaning: it checks indexing, bounds, grid-stride tails and reductions. Keep the grid
// small (launch_config.h caps it under emulation).
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error (CUDA host emulation)"; }

constexpr int warpSize = 32;

namespace bdx_emu {

struct Warp {
  explicit Warp(std::ptrdiff_t lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  alignas(16) unsigned char slots[32][16];
};

struct Block {
  explicit Block(unsigned threads) : barrier(threads) {
    for (unsigned first = 0; first < threads; first += 32) {
      warps.push_back(std::make_unique<Warp>(std::min<unsigned>(32, threads - first)));
    }
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};

struct ThreadContext {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  Block* block;
  Warp* warp;
  unsigned lane;
};

inline thread_local ThreadContext* context = nullptr;

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block_dim, Kernel kernel, Args... args) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  if (threads == 0 || threads > 1024) throw std::invalid_argument("CUDA emulation: invalid block size");
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block block(threads);
        std::vector<std::thread> workers;
        workers.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          workers.emplace_back([&, t] {
            ThreadContext ctx{dim3(t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y)),
                              dim3(bx, by, bz), block_dim, grid, &block, block.warps[t / 32].get(), t % 32};
            context = &ctx;
            kernel(args...);
            // A thread that has returned no longer takes part in barriers (as on the hardware).
            ctx.warp->barrier.arrive_and_drop();
            block.barrier.arrive_and_drop();
            context = nullptr;
          });
        }
        for (auto& w : workers) w.join();
      }
}

template <typename T>
T exchange(T value, unsigned source_lane) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "shuffle of an unsupported type");
  Warp& warp = *context->warp;
  std::memcpy(warp.slots[context->lane], &value, sizeof(T));
  warp.barrier.arrive_and_wait();
  T result;
  std::memcpy(&result, warp.slots[source_lane], sizeof(T));
  warp.barrier.arrive_and_wait();
  return result;
}

}  // namespace bdx_emu

#define threadIdx (::bdx_emu::context->thread_idx)
#define blockIdx (::bdx_emu::context->block_idx)
#define blockDim (::bdx_emu::context->block_dim)
#define gridDim (::bdx_emu::context->grid_dim)

inline void __syncthreads() { ::bdx_emu::context->block->barrier.arrive_and_wait(); }

template <typename T>
T __shfl_down_sync(unsigned, T value, unsigned delta, int width = warpSize) {
  const unsigned lane = ::bdx_emu::context->lane;
  const unsigned in_segment = lane % width;
  return ::bdx_emu::exchange(value, in_segment + delta < static_cast<unsigned>(width) ? lane + delta : lane);
}

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int width = warpSize) {
  const unsigned lane = ::bdx_emu::context->lane;
  const unsigned source = lane ^ static_cast<unsigned>(lane_mask);
  return ::bdx_emu::exchange(value, source / width == lane / width ? source : lane);
}

template <typename T>
T __shfl_sync(unsigned, T value, int source_lane, int width = warpSize) {
  const unsigned lane = ::bdx_emu::context->lane;
  return ::bdx_emu::exchange(value, (lane / width) * width + static_cast<unsigned>(source_lane) % width);
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

template <typename T>
T __ldg(const T* address) {
  return *address;
}
