// TEV reduction on CUDA: raw-pointer launcher. No torch types, so tev_cuda.cu builds without torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "tev/tev_common.h"

namespace mlra::tev {

// Number of blocks the launch uses for `problem` on a device with `num_sms` multiprocessors.
cudaError_t cuda_grid_size(const Problem& problem, int num_sms, int* grid);

// Device workspace the launch needs for `grid` blocks (block partials and a completion counter).
size_t cuda_workspace_bytes(int grid);

// One kernel launch (after a 4-byte memset of the counter) on `stream`. Writes the 5 doubles of the merged
// Partial to `stats` (device memory). Nothing is copied to the host and nothing synchronises.
cudaError_t launch_tev_cuda(const Problem& problem, Partial* stats, void* workspace, int grid, cudaStream_t stream);

}  // namespace mlra::tev
