// What the op sources share on LibTorch's stable ABI: the torch::stable headers, an argument check that
// throws exactly its message, and the formatting of shapes and devices in those messages.
//
// The sources use only torch::stable, torch::headeronly and the C shims (aoti_torch_*, torch_*), never ATen
// or c10, so the binary links against none of libtorch's C++ symbols and runs with every torch from the
// targeted one on. The build (setup.py, CMakeLists.txt, tests/sanitize/fuzz_ops.py) sets TORCH_TARGET_VERSION
// to setup.py's TORCH_MIN, so that newer torch headers offer only what that torch already has.
#pragma once

#if !defined(TORCH_TARGET_VERSION)
#error "build with -DTORCH_TARGET_VERSION for setup.py's TORCH_MIN (setup.py, CMakeLists.txt and fuzz_ops.py set it)"
#endif

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace mlra {

using torch::headeronly::ScalarType;
using torch::stable::Device;
using torch::stable::Tensor;
using Shape = torch::headeronly::IntHeaderOnlyArrayRef;

// A shape or strides as torch prints them: "[2, 3]".
struct Dims {
  std::vector<int64_t> v;
  Dims() = default;
  Dims(Shape s) : v(s.begin(), s.end()) {}                        // NOLINT: implicit on purpose
  Dims(std::initializer_list<int64_t> s) : v(s) {}                // NOLINT
  Dims(const std::vector<int64_t>& s) : v(s) {}                   // NOLINT
  bool operator==(Shape s) const { return Shape(v).equals(s); }
};

inline std::ostream& operator<<(std::ostream& out, const Dims& d) {
  out << "[";
  for (size_t i = 0; i < d.v.size(); ++i) out << (i > 0 ? ", " : "") << d.v[i];
  return out << "]";
}

// A device as torch prints it: "cpu", "cuda:0", "meta".
struct DeviceName {
  torch::headeronly::DeviceType type;
  int32_t index;
};

inline std::ostream& operator<<(std::ostream& out, const DeviceName& d) {
  using torch::headeronly::DeviceType;
  switch (d.type) {
    case DeviceType::CPU: out << "cpu"; break;
    case DeviceType::CUDA: out << "cuda"; break;
    case DeviceType::HIP: out << "hip"; break;
    case DeviceType::XPU: out << "xpu"; break;
    case DeviceType::MPS: out << "mps"; break;
    case DeviceType::Meta: out << "meta"; break;
    case DeviceType::XLA: out << "xla"; break;
    case DeviceType::Lazy: out << "lazy"; break;
    case DeviceType::HPU: out << "hpu"; break;
    case DeviceType::MTIA: out << "mtia"; break;
    case DeviceType::PrivateUse1: out << "privateuseone"; break;
    default: out << "device type " << static_cast<int>(d.type); break;
  }
  if (d.index != -1) out << ":" << d.index;
  return out;
}

inline DeviceName name_of(const Device& device) { return DeviceName{device.type(), device.index()}; }

template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream out;
  ((out << args), ...);
  return std::move(out).str();
}

}  // namespace mlra

// TORCH_CHECK's contract on the stable ABI: a RuntimeError in Python whose text is exactly the message
// (STD_TORCH_CHECK would put the function, file and line in front of it).
#define MLRA_CHECK(cond, ...)                                    \
  do {                                                           \
    if (!(cond)) throw std::runtime_error(::mlra::str(__VA_ARGS__)); \
  } while (false)
