// TEV reduction: tensor-level entry points. The op `mlra::tev_partials` is declared in tev_ops.cpp.
//
//   mlra::tev_partials(Tensor weight, Tensor? rows=None, bool per_token=False) -> (Tensor stats, Tensor per_token)
//
//   weight     [V, d] float32 / float16 / bfloat16, any strides; read once, in its own dtype.
//   rows       optional [R] int32 / int64 indices into [0, V); selects the rows to reduce.
//   stats      [5] float64 on weight's device: (count, mean, M2, nonfinite, bad_index), where count, mean
//              and M2 are the Welford state of the per-row population std TEV_i over the finite rows.
//              bad_index > 0 means some entries of `rows` were out of range (the Python wrapper raises);
//              the op reports it instead of raising so that the CUDA path never synchronises.
//   per_token  [R] float32 TEV_i (NaN for rows left out) when per_token is true, else [0].
#pragma once

#include <optional>
#include <tuple>

#include "stable_abi.h"
#include "tev/tev_common.h"

namespace mlra::tev {

// Checks the arguments (rank, dtype, emptiness, devices) and allocates the two outputs on weight's device.
std::tuple<Tensor, Tensor> check_and_allocate(
    const Tensor& weight, const std::optional<Tensor>& rows, bool per_token);

// Describes weight / rows / per_token as raw pointers, sizes and strides.
Problem make_problem(const Tensor& weight, const std::optional<Tensor>& rows, const Tensor& per_token);

// CPU kernel: torch::stable::parallel_for over chunks of rows, chunk partials merged in a fixed order.
void tev_cpu(const Problem& problem, Partial* out);

std::tuple<Tensor, Tensor> tev_partials_cpu(
    const Tensor& weight, const std::optional<Tensor>& rows, bool per_token);

}  // namespace mlra::tev
