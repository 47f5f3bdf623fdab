// C++ unit test of the TEV reduction (run by ctest): the mlra::tev_partials op through the dispatcher,
// against a float64 two-pass reference computed here, plus the Welford / Chan merge on its own.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "tev/tev_common.h"

namespace {

int g_failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "[ ok ]" : "[FAIL]", what.c_str());
  if (!ok) ++g_failures;
}

bool close(double got, double want, double rtol) { return std::fabs(got - want) <= rtol * std::fabs(want); }

std::string num(double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", x);  // std::to_string prints tiny values as 0.000000
  return buf;
}

struct Ref {
  double mean = 0, std = 0;
  int64_t rows = 0, nonfinite = 0;
};

// Two-pass float64 reference over the selected rows of w (any dtype, any strides).
Ref reference(const at::Tensor& w, const std::vector<int64_t>& rows) {
  const at::Tensor w64 = w.to(at::kDouble);
  const auto a = w64.accessor<double, 2>();
  const int64_t d = w.size(1);
  std::vector<double> t;
  Ref r;
  for (int64_t i : rows) {
    double s = 0;
    bool finite = true;
    for (int64_t j = 0; j < d; ++j) {
      finite = finite && std::isfinite(a[i][j]);
      s += a[i][j];
    }
    if (!finite) {
      ++r.nonfinite;
      continue;
    }
    const double m = s / d;
    double q = 0;
    for (int64_t j = 0; j < d; ++j) q += (a[i][j] - m) * (a[i][j] - m);
    t.push_back(std::sqrt(q / d));
  }
  r.rows = static_cast<int64_t>(t.size());
  double s = 0;
  for (double x : t) s += x;
  r.mean = s / r.rows;
  double q = 0;
  for (double x : t) q += (x - r.mean) * (x - r.mean);
  r.std = std::sqrt(q / r.rows);
  return r;
}

std::vector<int64_t> all_rows(int64_t v) {
  std::vector<int64_t> rows(static_cast<size_t>(v));
  for (int64_t i = 0; i < v; ++i) rows[static_cast<size_t>(i)] = i;
  return rows;
}

using OpFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&, bool);

std::tuple<at::Tensor, at::Tensor> call_op(const at::Tensor& w, const std::optional<at::Tensor>& rows, bool pt) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mlra::tev_partials", "").typed<OpFn>();
  return op.call(w, rows, pt);
}

void check_case(const std::string& name, const at::Tensor& w, const std::optional<at::Tensor>& rows,
                const std::vector<int64_t>& ref_rows, double rtol = 1e-6) {
  auto [stats, pt] = call_op(w, rows, true);
  const auto s = stats.to(at::kCPU);
  const double* p = s.data_ptr<double>();
  const Ref r = reference(w.to(at::kCPU), ref_rows);
  const double std_got = std::sqrt(p[2] / p[0]);
  expect(static_cast<int64_t>(p[0]) == r.rows && static_cast<int64_t>(p[3]) == r.nonfinite,
         name + ": counts " + num(p[0]) + " / " + num(p[3]));
  expect(close(p[1], r.mean, rtol), name + ": mean " + num(p[1]) + " vs " + num(r.mean));
  expect(close(std_got, r.std, rtol), name + ": std " + num(std_got) + " vs " + num(r.std));
  expect(pt.numel() == static_cast<int64_t>(ref_rows.size()), name + ": per_token size");
}

