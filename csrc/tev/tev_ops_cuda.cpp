// Binds the CUDA launcher to tensors and registers it for the CUDA dispatch key.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "tev/tev.h"
#include "tev/tev_cuda.h"

namespace mlra::tev {

std::tuple<at::Tensor, at::Tensor> tev_partials_cuda(
    const at::Tensor& weight, const std::optional<at::Tensor>& rows, bool per_token) {
  const c10::cuda::CUDAGuard guard(weight.device());
  auto [stats, pt] = check_and_allocate(weight, rows, per_token);
  std::optional<at::Tensor> idx;
  if (rows.has_value()) idx = rows->contiguous();
  const Problem pb = make_problem(weight, idx, pt);

  const int device = weight.get_device();
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  int grid = 0;
  C10_CUDA_CHECK(cuda_grid_size(pb, num_sms, &grid));
  // Freed on return; the caching allocator keeps it for this stream until the kernel is done.
  auto workspace = at::empty({static_cast<int64_t>(cuda_workspace_bytes(grid))}, weight.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  C10_CUDA_CHECK(launch_tev_cuda(pb, reinterpret_cast<Partial*>(stats.data_ptr<double>()), workspace.data_ptr(), grid,
                                 stream));
  return {stats, pt};
}

}  // namespace mlra::tev

TORCH_LIBRARY_IMPL(mlra, CUDA, m) { m.impl("tev_partials", &mlra::tev::tev_partials_cuda); }
