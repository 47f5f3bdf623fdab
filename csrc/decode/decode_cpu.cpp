// mlra::latent_decode_cpu: a decode step's attention on the latent cache, on the CPU (float32 or bfloat16
// caches, float32 arithmetic).
//
// The absorbed form of shared/DESIGN.md: the queries q̃ [B, g, M, r] (M = (H/g)·t rows, every head of a
// latent group and every new token) attend the group's cached latents c_K, c_V [B, g, S, r] and give
// Z [B, g, M, r]. Every row of a group is scored against each cached latent while it is in cache, so
// each cached number is read once per step for all heads (a GEMM with M = H/g rows would first copy
// the cache into its packed panels). The cache positions are split across tasks (torch::stable::parallel_for,
// torch's thread pool) so that one sequence's step still fills every core; each task keeps a running max and
// sum per row, and the tasks of one (sequence, group) are merged by their log-sum-exp, in a fixed order.
//
// Masks, as decode's torch path and the CUDA kernel apply them: positions at or past a sequence's length
// L (lengths [B], or S; t_new <= L <= S, checked) are not attended; key padding kpm [B, S] is added to the
// scores, and with causal the keys after new token i (of t, at position L - t + i) score fp32's lowest
// value, the sums clamped there, so that a row whose keys are all masked averages the values of all L
// positions. A masked key next to one that is not gets a weight of exactly 0 (exp2_8 underflows to 0).
// NaN propagates as through SDPA: a NaN score makes its row NaN (its weight is NaN), and a NaN
// value at a position below L makes NaN every row of its sequence and group, masked there or not
// (0 · NaN); a row whose every score is -inf (infinite inputs) gives NaN, softmax's 0/0.
#include "stable_abi.h"  // first: it checks that the build targets a torch version

#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define MLRA_DECODE_AVX2 1
#define MLRA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

#if defined(__GNUC__)
#define MLRA_INLINE inline __attribute__((always_inline))
#else
#define MLRA_INLINE inline
#endif

namespace mlra::decode {
namespace {

constexpr int64_t kKeyBlock = 64;     // keys scored per step of the online softmax
constexpr int64_t kMinSplit = 256;    // the fewest keys a task is given
constexpr float kLog2e = 1.44269504088896341f;
// Prefetch distances (Problem::prefetch), the best measured on this project's 2-core host at r = 128:
// keys 16 KB ahead in the cache, and each value row's column block 32 rows ahead.
constexpr int64_t kKeyPrefetchBytes = 16384;
constexpr int64_t kValuePrefetch = 32;

// The caches are float32 or bfloat16 (bf16_t: its bits); rows, scores and sums are float32 either way.
using bf16_t = uint16_t;

struct Problem {
  const float* q;
  const void* k;  // float or bf16_t, as the op's caches
  const void* v;
  float* z;
  int64_t B, G, M, S, R;
  int64_t q_sb, q_sg, q_sm;
  int64_t k_sb, k_sg, k_ss;
  int64_t v_sb, v_sg, v_ss;
  const float* kpm;  // additive [B, S] (row stride kpm_sb), or null
  int64_t kpm_sb;
  const int32_t* len32;
  const int64_t* len64;
  int64_t t_new;
  bool causal;
  float scale;
  int64_t splits, split_len;
  // Prefetch the cache into L2 ahead of the loads: for rows that do much work per cached number (M >= 4),
  // whose loads alone leave the stream far below the read rate; one row keeps up without it.
  bool prefetch;
};

// The attention of M query rows at q (strides: batch, group, row) over the caches k, v ([B, g, S, r], read
// in place, B, g, S and r taken from them); the caller adds key padding and lengths.
Problem problem_over(const float* q, int64_t q_sb, int64_t q_sg, int64_t q_sm, int64_t M, const Tensor& k,
                     const Tensor& v, int64_t t_new, bool causal, float scale) {
  Problem p{};
  p.q = q;
  p.q_sb = q_sb;
  p.q_sg = q_sg;
  p.q_sm = q_sm;
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.B = k.size(0);
  p.G = k.size(1);
  p.S = k.size(2);
  p.R = k.size(3);
  p.M = M;
  p.k_sb = k.stride(0);
  p.k_sg = k.stride(1);
  p.k_ss = k.stride(2);
  p.v_sb = v.stride(0);
  p.v_sg = v.stride(1);
  p.v_ss = v.stride(2);
  p.t_new = t_new;
  p.causal = causal;
  p.scale = scale;
  p.prefetch = M >= 4;
  return p;
}

// A sequence's length L, in [t_new, S] (the op checks lengths before any task runs).
int64_t length_of(const Problem& p, int64_t b) {
  if (p.len32 != nullptr) return p.len32[b];
  if (p.len64 != nullptr) return p.len64[b];
  return p.S;
}

// max(a, b) that keeps a NaN of either (std::max keeps only its first argument's).
MLRA_INLINE float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// How many of the L positions row m sees under causal masking: the first n of them.
MLRA_INLINE int64_t keys_of_row(const Problem& p, int64_t L, int64_t m) {
  if (!p.causal) return L;
  const int64_t i = m % p.t_new;
  return std::min<int64_t>(std::max<int64_t>(L - p.t_new + i + 1, 0), L);
}

// Eight floats as one value (GCC/Clang vector extensions): AVX2 registers where the caller is compiled for
// AVX2 (run_tasks_avx2), two SSE registers otherwise; FMAs come from the compiler's contraction.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));

MLRA_INLINE v8f load8(const float* p) { return *reinterpret_cast<const v8f_u*>(p); }
typedef uint16_t v8h_u __attribute__((vector_size(16), aligned(2)));
// Eight bfloat16 values as float32: each one's bits become the top half of a float's.
MLRA_INLINE v8f load8(const bf16_t* p) {
  typedef uint32_t v8u __attribute__((vector_size(32)));
  return (v8f)(__builtin_convertvector(*reinterpret_cast<const v8h_u*>(p), v8u) << 16);
}
MLRA_INLINE float to_f32(float x) { return x; }
MLRA_INLINE float to_f32(bf16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
MLRA_INLINE void store8(float* p, v8f x) { *reinterpret_cast<v8f_u*>(p) = x; }
MLRA_INLINE float hsum8(v8f x) { return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7])); }

#if defined(__clang__)
#define MLRA_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define MLRA_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

