// TEV reduction: plain-C++ types shared by the CPU kernel, the CUDA kernel and the bindings.
// No torch types here, so the CUDA kernels compile without the torch headers.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MLRA_HD __host__ __device__ __forceinline__
#else
#define MLRA_HD inline
#endif

namespace mlra::tev {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Running statistics of the per-row values TEV_i, plus the rows left out.
// Laid out as 5 doubles: this is exactly the stats tensor the op returns.
struct Partial {
  double count;      // rows merged into mean / m2
  double mean;       // mean of TEV_i over those rows
  double m2;         // sum of squared deviations of TEV_i from mean
  double nonfinite;  // rows left out because they hold NaN / Inf
  double bad_index;  // entries of `rows` outside [0, V)
};
static_assert(sizeof(Partial) == 5 * sizeof(double), "Partial must be 5 packed doubles");
constexpr int kStatsSize = 5;

// What the kernels read and write. Sizes and strides are in elements, all int64.
struct Problem {
  const void* weight;      // [V, d], element (i, j) at weight[i * stride_row + j * stride_col]
  DType dtype;
  int64_t vocab;           // V
  int64_t dim;             // d
  int64_t stride_row;
  int64_t stride_col;
  const void* rows;        // optional [n_rows] row indices into [0, V); nullptr selects every row
  bool rows_int64;         // index dtype: int64 if true, else int32
  int64_t n_rows;          // number of selected rows (V when rows == nullptr)
  float* per_token;        // optional [n_rows] output TEV_i (NaN for left-out rows); nullptr to skip
};

MLRA_HD Partial empty_partial() { return Partial{0.0, 0.0, 0.0, 0.0, 0.0}; }

// Welford update with one value.
MLRA_HD void push(Partial& a, double x) {
  a.count += 1.0;
  const double delta = x - a.mean;
  a.mean += delta / a.count;
  a.m2 += delta * (x - a.mean);
}

// Chan et al. merge of b into a. Exact in exact arithmetic; stable in floating point.
MLRA_HD void merge(Partial& a, const Partial& b) {
  a.nonfinite += b.nonfinite;
  a.bad_index += b.bad_index;
  if (b.count == 0.0) return;
  if (a.count == 0.0) {
    a.count = b.count;
    a.mean = b.mean;
    a.m2 = b.m2;
    return;
  }
  const double n = a.count + b.count;
  const double delta = b.mean - a.mean;
  a.mean += delta * (b.count / n);
  a.m2 += b.m2 + delta * delta * (a.count * (b.count / n));
  a.count = n;
}

// Population std of one row from sums of shifted values y = x - K (any K; the first element of
// the row keeps y of the order of the std): s1 = sum y, s2 = sum y^2, n elements.
MLRA_HD double row_std(double s1, double s2, int64_t n) {
  const double dn = static_cast<double>(n);
  double m2 = s2 - s1 * (s1 / dn);
  m2 = m2 > 0.0 ? m2 : 0.0;
#if defined(__CUDA_ARCH__)
  return sqrt(m2 / dn);
#else
  return std::sqrt(m2 / dn);
#endif
}

// x - x is 0 for finite x and NaN for NaN / Inf; holds without -ffast-math, which this code never uses.
MLRA_HD bool finite_sums(double s1, double s2) { return (s1 - s1) == 0.0 && (s2 - s2) == 0.0; }

// 2^-125: twice FLT_MIN, the smallest normal fp32.
constexpr double kMinMeanSquare = 2.350988701644575e-38;

// Whether a row's fast sums (s1, s2 of fp32 terms y = x - K over n elements) must be redone in fp64:
//  - not finite: a square overflowed fp32 (|y| above ~1.8e19), or the row holds NaN / Inf;
//  - s2 < n * 2^-125, the mean of the squares below 2 * FLT_MIN: squares under FLT_MIN are subnormal or 0
//    in fp32 (|y| below ~1.1e-19: fp32 rows of std under ~1e-19, bf16 subnormal rows). Each fp32 operation
//    then errs by up to 2^-150 absolute, so above this bound underflow costs s2 at most 2^-25 relative,
//    less than fp32 rounding already does. A constant row (s2 == 0) falls here too: its TEV is exactly 0
//    (the CPU kernel recognises it with a scan of the row, the CUDA kernel with the fp64 pass).
// Typical rows (std ~1e-3 .. 1e3) are never redone, so the redo costs nothing on the common path.
MLRA_HD bool needs_fp64(double s1, double s2, int64_t n) {
  return !finite_sums(s1, s2) || s2 < static_cast<double>(n) * kMinMeanSquare;
}

}  // namespace mlra::tev
