// TEV reduction on the CPU: the per-row kernel, free of torch types (tev_cpu.cpp adds the threading).
//
// A row is read once. Values are shifted by K, the fp32 mean of the row's first kPivot elements, so the
// shifted values y = x - K are of the order of the row's std; they are summed into kLanes fp32 lanes
// (plain loops the compiler vectorises), and every kFoldElems elements the lanes are added into fp64.
// The row's std then comes from the fp64 shifted sums (row_std). Rows merge with Welford. A row whose
// fp32 squares overflowed or underflowed (needs_fp64, in tev_common.h) is read once more, in fp64.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "tev/tev_common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MLRA_HAVE_AVX2_PATH 1
#define MLRA_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

#if defined(__GNUC__)
#define MLRA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MLRA_ALWAYS_INLINE inline
#endif

namespace mlra::tev::cpu {

constexpr int kLanes = 16;
constexpr int64_t kFoldElems = 256;
constexpr int64_t kPivot = 16;

struct LoadF32 {
  using Raw = float;
  static MLRA_ALWAYS_INLINE float f(float x) { return x; }
};

struct LoadBF16 {
  using Raw = uint16_t;
  static MLRA_ALWAYS_INLINE float f(uint16_t b) {
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float x;
    std::memcpy(&x, &u, sizeof(x));
    return x;
  }
};

struct LoadF16 {
  using Raw = uint16_t;
  static MLRA_ALWAYS_INLINE float f(uint16_t b) {
#if defined(__FLT16_MAX__)
    _Float16 h;  // with F16C the compiler turns this into vcvtph2ps
    std::memcpy(&h, &b, sizeof(h));
    return static_cast<float>(h);
#else
    // IEEE half -> float by hand (normal, subnormal, Inf / NaN), for compilers without _Float16.
    const uint32_t sign = static_cast<uint32_t>(b & 0x8000u) << 16;
    const uint32_t exp = (b >> 10) & 0x1fu;
    const uint32_t man = b & 0x3ffu;
    uint32_t u;
    if (exp == 0x1fu) {
      u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
      u = sign | ((exp + 112u) << 23) | (man << 13);
    } else {
      float m = static_cast<float>(man) * (1.0f / 16777216.0f);  // man * 2^-24
      std::memcpy(&u, &m, sizeof(u));
      u |= sign;
    }
    float x;
    std::memcpy(&x, &u, sizeof(x));
    return x;
#endif
  }
};

template <class L>
MLRA_ALWAYS_INLINE float pivot(const typename L::Raw* p, int64_t d, int64_t stride) {
  const int64_t n = std::min(d, kPivot);
  float s = 0.f;
  for (int64_t j = 0; j < n; ++j) s += L::f(p[j * stride]);
  return s / static_cast<float>(n);
}

// Shifted sums of one contiguous row: s1 = sum (x - K), s2 = sum (x - K)^2.
template <class L>
MLRA_ALWAYS_INLINE void row_sums_contiguous(const typename L::Raw* __restrict__ p, int64_t d, double& s1,
                                            double& s2) {
  const float k = pivot<L>(p, d, 1);
  double a1 = 0.0, a2 = 0.0;
  const int64_t d_vec = d - d % kLanes;
  int64_t j = 0;
  while (j < d_vec) {
    const int64_t stop = std::min(d_vec, j + kFoldElems);
    float l1[kLanes] = {};
    float l2[kLanes] = {};
    for (; j < stop; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float y = L::f(p[j + l]) - k;
        l1[l] += y;
        l2[l] += y * y;
      }
    }
    for (int l = 0; l < kLanes; ++l) {
      a1 += l1[l];
      a2 += l2[l];
    }
  }
  for (; j < d; ++j) {
    const float y = L::f(p[j]) - k;
    a1 += y;
    a2 += static_cast<double>(y) * y;
  }
  s1 = a1;
  s2 = a2;
}

// Same for a row whose elements are `stride` apart (a transposed or column-sliced view).
template <class L>
MLRA_ALWAYS_INLINE void row_sums_strided(const typename L::Raw* p, int64_t d, int64_t stride, double& s1,
                                         double& s2) {
  const float k = pivot<L>(p, d, stride);
  double a1 = 0.0, a2 = 0.0;
  for (int64_t j = 0; j < d; ++j) {
    const float y = L::f(p[j * stride]) - k;
    a1 += y;
    a2 += static_cast<double>(y) * y;
  }
  s1 = a1;
  s2 = a2;
}