// The eight sums of eight vectors, as one vector: three rounds of pairwise adds (21 shuffles and adds
// where eight separate horizontal sums take 56).
MLRA_INLINE v8f hsum8x8(v8f v0, v8f v1, v8f v2, v8f v3, v8f v4, v8f v5, v8f v6, v8f v7) {
  const v8f x01 = MLRA_SHUFFLE(v0, v1, 0, 8, 2, 10, 4, 12, 6, 14) + MLRA_SHUFFLE(v0, v1, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f x23 = MLRA_SHUFFLE(v2, v3, 0, 8, 2, 10, 4, 12, 6, 14) + MLRA_SHUFFLE(v2, v3, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f x45 = MLRA_SHUFFLE(v4, v5, 0, 8, 2, 10, 4, 12, 6, 14) + MLRA_SHUFFLE(v4, v5, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f x67 = MLRA_SHUFFLE(v6, v7, 0, 8, 2, 10, 4, 12, 6, 14) + MLRA_SHUFFLE(v6, v7, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f y03 = MLRA_SHUFFLE(x01, x23, 0, 1, 8, 9, 4, 5, 12, 13) + MLRA_SHUFFLE(x01, x23, 2, 3, 10, 11, 6, 7, 14, 15);
  const v8f y47 = MLRA_SHUFFLE(x45, x67, 0, 1, 8, 9, 4, 5, 12, 13) + MLRA_SHUFFLE(x45, x67, 2, 3, 10, 11, 6, 7, 14, 15);
  return MLRA_SHUFFLE(y03, y47, 0, 1, 2, 3, 8, 9, 10, 11) + MLRA_SHUFFLE(y03, y47, 4, 5, 6, 7, 12, 13, 14, 15);
}

// 2^t for t <= 0 (scores minus their running max, in base 2), eight at a time: 2^n · 2^f with
// n = round(t), f in [-1/2, 1/2] and 2^f = e^(f·ln 2) by its Taylor series to degree 7 (relative error
// below 1e-8, under one fp32 ulp). Exactly 0 for t < -126.5, where n = -127 gives 2^n the exponent bits
// of 0: a masked key, whose score is fp32's lowest, weighs nothing. NaN stays NaN.
MLRA_INLINE v8f exp2_8(v8f t) {
  typedef uint32_t v8u __attribute__((vector_size(32)));
  const v8f magic = v8f{} + 12582912.f, lo = v8f{} - 127.f;
  t = t < lo ? lo : t;
  const v8f u = t + magic;  // round to nearest: the integer sits in u's low mantissa bits
  const v8f n = u - magic;
  const v8f f = (t - n) * 0.693147180559945309f;
  v8f p = v8f{} + (1.f / 5040.f);
  p = p * f + (1.f / 720.f);
  p = p * f + (1.f / 120.f);
  p = p * f + (1.f / 24.f);
  p = p * f + (1.f / 6.f);
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const v8u e = (((v8u)u - (v8u)magic) + 127u) << 23;  // vector casts keep the bits; n + 127 >= 0
  return p * (v8f)e;
}

MLRA_INLINE float exp2_1(float t) {
  v8f v = v8f{} + t;
  return exp2_8(v)[0];
}

// Scores of rows m and m + 1 (kTwo = false: row m only) against four keys, eight columns at a time; the
// rows come scaled, so these are the scores in base-2 units.
template <bool kTwo, typename T>
MLRA_INLINE void scores_4x(const float* q0, const float* q1, const T* k0, int64_t ks, int64_t R, float* s0,
                           float* s1, bool prefetch) {
  const T* k1 = k0 + ks;
  const T* k2 = k1 + ks;
  const T* k3 = k2 + ks;
  v8f a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
  int64_t l = 0;
  for (; l + 8 <= R; l += 8) {
    // One prefetch per 64-byte line of each key, kKeyPrefetchBytes ahead.
    constexpr int64_t kLine = 64 / sizeof(T), kAhead = kKeyPrefetchBytes / sizeof(T);
    if (prefetch && (l & (kLine - 1)) == 0) {
      __builtin_prefetch(k0 + l + kAhead, 0, 2);
      __builtin_prefetch(k1 + l + kAhead, 0, 2);
      __builtin_prefetch(k2 + l + kAhead, 0, 2);
      __builtin_prefetch(k3 + l + kAhead, 0, 2);
    }
    const v8f x0 = load8(q0 + l), y0 = load8(k0 + l), y1 = load8(k1 + l), y2 = load8(k2 + l), y3 = load8(k3 + l);
    a0 += x0 * y0;
    a1 += x0 * y1;
    a2 += x0 * y2;
    a3 += x0 * y3;
    if constexpr (kTwo) {
      const v8f x1 = load8(q1 + l);
      b0 += x1 * y0;
      b1 += x1 * y1;
      b2 += x1 * y2;
      b3 += x1 * y3;
    }
  }
  const v8f sums = hsum8x8(a0, a1, a2, a3, b0, b1, b2, b3);  // [row m: keys 0-3, row m + 1: keys 0-3]
  float r[8];
  store8(r, sums);
  for (; l < R; ++l) {
    for (int j = 0; j < 4; ++j) {
      const float kv = to_f32((k0 + j * ks)[l]);
      r[j] += q0[l] * kv;
      if constexpr (kTwo) r[4 + j] += q1[l] * kv;
    }
  }
  for (int j = 0; j < 4; ++j) {
    s0[j] = r[j];
    if constexpr (kTwo) s1[j] = r[4 + j];
  }
}

template <typename T>
MLRA_INLINE float dot(const float* a, const T* b, int64_t R) {
  v8f acc{};
  int64_t l = 0;
  for (; l + 8 <= R; l += 8) acc += load8(a + l) * load8(b + l);
  float r = hsum8(acc);
  for (; l < R; ++l) r += a[l] * to_f32(b[l]);
  return r;
}

// acc[m, c0 : c0 + 8·C] += Σ_jj p[m][jj] · v[jj, c0 : c0 + 8·C] for every row m, four rows at a time; past M
// the last row stands in for the missing ones (its copies hold the same value, whichever is stored last).
template <int C, typename T>
MLRA_INLINE void accumulate_pv(float* __restrict acc, const float* __restrict s_buf, const T* vc, int64_t vs,
                               int64_t M, int64_t R, int64_t nb, int64_t c0, bool prefetch) {
  for (int64_t m = 0; m < M; m += 4) {
    float* a_ptr[4];
    const float* p_ptr[4];
    for (int64_t i = 0; i < 4; ++i) {
      const int64_t mi = std::min<int64_t>(m + i, M - 1);
      a_ptr[i] = acc + mi * R + c0;
      p_ptr[i] = s_buf + mi * kKeyBlock;
    }
    v8f a[4][C];
    for (int i = 0; i < 4; ++i)
      for (int c = 0; c < C; ++c) a[i][c] = load8(a_ptr[i] + 8 * c);
    for (int64_t jj = 0; jj < nb; ++jj) {
      if (prefetch && m == 0) __builtin_prefetch(vc + (jj + kValuePrefetch) * vs, 0, 2);
      v8f vj[C];
      for (int c = 0; c < C; ++c) vj[c] = load8(vc + jj * vs + 8 * c);
      for (int i = 0; i < 4; ++i) {
        const float w = p_ptr[i][jj];
        for (int c = 0; c < C; ++c) a[i][c] += w * vj[c];
      }
    }
    for (int i = 3; i >= 0; --i)
      for (int c = 0; c < C; ++c) store8(a_ptr[i] + 8 * c, a[i][c]);
  }
}

// One task: rows [0, M) of (b, grp) against the keys [j0, j1). Writes the unnormalised accumulator
// acc [M, R], the running max mx [M] and sum sm [M] of the base-2 scores (mx = -inf, sm = 0 for a row
// that saw no key). scratch: M·(kKeyBlock + R) floats.
template <typename T>
MLRA_INLINE void run_task(const Problem& p, int64_t b, int64_t grp, int64_t j0, int64_t j1, float* __restrict acc,
                          float* __restrict mx, float* __restrict sm, float* __restrict scratch) {
  const int64_t M = p.M, R = p.R;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + grp * p.k_sg;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + grp * p.v_sg;
  const int64_t L = length_of(p, b);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float* s_buf = scratch;
  // The rows scaled by scale·log2(e) once: scores come out in base 2, for exp2.
  float* q = scratch + M * kKeyBlock;
  const float qscale = p.scale * kLog2e;
  for (int64_t m = 0; m < M; ++m) {
    const float* src = p.q + b * p.q_sb + grp * p.q_sg + m * p.q_sm;
    for (int64_t l = 0; l < R; ++l) q[m * R + l] = src[l] * qscale;
    mx[m] = neg_inf;
    sm[m] = 0.f;
  }
  std::fill(acc, acc + M * R, 0.f);
  j1 = std::min(j1, L);
  for (int64_t jb = j0; jb < j1; jb += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, j1 - jb);
    // Scores s[m][jj] of the block: two rows by four keys at a time.
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
      const float* q0 = q + m * R;
      int64_t jj = 0;
      for (; jj + 4 <= nb; jj += 4)
        scores_4x<true>(q0, q0 + R, k + (jb + jj) * p.k_ss, p.k_ss, R, s_buf + m * kKeyBlock + jj,
                        s_buf + (m + 1) * kKeyBlock + jj, p.prefetch);
      for (; jj < nb; ++jj) {
        const T* kj = k + (jb + jj) * p.k_ss;
        s_buf[m * kKeyBlock + jj] = dot(q0, kj, R);
        s_buf[(m + 1) * kKeyBlock + jj] = dot(q0 + R, kj, R);
      }
    }
    if (m < M) {
      const float* q0 = q + m * R;
      int64_t jj = 0;
      for (; jj + 4 <= nb; jj += 4)
        scores_4x<false>(q0, nullptr, k + (jb + jj) * p.k_ss, p.k_ss, R, s_buf + m * kKeyBlock + jj, nullptr, p.prefetch);
      for (; jj < nb; ++jj) s_buf[m * kKeyBlock + jj] = dot(q0, k + (jb + jj) * p.k_ss, R);
    }
    const float lowest = std::numeric_limits<float>::lowest();
    if (p.kpm != nullptr) {  // padding, in base 2 too, with the sum clamped at fp32's lowest value
      const float* pad = p.kpm + b * p.kpm_sb + jb;
      for (m = 0; m < M; ++m) {
        float* s = s_buf + m * kKeyBlock;
        for (int64_t jj = 0; jj < nb; ++jj) s[jj] = std::max(s[jj] + pad[jj] * kLog2e, lowest);
      }
    }
    if (p.causal) {  // the keys after a row's token score the lowest value (a NaN score stays NaN)
      for (m = 0; m < M; ++m) {
        float* s = s_buf + m * kKeyBlock;
        for (int64_t jj = std::max<int64_t>(keys_of_row(p, L, m) - jb, 0); jj < nb; ++jj)
          s[jj] = s[jj] != s[jj] ? s[jj] : lowest;
      }
    }
    // Online softmax per row over the block's keys (all of them below the length L).
    for (m = 0; m < M; ++m) {
      float* s = s_buf + m * kKeyBlock;
      v8f vmax = v8f{} + neg_inf;
      int64_t jj = 0;
      for (; jj + 8 <= nb; jj += 8) {  // NaN scores are passed over here; their exp2 below is NaN
        const v8f x = load8(s + jj);
        vmax = x > vmax ? x : vmax;
      }
      float bmax = std::max(std::max(std::max(vmax[0], vmax[1]), std::max(vmax[2], vmax[3])),
                            std::max(std::max(vmax[4], vmax[5]), std::max(vmax[6], vmax[7])));
      for (; jj < nb; ++jj) bmax = std::max(bmax, s[jj]);
      if (bmax == neg_inf) {  // every score NaN or -inf (non-finite inputs: masked ones are at least fp32's lowest)
        if (std::none_of(s, s + nb, [](float x) { return x != x; })) {  // all -inf: the block weighs nothing
          std::fill(s, s + nb, 0.f);
          continue;
        }
        bmax = std::numeric_limits<float>::quiet_NaN();  // a NaN score: the row is NaN
      }
      const float new_max = nan_max(mx[m], bmax);
      const float corr = mx[m] == neg_inf ? 0.f : exp2_1(mx[m] - new_max);
      v8f vsum{};
      for (jj = 0; jj + 8 <= nb; jj += 8) {
        const v8f e = exp2_8(load8(s + jj) - new_max);
        store8(s + jj, e);
        vsum += e;
      }
      float sum = hsum8(vsum);
      for (; jj < nb; ++jj) {
        s[jj] = exp2_1(s[jj] - new_max);
        sum += s[jj];
      }
      sm[m] = sm[m] * corr + sum;
      mx[m] = new_max;
      float* am = acc + m * R;
      if (corr == 0.f) {  // the keys so far weigh nothing: drop their sums, which may have overflowed, not a NaN
        for (int64_t l = 0; l < R; ++l) am[l] = am[l] != am[l] ? am[l] : 0.f;
      } else if (corr != 1.f) {
        for (int64_t l = 0; l < R; ++l) am[l] *= corr;
      }
    }
    // acc[m] += Σ_j p[m][j] · v[j]: four rows by 24 columns held in registers over the block's keys (twelve
    // FMAs per seven loads), then the columns left in steps of eight.
    int64_t c0 = 0;
    for (; c0 + 24 <= R; c0 += 24) accumulate_pv<3>(acc, s_buf, v + jb * p.v_ss + c0, p.v_ss, M, R, nb, c0, p.prefetch);
    for (; c0 + 8 <= R; c0 += 8) accumulate_pv<1>(acc, s_buf, v + jb * p.v_ss + c0, p.v_ss, M, R, nb, c0, p.prefetch);
    for (; c0 < R; ++c0) {
      for (m = 0; m < M; ++m) {
        const float* pm = s_buf + m * kKeyBlock;
        float a = acc[m * R + c0];
        for (int64_t jj = 0; jj < nb; ++jj) a += pm[jj] * to_f32(v[(jb + jj) * p.v_ss + c0]);
        acc[m * R + c0] = a;
      }
    }
  }
}

template <typename T>
void run_tasks_default(const Problem& p, int64_t t0, int64_t t1, float* acc, float* mx, float* sm, float* s_buf) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t split = t % p.splits, bg = t / p.splits;
    const int64_t j0 = split * p.split_len;
    run_task<T>(p, bg / p.G, bg % p.G, j0, j0 + p.split_len, acc + t * p.M * p.R, mx + t * p.M, sm + t * p.M, s_buf);
  }
}

