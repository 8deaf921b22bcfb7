// Host-side API of the Tri CUDA kernels (launchers implemented in the .cu files).
//
// This header depends only on the CUDA runtime API, never on torch: the .cu files compile with nvcc
// against the CUDA toolkit alone (raw pointers, float / bf16 / fp16 templates), and all torch glue
// (tensor checks, streams, pybind11) lives in bindings.cpp.
//
// Two kernel families:
//  * Fused softmax cross-entropy over one chunk of vocab-parallel logits [rows, vocab] (row stride ld):
//      ce_forward_stats    per-row max, sum exp(x - max) and target logit (0 when the target id is
//                          outside this vocab shard [vocab_start, vocab_start + vocab));
//      ce_backward_inplace overwrites the logits with p_coef * exp(x - lse) - t_coef * onehot(target),
//                          i.e. (softmax * (1 + 2 z lse) - onehot) * dloss, in the logits' dtype.
//  * RoPE + per-query scale (SSMax s_h * log n, or Llama-4 temperature tuning) on q and k, forward and
//    backward (the transpose), with document-relative positions from packed-sequence cu_seqlens.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace tri_kernels {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// ---------------------------------------------------------------- cross-entropy ---------------------
cudaError_t ce_forward_stats(DType dtype, const void* logits, int64_t rows, int64_t vocab, int64_t ld,
                             const int64_t* labels, int64_t vocab_start, float* row_max,
                             float* row_sumexp, float* target_logit, cudaStream_t stream);

cudaError_t ce_backward_inplace(DType dtype, void* logits, int64_t rows, int64_t vocab, int64_t ld,
                                const int64_t* labels, int64_t vocab_start, const float* lse,
                                const float* p_coef, const float* t_coef, cudaStream_t stream);

// ---------------------------------------------------------------- RoPE + query scale ----------------
enum QueryScaleMode : int { kScaleNone = 0, kScaleSSMax = 1, kScaleTemperature = 2 };

// A [S, B, H, D] tensor view with unit stride on D (thd tensors are passed as [T, 1, H, D]).
struct View4 {
  void* ptr = nullptr;
  int64_t stride_s = 0, stride_b = 0, stride_h = 0;
};

struct RopeParams {
  DType dtype = DType::kFloat32;
  int64_t seq = 0;       // S (or T for packed thd)
  int64_t batch = 1;     // B (1 for thd); row = s * batch + b
  int heads_q = 0, heads_k = 0, head_dim = 0;
  int rot_dim = 0;       // rotated leading dims (even, <= head_dim); the rest passes through
  bool rotate = true;    // false: NoPE layer, scale only
  bool inverse = false;  // backward: apply the transpose (R^T and the same per-row scale)
  // Inputs / outputs (out may alias in: every element is read before it is written, by one thread).
  View4 q_in, q_out, k_in, k_out;  // k_in.ptr == nullptr: k untouched; q_in.ptr == nullptr: q skipped
  // cos / sin tables [freq_rows, rot_dim] fp32 (already times mscale). sbhd: table row =
  // s * freq_batch + (freq_batch > 1 ? b : 0); thd: table row = position within the document.
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t freq_rows = 0;  // rows of the tables; a token needing a row past them gets NaN outputs
  int64_t freq_batch = 1;
  // Packed sequences: cu_seqlens [num_docs + 1] int32 (thd only), or nullptr.
  const int32_t* cu_seqlens = nullptr;
  int num_docs = 0;
  // Optional explicit 0-based positions per row [S * B] int32 for the query factor (else: s for sbhd,
  // position within the document for thd).
  const int32_t* positions = nullptr;
  int mode = kScaleNone;
  const float* ssmax_scale = nullptr;  // [heads_q] fp32 (mode == kScaleSSMax)
  float floor_scale = 8192.f, attn_scale = 0.1f;
  // SSMax scale gradient (inverse only): ds_partial[row * heads_q + h] = log(n) * sum_d g * R(q_saved).
  View4 q_saved;
  float* ds_partial = nullptr;
};

cudaError_t rope_query_scale(const RopeParams& p, cudaStream_t stream);

}  // namespace tri_kernels
