// Dispatcher registration of mlra::tev_partials, the argument checks shared by both devices, and the CPU impl.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "tev/tev.h"

namespace mlra::tev {

std::tuple<at::Tensor, at::Tensor> check_and_allocate(
    const at::Tensor& weight, const std::optional<at::Tensor>& rows, bool per_token) {
  TORCH_CHECK(weight.dim() == 2, "mlra::tev_partials: weight must be a 2-D [V, d] tensor, got ", weight.dim(),
              "-D with shape ", weight.sizes());
  const auto dt = weight.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "mlra::tev_partials: weight dtype must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(weight.size(0) > 0 && weight.size(1) > 0,
              "mlra::tev_partials: weight is empty (shape ", weight.sizes(),
              "); TEV needs at least one row and one column");
  int64_t n_rows = weight.size(0);
  if (rows.has_value()) {
    const at::Tensor& idx = *rows;
    TORCH_CHECK(idx.dim() == 1, "mlra::tev_partials: rows must be a 1-D index tensor, got shape ", idx.sizes());
    TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
                "mlra::tev_partials: rows must be int64 or int32, got ", idx.scalar_type());
    TORCH_CHECK(idx.device() == weight.device(), "mlra::tev_partials: rows is on ", idx.device(),
                " but weight is on ", weight.device());
    TORCH_CHECK(idx.numel() > 0, "mlra::tev_partials: rows selects no rows");
    n_rows = idx.numel();
  }
  auto stats = at::empty({kStatsSize}, weight.options().dtype(at::kDouble));
  auto pt = at::empty({per_token ? n_rows : 0}, weight.options().dtype(at::kFloat));
  return {stats, pt};
}

Problem make_problem(const at::Tensor& weight, const std::optional<at::Tensor>& rows, const at::Tensor& per_token) {
  Problem pb{};
  pb.weight = weight.data_ptr();
  switch (weight.scalar_type()) {
    case at::kFloat:
      pb.dtype = DType::kFloat32;
      break;
    case at::kHalf:
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
    const at::Tensor& idx = *rows;
    TORCH_CHECK(idx.is_contiguous(), "mlra::tev: make_problem needs a contiguous rows index");
    pb.rows = idx.data_ptr();
    pb.rows_int64 = idx.scalar_type() == at::kLong;
    pb.n_rows = idx.numel();
  }
  pb.per_token = per_token.numel() > 0 ? per_token.data_ptr<float>() : nullptr;
  return pb;
}

std::tuple<at::Tensor, at::Tensor> tev_partials_cpu(
    const at::Tensor& weight, const std::optional<at::Tensor>& rows, bool per_token) {
  auto [stats, pt] = check_and_allocate(weight, rows, per_token);
  // A strided 1-D index is the only input ever copied (it is tiny next to weight); idx keeps it alive.
  std::optional<at::Tensor> idx;
  if (rows.has_value()) idx = rows->contiguous();
  const Problem pb = make_problem(weight, idx, pt);
  tev_cpu(pb, reinterpret_cast<Partial*>(stats.data_ptr<double>()));
  return {stats, pt};
}

}  // namespace mlra::tev

TORCH_LIBRARY(mlra, m) {
  m.def("tev_partials(Tensor weight, Tensor? rows=None, bool per_token=False) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mlra, CPU, m) { m.impl("tev_partials", &mlra::tev::tev_partials_cpu); }