#if defined(MLRA_DECODE_AVX2)
template <typename T>
MLRA_TARGET_AVX2 __attribute__((noinline)) void run_tasks_avx2(const Problem& p, int64_t t0, int64_t t1, float* acc,
                                                                float* mx, float* sm, float* s_buf) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t split = t % p.splits, bg = t / p.splits;
    const int64_t j0 = split * p.split_len;
    run_task<T>(p, bg / p.G, bg % p.G, j0, j0 + p.split_len, acc + t * p.M * p.R, mx + t * p.M, sm + t * p.M, s_buf);
  }
}

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

// --- A few rows against a weight read once: the GEMMs of a decode step ------------------------------
//
// y[p, n, j] = x[p, n, :] · w[p, j, :] + bias[p, j] for n < N (a step's B·t rows, at most kGemmRows):
// each weight row is streamed once from memory for all N rows, the weight rows split across threads.
// torch's GEMM for so few rows reads the weight at about a third of the machine's read rate here.
constexpr int64_t kGemmRows = 16;         // more rows: torch's bmm / baddbmm, which are compute-bound there
constexpr int64_t kGemmTaskFloats = 8192;  // the weight floats (32 KB) a task reads at least
constexpr int64_t kGemmPrefetch = 4096;    // 16 KB: measured best of 2-16 KB on this project's 2-core host

struct Gemm {
  const float* x;
  int64_t x_sp, x_sn;
  const float* w;
  int64_t w_sp, w_sj;
  const float* bias;  // [P, J] rows of stride b_sp, or null
  int64_t b_sp;
  float* y;
  int64_t y_sp, y_sn, y_sj;
  int64_t P, N, J, K;
  int64_t rows_per_task, tasks_per_p;
};

// Weight rows j (and j + 1 with kTwo) against NB rows of x: NB·2 accumulators of eight floats.
template <int NB, bool kTwo>
MLRA_INLINE void gemm_tile(const Gemm& g, int64_t p, int64_t n0, int64_t j) {
  const float* w0 = g.w + p * g.w_sp + j * g.w_sj;
  const float* w1 = w0 + g.w_sj;
  const float* xr[NB];
  for (int i = 0; i < NB; ++i) xr[i] = g.x + p * g.x_sp + (n0 + i) * g.x_sn;
  v8f a[NB], b[NB];
  for (int i = 0; i < NB; ++i) a[i] = b[i] = v8f{};
  // The first rows' pass asks for the weight kGemmPrefetch floats ahead into L2: the hardware's own
  // prefetch, which restarts at every 4 KB page, leaves this stream at a third of the read rate.
  const bool prefetch = n0 == 0;
  int64_t l = 0;
  for (; l + 8 <= g.K; l += 8) {
    if (prefetch && (l & 15) == 0) {
      __builtin_prefetch(w0 + l + kGemmPrefetch, 0, 2);
      if constexpr (kTwo) __builtin_prefetch(w1 + l + kGemmPrefetch, 0, 2);
    }
    const v8f u = load8(w0 + l);
    v8f v{};
    if constexpr (kTwo) v = load8(w1 + l);
    for (int i = 0; i < NB; ++i) {
      const v8f xv = load8(xr[i] + l);
      a[i] += u * xv;
      if constexpr (kTwo) b[i] += v * xv;
    }
  }
  const float bias0 = g.bias != nullptr ? g.bias[p * g.b_sp + j] : 0.f;
  const float bias1 = (kTwo && g.bias != nullptr) ? g.bias[p * g.b_sp + j + 1] : 0.f;
  for (int i = 0; i < NB; ++i) {
    float s0 = hsum8(a[i]), s1 = hsum8(b[i]);
    for (int64_t ll = l; ll < g.K; ++ll) {
      s0 += w0[ll] * xr[i][ll];
      if constexpr (kTwo) s1 += w1[ll] * xr[i][ll];
    }
    float* out = g.y + p * g.y_sp + (n0 + i) * g.y_sn + j * g.y_sj;
    out[0] = s0 + bias0;
    if constexpr (kTwo) out[g.y_sj] = s1 + bias1;
  }
}

