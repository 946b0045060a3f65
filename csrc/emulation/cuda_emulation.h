// Host emulation of the CUDA execution model, so that the *same* kernel source (.cu) compiles with
// g++ and runs in the test suite on a machine without a GPU.
//
// Every launch is serialised; blocks run one after another; the threads of a block are real host
// threads, so `__shared__` (a function-local static here) is shared within the block, and
// __syncthreads and warp shuffles are barriers. It checks indexing, bounds, grid-stride tails,
// launch configurations and reductions; it has no performance meaning. Keep the grid small
// (launch_config.h caps it under emulation). What it cannot reproduce, and so never proves:
//  * memory-model and race fidelity: threads really run concurrently, so a missing barrier or
//    atomic shows up often, but not always;
//  * uninitialised shared memory: a `__shared__` array starts at zero and keeps the previous
//    block's values, where a GPU gives garbage;
//  * partial-warp shuffles: a shuffle or __syncwarp waits for every live lane of the warp, so its
//    mask must name them all (a narrower mask raises instead of deadlocking);
//  * dynamic (`extern __shared__`) shared memory, cooperative groups, streams.
// An exception thrown by a kernel thread (a misused primitive) ends that thread like a return and
// is rethrown by the launch once the block has finished.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>  // device code sees the math functions without an include
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
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
  explicit Warp(unsigned lanes) : barrier(lanes), live(lanes == 32 ? ~0u : (1u << lanes) - 1u) {}
  std::barrier<> barrier;
  std::atomic<unsigned> live;  // lanes that have not returned
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
  std::mutex failure_mutex;
  std::exception_ptr failure;
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

// The limits a GPU enforces at launch (compute capability ≥ 3.0), so that a configuration the
// hardware would reject fails here too.
inline void check_launch_configuration(dim3 grid, dim3 block) {
  const auto describe = [](const char* what, dim3 d) {
    return std::string(what) + " (" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) +
           ")";
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    throw std::invalid_argument("CUDA emulation: invalid launch configuration: " + describe("grid", grid));
  }
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) {
    throw std::invalid_argument("CUDA emulation: invalid launch configuration: " + describe("block", block) +
                                "; at most 1024 threads, z <= 64");
  }
}

template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block_dim, Kernel kernel, Args... args) {
  check_launch_configuration(grid, block_dim);
  std::lock_guard<std::mutex> lock(launch_mutex());
  const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
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
            try {
              kernel(args...);
            } catch (...) {
              std::lock_guard<std::mutex> failure_lock(block.failure_mutex);
              if (!block.failure) block.failure = std::current_exception();
            }
            // A thread that has returned no longer takes part in barriers (as on the hardware).
            ctx.warp->live.fetch_and(~(1u << ctx.lane));
            ctx.warp->barrier.arrive_and_drop();
            block.barrier.arrive_and_drop();
            context = nullptr;
          });
        }
        for (auto& w : workers) w.join();
        if (block.failure) std::rethrow_exception(block.failure);
      }
}

// A warp-synchronous primitive needs every live lane of the warp (see the header comment).
inline void check_warp_mask(unsigned mask, const char* primitive) {
  const unsigned lane = context->lane;
  const unsigned live = context->warp->live.load();
  if (!((mask >> lane) & 1u)) {
    throw std::logic_error(std::string("CUDA emulation: ") + primitive + " called by lane " + std::to_string(lane) +
                           " with a mask that excludes it (undefined on the GPU)");
  }
  if (live & ~mask) {
    throw std::logic_error(std::string("CUDA emulation: ") + primitive + " with mask " + std::to_string(mask) +
                           " leaves out live lanes " + std::to_string(live & ~mask) +
                           "; the emulation synchronises whole warps, so every live lane must take part");
  }
}

inline void check_width(int width) {
  if (width < 1 || width > warpSize || (width & (width - 1))) {
    throw std::invalid_argument("CUDA emulation: shuffle width must be a power of two in [1, 32], got " +
                                std::to_string(width));
  }
}

// Every live lane publishes `value`, then reads the one published by `source_lane`.
template <typename T>
T exchange(unsigned mask, T value, unsigned source_lane) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "shuffle of an unsupported type");
  check_warp_mask(mask, "a warp shuffle");
  Warp& warp = *context->warp;
  std::memcpy(warp.slots[context->lane], &value, sizeof(T));
  warp.barrier.arrive_and_wait();
  T result;
  std::memcpy(&result, warp.slots[source_lane], sizeof(T));
  // No lane may publish its next value before every lane has read this one.
  warp.barrier.arrive_and_wait();
  return result;
}

// The overloads of atomicAdd that CUDA provides (half types aside): code that compiles here
// compiles with nvcc.
template <typename T>
inline constexpr bool is_cuda_atomic_add_type =
    std::is_same_v<T, int> || std::is_same_v<T, unsigned> || std::is_same_v<T, unsigned long long> ||
    std::is_same_v<T, float> || std::is_same_v<T, double>;

}  // namespace bdx_emu

#define threadIdx (::bdx_emu::context->thread_idx)
#define blockIdx (::bdx_emu::context->block_idx)
#define blockDim (::bdx_emu::context->block_dim)
#define gridDim (::bdx_emu::context->grid_dim)

inline void __syncthreads() { ::bdx_emu::context->block->barrier.arrive_and_wait(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::bdx_emu::check_warp_mask(mask, "__syncwarp");
  ::bdx_emu::context->warp->barrier.arrive_and_wait();
}

// Shuffle semantics as the CUDA programming guide states them: lanes form segments of `width`;
// down/up read lane ± delta and keep their own value past the segment's edge; xor may read an
// earlier segment but keeps its own value for a later one; idx reads srcLane modulo width within
// the segment.
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  ::bdx_emu::check_width(width);
  const unsigned lane = ::bdx_emu::context->lane;
  const unsigned in_segment = lane % static_cast<unsigned>(width);
  return ::bdx_emu::exchange(mask, value, in_segment + delta < static_cast<unsigned>(width) ? lane + delta : lane);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  ::bdx_emu::check_width(width);
  const unsigned lane = ::bdx_emu::context->lane;
  const unsigned in_segment = lane % static_cast<unsigned>(width);
  return ::bdx_emu::exchange(mask, value, in_segment >= delta ? lane - delta : lane);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize) {
  ::bdx_emu::check_width(width);
  const unsigned lane = ::bdx_emu::context->lane;
  const unsigned source = (lane ^ static_cast<unsigned>(lane_mask)) % warpSize;
  const bool later_segment = source / width > lane / width;
  return ::bdx_emu::exchange(mask, value, later_segment ? lane : source);
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int source_lane, int width = warpSize) {
  ::bdx_emu::check_width(width);
  const unsigned lane = ::bdx_emu::context->lane;
  const unsigned segment_start = lane / width * width;
  return ::bdx_emu::exchange(mask, value, segment_start + static_cast<unsigned>(source_lane) % width);
}

template <typename T>
T atomicAdd(T* address, T value) {
  static_assert(::bdx_emu::is_cuda_atomic_add_type<T>, "CUDA has no atomicAdd for this type");
  return std::atomic_ref<T>(*address).fetch_add(value);
}

template <typename T>
T __ldg(const T* address) {
  return *address;
}
