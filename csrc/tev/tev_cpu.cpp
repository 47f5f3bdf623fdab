// TEV reduction on the CPU: torch::stable::parallel_for over fixed chunks of rows; chunk partials merge (Chan) in
// chunk order, so the result does not depend on the thread count. The row kernel (tev_cpu_kernel.h) is
// compiled twice, with AVX2 / FMA / F16C intrinsics (x86-64) and portable auto-vectorised loops, and picked at run time.
#include <algorithm>
#include <vector>

#include "tev/tev.h"
#include "tev/tev_cpu_kernel.h"

namespace mlra::tev {
namespace {

constexpr int64_t kChunkElems = 1 << 16;  // elements per work item (fixed: the merge order depends on it)
constexpr int64_t kMinThreadElems = 1 << 18;

#if defined(MLRA_HAVE_AVX2_PATH)
Partial reduce_rows_avx2(const Problem& pb, int64_t b, int64_t e) {
  return cpu::reduce_rows_any<true>(pb, b, e);
}

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif

Partial reduce_rows_baseline(const Problem& pb, int64_t b, int64_t e) {
  return cpu::reduce_rows_any<false>(pb, b, e);
}

Partial reduce_rows(const Problem& pb, int64_t b, int64_t e) {
#if defined(MLRA_HAVE_AVX2_PATH)
  if (has_avx2()) return reduce_rows_avx2(pb, b, e);
#endif
  return reduce_rows_baseline(pb, b, e);
}

}  // namespace

void tev_cpu(const Problem& problem, Partial* out) {
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / problem.dim);
  const int64_t n_chunks = (problem.n_rows + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<Partial> partials(static_cast<size_t>(n_chunks), empty_partial());
  // At least kMinThreadElems elements per thread: below that, waking threads costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, kMinThreadElems / (rows_per_chunk * problem.dim));
  torch::stable::parallel_for(0, n_chunks, grain, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t r_end = std::min(problem.n_rows, (c + 1) * rows_per_chunk);
      partials[static_cast<size_t>(c)] = reduce_rows(problem, c * rows_per_chunk, r_end);
    }
  });
  Partial total = empty_partial();
  for (const Partial& part : partials) merge(total, part);
  *out = total;
}

}  // namespace mlra::tev