template <bool kTwo>
MLRA_INLINE void gemm_rows(const Gemm& g, int64_t p, int64_t j) {
  int64_t n = 0;
  for (; n + 4 <= g.N; n += 4) gemm_tile<4, kTwo>(g, p, n, j);
  switch (g.N - n) {
    case 3: gemm_tile<3, kTwo>(g, p, n, j); break;
    case 2: gemm_tile<2, kTwo>(g, p, n, j); break;
    case 1: gemm_tile<1, kTwo>(g, p, n, j); break;
    default: break;
  }
}

MLRA_INLINE void gemm_tasks(const Gemm& g, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t p = t / g.tasks_per_p, j0 = (t % g.tasks_per_p) * g.rows_per_task;
    const int64_t j1 = std::min(g.J, j0 + g.rows_per_task);
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) gemm_rows<true>(g, p, j);
    if (j < j1) gemm_rows<false>(g, p, j);
  }
}

void gemm_tasks_default(const Gemm& g, int64_t t0, int64_t t1) { gemm_tasks(g, t0, t1); }

#if defined(MLRA_DECODE_AVX2)
MLRA_TARGET_AVX2 __attribute__((noinline)) void gemm_tasks_avx2(const Gemm& g, int64_t t0, int64_t t1) {
  gemm_tasks(g, t0, t1);
}
#endif

// --- The step's operands and intermediates as torch would view them --------------------------------
//
// Float32 memory with torch's geometry (sizes and strides), so that the step takes the views and copies
// that its ATen form took (view, reshape, transpose, permute, narrow, select, unsqueeze), without creating
// a tensor for each: the strides, those of size-1 dimensions included, decide the GEMM path below.
struct Span {
  float* data;
  std::vector<int64_t> sizes, strides;
};

// Float32 buffers that live as long as the step.
struct Pool {
  std::vector<std::unique_ptr<float[]>> buffers;
  float* alloc(int64_t n) {
    buffers.emplace_back(new float[static_cast<size_t>(std::max<int64_t>(n, 1))]);
    return buffers.back().get();
  }
};

int64_t numel_of(const std::vector<int64_t>& sizes) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  return n;
}

// A contiguous tensor's strides, as torch sets them (a size-0 or size-1 dimension counts as 1).
std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> st(sizes.size());
  int64_t s = 1;
  for (size_t i = sizes.size(); i-- > 0;) {
    st[i] = s;
    s *= std::max<int64_t>(sizes[i], 1);
  }
  return st;
}

// torch's is_contiguous: dimensions of size 1 have any stride.
bool is_contiguous(const Span& s) {
  if (numel_of(s.sizes) == 0) return true;
  int64_t expected = 1;
  for (size_t i = s.sizes.size(); i-- > 0;) {
    if (s.sizes[i] == 1) continue;
    if (s.strides[i] != expected) return false;
    expected *= s.sizes[i];
  }
  return true;
}

// The strides of `shape` as a view of `s`, as torch computes them for view and reshape
// (at::detail::computeStride), or none where the view is impossible (reshape then copies).
std::optional<std::vector<int64_t>> view_strides(const Span& s, const std::vector<int64_t>& shape) {
  const std::vector<int64_t>& os = s.sizes;
  const std::vector<int64_t>& ot = s.strides;
  if (os.empty()) return std::vector<int64_t>(shape.size(), 1);
  const int64_t numel = numel_of(os);
  if (numel == 0 && os == shape) return ot;
  std::vector<int64_t> ns(shape.size());
  if (numel == 0) {
    for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d)
      ns[d] = d == static_cast<int64_t>(shape.size()) - 1 ? 1 : std::max<int64_t>(shape[d + 1], 1) * ns[d + 1];
    return ns;
  }
  int64_t view_d = static_cast<int64_t>(shape.size()) - 1;
  int64_t chunk_base_stride = ot.back(), tensor_numel = 1, view_numel = 1;
  for (int64_t tensor_d = static_cast<int64_t>(os.size()) - 1; tensor_d >= 0; --tensor_d) {
    tensor_numel *= os[tensor_d];
    if (tensor_d == 0 || (os[tensor_d - 1] != 1 && ot[tensor_d - 1] != tensor_numel * chunk_base_stride)) {
      while (view_d >= 0 && (view_numel < tensor_numel || shape[view_d] == 1)) {
        ns[view_d] = view_numel * chunk_base_stride;
        view_numel *= shape[view_d];
        --view_d;
      }
      if (view_numel != tensor_numel) return std::nullopt;
      if (tensor_d > 0) {
        chunk_base_stride = ot[tensor_d - 1];
        tensor_numel = 1;
        view_numel = 1;
      }
    }
  }
  if (view_d != -1) return std::nullopt;
  return ns;
}

// A float32 tensor's memory: read only, unless `writes`.
Span span_of(const Tensor& t, bool writes = false) {
  const Shape sz = t.sizes(), st = t.strides();
  float* data = writes ? static_cast<float*>(t.mutable_data_ptr()) : const_cast<float*>(t.const_data_ptr<float>());
  return Span{data, {sz.begin(), sz.end()}, {st.begin(), st.end()}};
}

Span empty_span(const std::vector<int64_t>& sizes, Pool& pool) {
  return Span{pool.alloc(numel_of(sizes)), sizes, contiguous_strides(sizes)};
}

Span view(const Span& s, const std::vector<int64_t>& shape) {
  auto st = view_strides(s, shape);
  MLRA_CHECK(st.has_value(), "mlra::latent_decode_step_cpu: internal error: a view that torch would not take");
  return Span{s.data, shape, *st};
}

// dst = src, element by element (equal sizes, any strides).
void copy_into(const Span& dst, const Span& src) {
  const int64_t n = numel_of(src.sizes);
  const size_t D = src.sizes.size();
  std::vector<int64_t> idx(D, 0);
  int64_t d_off = 0, s_off = 0;
  for (int64_t e = 0; e < n; ++e) {
    dst.data[d_off] = src.data[s_off];
    for (size_t i = D; i-- > 0;) {  // the next index, last dimension fastest
      if (++idx[i] < src.sizes[i]) {
        d_off += dst.strides[i];
        s_off += src.strides[i];
        break;
      }
      d_off -= (src.sizes[i] - 1) * dst.strides[i];
      s_off -= (src.sizes[i] - 1) * src.strides[i];
      idx[i] = 0;
    }
  }
}

Span contiguous(const Span& s, Pool& pool) {
  if (is_contiguous(s)) return s;
  Span out = empty_span(s.sizes, pool);
  copy_into(out, s);
  return out;
}

// torch's reshape: a view where one exists, else a contiguous copy viewed as `shape`.
Span reshape(const Span& s, const std::vector<int64_t>& shape, Pool& pool) {
  if (auto st = view_strides(s, shape)) return Span{s.data, shape, *st};
  Span copy = empty_span(s.sizes, pool);
  copy_into(copy, s);
  return view(copy, shape);
}