void test_merge() {
  using namespace mlra::tev;
  std::vector<double> xs;
  for (int i = 0; i < 1000; ++i) xs.push_back(1e6 + std::sin(i * 0.37) + 0.001 * i);
  Partial whole = empty_partial(), a = empty_partial(), b = empty_partial();
  for (size_t i = 0; i < xs.size(); ++i) {
    push(whole, xs[i]);
    push(i < 317 ? a : b, xs[i]);
  }
  merge(a, b);
  // Two-pass float64 M2 as the reference for both.
  double mean = 0, m2 = 0;
  for (double x : xs) mean += x;
  mean /= static_cast<double>(xs.size());
  for (double x : xs) m2 += (x - mean) * (x - mean);
  expect(whole.count == 1000 && close(whole.mean, mean, 1e-14) && close(whole.m2, m2, 1e-9),
         "Welford over 1000 values offset by 1e6: m2 " + std::to_string(whole.m2) + " vs " + std::to_string(m2));
  expect(a.count == 1000 && close(a.mean, mean, 1e-14) && close(a.m2, m2, 1e-9),
         "Chan merge of two Welford states: m2 " + std::to_string(a.m2) + " vs " + std::to_string(m2));
  Partial e = empty_partial();
  merge(e, whole);
  expect(e.count == whole.count && e.mean == whole.mean && e.m2 == whole.m2, "merge into an empty state copies");
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_merge();

  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor scale = 0.5 + at::rand({777, 1}, f32);
  const at::Tensor w = at::randn({777, 300}, f32) * scale;
  check_case("fp32 777x300", w, std::nullopt, all_rows(777));
  check_case("bf16 777x300", w.to(at::kBFloat16), std::nullopt, all_rows(777));
  check_case("fp16 777x300", w.to(at::kHalf), std::nullopt, all_rows(777));
  check_case("fp32 rows offset by 1e4", w + 1e4, std::nullopt, all_rows(777));
  check_case("fp32 strided view", w.slice(1, 5, 250), std::nullopt, all_rows(777));
  check_case("fp32 transposed view", w.slice(1, 0, 100).t(), std::nullopt, all_rows(100));

  at::Tensor bad = w.clone();
  bad.index_put_({3, 7}, std::nan(""));
  bad.index_put_({500, 0}, INFINITY);
  check_case("fp32 with NaN / Inf rows", bad, std::nullopt, all_rows(777));

  // Rows whose fp32 squares underflow (std below ~1e-19, subnormal values) are redone in fp64.
  check_case("fp32 rows of std 1e-25", w * 1e-25, std::nullopt, all_rows(777));
  check_case("fp32 rows of std 1e-30, strided", (w * 1e-30).t().contiguous().t(), std::nullopt, all_rows(777));
  check_case("fp32 subnormal rows (std 1e-40)", w * 1e-40, std::nullopt, all_rows(777));
  check_case("bf16 subnormal rows (std 1e-39)", (w * 1e-39).to(at::kBFloat16), std::nullopt, all_rows(777));
  at::Tensor flat = w.clone();
  flat.slice(0, 0, 10).fill_(0.5);
  flat.slice(0, 10, 20).zero_();
  flat.slice(0, 20, 21).zero_();
  flat.index_put_({20, 40}, 1e-40);  // zeros but one subnormal element: not constant
  check_case("fp32 with constant rows", flat, std::nullopt, all_rows(777));
  const at::Tensor flat_pt = std::get<1>(call_op(flat, std::nullopt, true));
  expect(flat_pt.slice(0, 0, 20).eq(0).all().item<bool>(), "constant rows have TEV exactly 0");

  const std::vector<int64_t> sel = {5, 700, 5, 0, 776, 123};
  const at::Tensor idx = at::tensor(sel, at::TensorOptions().dtype(at::kLong));
  check_case("fp32 rows subset", w, idx, sel);
  check_case("bf16 rows subset int32", w.to(at::kBFloat16), idx.to(at::kInt), sel);

  auto [stats, pt] = call_op(w, at::tensor(std::vector<int64_t>{0, 777, -1}, at::kLong), false);
  expect(stats[4].item<double>() == 2.0 && pt.numel() == 0, "out-of-range indices are reported");

  bool threw = false;
  try {
    call_op(at::ones({3, 3}, at::kInt), std::nullopt, false);
  } catch (const std::runtime_error& err) {  // the stable-ABI op's checks throw std::runtime_error
    threw = std::string(err.what()).find("weight dtype must be float32, float16 or bfloat16, got Int") !=
            std::string::npos;
  }
  expect(threw, "int weight is rejected with its message");

#if defined(MLRA_WITH_CUDA)
  if (at::hasCUDA()) {
    const at::Tensor wc = w.to(at::kBFloat16).to(at::kCUDA);
    check_case("cuda bf16 777x300", wc, std::nullopt, all_rows(777));
    check_case("cuda fp32 offset 1e4", (w + 1e4).to(at::kCUDA), std::nullopt, all_rows(777));
    check_case("cuda fp32 rows of std 1e-30", (w * 1e-30).to(at::kCUDA), std::nullopt, all_rows(777));
    check_case("cuda bf16 subnormal rows", (w * 1e-39).to(at::kBFloat16).to(at::kCUDA), std::nullopt, all_rows(777));
    check_case("cuda fp32 with constant rows", flat.to(at::kCUDA), std::nullopt, all_rows(777));
  } else {
    std::printf("[skip] CUDA cases: built with CUDA but no GPU is visible\n");
  }
#else
  std::printf("[skip] CUDA cases: built without CUDA\n");
#endif

  std::printf("%d failure(s)\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
