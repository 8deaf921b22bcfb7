// Fused softmax cross-entropy kernels over one token chunk of vocab-parallel logits.
//
// The logits GEMMs (hidden @ W^T, and the input / weight gradient GEMMs) run in cuBLAS through torch;
// these kernels do the softmax / CE part so that no fp32 [tokens, vocab] copy is ever made:
//   forward:  one pass per row -> running max, sum exp(x - max) (online softmax, fp32) and the
//             target logit when the target id falls in this vocab shard. Shards are merged by the
//             caller (all-reduce MAX of max, then SUM of rescaled sum-exp and target logit).
//   backward: one pass per row, in place: x <- p_coef * exp(x - lse) - t_coef * [v == target],
//             with p_coef = dloss * scale * mask * (1 + 2 z lse) and t_coef = dloss * scale * mask.
// One thread block per row; rows are read as 16-byte vectors when the row start is aligned.
#include <cstdint>

#include "common.cuh"
#include "tri_kernels.h"

namespace tri_kernels {
namespace {

using detail::from_float;
using detail::to_float;
using detail::Vec16;

constexpr int kBlock = 256;

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
ce_forward_stats_kernel(const T* __restrict__ logits, int64_t vocab, int64_t ld,
                        const int64_t* __restrict__ labels, int64_t vocab_start,
                        float* __restrict__ row_max, float* __restrict__ row_sumexp,
                        float* __restrict__ target_logit) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * ld;
  float m = -INFINITY, s = 0.f;
  int64_t done = 0;
  if (aligned16(x)) {
    constexpr int V = Vec16<T>::kSize;
    const int64_t nvec = vocab / V;
    const Vec16<T>* xv = reinterpret_cast<const Vec16<T>*>(x);
    for (int64_t i = threadIdx.x; i < nvec; i += BLOCK) {
      const Vec16<T> pack = xv[i];
      float f[V];
      float mv = -INFINITY;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        f[j] = to_float(pack.v[j]);
        mv = fmaxf(mv, f[j]);
      }
      if (mv > m) {
        s = (m == -INFINITY) ? 0.f : s * __expf(m - mv);
        m = mv;
      }
#pragma unroll
      for (int j = 0; j < V; ++j) s += __expf(f[j] - m);
    }
    done = nvec * V;
  }
  for (int64_t v = done + threadIdx.x; v < vocab; v += BLOCK) {
    const float f = to_float(x[v]);
    if (f > m) {
      s = (m == -INFINITY) ? 0.f : s * __expf(m - f);
      m = f;
    }
    s += __expf(f - m);
  }
  detail::block_merge_max_sumexp<BLOCK>(m, s);
  if (threadIdx.x == 0) {
    row_max[row] = m;
    row_sumexp[row] = s;
    const int64_t t = labels[row] - vocab_start;
    target_logit[row] = (t >= 0 && t < vocab) ? to_float(x[t]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ float ce_grad(float x, int64_t v, int64_t t, float lse, float pc, float tc) {
  const float g = pc * __expf(x - lse);
  return v == t ? g - tc : g;
}

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
ce_backward_inplace_kernel(T* __restrict__ logits, int64_t vocab, int64_t ld,
                           const int64_t* __restrict__ labels, int64_t vocab_start,
                           const float* __restrict__ lse, const float* __restrict__ p_coef,
                           const float* __restrict__ t_coef) {
  const int64_t row = blockIdx.x;
  T* x = logits + row * ld;
  const float L = lse[row], pc = p_coef[row], tc = t_coef[row];
  const int64_t t = labels[row] - vocab_start;  // outside [0, vocab): no one-hot term on this shard
  int64_t done = 0;
  if (aligned16(x)) {
    constexpr int V = Vec16<T>::kSize;
    const int64_t nvec = vocab / V;
    Vec16<T>* xv = reinterpret_cast<Vec16<T>*>(x);
    for (int64_t i = threadIdx.x; i < nvec; i += BLOCK) {
      Vec16<T> pack = xv[i];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        pack.v[j] = from_float<T>(ce_grad<T>(to_float(pack.v[j]), i * V + j, t, L, pc, tc));
      }
      xv[i] = pack;
    }
    done = nvec * V;
  }
  for (int64_t v = done + threadIdx.x; v < vocab; v += BLOCK) {
    x[v] = from_float<T>(ce_grad<T>(to_float(x[v]), v, t, L, pc, tc));
  }
}

template <typename T>
cudaError_t launch_forward(const void* logits, int64_t rows, int64_t vocab, int64_t ld,
                           const int64_t* labels, int64_t vocab_start, float* row_max,
                           float* row_sumexp, float* target_logit, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  ce_forward_stats_kernel<T, kBlock><<<static_cast<unsigned>(rows), kBlock, 0, stream>>>(
      static_cast<const T*>(logits), vocab, ld, labels, vocab_start, row_max, row_sumexp,
      target_logit);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(void* logits, int64_t rows, int64_t vocab, int64_t ld,
                            const int64_t* labels, int64_t vocab_start, const float* lse,
                            const float* p_coef, const float* t_coef, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  ce_backward_inplace_kernel<T, kBlock><<<static_cast<unsigned>(rows), kBlock, 0, stream>>>(
      static_cast<T*>(logits), vocab, ld, labels, vocab_start, lse, p_coef, t_coef);
  return cudaGetLastError();
}

}  // namespace

cudaError_t ce_forward_stats(DType dtype, const void* logits, int64_t rows, int64_t vocab, int64_t ld,
                             const int64_t* labels, int64_t vocab_start, float* row_max,
                             float* row_sumexp, float* target_logit, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_forward<float>(logits, rows, vocab, ld, labels, vocab_start, row_max, row_sumexp,
                                   target_logit, stream);
    case DType::kBFloat16:
      return launch_forward<__nv_bfloat16>(logits, rows, vocab, ld, labels, vocab_start, row_max,
                                           row_sumexp, target_logit, stream);
    case DType::kFloat16:
      return launch_forward<__half>(logits, rows, vocab, ld, labels, vocab_start, row_max, row_sumexp,
                                    target_logit, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t ce_backward_inplace(DType dtype, void* logits, int64_t rows, int64_t vocab, int64_t ld,
                                const int64_t* labels, int64_t vocab_start, const float* lse,
                                const float* p_coef, const float* t_coef, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_backward<float>(logits, rows, vocab, ld, labels, vocab_start, lse, p_coef, t_coef,
                                    stream);
    case DType::kBFloat16:
      return launch_backward<__nv_bfloat16>(logits, rows, vocab, ld, labels, vocab_start, lse, p_coef,
                                            t_coef, stream);
    case DType::kFloat16:
      return launch_backward<__half>(logits, rows, vocab, ld, labels, vocab_start, lse, p_coef, t_coef,
                                     stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tri_kernels