Span transpose(Span s, size_t a, size_t b) {
  std::swap(s.sizes[a], s.sizes[b]);
  std::swap(s.strides[a], s.strides[b]);
  return s;
}

Span permute(const Span& s, const std::vector<size_t>& dims) {
  Span out{s.data, {}, {}};
  for (size_t d : dims) {
    out.sizes.push_back(s.sizes[d]);
    out.strides.push_back(s.strides[d]);
  }
  return out;
}

Span narrow(Span s, size_t dim, int64_t start, int64_t length) {
  s.data += start * s.strides[dim];
  s.sizes[dim] = length;
  return s;
}

Span select(Span s, size_t dim, int64_t index) {
  s.data += index * s.strides[dim];
  s.sizes.erase(s.sizes.begin() + static_cast<std::ptrdiff_t>(dim));
  s.strides.erase(s.strides.begin() + static_cast<std::ptrdiff_t>(dim));
  return s;
}

Span unsqueeze0(Span s) {
  s.strides.insert(s.strides.begin(), s.sizes.empty() ? 1 : s.sizes[0] * s.strides[0]);
  s.sizes.insert(s.sizes.begin(), 1);
  return s;
}

// y [P, N, J] (any strides) = x [P, N, K] · w [P, J, K]ᵀ (contiguous) + bias [P, J] (contiguous). With more than
// kGemmRows rows, or x not of unit stride in K, torch's CPU bmm / baddbmm (the C shims of its out= kernels)
// write y instead, on tensors over the same memory and strides. The step has checked every shape.
void rows_gemm(const Span& x, const Span& w, const std::optional<Span>& bias, const Span& y) {
  const int64_t P = x.sizes[0], N = x.sizes[1], K = x.sizes[2], J = w.sizes[1];
  if (N > kGemmRows || x.strides[2] != 1) {
    const auto over = [](const Span& s) {
      return torch::stable::from_blob(s.data, s.sizes, s.strides, Device(torch::headeronly::kCPU), ScalarType::Float);
    };
    const Tensor xt = over(x), wt = over(transpose(w, 1, 2)), yt = over(y);
    if (bias.has_value()) {
      const Tensor bt = over(view(*bias, {P, 1, J}));
      TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_baddbmm_out(yt.get(), bt.get(), xt.get(), wt.get(), 1.0, 1.0));
    } else {
      TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_bmm_out(yt.get(), xt.get(), wt.get()));
    }
    return;
  }
  if (P == 0 || N == 0 || J == 0) return;
  Gemm g{};
  g.x = x.data;
  g.x_sp = x.strides[0];
  g.x_sn = x.strides[1];
  g.w = w.data;
  g.w_sp = w.strides[0];
  g.w_sj = w.strides[1];
  g.bias = bias.has_value() ? bias->data : nullptr;
  g.b_sp = J;
  g.y = y.data;
  g.y_sp = y.strides[0];
  g.y_sn = y.strides[1];
  g.y_sj = y.strides[2];
  g.P = P;
  g.N = N;
  g.J = J;
  g.K = K;
  g.rows_per_task = std::max<int64_t>(2, (kGemmTaskFloats / std::max<int64_t>(K, 1) + 1) / 2 * 2);
  g.tasks_per_p = (J + g.rows_per_task - 1) / g.rows_per_task;
  torch::stable::parallel_for(0, P * g.tasks_per_p, 1, [&](int64_t t0, int64_t t1) {
#if defined(MLRA_DECODE_AVX2)
    if (has_avx2()) {
      gemm_tasks_avx2(g, t0, t1);
      return;
    }
#endif
    gemm_tasks_default(g, t0, t1);
  });
}

void check_operand(const Tensor& t, const char* name, const char* op = "mlra::latent_decode_cpu",
                   bool bf16_too = false) {
  MLRA_CHECK(t.is_cpu(), op, ": ", name, " must be a CPU tensor, got ", name_of(t.device()));
  MLRA_CHECK(t.scalar_type() == ScalarType::Float || (bf16_too && t.scalar_type() == ScalarType::BFloat16), op, ": ",
             name, bf16_too ? " must be float32 or bfloat16, got " : " must be float32, got ", t.scalar_type());
  MLRA_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D [B, g, ·, r], got shape ", Dims(t.sizes()));
  MLRA_CHECK(t.stride(3) == 1 || t.size(3) == 1, op, ": ", name, " must have a contiguous last dimension, got strides ",
             Dims(t.strides()));
}

// Whether some element of a tensor shares its memory with another: a dimension of more than one element
// with stride 0 (as from expand()), what at::has_internal_overlap reports as MemOverlap::Yes.
bool has_internal_overlap(const Tensor& t) {
  for (int64_t i = 0; i < t.dim(); ++i)
    if (t.size(i) > 1 && t.stride(i) == 0) return true;
  return false;
}

// Whether some element of `dims` (stride, size > 1 pairs, strides descending; reach[i]: Σ (size - 1)·stride
// of dims i..) can be offset by exactly `rem` elements: rem = Σ n_i·stride_i with |n_i| < size_i. At most
// two n_i fit each level where every stride exceeds the reach of the smaller ones (the views of one dense
// buffer); past `budget` tries it gives up and answers yes.
bool offset_reachable(const std::vector<std::pair<int64_t, int64_t>>& dims, const std::vector<int64_t>& reach, size_t i,
                      int64_t rem, int& budget) {
  if (i == dims.size()) return rem == 0;
  if (--budget < 0) return true;
  const auto floor_div = [](int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); };
  const int64_t s = dims[i].first, n = dims[i].second;
  const int64_t lo = std::max(-(n - 1), -floor_div(reach[i + 1] - rem, s));  // ceil((rem - reach) / s)
  const int64_t hi = std::min(n - 1, floor_div(rem + reach[i + 1], s));
  for (int64_t c = lo; c <= hi; ++c)
    if (offset_reachable(dims, reach, i + 1, rem - c * s, budget)) return true;
  return false;
}

// Whether two CPU tensors may share memory: no when their byte ranges are apart (tensors of different
// storages always are), or when they are equally strided views of one buffer whose offset no index
// difference bridges (k = buf[..., :r], v = buf[..., r:]); yes in every other case where their ranges meet.
bool may_overlap(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto span = [](const Tensor& x) {  // bytes from the start of its first element to the end of its last
    int64_t n = 1;
    for (int64_t i = 0; i < x.dim(); ++i) n += (x.size(i) - 1) * x.stride(i);
    return n * static_cast<int64_t>(x.element_size());
  };
  const auto a0 = reinterpret_cast<intptr_t>(a.data_ptr()), b0 = reinterpret_cast<intptr_t>(b.data_ptr());
  if (a0 + span(a) <= b0 || b0 + span(b) <= a0) return false;
  const int64_t size = static_cast<int64_t>(a.element_size());
  if (!a.sizes().equals(b.sizes()) || !a.strides().equals(b.strides()) || a.scalar_type() != b.scalar_type() ||
      (b0 - a0) % size != 0)
    return true;
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t i = 0; i < a.dim(); ++i) {
    if (a.size(i) == 1) continue;
    if (a.stride(i) == 0) return true;
    dims.emplace_back(a.stride(i), a.size(i));
  }
  std::sort(dims.begin(), dims.end(), [](const auto& u, const auto& v) { return u.first > v.first; });
  std::vector<int64_t> reach(dims.size() + 1, 0);
  for (size_t i = dims.size(); i-- > 0;) reach[i] = reach[i + 1] + (dims[i].second - 1) * dims[i].first;
  int budget = 256;
  return offset_reachable(dims, reach, 0, (b0 - a0) / size, budget);
}

// The score scale as the kernel uses it (float32): positive and finite, as decode's Python checks it.
float checked_scale(double scale, const char* op) {
  const float s = static_cast<float>(scale);
  MLRA_CHECK(std::isfinite(s) && s > 0.f, op, ": scale must be a positive finite float32 number, got ", scale);
  return s;
}

