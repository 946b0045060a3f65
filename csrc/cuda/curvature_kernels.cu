// CUDA kernels of the curvature accumulators (docs/MATH.md §1.2). No torch headers: see curvature_kernels.h.
// Patch entries are read from φ on the fly (kernels/curvature_math.h): nothing is unfolded.
#include "cuda/curvature_kernels.h"
#include "cuda/launch_config.h"
#include "cuda/linear_curvature_kernels.h"

namespace bdx::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// Positions staged in shared memory per step, and the edge of a Gram tile.
constexpr int kTile = 32;
// Gram: 16×16 threads, each owning the 2×2 tile entries (y + 16a, x + 16b).
constexpr int kGramThreads = 16;
// EF: 32 patch entries (threadIdx.x) × 8 output channels (threadIdx.y) per block.
constexpr int kEfEntries = 32;
constexpr int kEfChannels = 8;
// Blocks the Gram's split over positions aims for, so that small D still fills the GPU.
constexpr int64_t kGramTargetBlocks = 1024;

BDX_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned capped_blocks(int64_t wanted) {
  return static_cast<unsigned>(wanted < 1 ? 1 : (wanted > kMaxBlocks ? kMaxBlocks : wanted));
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
  for (int offset = warpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset);
  return v;
}

// Sum over a 1-D block whose size is a multiple of 32; the result is valid in thread 0. Every
// thread of the block must call it.
template <typename Acc>
__device__ Acc block_sum(Acc v) {
  __shared__ Acc warp_sums[32];
  const unsigned lane = threadIdx.x % warpSize;
  const unsigned warp = threadIdx.x / warpSize;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < blockDim.x / warpSize ? warp_sums[lane] : Acc(0);
    v = warp_sum(v);
  }
  // warp_sums is reused by the block's next call.
  __syncthreads();
  return v;
}

template <typename T>
__global__ void batch_square_sum_kernel(const T* __restrict__ phi, PatchGeometry g,
                                        acc_t<T>* __restrict__ square_sum) {
  const int64_t numel = g.channels * g.plane();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    square_sum[i] = batch_square_sum<acc_t<T>>(phi, g, i);
  }
}

// One block per output (c, i, j): the sum of Σ_n φ² over the input pixels that tap reads.
template <typename Acc>
__global__ void tap_sum_kernel(const Acc* __restrict__ square_sum, PatchGeometry g, Acc* __restrict__ out) {
  const int64_t outputs = g.channels * g.taps();
  for (int64_t o = blockIdx.x; o < outputs; o += gridDim.x) {
    const int64_t tap = o % g.taps();
    const Acc* plane = square_sum + (o / g.taps()) * g.plane();
    Acc sum = Acc(0);
    for (int64_t p = threadIdx.x; p < g.positions(); p += blockDim.x) {
      const int64_t offset = tap_plane_offset(g, p, tap / g.kernel_w, tap % g.kernel_w);
      if (offset >= 0) sum += plane[offset];
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) out[o] = sum;
  }
}

