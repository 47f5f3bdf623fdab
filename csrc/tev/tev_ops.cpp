// Dispatcher registration of mlra::tev_partials (LibTorch's stable ABI), the argument checks shared by both
// devices, and the CPU impl.
#include "tev/tev.h"

namespace mlra::tev {

std::tuple<Tensor, Tensor> check_and_allocate(const Tensor& weight, const std::optional<Tensor>& rows,
                                              bool per_token) {
  MLRA_CHECK(weight.dim() == 2, "mlra::tev_partials: weight must be a 2-D [V, d] tensor, got ", weight.dim(),
             "-D with shape ", Dims(weight.sizes()));
  const auto dt = weight.scalar_type();
  MLRA_CHECK(dt == ScalarType::Float || dt == ScalarType::Half || dt == ScalarType::BFloat16,
             "mlra::tev_partials: weight dtype must be float32, float16 or bfloat16, got ", dt);
  MLRA_CHECK(weight.size(0) > 0 && weight.size(1) > 0, "mlra::tev_partials: weight is empty (shape ",
             Dims(weight.sizes()), "); TEV needs at least one row and one column");
  int64_t n_rows = weight.size(0);
  if (rows.has_value()) {
    const Tensor& idx = *rows;
    MLRA_CHECK(idx.dim() == 1, "mlra::tev_partials: rows must be a 1-D index tensor, got shape ", Dims(idx.sizes()));
    MLRA_CHECK(idx.scalar_type() == ScalarType::Long || idx.scalar_type() == ScalarType::Int,
               "mlra::tev_partials: rows must be int64 or int32, got ", idx.scalar_type());
    MLRA_CHECK(idx.device() == weight.device(), "mlra::tev_partials: rows is on ", name_of(idx.device()),
               " but weight is on ", name_of(weight.device()));
    MLRA_CHECK(idx.numel() > 0, "mlra::tev_partials: rows selects no rows");
    n_rows = idx.numel();
  }
  auto stats = torch::stable::empty({kStatsSize}, ScalarType::Double, std::nullopt, weight.device());
  auto pt = torch::stable::empty({per_token ? n_rows : 0}, ScalarType::Float, std::nullopt, weight.device());
  return {stats, pt};
}

Problem make_problem(const Tensor& weight, const std::optional<Tensor>& rows, const Tensor& per_token) {
  Problem pb{};
  pb.weight = weight.const_data_ptr();
  switch (weight.scalar_type()) {
    case ScalarType::Float:
      pb.dtype = DType::kFloat32;
      break;
    case ScalarType::Half:
      pb.dtype = DType::kFloat16;
      break;
    default:
      pb.dtype = DType::kBFloat16;
      break;
  }
  pb.vocab = weight.size(0);
  pb.dim = weight.size(1);
  pb.stride_row = weight.stride(0);
  pb.stride_col = weight.stride(1);
  pb.rows = nullptr;
  pb.rows_int64 = true;
  pb.n_rows = pb.vocab;
  if (rows.has_value()) {
    const Tensor& idx = *rows;
    MLRA_CHECK(idx.is_contiguous(), "mlra::tev: make_problem needs a contiguous rows index");
    pb.rows = idx.const_data_ptr();
    pb.rows_int64 = idx.scalar_type() == ScalarType::Long;
    pb.n_rows = idx.numel();
  }
  pb.per_token = per_token.numel() > 0 ? per_token.mutable_data_ptr<float>() : nullptr;
  return pb;
}

std::tuple<Tensor, Tensor> tev_partials_cpu(const Tensor& weight, const std::optional<Tensor>& rows,
                                            bool per_token) {
  auto [stats, pt] = check_and_allocate(weight, rows, per_token);
  // A strided 1-D index is the only input ever copied (it is tiny next to weight); idx keeps it alive.
  std::optional<Tensor> idx;
  if (rows.has_value()) idx = rows->is_contiguous() ? *rows : torch::stable::contiguous(*rows);
  const Problem pb = make_problem(weight, idx, pt);
  tev_cpu(pb, reinterpret_cast<Partial*>(stats.mutable_data_ptr<double>()));
  return {stats, pt};
}

}  // namespace mlra::tev

STABLE_TORCH_LIBRARY(mlra, m) {
  m.def("tev_partials(Tensor weight, Tensor? rows=None, bool per_token=False) -> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(mlra, CPU, m) { m.impl("tev_partials", TORCH_BOX(&mlra::tev::tev_partials_cpu)); }
