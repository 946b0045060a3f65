// CUDA kernels of the Linear-head fitting sums (docs/MATH.md §1.2). No torch headers: see
// linear_curvature_kernels.h. The Gram's kernel is the patch Gram's (curvature_kernels.cu).
#include "cuda/launch_config.h"
#include "cuda/linear_curvature_kernels.h"

namespace bdx::cuda {
namespace {

// Rows staged in shared memory per step.
constexpr int kTokenTile = 32;
// EF: 32 augmented features (threadIdx.x) × 8 outputs (threadIdx.y) per block.
constexpr int kEfFeatures = 32;
constexpr int kEfOutputs = 8;
static_assert(kEfFeatures * kEfOutputs == kTokenTile * kEfOutputs && kTokenTile == kEfFeatures,
              "the EF kernel's loaders cover one token tile of features and of outputs per step");
// Blocks the diagonal GGN's split over rows aims for, so that small D still fills the GPU.
constexpr int64_t kTargetBlocks = 1024;

BDX_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned capped_blocks(int64_t wanted) {
  return static_cast<unsigned>(wanted < 1 ? 1 : (wanted > kMaxBlocks ? kMaxBlocks : wanted));
}

// One thread per feature j (neighbouring threads read neighbouring addresses of a row) and slice of
// rows; the slices' partial sums meet atomically.
template <typename T>
__global__ void linear_diag_ggn_kernel(const T* __restrict__ phi, TokenGeometry g, int64_t rows_per_slice,
                                       double* __restrict__ out) {
  const int64_t rows = g.rows();
  const int64_t slices = ceil_div(rows, rows_per_slice);
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < g.features;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    for (int64_t slice = blockIdx.y; slice < slices; slice += gridDim.y) {
      const int64_t begin = slice * rows_per_slice;
      const int64_t end = begin + rows_per_slice < rows ? begin + rows_per_slice : rows;
      double sum = 0.0;
      for (int64_t r = begin; r < end; ++r) {
        const double x = load<double>(phi, r * g.features + j);
        sum += x * x;
      }
      atomicAdd(&out[j], sum);
    }
  }
}

// A block owns sample n, kEfFeatures augmented features and kEfOutputs outputs; each thread forms
// one entry of the sample's gradient Σ_t r[n, t, c]·φ̃[n, t, j] over all of its tokens, then adds
// its square atomically (samples are summed across blocks).
template <typename T>
__global__ void __launch_bounds__(kEfFeatures * kEfOutputs)
    linear_diag_ef_kernel(const T* __restrict__ phi, const T* __restrict__ residual, TokenGeometry g,
                          double* __restrict__ out) {
  __shared__ double feature_tile[kTokenTile][kEfFeatures + 1];  // [token][feature]
  __shared__ double residual_tile[kEfOutputs][kTokenTile + 1];  // [output][token]
  const int64_t augmented = g.augmented();
  const int64_t feature_tiles = ceil_div(augmented, kEfFeatures);
  const int64_t output_tiles = ceil_div(g.outputs, kEfOutputs);
  const int64_t work_items = g.samples * feature_tiles * output_tiles;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  // Loading: consecutive threads read consecutive features of one row (and outputs of one row).
  const int load_feature = tid % kEfFeatures;
  const int load_token = tid / kEfFeatures;  // 0 .. kEfOutputs-1, stepping by kEfOutputs
  const int load_output = tid % kEfOutputs;
  const int load_residual_token = tid / kEfOutputs;  // 0 .. kTokenTile-1

  for (int64_t work = blockIdx.x; work < work_items; work += gridDim.x) {
    // Output tiles vary fastest: neighbouring blocks read the same features.
    const int64_t n = work / (feature_tiles * output_tiles);
    const int64_t feature_base = (work / output_tiles) % feature_tiles * kEfFeatures;
    const int64_t output_base = work % output_tiles * kEfOutputs;
    double gradient = 0.0;
    for (int64_t t0 = 0; t0 < g.tokens; t0 += kTokenTile) {
      for (int k = load_token; k < kTokenTile; k += kEfOutputs) {
        const int64_t t = t0 + k;
        feature_tile[k][load_feature] =
            t < g.tokens ? augmented_feature<double>(phi + (n * g.tokens + t) * g.features,
                                                     feature_base + load_feature, g.features)
                         : 0.0;
      }
      const int64_t t = t0 + load_residual_token;
      const int64_t c = output_base + load_output;
      residual_tile[load_output][load_residual_token] =
          t < g.tokens && c < g.outputs ? load<double>(residual, (n * g.tokens + t) * g.outputs + c) : 0.0;
      __syncthreads();
      for (int k = 0; k < kTokenTile; ++k) gradient += residual_tile[threadIdx.y][k] * feature_tile[k][threadIdx.x];
      __syncthreads();
    }
    const int64_t c = output_base + threadIdx.y;
    const int64_t j = feature_base + threadIdx.x;
    if (c < g.outputs && j < augmented) atomicAdd(&out[c * augmented + j], gradient * gradient);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_linear_diag_ggn(const T* phi, const TokenGeometry& g, double* out, cudaStream_t stream) {
  const int64_t rows = g.rows();
  if (rows == 0 || g.features == 0) return cudaSuccess;
  const unsigned grid_x = capped_blocks(ceil_div(g.features, kThreadsPerBlock));
  const int64_t wanted_slices = ceil_div(kTargetBlocks, grid_x);
  const int64_t rows_per_slice = ceil_div(rows, wanted_slices < rows ? wanted_slices : rows);
  // The cap applies to the whole grid: under emulation every block is a batch of host threads.
  const int64_t room = kMaxBlocks / grid_x;
  const int64_t slices = ceil_div(rows, rows_per_slice);
  const dim3 grid(grid_x, capped_blocks(slices < room ? slices : room));
  BDX_LAUNCH(linear_diag_ggn_kernel<T>, grid, kThreadsPerBlock, stream, phi, g, rows_per_slice, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_linear_diag_ef(const T* phi, const T* residual, const TokenGeometry& g, double* out,
                                  cudaStream_t stream) {
  const int64_t work_items = g.samples * ceil_div(g.augmented(), kEfFeatures) * ceil_div(g.outputs, kEfOutputs);
  if (work_items == 0 || g.tokens == 0) return cudaSuccess;
  BDX_LAUNCH(linear_diag_ef_kernel<T>, capped_blocks(work_items), dim3(kEfFeatures, kEfOutputs), stream, phi,
             residual, g, out);
  return cudaGetLastError();
}

#define BDX_INSTANTIATE(T)                                                                                   \
  template cudaError_t launch_linear_diag_ggn<T>(const T*, const TokenGeometry&, double*, cudaStream_t);    \
  template cudaError_t launch_linear_diag_ef<T>(const T*, const T*, const TokenGeometry&, double*, cudaStream_t);
BDX_INSTANTIATE(float)
BDX_INSTANTIATE(double)
BDX_INSTANTIATE(half_t)
BDX_INSTANTIATE(bfloat16_t)
#undef BDX_INSTANTIATE

}  // namespace bdx::cuda
