// extern "C" entry points over the tri_kernels launchers, for ctypes (tests/kernel_emulator.py).
// Built with g++ together with csrc/kernels/*.cu (launch syntax rewritten) against include/.
#include <cstdint>

#include "tri_kernels.h"

namespace tk = tri_kernels;

extern "C" {

int emu_ce_forward_stats(int dtype, const void* logits, int64_t rows, int64_t vocab, int64_t ld,
                         const int64_t* labels, int64_t vocab_start, float* row_max, float* row_sumexp,
                         float* target_logit) {
  return tk::ce_forward_stats(static_cast<tk::DType>(dtype), logits, rows, vocab, ld, labels, vocab_start,
                              row_max, row_sumexp, target_logit, nullptr);
}

int emu_ce_backward_inplace(int dtype, void* logits, int64_t rows, int64_t vocab, int64_t ld,
                            const int64_t* labels, int64_t vocab_start, const float* lse,
                            const float* p_coef, const float* t_coef) {
  return tk::ce_backward_inplace(static_cast<tk::DType>(dtype), logits, rows, vocab, ld, labels, vocab_start,
                                 lse, p_coef, t_coef, nullptr);
}

// views: 5 x (ptr, stride_s, stride_b, stride_h) for q_in, q_out, k_in, k_out, q_saved
int emu_rope_query_scale(int dtype, int64_t seq, int64_t batch, int heads_q, int heads_k, int head_dim,
                         int rot_dim, int rotate, int inverse, void* const* view_ptrs,
                         const int64_t* view_strides, const float* cos, const float* sin,
                         int64_t freq_rows, int64_t freq_batch, const int32_t* cu_seqlens, int num_docs,
                         const int32_t* positions, int mode, const float* ssmax_scale, float floor_scale,
                         float attn_scale, float* ds_partial) {
  tk::RopeParams p;
  p.dtype = static_cast<tk::DType>(dtype);
  p.seq = seq;
  p.batch = batch;
  p.heads_q = heads_q;
  p.heads_k = heads_k;
  p.head_dim = head_dim;
  p.rot_dim = rot_dim;
  p.rotate = rotate != 0;
  p.inverse = inverse != 0;
  tk::View4* views[5] = {&p.q_in, &p.q_out, &p.k_in, &p.k_out, &p.q_saved};
  for (int i = 0; i < 5; ++i) {
    views[i]->ptr = view_ptrs[i];
    views[i]->stride_s = view_strides[3 * i];
    views[i]->stride_b = view_strides[3 * i + 1];
    views[i]->stride_h = view_strides[3 * i + 2];
  }
  p.cos = cos;
  p.sin = sin;
  p.freq_rows = freq_rows;
  p.freq_batch = freq_batch;
  p.cu_seqlens = cu_seqlens;
  p.num_docs = num_docs;
  p.positions = positions;
  p.mode = mode;
  p.ssmax_scale = ssmax_scale;
  p.floor_scale = floor_scale;
  p.attn_scale = attn_scale;
  p.ds_partial = ds_partial;
  return tk::rope_query_scale(p, nullptr);
}

}  // extern "C"