// The attention of latent_decode_cpu on a checked problem: z [B, g, M, r] (contiguous, float32).
void attend(Problem& p, bool bf16, float* zp) {
  const int64_t B = p.B, G = p.G, M = p.M, R = p.R;
  if (B == 0 || G == 0 || M == 0 || R == 0) return;
  // Enough tasks for every thread (a few each, for balance), none shorter than kMinSplit keys, over the
  // positions in use (a preallocated cache is mostly empty early in a generation).
  int64_t used = 0;
  for (int64_t b = 0; b < B; ++b) used = std::max(used, length_of(p, b));
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const int64_t want = std::max<int64_t>(1, (4 * threads + B * G - 1) / (B * G));
  p.splits = std::max<int64_t>(1, std::min(want, (used + kMinSplit - 1) / kMinSplit));
  p.split_len = std::max<int64_t>(1, (used + p.splits - 1) / p.splits);
  const int64_t tasks = B * G * p.splits;
  std::vector<float> acc(static_cast<size_t>(tasks * M * R)), mx(static_cast<size_t>(tasks * M)),
      sm(static_cast<size_t>(tasks * M));
  torch::stable::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s_buf(static_cast<size_t>(M * (kKeyBlock + R)));
#if defined(MLRA_DECODE_AVX2)
    if (has_avx2()) {
      if (bf16)
        run_tasks_avx2<bf16_t>(p, t0, t1, acc.data(), mx.data(), sm.data(), s_buf.data());
      else
        run_tasks_avx2<float>(p, t0, t1, acc.data(), mx.data(), sm.data(), s_buf.data());
      return;
    }
#endif
    if (bf16)
      run_tasks_default<bf16_t>(p, t0, t1, acc.data(), mx.data(), sm.data(), s_buf.data());
    else
      run_tasks_default<float>(p, t0, t1, acc.data(), mx.data(), sm.data(), s_buf.data());
  });
  // Merge the splits of each (sequence, group) by their log-sum-exp, in split order.
  const int64_t splits = p.splits;
  torch::stable::parallel_for(0, B * G, 1, [&](int64_t bg0, int64_t bg1) {
    for (int64_t bg = bg0; bg < bg1; ++bg) {
      for (int64_t m = 0; m < M; ++m) {
        float gmax = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < splits; ++s) gmax = nan_max(gmax, mx[(bg * splits + s) * M + m]);
        float* out = zp + bg * M * R + m * R;
        if (gmax == -std::numeric_limits<float>::infinity()) {  // every row sees a key (L >= t_new): all were -inf
          std::fill(out, out + R, std::numeric_limits<float>::quiet_NaN());
          continue;
        }
        std::fill(out, out + R, 0.f);
        float total = 0.f;
        for (int64_t s = 0; s < splits; ++s) {
          const int64_t t = bg * splits + s;
          const float w = std::exp2(mx[t * M + m] - gmax);  // 0 for a split that saw no key
          const float* a = acc.data() + (t * M + m) * R;
          if (w == 0.f) {  // its keys weigh nothing; a NaN value among them still shows (0 · NaN)
            for (int64_t l = 0; l < R; ++l) out[l] += a[l] != a[l] ? a[l] : 0.f;
            continue;
          }
          total += w * sm[t * M + m];
          for (int64_t l = 0; l < R; ++l) out[l] += w * a[l];
        }
        const float inv = 1.f / total;
        for (int64_t l = 0; l < R; ++l) out[l] *= inv;
      }
    }
  });
}

}  // namespace

Tensor latent_decode_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& kpm,
                         const std::optional<Tensor>& lengths, int64_t t_new, bool causal, double scale) {
  check_operand(q, "q", "mlra::latent_decode_cpu", true);
  check_operand(k, "k", "mlra::latent_decode_cpu", true);
  check_operand(v, "v", "mlra::latent_decode_cpu", true);
  MLRA_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
             "mlra::latent_decode_cpu: q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
             " and ", v.scalar_type());
  const bool bf16 = q.scalar_type() == ScalarType::BFloat16;
  const int64_t B = q.size(0), G = q.size(1), M = q.size(2), R = q.size(3), S = k.size(2);
  MLRA_CHECK(k.size(0) == B && k.size(1) == G && k.size(3) == R && v.sizes().equals(k.sizes()),
             "mlra::latent_decode_cpu: k and v must be [B, g, S, r] = [", B, ", ", G, ", S, ", R, "] alike, got ",
             Dims(k.sizes()), " and ", Dims(v.sizes()));
  MLRA_CHECK(t_new >= 1 && M % t_new == 0, "mlra::latent_decode_cpu: t_new=", t_new, " must divide the ", M,
             " query rows");
  const float scale_f = checked_scale(scale, "mlra::latent_decode_cpu");
  // bfloat16 rows are few (B·g·M·r numbers): read as float32 once; the caches are read as they are.
  const Tensor qf = bf16 ? torch::stable::to(q, ScalarType::Float) : q;
  Problem p = problem_over(qf.const_data_ptr<float>(), qf.stride(0), qf.stride(1), qf.stride(2), M, k, v, t_new,
                           causal, scale_f);
  if (kpm.has_value()) {
    const Tensor& pad = *kpm;
    MLRA_CHECK(pad.is_cpu() && pad.scalar_type() == ScalarType::Float && pad.dim() == 2 && pad.size(0) == B &&
                   pad.size(1) == S && (pad.stride(1) == 1 || S == 1),
               "mlra::latent_decode_cpu: kpm must be a float32 CPU [B, S] = [", B, ", ", S,
               "] tensor with a contiguous key dimension, got ", pad.scalar_type(), " ", Dims(pad.sizes()),
               " strides ", Dims(pad.strides()), " on ", name_of(pad.device()));
    p.kpm = pad.const_data_ptr<float>();
    p.kpm_sb = pad.stride(0);
  }
  std::optional<Tensor> len;
  if (lengths.has_value()) {
    len = lengths->is_contiguous() ? *lengths : torch::stable::contiguous(*lengths);
    MLRA_CHECK(len->is_cpu() && len->dim() == 1 && len->size(0) == B,
               "mlra::latent_decode_cpu: lengths must be a CPU [B] = [", B, "] tensor, got ", Dims(len->sizes()),
               " on ", name_of(len->device()));
    if (len->scalar_type() == ScalarType::Int) {
      p.len32 = len->const_data_ptr<int32_t>();
    } else {
      MLRA_CHECK(len->scalar_type() == ScalarType::Long,
                 "mlra::latent_decode_cpu: lengths must be int32 or int64, got ", len->scalar_type());
      p.len64 = len->const_data_ptr<int64_t>();
    }
  }
  // Every sequence holds its t_new new tokens, and at most the S positions of the caches.
  MLRA_CHECK(lengths.has_value() || B == 0 || S >= t_new, "mlra::latent_decode_cpu: the caches hold S=", S,
             " positions, fewer than the t_new=", t_new, " new tokens (without lengths every sequence is S long)");
  for (int64_t b = 0; lengths.has_value() && b < B; ++b) {
    const int64_t L = length_of(p, b);
    MLRA_CHECK(L >= t_new && L <= S, "mlra::latent_decode_cpu: lengths (cache_seqlens)[", b, "] = ", L,
               " is outside [t_new, S] = [", t_new, ", ", S,
               "]: a sequence holds its t_new new tokens and at most the caches' S positions");
  }
  Tensor z = torch::stable::empty({B, G, M, R}, ScalarType::Float, std::nullopt, Device(torch::headeronly::kCPU));
  attend(p, bf16, z.mutable_data_ptr<float>());
  return bf16 ? torch::stable::to(z, ScalarType::BFloat16) : z;
}