#if defined(MLRA_HAVE_AVX2_PATH)
// 8 elements as fp32.
MLRA_TARGET_AVX2 MLRA_ALWAYS_INLINE __m256 load8(LoadF32, const float* p) { return _mm256_loadu_ps(p); }
MLRA_TARGET_AVX2 MLRA_ALWAYS_INLINE __m256 load8(LoadBF16, const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
MLRA_TARGET_AVX2 MLRA_ALWAYS_INLINE __m256 load8(LoadF16, const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// fp32 lanes added into fp64 lanes (4 + 4), and the horizontal sum of 4 fp64 lanes.
MLRA_TARGET_AVX2 MLRA_ALWAYS_INLINE __m256d widen_add(__m256d acc, __m256 v) {
  acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  return _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}
MLRA_TARGET_AVX2 MLRA_ALWAYS_INLINE double hsum4(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

// row_sums_contiguous with AVX2 intrinsics: 32 elements per step in four independent 8-lane fp32
// accumulators per sum (four add chains hide the add / FMA latency), folded into fp64 vector lanes
// every kFoldElems elements without leaving the registers.
// Not inlined: a function compiled for AVX2 cannot be inlined into baseline code; one call per row.
template <class L>
MLRA_TARGET_AVX2 __attribute__((noinline)) void row_sums_avx2(const typename L::Raw* __restrict__ p, int64_t d,
                                                       double& s1, double& s2) {
  const float k = pivot<L>(p, d, 1);
  const __m256 kv = _mm256_set1_ps(k);
  __m256d d1 = _mm256_setzero_pd(), d2 = _mm256_setzero_pd();
  const int64_t d_vec = d - d % 32;
  int64_t j = 0;
  while (j < d_vec) {
    const int64_t stop = std::min(d_vec, j + kFoldElems);
    __m256 u0 = _mm256_setzero_ps(), u1 = _mm256_setzero_ps(), u2 = _mm256_setzero_ps(), u3 = _mm256_setzero_ps();
    __m256 v0 = _mm256_setzero_ps(), v1 = _mm256_setzero_ps(), v2 = _mm256_setzero_ps(), v3 = _mm256_setzero_ps();
    for (; j < stop; j += 32) {
      const __m256 y0 = _mm256_sub_ps(load8(L{}, p + j), kv);
      const __m256 y1 = _mm256_sub_ps(load8(L{}, p + j + 8), kv);
      const __m256 y2 = _mm256_sub_ps(load8(L{}, p + j + 16), kv);
      const __m256 y3 = _mm256_sub_ps(load8(L{}, p + j + 24), kv);
      u0 = _mm256_add_ps(u0, y0);
      u1 = _mm256_add_ps(u1, y1);
      u2 = _mm256_add_ps(u2, y2);
      u3 = _mm256_add_ps(u3, y3);
      v0 = _mm256_fmadd_ps(y0, y0, v0);
      v1 = _mm256_fmadd_ps(y1, y1, v1);
      v2 = _mm256_fmadd_ps(y2, y2, v2);
      v3 = _mm256_fmadd_ps(y3, y3, v3);
    }
    d1 = widen_add(d1, _mm256_add_ps(_mm256_add_ps(u0, u1), _mm256_add_ps(u2, u3)));
    d2 = widen_add(d2, _mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
  }
  for (; j + 8 <= d; j += 8) {
    const __m256 y = _mm256_sub_ps(load8(L{}, p + j), kv);
    d1 = widen_add(d1, y);
    d2 = widen_add(d2, _mm256_mul_ps(y, y));
  }
  double a1 = hsum4(d1), a2 = hsum4(d2);
  for (; j < d; ++j) {
    const float y = L::f(p[j]) - k;
    a1 += y;
    a2 += static_cast<double>(y) * y;
  }
  s1 = a1;
  s2 = a2;
}
#endif

// The same sums in fp64, for a row whose fp32 sums cannot be trusted (needs_fp64: squares that overflowed
// or underflowed fp32). Finite values of any supported dtype square in fp64 without overflow, and without
// underflow down to the smallest subnormal (2^-149 squares to 2^-298), so only a row holding NaN or Inf
// stays non-finite, and a constant row gives exactly 0.
template <class L>
inline void row_sums_fp64(const typename L::Raw* p, int64_t d, int64_t stride, double& s1, double& s2) {
  const double k = static_cast<double>(L::f(p[0]));  // a sum of huge values may overflow fp32; one cannot
  double a1 = 0.0, a2 = 0.0;
  for (int64_t j = 0; j < d; ++j) {
    const double y = static_cast<double>(L::f(p[j * stride])) - k;
    a1 += y;
    a2 += y * y;
  }
  s1 = a1;
  s2 = a2;
}

// Whether every element of the row has the bits of its first. The contiguous loop (an OR of XORs, no
// early exit) vectorises; a row of +0 and -0 is not "constant" here and takes the fp64 pass, which gives 0.
template <class L>
inline bool constant_row(const typename L::Raw* p, int64_t d, int64_t stride) {
  using Bits = std::conditional_t<sizeof(typename L::Raw) == 4, uint32_t, uint16_t>;
  static_assert(sizeof(Bits) == sizeof(typename L::Raw), "raw element size");
  Bits first, diff = 0;
  std::memcpy(&first, p, sizeof(Bits));
  if (stride == 1) {
    for (int64_t j = 0; j < d; ++j) {
      Bits b;
      std::memcpy(&b, p + j, sizeof(Bits));
      diff |= b ^ first;
    }
  } else {
    for (int64_t j = 1; j < d && diff == 0; ++j) {
      Bits b;
      std::memcpy(&b, p + j * stride, sizeof(Bits));
      diff |= b ^ first;
    }
  }
  return diff == 0;
}

MLRA_ALWAYS_INLINE int64_t row_index(const Problem& pb, int64_t r) {
  if (pb.rows == nullptr) return r;
  return pb.rows_int64 ? static_cast<const int64_t*>(pb.rows)[r]
                       : static_cast<int64_t>(static_cast<const int32_t*>(pb.rows)[r]);
}

// Welford state of TEV_i over the selected rows [r_begin, r_end); writes per_token when asked.
template <class L, bool kAvx2>
MLRA_ALWAYS_INLINE Partial reduce_rows(const Problem& pb, int64_t r_begin, int64_t r_end) {
  using Raw = typename L::Raw;
  const Raw* w = static_cast<const Raw*>(pb.weight);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Partial acc = empty_partial();
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t row = row_index(pb, r);
    if (row < 0 || row >= pb.vocab) {
      acc.bad_index += 1.0;
      if (pb.per_token) pb.per_token[r] = nan;
      continue;
    }
    const Raw* p = w + row * pb.stride_row;
    double s1, s2;
    if (pb.stride_col == 1) {
#if defined(MLRA_HAVE_AVX2_PATH)
      if constexpr (kAvx2) {
        row_sums_avx2<L>(p, pb.dim, s1, s2);
      } else {
        row_sums_contiguous<L>(p, pb.dim, s1, s2);
      }
#else
      row_sums_contiguous<L>(p, pb.dim, s1, s2);
#endif
    } else {
      row_sums_strided<L>(p, pb.dim, pb.stride_col, s1, s2);
    }
    if (needs_fp64(s1, s2, pb.dim)) {
      // s2 == 0: a constant row (TEV exactly 0: a quick scan, e.g. for a zero padding row), or one whose
      // deviations all underflowed fp32 squares; any other row is redone in fp64.
      if (s2 == 0.0 && constant_row<L>(p, pb.dim, pb.stride_col)) {
        s1 = 0.0;
      } else {
        row_sums_fp64<L>(p, pb.dim, pb.stride_col, s1, s2);
      }
    }
    if (!finite_sums(s1, s2)) {
      acc.nonfinite += 1.0;
      if (pb.per_token) pb.per_token[r] = nan;
      continue;
    }
    const double t = row_std(s1, s2, pb.dim);
    push(acc, t);
    if (pb.per_token) pb.per_token[r] = static_cast<float>(t);
  }
  return acc;
}

template <bool kAvx2>
MLRA_ALWAYS_INLINE Partial reduce_rows_any(const Problem& pb, int64_t r_begin, int64_t r_end) {
  switch (pb.dtype) {
    case DType::kFloat32:
      return reduce_rows<LoadF32, kAvx2>(pb, r_begin, r_end);
    case DType::kFloat16:
      return reduce_rows<LoadF16, kAvx2>(pb, r_begin, r_end);
    case DType::kBFloat16:
    default:
      return reduce_rows<LoadBF16, kAvx2>(pb, r_begin, r_end);
  }
}

}  // namespace mlra::tev::cpu