// Gram of the augmented patches: a block owns a kTile×kTile tile (row tile ≤ column tile, the
// lower triangle is mirrored on write) over one slice of batch positions, and adds its partial
// sums atomically. Each step stages kTile positions' entries of both tiles in shared memory.
// Acc is acc_t<T> for conv heads and double for Linear heads (linear_curvature_math.h).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kGramThreads * kGramThreads)
    patch_gram_kernel(const T* __restrict__ phi, PatchGeometry g, int64_t tiles, int64_t positions_per_split,
                      Acc* __restrict__ gram) {
  // [position][entry]; the +1 column keeps the per-position stores free of bank conflicts.
  __shared__ Acc row_tile[kTile][kTile + 1];
  __shared__ Acc col_tile[kTile][kTile + 1];
  const int64_t augmented = g.patch_size() + 1;
  const int64_t total = g.batch * g.positions();
  const int64_t pairs = tiles * (tiles + 1) / 2;
  const int64_t splits = ceil_div(total, positions_per_split);
  // Loading: a thread stages one position (its lane) and every 8th entry from its warp index.
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int load_position = tid % kTile;
  const int load_entry = tid / kTile;
  constexpr int kEntryStep = kGramThreads * kGramThreads / kTile;

  for (int64_t pair = blockIdx.x; pair < pairs; pair += gridDim.x) {
    int64_t ti = 0;
    int64_t rest = pair;
    while (rest >= tiles - ti) {
      rest -= tiles - ti;
      ++ti;
    }
    const int64_t tj = ti + rest;
    const bool diagonal = ti == tj;
    Acc(*cols)[kTile + 1] = diagonal ? row_tile : col_tile;
    // The entries this thread stages, split once per tile pair instead of once per position.
    AugmentedEntry row_entries[kTile / kEntryStep];
    AugmentedEntry col_entries[kTile / kEntryStep];
    for (int m = 0; m < kTile / kEntryStep; ++m) {
      row_entries[m] = augmented_entry(g, ti * kTile + load_entry + m * kEntryStep);
      col_entries[m] = augmented_entry(g, tj * kTile + load_entry + m * kEntryStep);
    }

    for (int64_t split = blockIdx.y; split < splits; split += gridDim.y) {
      Acc sums[2][2] = {{Acc(0), Acc(0)}, {Acc(0), Acc(0)}};
      const int64_t q_begin = split * positions_per_split;
      const int64_t q_end = q_begin + positions_per_split < total ? q_begin + positions_per_split : total;
      for (int64_t q0 = q_begin; q0 < q_end; q0 += kTile) {
        const int64_t q = q0 + load_position;
        const bool valid = q < q_end;
        const PatchPosition pos = patch_position(g, valid ? q : q0);
        for (int m = 0; m < kTile / kEntryStep; ++m) {
          const int e = load_entry + m * kEntryStep;
          row_tile[load_position][e] = valid ? augmented_patch_value<Acc>(phi, g, pos, row_entries[m]) : Acc(0);
          if (!diagonal) {
            col_tile[load_position][e] = valid ? augmented_patch_value<Acc>(phi, g, pos, col_entries[m]) : Acc(0);
          }
        }
        __syncthreads();
        for (int k = 0; k < kTile; ++k) {
          const Acc r0 = row_tile[k][threadIdx.y];
          const Acc r1 = row_tile[k][threadIdx.y + kGramThreads];
          const Acc c0 = cols[k][threadIdx.x];
          const Acc c1 = cols[k][threadIdx.x + kGramThreads];
          sums[0][0] += r0 * c0;
          sums[0][1] += r0 * c1;
          sums[1][0] += r1 * c0;
          sums[1][1] += r1 * c1;
        }
        __syncthreads();
      }
      for (int a = 0; a < 2; ++a) {
        for (int b = 0; b < 2; ++b) {
          const int64_t row = ti * kTile + threadIdx.y + a * kGramThreads;
          const int64_t col = tj * kTile + threadIdx.x + b * kGramThreads;
          if (row >= augmented || col >= augmented) continue;
          atomicAdd(&gram[row * augmented + col], sums[a][b]);
          if (!diagonal) atomicAdd(&gram[col * augmented + row], sums[a][b]);
        }
      }
    }
  }
}