// mlra::latent_decode_step_cpu: a layer's whole decode step on the pre-multiplied weights of
// ops/mlra/step_weights.py (one call instead of a dozen small ones from Python, whose dispatch costs as much
// as a small layer's step): one GEMM gives the query part (q̃ itself, or c_Q and then M_h) and the new
// latents c_K, c_V, which are written into the caches at positions [pos, pos + t) while seqlens grows by
// t; the attention runs over the caches as latent_decode_cpu does (causal, seqlens); the output is
// Z·W_OVᵀ + b' (B_V folded into W_O) or (Z·B_Vᵀ + b_V)·W_Oᵀ + b_O. The heads may be a subset of whole
// latent groups of a layer's: d_h comes from w_out's columns (H·d_h) with w_v, and the output is [B, t, d]
// for the width d of x either way (W_O's columns of those heads: the subsets' outputs sum to the layer's).
Tensor latent_decode_step_cpu(const Tensor& x, const Tensor& w_in, const std::optional<Tensor>& b_in,
                              const std::optional<Tensor>& m, const std::optional<Tensor>& beta,
                              const std::optional<Tensor>& w_v, const std::optional<Tensor>& b_v, const Tensor& w_out,
                              const std::optional<Tensor>& b_out, Tensor k_cache, Tensor v_cache, Tensor seqlens,
                              int64_t pos, int64_t num_heads, double scale) {
  constexpr const char* kOp = "mlra::latent_decode_step_cpu";
  // Every argument is checked before anything is written: a failed call leaves the caches and seqlens as
  // they were. Messages name the argument, what it was and what was expected.
  MLRA_CHECK(x.is_cpu() && x.scalar_type() == ScalarType::Float && x.dim() == 3, kOp,
             ": x must be a float32 CPU [B, t, d] tensor, got ", x.scalar_type(), " ", Dims(x.sizes()), " on ",
             name_of(x.device()));
  check_operand(k_cache, "k_cache", kOp);
  check_operand(v_cache, "v_cache", kOp);
  const int64_t B = x.size(0), t = x.size(1), d = x.size(2);
  const int64_t G = k_cache.size(1), cap = k_cache.size(2), R = k_cache.size(3), H = num_heads;
  MLRA_CHECK(k_cache.size(0) == B, kOp, ": k_cache must be [B, g, capacity, r] with the B=", B,
             " sequences of x, got ", Dims(k_cache.sizes()));
  MLRA_CHECK(v_cache.sizes().equals(k_cache.sizes()), kOp, ": v_cache must have the shape of k_cache, ",
             Dims(k_cache.sizes()), ", got ", Dims(v_cache.sizes()));
  MLRA_CHECK(G >= 1 && R >= 1, kOp, ": k_cache must have at least one latent group g and a latent width r >= 1 ",
             "([B, g, capacity, r]), got ", Dims(k_cache.sizes()));
  MLRA_CHECK(t >= 1, kOp, ": x must hold at least one new token, got shape ", Dims(x.sizes()));
  const std::string end = pos <= std::numeric_limits<int64_t>::max() - t ? std::to_string(pos + t) : "2^63 or more";
  MLRA_CHECK(pos >= 0 && t <= cap && pos <= cap - t, kOp, ": pos=", pos, " with t=", t, " new tokens: positions [",
             pos, ", ", end, ") do not fit a cache of ", cap, " positions (k_cache.size(2))");
  MLRA_CHECK(seqlens.is_cpu() && seqlens.scalar_type() == ScalarType::Int && seqlens.dim() == 1 &&
                 seqlens.size(0) == B && seqlens.is_contiguous(),
             kOp, ": seqlens must be a contiguous int32 CPU [B] = [", B, "] tensor, got ", seqlens.scalar_type(), " ",
             Dims(seqlens.sizes()), " on ", name_of(seqlens.device()));
  int32_t* lengths = seqlens.mutable_data_ptr<int32_t>();
  // seqlens grows by t: each length must stay within the caches' capacity (and int32).
  const int64_t room = std::min<int64_t>(cap, std::numeric_limits<int32_t>::max());
  for (int64_t b = 0; b < B; ++b) {
    MLRA_CHECK(lengths[b] >= 0, kOp, ": seqlens[", b, "] = ", lengths[b], " is negative");
    MLRA_CHECK(lengths[b] <= room - t, kOp, ": seqlens[", b, "] = ", lengths[b], " cannot grow by the t=", t,
               " new tokens: a length must stay at most ", room,
               cap <= room ? " (the capacity of k_cache, its size(2))" : " (int32's largest value)",
               lengths[b] != pos ? "; every sequence must hold pos=" + std::to_string(pos) + " positions" : "");
  }
  MLRA_CHECK(H >= 1 && H % G == 0, kOp, ": num_heads=", H, " must be a positive multiple of the caches' g=", G,
             " latent groups (k_cache.size(1))");
  checked_scale(scale, kOp);
  const int64_t hpg = H / G, gr = G * R, N = B * t;
  const int64_t n_q = m.has_value() ? gr : H * R, n_in = n_q + 2 * gr;
  // d_h: from W_O's columns, H·d_h (the heads' width: d for a whole layer, less for a subset of its heads).
  if (w_v.has_value()) {
    MLRA_CHECK(w_out.dim() == 2 && w_out.size(0) == d && w_out.size(1) >= H && w_out.size(1) % H == 0, kOp,
               ": w_out must be W_O [d, num_heads·d_h] with w_v (d=", d, " the width of x, num_heads=", H,
               "), got ", Dims(w_out.sizes()));
  }
  const int64_t dh = w_v.has_value() ? w_out.size(1) / H : 0;
  const auto sizes_of = [](const Tensor& w) {  // "[a, b]", and the strides of a tensor that is not contiguous
    std::ostringstream out;
    out << Dims(w.sizes());
    if (!w.is_contiguous()) out << " (not contiguous: strides " << Dims(w.strides()) << ")";
    return out.str();
  };
  // A step weight: a contiguous float32 CPU tensor of one shape; `why` says where that shape comes from.
  const auto check = [&](const Tensor& w, const char* name, const Dims& shape, const std::string& why,
                         const std::string& prefix = "", const std::string& hint = "") {
    MLRA_CHECK(shape == w.sizes() && w.is_contiguous() && w.scalar_type() == ScalarType::Float && w.is_cpu(), kOp,
               ": ", prefix, name, " must be a contiguous float32 CPU ", shape, " tensor (", why, "), got ",
               w.scalar_type(), " ", sizes_of(w), " on ", name_of(w.device()), hint);
  };
  // A weight whose shape is right but for its number of heads, heads·r rows (or heads of d/heads): the
  // messages name num_heads, and the number of heads the weight was formed for.
  const std::string heads = "num_heads=" + std::to_string(H);
  const auto wrong_heads = [&](const char* name) { return heads + " does not match " + name + ": "; };
  const auto formed_for = [&](int64_t other) {
    return "; that is the shape for num_heads=" + std::to_string(other) +
           ": were the step weights formed for another number of heads?";
  };
  const std::string hgr = heads + ", g=" + std::to_string(G) + " and r=" + std::to_string(R) + " (g, r: k_cache's)";
  MLRA_CHECK(w_in.dim() == 2 && w_in.size(0) == n_in && w_in.size(1) == d, kOp, ": w_in must be [", n_in, ", ", d,
             "] for H=", H, ", g=", G, ", r=", R, ", got ", Dims(w_in.sizes()), " (rows: the query's, num_heads·r, ",
             "or g·r with m, then 2·g·r for the latents; columns: the width d of x; H is num_heads, g and r are ",
             "k_cache's)");
  check(w_in, "w_in", {n_in, d}, "w_in's rows");
  if (b_in.has_value()) check(*b_in, "b_in", {n_in}, "one per row of w_in");
  if (m.has_value()) {
    const Tensor& mm = *m;
    const bool by_heads = mm.dim() == 3 && mm.size(0) == G && mm.size(2) == R && mm.size(1) % R == 0 &&
                          mm.size(1) != hpg * R;
    check(mm, "m", {G, hpg * R, R}, "[g, (num_heads/g)·r, r] for " + hgr, by_heads ? wrong_heads("m") : "",
          by_heads ? formed_for(mm.size(1) / R * G) : "");
  }
  MLRA_CHECK(!beta.has_value() || m.has_value(), kOp, ": beta is given without m");
  if (beta.has_value()) check(*beta, "beta", {G, hpg * R}, "[g, (num_heads/g)·r] for " + hgr);
  if (w_v.has_value()) {
    const Tensor& wv = *w_v;
    const bool by_heads = wv.dim() == 3 && wv.size(0) >= 1 && wv.size(0) != H && wv.size(0) * wv.size(1) == H * dh &&
                          wv.size(2) == R;
    check(wv, "w_v", {H, dh, R}, "[num_heads, d_h, r] for " + hgr + ", d_h=" + std::to_string(dh) + " of w_out",
          by_heads ? wrong_heads("w_v") : "", by_heads ? formed_for(wv.size(0)) : "");
  }
  MLRA_CHECK(!b_v.has_value() || w_v.has_value(), kOp, ": b_v is given without w_v");
  if (b_v.has_value())
    check(*b_v, "b_v", {H, dh}, "[num_heads, d_h] for " + heads + ", d_h=" + std::to_string(dh) + " of w_out");
  if (w_v.has_value()) {
    check(w_out, "w_out", {d, H * dh}, "W_O, [d, num_heads·d_h] with w_v, for the width d=" + std::to_string(d) +
          " of x");
  } else {
    const bool by_heads = w_out.dim() == 2 && w_out.size(0) == d && w_out.size(1) % R == 0 && w_out.size(1) != H * R;
    check(w_out, "w_out", {d, H * R}, "[d, num_heads·r] without w_v, for " + hgr + ", d=" + std::to_string(d) + " of x",
          by_heads ? wrong_heads("w_out") : "", by_heads ? formed_for(w_out.size(1) / R) : "");
  }
  if (b_out.has_value()) check(*b_out, "b_out", {d}, "the width d of x");
  // The step writes k_cache, v_cache and seqlens in place: none of them may share memory with another argument
  // (k and v both views of one buffer are fine where their elements are apart).
  const std::vector<std::pair<const char*, const Tensor*>> args = {
      {"k_cache", &k_cache}, {"v_cache", &v_cache}, {"seqlens", &seqlens}, {"x", &x}, {"w_in", &w_in},
      {"b_in", b_in ? &*b_in : nullptr}, {"m", m ? &*m : nullptr}, {"beta", beta ? &*beta : nullptr},
      {"w_v", w_v ? &*w_v : nullptr}, {"b_v", b_v ? &*b_v : nullptr}, {"w_out", &w_out},
      {"b_out", b_out ? &*b_out : nullptr}};
  for (size_t i = 0; i < 3; ++i) {
    MLRA_CHECK(!has_internal_overlap(*args[i].second), kOp, ": ", args[i].first, " has elements that share memory ",
               "(strides ", Dims(args[i].second->strides()),
               ", as from expand()): the step writes it, so each element needs its own memory");
    for (size_t j = i + 1; j < args.size(); ++j) {
      MLRA_CHECK(args[j].second == nullptr || !may_overlap(*args[i].second, *args[j].second), kOp, ": ",
                 args[i].first, " and ", args[j].first, " share memory: the step writes k_cache, v_cache and ",
                 "seqlens in place, so they must not overlap each other or any other argument");
    }
  }
  // The new tokens are written at [pos, pos + t) and attended as the last t of seqlens[b] + t positions.
  for (int64_t b = 0; b < B; ++b) {
    MLRA_CHECK(lengths[b] == pos, kOp, ": seqlens[", b, "] = ", lengths[b], " differs from pos=", pos,
               ": the step writes the new tokens at positions [pos, pos + t) of every sequence, so every sequence "
               "must hold pos positions");
  }
  // From here on the step works on raw memory with torch's geometry (Span): the views and copies of the step
  // as torch's ops take them, the intermediates in buffers of its own.
  Pool pool;
  const auto bias_of = [](const std::optional<Tensor>& b) {
    return b.has_value() ? std::optional<Span>(span_of(*b)) : std::nullopt;
  };
  const Span x2 = reshape(span_of(x), {1, N, d}, pool);
  const Span y = empty_span({1, N, n_in}, pool);
  rows_gemm(x2, unsqueeze0(span_of(w_in)), bias_of(b_in), y);  // [q̃ or c_Q | c_K | c_V] of every new token
  const Span lat = view(narrow(view(y, {B, t, n_in}), 2, n_q, 2 * gr), {B, t, 2, G, R});
  copy_into(narrow(span_of(k_cache, true), 2, pos, t), transpose(select(lat, 2, 0), 1, 2));
  copy_into(narrow(span_of(v_cache, true), 2, pos, t), transpose(select(lat, 2, 1), 1, 2));
  for (int64_t b = 0; b < B; ++b) lengths[b] = static_cast<int32_t>(lengths[b] + t);  // seqlens += t, checked above
  Span q;  // [g, B·t, (head, r)] for now
  if (m.has_value()) {
    const Span c_q = transpose(view(narrow(view(y, {N, n_in}), 1, 0, gr), {N, G, R}), 0, 1);  // [g, B·t, r]
    q = empty_span({G, N, hpg * R}, pool);
    rows_gemm(c_q, span_of(*m), bias_of(beta), q);  // q̃ = c_Q·M_h + β_h
  } else {
    q = transpose(view(narrow(view(y, {N, n_in}), 1, 0, n_q), {N, G, hpg * R}), 0, 1);
  }
  q = reshape(permute(view(q, {G, B, t, hpg, R}), {1, 0, 3, 2, 4}), {B, G, hpg * t, R}, pool);  // a view when t = 1
  if (q.strides[3] != 1) q = contiguous(q, pool);
  // The attention over the caches, as latent_decode_cpu(q, k_cache, v_cache, None, seqlens, t, true, scale) runs
  // it; its checks hold here (the step's are stricter).
  const int64_t M = hpg * t;
  Problem p = problem_over(q.data, q.strides[0], q.strides[1], q.strides[2], M, k_cache, v_cache, t, true,
                           static_cast<float>(scale));
  p.len32 = lengths;
  const Span z = empty_span({B, G, M, R}, pool);
  attend(p, false, z.data);
  const Span z5 = view(z, {B, G, hpg, t, R});
  Tensor out = torch::stable::empty({B, t, d}, ScalarType::Float, std::nullopt, Device(torch::headeronly::kCPU));
  const Span out3{static_cast<float*>(out.mutable_data_ptr()), {1, N, d}, contiguous_strides({1, N, d})};
  if (!w_v.has_value()) {  // Z · W_OVᵀ + b'
    rows_gemm(reshape(permute(z5, {0, 3, 1, 2, 4}), {1, N, H * R}, pool), unsqueeze0(span_of(w_out)), bias_of(b_out),
              out3);
    return out;
  }
  const Span z_h = reshape(permute(z5, {1, 2, 0, 3, 4}), {H, N, R}, pool);  // a view when t = 1
  const Span o = empty_span({N, H * dh}, pool);
  rows_gemm(z_h, span_of(*w_v), bias_of(b_v), transpose(view(o, {N, H, dh}), 0, 1));  // Z_h·B_{V,h}ᵀ + b_{V,h}
  rows_gemm(unsqueeze0(o), unsqueeze0(span_of(w_out)), bias_of(b_out), out3);
  return out;
}

}  // namespace mlra::decode

STABLE_TORCH_LIBRARY_FRAGMENT(mlra, m) {
  m.def(
      "latent_decode_step_cpu(Tensor x, Tensor w_in, Tensor? b_in, Tensor? m, Tensor? beta, Tensor? w_v, "
      "Tensor? b_v, Tensor w_out, Tensor? b_out, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) seqlens, "
      "int pos, int num_heads, float scale) -> Tensor");
  m.def(
      "latent_decode_cpu(Tensor q, Tensor k, Tensor v, Tensor? kpm, Tensor? lengths, int t_new, bool causal, "
      "float scale) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(mlra, CPU, m) {
  m.impl("latent_decode_cpu", TORCH_BOX(&mlra::decode::latent_decode_cpu));
  m.impl("latent_decode_step_cpu", TORCH_BOX(&mlra::decode::latent_decode_step_cpu));
}
