// The Python module mlra_kernels._C. Loading it registers the mlra:: ops (static initialisers of the op
// sources linked into it); the module itself only reports how it was built.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

#if defined(MLRA_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mlra-kernels compiled ops (registered under torch.ops.mlra) and their build information";
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
#if defined(MLRA_WITH_CUDA)
  m.attr("with_cuda") = true;
  m.attr("cuda_runtime_version") = CUDART_VERSION;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_runtime_version") = py::none();
#endif
#if defined(MLRA_DEBUG)
  m.attr("debug") = true;
#else
  m.attr("debug") = false;
#endif
}