// Diagonal EF: a block owns image n, kEfEntries patch entries and kEfChannels output channels; each
// thread forms one entry of the image's gradient Σ_p r[c, p] φ_p[d] over all positions, then adds
// its square atomically (images are summed across blocks).
template <typename T>
__global__ void __launch_bounds__(kEfEntries * kEfChannels)
    diag_ef_kernel(const T* __restrict__ phi, const T* __restrict__ residual, PatchGeometry g,
                   int64_t out_channels, acc_t<T>* __restrict__ out) {
  using Acc = acc_t<T>;
  __shared__ Acc patch_tile[kTile][kEfEntries + 1];       // [position][entry]
  __shared__ Acc residual_tile[kEfChannels][kTile + 1];   // [channel][position]
  const int64_t patch = g.patch_size();
  const int64_t positions = g.positions();
  const int64_t entry_tiles = ceil_div(patch, kEfEntries);
  const int64_t channel_tiles = ceil_div(out_channels, kEfChannels);
  const int64_t work_items = g.batch * entry_tiles * channel_tiles;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int load_position = tid % kTile;
  const int load_row = tid / kTile;  // 0 .. kEfChannels-1
  constexpr int kEntryStep = kEfEntries * kEfChannels / kTile;

  for (int64_t work = blockIdx.x; work < work_items; work += gridDim.x) {
    // Channel tiles vary fastest: neighbouring blocks read the same patch entries.
    const int64_t n = work / (entry_tiles * channel_tiles);
    const int64_t entry_base = (work / channel_tiles) % entry_tiles * kEfEntries;
    const int64_t channel_base = work % channel_tiles * kEfChannels;
    AugmentedEntry entries[kEfEntries / kEntryStep];
    for (int m = 0; m < kEfEntries / kEntryStep; ++m) {
      const int64_t d = entry_base + load_row + m * kEntryStep;
      // Past D the tile's tail reads zeros (the bias entry is not part of the EF).
      entries[m] = augmented_entry(g, d < patch ? d : patch + 1);
    }
    Acc gradient = Acc(0);
    for (int64_t p0 = 0; p0 < positions; p0 += kTile) {
      const int64_t p = p0 + load_position;
      const bool valid = p < positions;
      const PatchPosition pos = patch_position(g, n * positions + (valid ? p : p0));
      for (int m = 0; m < kEfEntries / kEntryStep; ++m) {
        patch_tile[load_position][load_row + m * kEntryStep] =
            valid ? augmented_patch_value<Acc>(phi, g, pos, entries[m]) : Acc(0);
      }
      const int64_t rc = channel_base + load_row;
      residual_tile[load_row][load_position] =
          valid && rc < out_channels ? load<Acc>(residual, (n * out_channels + rc) * positions + p) : Acc(0);
      __syncthreads();
      for (int k = 0; k < kTile; ++k) gradient += residual_tile[threadIdx.y][k] * patch_tile[k][threadIdx.x];
      __syncthreads();
    }
    const int64_t c = channel_base + threadIdx.y;
    const int64_t d = entry_base + threadIdx.x;
    if (c < out_channels && d < patch) atomicAdd(&out[c * patch + d], gradient * gradient);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_conv_diag_ggn(const T* phi, const PatchGeometry& g, acc_t<T>* square_sum, acc_t<T>* out,
                                 cudaStream_t stream) {
  const int64_t outputs = g.channels * g.taps();
  if (outputs == 0) return cudaSuccess;
  const int64_t pixels = g.channels * g.plane();
  BDX_LAUNCH(batch_square_sum_kernel<T>, blocks_for(pixels), kThreadsPerBlock, stream, phi, g, square_sum);
  BDX_LAUNCH(tap_sum_kernel<acc_t<T>>, capped_blocks(outputs), kThreadsPerBlock, stream, square_sum, g, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_conv_diag_ef(const T* phi, const T* residual, const PatchGeometry& g, int64_t out_channels,
                                acc_t<T>* out, cudaStream_t stream) {
  const int64_t work_items =
      g.batch * ceil_div(g.patch_size(), kEfEntries) * ceil_div(out_channels, kEfChannels);
  if (work_items == 0) return cudaSuccess;
  BDX_LAUNCH(diag_ef_kernel<T>, capped_blocks(work_items), dim3(kEfEntries, kEfChannels), stream, phi, residual, g,
             out_channels, out);
  return cudaGetLastError();
}

namespace {

template <typename T, typename Acc>
cudaError_t launch_patch_gram(const T* phi, const PatchGeometry& g, Acc* gram, cudaStream_t stream) {
  const int64_t total = g.batch * g.positions();
  if (total == 0) return cudaSuccess;
  const int64_t tiles = ceil_div(g.patch_size() + 1, kTile);
  const int64_t pairs = tiles * (tiles + 1) / 2;
  // Split the positions so that pairs × splits approaches the target, in whole kTile steps.
  const int64_t wanted_splits = ceil_div(kGramTargetBlocks, pairs);
  const int64_t steps = ceil_div(total, kTile);
  const int64_t splits = wanted_splits < steps ? wanted_splits : steps;
  const int64_t positions_per_split = ceil_div(steps, splits) * kTile;
  const unsigned grid_x = capped_blocks(pairs);
  // The cap applies to the whole grid: under emulation every block is a batch of host threads.
  const int64_t split_blocks = ceil_div(total, positions_per_split);
  const int64_t room = kMaxBlocks / grid_x;
  const dim3 grid(grid_x, capped_blocks(split_blocks < room ? split_blocks : room));
  const auto kernel = patch_gram_kernel<T, Acc>;  // a name without a comma, for the launch macro
  BDX_LAUNCH(kernel, grid, dim3(kGramThreads, kGramThreads), stream, phi, g, tiles, positions_per_split, gram);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_conv_patch_gram(const T* phi, const PatchGeometry& g, acc_t<T>* gram, cudaStream_t stream) {
  return launch_patch_gram(phi, g, gram, stream);
}

// Rows (R, D) are the NCHW layout of R images of D channels at 1×1, seen by a 1×1 kernel.
template <typename T>
cudaError_t launch_linear_gram(const T* phi, const TokenGeometry& rows, double* gram, cudaStream_t stream) {
  PatchGeometry g{};
  g.batch = rows.rows();
  g.channels = rows.features;
  g.height = g.width = g.kernel_h = g.kernel_w = 1;
  g.stride_h = g.stride_w = g.dilation_h = g.dilation_w = 1;
  g.out_h = g.out_w = 1;
  return launch_patch_gram(phi, g, gram, stream);
}

#define BDX_INSTANTIATE(T)                                                                                     \
  template cudaError_t launch_conv_diag_ggn<T>(const T*, const PatchGeometry&, acc_t<T>*, acc_t<T>*,           \
                                               cudaStream_t);                                                  \
  template cudaError_t launch_conv_diag_ef<T>(const T*, const T*, const PatchGeometry&, int64_t, acc_t<T>*,    \
                                              cudaStream_t);                                                   \
  template cudaError_t launch_conv_patch_gram<T>(const T*, const PatchGeometry&, acc_t<T>*, cudaStream_t);       \
  template cudaError_t launch_linear_gram<T>(const T*, const TokenGeometry&, double*, cudaStream_t);
BDX_INSTANTIATE(float)
BDX_INSTANTIATE(double)
BDX_INSTANTIATE(half_t)
BDX_INSTANTIATE(bfloat16_t)
#undef BDX_INSTANTIATE

}  // namespace bdx::cuda
