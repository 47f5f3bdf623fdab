// TEV reduction on CUDA.
//
// One warp per row, grid-stride over rows. Rows are read with 16-byte loads (4 fp32 or 8 fp16/bf16 per
// thread) when the row start and the row stride allow it, else with scalar strided loads. Each thread
// sums shifted values y = x - K (K = mean of the row's first 32 elements) in fp32 over at most 4 loads, then adds
// them into fp64; the warp reduces the fp64 sums with shuffles. A row whose fp32 squares overflowed or
// underflowed (needs_fp64) is read once more in fp64. Lane 0 keeps a Welford state of TEV_i.
// Warps merge into a block partial (Chan); the last block to finish merges all block partials in a fixed
// tree order and writes the 5 output doubles, so a single launch produces the final stats on the device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "tev/tev_cuda.h"

namespace mlra::tev {
namespace {

constexpr int kWarp = 32;
constexpr int kBlock = 256;
constexpr int kWarpsPerBlock = kBlock / kWarp;
constexpr int kFold = 32;  // scalar path: fp32 terms per thread before adding into fp64

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// Adds the 16 / sizeof(T) values packed in v, shifted by k.
template <typename T>
__device__ __forceinline__ void acc16(const uint4& v, float k, float& a1, float& a2) {
  constexpr int kN = 16 / sizeof(T);
  T e[kN];
  memcpy(e, &v, 16);
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    const float y = to_f(e[i]) - k;
    a1 += y;
    a2 = fmaf(y, y, a2);
  }
}

// Shift K for a row: the fp32 mean of its first min(d, 32) elements, the same value in every lane
// (reduced with xor shuffles, then lane 0's sum broadcast, since xor sums may differ in the last bit).
template <typename T>
__device__ __forceinline__ float warp_pivot(const T* p, int64_t d, int64_t stride, int lane) {
  const int n = d < kWarp ? static_cast<int>(d) : kWarp;
  float x = lane < n ? to_f(p[lane * stride]) : 0.f;
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return __shfl_sync(0xffffffffu, x, 0) / static_cast<float>(n);
}

__device__ __forceinline__ Partial load_cg(const Partial* p) {
  const double* d = reinterpret_cast<const double*>(p);
  return Partial{__ldcg(d), __ldcg(d + 1), __ldcg(d + 2), __ldcg(d + 3), __ldcg(d + 4)};
}

template <typename T, typename IndexT, bool kVec>
__global__ void __launch_bounds__(kBlock) tev_fwd_kernel(Problem pb, Partial* __restrict__ block_partials,
                                                          unsigned int* __restrict__ counter,
                                                          Partial* __restrict__ out) {
  __shared__ Partial s_part[kBlock];
  __shared__ bool s_last;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const T* __restrict__ w = static_cast<const T*>(pb.weight);
  const IndexT* __restrict__ idx = static_cast<const IndexT*>(pb.rows);
  const float nan = __int_as_float(0x7fc00000);

  Partial acc = empty_partial();  // meaningful in lane 0
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; r < pb.n_rows; r += n_warps) {
    const int64_t row = idx != nullptr ? static_cast<int64_t>(idx[r]) : r;
    if (row < 0 || row >= pb.vocab) {  // uniform across the warp
      if (lane == 0) {
        acc.bad_index += 1.0;
        if (pb.per_token != nullptr) pb.per_token[r] = nan;
      }
      continue;
    }
    const T* p = w + row * pb.stride_row;
    const float k = warp_pivot(p, pb.dim, pb.stride_col, lane);
    double s1 = 0.0, s2 = 0.0;
    if constexpr (kVec) {
      const uint4* pv = reinterpret_cast<const uint4*>(p);
      const int64_t n_vec = pb.dim / (16 / static_cast<int64_t>(sizeof(T)));
      int64_t v = lane;
      for (; v + 3 * kWarp < n_vec; v += 4 * kWarp) {
        const uint4 x0 = __ldg(pv + v);
        const uint4 x1 = __ldg(pv + v + kWarp);
        const uint4 x2 = __ldg(pv + v + 2 * kWarp);
        const uint4 x3 = __ldg(pv + v + 3 * kWarp);
        float a1 = 0.f, a2 = 0.f;
        acc16<T>(x0, k, a1, a2);
        acc16<T>(x1, k, a1, a2);
        acc16<T>(x2, k, a1, a2);
        acc16<T>(x3, k, a1, a2);
        s1 += a1;
        s2 += a2;
      }
      float a1 = 0.f, a2 = 0.f;
#pragma unroll 3
      for (; v < n_vec; v += kWarp) acc16<T>(__ldg(pv + v), k, a1, a2);
      s1 += a1;
      s2 += a2;
    } else {
      float a1 = 0.f, a2 = 0.f;
      int n = 0;
      for (int64_t j = lane; j < pb.dim; j += kWarp) {
        const float y = to_f(p[j * pb.stride_col]) - k;
        a1 += y;
        a2 = fmaf(y, y, a2);
        if (++n == kFold) {
          s1 += a1;
          s2 += a2;
          a1 = a2 = 0.f;
          n = 0;
        }
      }
      s1 += a1;
      s2 += a2;
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o /= 2) {
      s1 += __shfl_xor_sync(0xffffffffu, s1, o);
      s2 += __shfl_xor_sync(0xffffffffu, s2, o);
    }
    // fp32 squares overflow for |x - K| above ~1.8e19 and underflow below ~1.1e-19: redo such a row in
    // fp64 (needs_fp64), so that only a row holding NaN or Inf counts as non-finite and tiny rows keep
    // their precision. Lane 0 decides for the whole warp.
    if (__shfl_sync(0xffffffffu, static_cast<int>(needs_fp64(s1, s2, pb.dim)), 0)) {
      const double kd = static_cast<double>(to_f(p[0]));  // k itself may have overflowed
      s1 = s2 = 0.0;
      for (int64_t j = lane; j < pb.dim; j += kWarp) {
        const double y = static_cast<double>(to_f(p[j * pb.stride_col])) - kd;
        s1 += y;
        s2 += y * y;
      }
#pragma unroll
      for (int o = kWarp / 2; o > 0; o /= 2) {
        s1 += __shfl_xor_sync(0xffffffffu, s1, o);
        s2 += __shfl_xor_sync(0xffffffffu, s2, o);
      }
    }
    if (lane == 0) {
      if (!finite_sums(s1, s2)) {
        acc.nonfinite += 1.0;
        if (pb.per_token != nullptr) pb.per_token[r] = nan;
      } else {
        const double t = row_std(s1, s2, pb.dim);
        push(acc, t);
        if (pb.per_token != nullptr) pb.per_token[r] = static_cast<float>(t);
      }
    }
  }

