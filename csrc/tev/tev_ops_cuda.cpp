// Binds the CUDA launcher to tensors and registers it for the CUDA dispatch key (LibTorch's stable ABI).
//
// The binary must load with a CPU-only torch too, so nothing here links against torch's CUDA libraries: the
// device guard is the stable accelerator API (libtorch_cpu), the current stream comes from the C shim
// aoti_torch_get_current_cuda_stream looked up in the libtorch_cuda already loaded (a CUDA tensor cannot
// exist without it), and the CUDA runtime calls go to the runtime linked into this binary.
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <torch/csrc/stable/accelerator.h>

#include <string>

#include "tev/tev.h"
#include "tev/tev_cuda.h"

namespace mlra::tev {
namespace {

void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(str("CUDA error: ", cudaGetErrorString(err), " (", what, ")"));
  }
}

// torch's current CUDA stream of `device`: the stream its own CUDA ops on that device run on now.
cudaStream_t current_stream(int32_t device) {
  using GetStream = AOTITorchError (*)(int32_t, void**);
  static const GetStream get = [] {
    void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
    return lib != nullptr ? reinterpret_cast<GetStream>(dlsym(lib, "aoti_torch_get_current_cuda_stream")) : nullptr;
  }();
  MLRA_CHECK(get != nullptr, "mlra::tev_partials: torch's CUDA library (libtorch_cuda.so, with "
             "aoti_torch_get_current_cuda_stream) is not loaded, so the current CUDA stream is unknown");
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(get(device, &stream));
  return static_cast<cudaStream_t>(stream);
}

}  // namespace

std::tuple<Tensor, Tensor> tev_partials_cuda(const Tensor& weight, const std::optional<Tensor>& rows,
                                             bool per_token) {
  const int32_t device = weight.get_device_index();
  const torch::stable::accelerator::DeviceGuard guard(device);
  auto [stats, pt] = check_and_allocate(weight, rows, per_token);
  std::optional<Tensor> idx;
  if (rows.has_value()) idx = rows->is_contiguous() ? *rows : torch::stable::contiguous(*rows);
  const Problem pb = make_problem(weight, idx, pt);

  int num_sms = 0;
  cuda_check(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  int grid = 0;
  cuda_check(cuda_grid_size(pb, num_sms, &grid), "cuda_grid_size");
  // Freed on return; the caching allocator keeps it for this stream until the kernel is done.
  auto workspace = torch::stable::empty({static_cast<int64_t>(cuda_workspace_bytes(grid))}, ScalarType::Byte,
                                        std::nullopt, weight.device());
  const cudaStream_t stream = current_stream(device);
  cuda_check(launch_tev_cuda(pb, reinterpret_cast<Partial*>(stats.mutable_data_ptr<double>()),
                             workspace.mutable_data_ptr(), grid, stream),
             "launch_tev_cuda");
  return {stats, pt};
}

}  // namespace mlra::tev

STABLE_TORCH_LIBRARY_IMPL(mlra, CUDA, m) { m.impl("tev_partials", TORCH_BOX(&mlra::tev::tev_partials_cuda)); }
