// Grid sizing shared by the CUDA kernels.
#pragma once

#include <cstdint>

namespace bdx::cuda {

constexpr int kThreadsPerBlock = 256;

// Grid-stride loops cover any size; the host emulation runs blocks one after another, so it caps
// the grid low, which also makes every test exercise the grid-stride path.
#if defined(BDX_CUDA_EMULATION)
constexpr int64_t kMaxBlocks = 4;
#else
constexpr int64_t kMaxBlocks = 65535;
#endif

inline unsigned blocks_for(int64_t numel) {
  int64_t blocks = (numel + kThreadsPerBlock - 1) / kThreadsPerBlock;
  if (blocks < 1) blocks = 1;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return static_cast<unsigned>(blocks);
}

}  // namespace bdx::cuda