  if (lane == 0) s_part[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    Partial b = s_part[0];
    for (int i = 1; i < kWarpsPerBlock; ++i) merge(b, s_part[i]);
    block_partials[blockIdx.x] = b;
    __threadfence();
    s_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!s_last) return;

  // Last block: merge the block partials, strided per thread then as a tree; the order is fixed.
  __threadfence();
  Partial m = empty_partial();
  for (int i = threadIdx.x; i < static_cast<int>(gridDim.x); i += kBlock) merge(m, load_cg(block_partials + i));
  s_part[threadIdx.x] = m;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) merge(s_part[threadIdx.x], s_part[threadIdx.x + s]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *out = s_part[0];
    *counter = 0u;
  }
}

using KernelFn = void (*)(Problem, Partial*, unsigned int*, Partial*);

template <typename T>
KernelFn pick_typed(const Problem& pb, bool vec) {
  if (pb.rows != nullptr && !pb.rows_int64) {
    return vec ? tev_fwd_kernel<T, int32_t, true> : tev_fwd_kernel<T, int32_t, false>;
  }
  return vec ? tev_fwd_kernel<T, int64_t, true> : tev_fwd_kernel<T, int64_t, false>;
}

bool can_vectorize(const Problem& pb, int64_t elem) {
  return pb.stride_col == 1 && reinterpret_cast<uintptr_t>(pb.weight) % 16 == 0 && (pb.dim * elem) % 16 == 0 &&
         (pb.stride_row * elem) % 16 == 0;
}

KernelFn pick(const Problem& pb) {
  switch (pb.dtype) {
    case DType::kFloat32:
      return pick_typed<float>(pb, can_vectorize(pb, 4));
    case DType::kFloat16:
      return pick_typed<__half>(pb, can_vectorize(pb, 2));
    case DType::kBFloat16:
    default:
      return pick_typed<__nv_bfloat16>(pb, can_vectorize(pb, 2));
  }
}

size_t counter_offset(int grid) { return (static_cast<size_t>(grid) * sizeof(Partial) + 15) / 16 * 16; }

}  // namespace

cudaError_t cuda_grid_size(const Problem& problem, int num_sms, int* grid) {
  int per_sm = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, pick(problem), kBlock, 0);
  if (err != cudaSuccess) return err;
  per_sm = per_sm > 0 ? per_sm : 1;
  const int64_t wanted = (problem.n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t resident = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * per_sm;
  *grid = static_cast<int>(wanted < resident ? wanted : resident);
  return cudaSuccess;
}

size_t cuda_workspace_bytes(int grid) { return counter_offset(grid) + 16; }

cudaError_t launch_tev_cuda(const Problem& problem, Partial* stats, void* workspace, int grid, cudaStream_t stream) {
  auto* parts = static_cast<Partial*>(workspace);
  auto* counter = reinterpret_cast<unsigned int*>(static_cast<char*>(workspace) + counter_offset(grid));
  cudaError_t err = cudaMemsetAsync(counter, 0, sizeof(unsigned int), stream);
  if (err != cudaSuccess) return err;
  const KernelFn kernel = pick(problem);
  kernel<<<grid, kBlock, 0, stream>>>(problem, parts, counter, stats);
  return cudaGetLastError();
}

}  // namespace mlra::tev
