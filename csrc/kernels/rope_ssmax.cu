// Fused RoPE + per-query scale (SSMax / temperature tuning) on q and k, forward and backward.
//
// One warp per (token row, head); q heads first, then k heads, all in one launch. Per element pair
// (j, j + rot_dim/2) in megatron's non-interleaved "rotate_half" convention:
//   forward   y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2          (c*, s* from the cos/sin tables)
//   backward  g1 = x1 c1 + x2 s2,   g2 = x2 c2 - x1 s1          (transpose of the forward map)
// then times the per-(row, head) query factor (q only): s_h * log(n) (SSMax, n = position + 1) or
// log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1 (temperature tuning). Dims past rot_dim
// pass through (scaled). Math is fp32, each output is rounded once to the storage dtype.
// Backward also writes, per (row, q head), log(n) * sum_d g * R(q) for the SSMax scale gradient
// (a deterministic warp reduction; the caller sums over rows). A token whose RoPE table row is past
// the end of the tables (freqs shorter than its document) gets NaN outputs rather than a wild read.
#include <cstdint>

#include "common.cuh"
#include "tri_kernels.h"

namespace tri_kernels {
namespace {

using detail::from_float;
using detail::to_float;

constexpr int kBlock = 256;
constexpr int kWarpsPerBlock = kBlock / 32;

// Largest d in [0, num_docs) with cu[d] <= token.
__device__ __forceinline__ int find_doc(const int32_t* __restrict__ cu, int num_docs, int64_t token) {
  int lo = 0, hi = num_docs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (static_cast<int64_t>(cu[mid]) <= token) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T>
__global__ void __launch_bounds__(kBlock) rope_query_scale_kernel(const RopeParams p) {
  const int hq = p.q_in.ptr ? p.heads_q : 0;
  const int hk = p.k_in.ptr ? p.heads_k : 0;
  const int heads = hq + hk;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (heads == 0 || item >= p.seq * p.batch * heads) return;  // whole warp leaves together
  const int64_t row = item / heads;
  const int head = static_cast<int>(item % heads);
  const int64_t s = row / p.batch, b = row % p.batch;

  int64_t doc_pos, freq_row;
  if (p.cu_seqlens != nullptr) {
    doc_pos = s - p.cu_seqlens[find_doc(p.cu_seqlens, p.num_docs, s)];
    freq_row = doc_pos;
  } else {
    doc_pos = s;
    freq_row = s * p.freq_batch + (p.freq_batch > 1 ? b : 0);
  }

  const bool is_q = head < hq;
  const int h = is_q ? head : head - hq;
  float factor = 1.f, log_n = 0.f;
  if (is_q && p.mode != kScaleNone) {
    const int64_t pos = p.positions != nullptr ? static_cast<int64_t>(p.positions[row]) : doc_pos;
    const float n = static_cast<float>(pos + 1);
    if (p.mode == kScaleSSMax) {
      log_n = logf(n);
      factor = p.ssmax_scale[h] * log_n;
    } else {  // kScaleTemperature; IEEE division so that floor() is exact at multiples of floor_scale
      factor = logf(floorf(__fdiv_rn(n, p.floor_scale)) + 1.f) * p.attn_scale + 1.f;
    }
  }

  const View4& vin = is_q ? p.q_in : p.k_in;
  const View4& vout = is_q ? p.q_out : p.k_out;
  const T* src = static_cast<const T*>(vin.ptr) + s * vin.stride_s + b * vin.stride_b + h * vin.stride_h;
  T* dst = static_cast<T*>(vout.ptr) + s * vout.stride_s + b * vout.stride_b + h * vout.stride_h;
  const bool want_ds = is_q && p.ds_partial != nullptr;
  const T* saved = want_ds ? static_cast<const T*>(p.q_saved.ptr) + s * p.q_saved.stride_s +
                                 b * p.q_saved.stride_b + h * p.q_saved.stride_h
                           : nullptr;
  float acc = 0.f;

  if (p.rotate && freq_row >= p.freq_rows) {  // freqs too short for this document: fail loudly
    for (int d = lane; d < p.head_dim; d += 32) dst[d] = from_float<T>(__int_as_float(0x7fc00000));
    if (want_ds && lane == 0) p.ds_partial[row * p.heads_q + h] = __int_as_float(0x7fc00000);
    return;
  }
  int pass_start = 0;
  if (p.rotate) {
    const int half = p.rot_dim / 2;
    const float* cs = p.cos + freq_row * p.rot_dim;
    const float* sn = p.sin + freq_row * p.rot_dim;
    for (int j = lane; j < half; j += 32) {
      const float c1 = cs[j], s1 = sn[j], c2 = cs[j + half], s2 = sn[j + half];
      const float x1 = to_float(src[j]), x2 = to_float(src[j + half]);
      float y1, y2;
      if (!p.inverse) {
        y1 = x1 * c1 - x2 * s1;
        y2 = x2 * c2 + x1 * s2;
      } else {
        y1 = x1 * c1 + x2 * s2;
        y2 = x2 * c2 - x1 * s1;
      }
      if (want_ds) {
        const float q1 = to_float(saved[j]), q2 = to_float(saved[j + half]);
        acc += x1 * (q1 * c1 - q2 * s1) + x2 * (q2 * c2 + q1 * s2);
      }
      dst[j] = from_float<T>(factor * y1);
      dst[j + half] = from_float<T>(factor * y2);
    }
    pass_start = p.rot_dim;
  }
  for (int d = pass_start + lane; d < p.head_dim; d += 32) {
    const float x = to_float(src[d]);
    if (want_ds) acc += x * to_float(saved[d]);
    dst[d] = from_float<T>(factor * x);
  }
  if (want_ds) {
    acc = detail::warp_sum(acc);
    if (lane == 0) p.ds_partial[row * p.heads_q + h] = acc * log_n;
  }
}

}  // namespace

cudaError_t rope_query_scale(const RopeParams& p, cudaStream_t stream) {
  const int heads = (p.q_in.ptr ? p.heads_q : 0) + (p.k_in.ptr ? p.heads_k : 0);
  const int64_t items = p.seq * p.batch * heads;
  if (items == 0) return cudaSuccess;
  if (p.rotate && (p.rot_dim % 2 != 0 || p.rot_dim > p.head_dim || !p.cos || !p.sin))
    return cudaErrorInvalidValue;
  const int64_t blocks = detail::ceil_div(items, kWarpsPerBlock);
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (p.dtype) {
    case DType::kFloat32:
      rope_query_scale_kernel<float><<<grid, kBlock, 0, stream>>>(p);
      break;
    case DType::kBFloat16:
      rope_query_scale_kernel<__nv_bfloat16><<<grid, kBlock, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      rope_query_scale_kernel<__half><<<grid, kBlock, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace tri_kernels
