// pybind11 / torch bindings of the Tri CUDA kernels (extension tri_megatron._cuda_kernels).
//
// The only file that touches torch: validates tensors (device, dtype, shapes, unit inner stride),
// picks the current CUDA stream and device, and calls the raw-pointer launchers of tri_kernels.h.
// Outputs are caller-allocated (the Python autograd functions in tri_megatron/ops own allocation).
#include <optional>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "tri_kernels.h"

namespace tk = tri_kernels;

namespace {

tk::DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return tk::DType::kFloat32;
    case at::kBFloat16:
      return tk::DType::kBFloat16;
    case at::kHalf:
      return tk::DType::kFloat16;
    default:
      TORCH_CHECK(false, "tri kernels support float32 / bfloat16 / float16, got ", t.scalar_type());
  }
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void check_vector(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const at::Tensor& like,
                  const char* name) {
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(numel < 0 || t.numel() == numel, name, " must have ", numel, " elements, got ", t.numel());
}

// ------------------------------------------------------------------ cross-entropy ----------------------
void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), "logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [rows, vocab] with unit stride");
}

void ce_forward_stats(const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start,
                      at::Tensor row_max, at::Tensor row_sumexp, at::Tensor target_logit) {
  check_logits(logits);
  const int64_t rows = logits.size(0);
  check_vector(labels, at::kLong, rows, logits, "labels");
  check_vector(row_max, at::kFloat, rows, logits, "row_max");
  check_vector(row_sumexp, at::kFloat, rows, logits, "row_sumexp");
  check_vector(target_logit, at::kFloat, rows, logits, "target_logit");
  const c10::cuda::CUDAGuard guard(logits.device());
  check_cuda(tk::ce_forward_stats(kernel_dtype(logits), logits.data_ptr(), rows, logits.size(1),
                                  logits.stride(0), labels.data_ptr<int64_t>(), vocab_start,
                                  row_max.data_ptr<float>(), row_sumexp.data_ptr<float>(),
                                  target_logit.data_ptr<float>(),
                                  c10::cuda::getCurrentCUDAStream().stream()),
             "ce_forward_stats");
}

void ce_backward_inplace(at::Tensor logits, const at::Tensor& labels, int64_t vocab_start,
                         const at::Tensor& lse, const at::Tensor& p_coef, const at::Tensor& t_coef) {
  check_logits(logits);
  const int64_t rows = logits.size(0);
  check_vector(labels, at::kLong, rows, logits, "labels");
  check_vector(lse, at::kFloat, rows, logits, "lse");
  check_vector(p_coef, at::kFloat, rows, logits, "p_coef");
  check_vector(t_coef, at::kFloat, rows, logits, "t_coef");
  const c10::cuda::CUDAGuard guard(logits.device());
  check_cuda(tk::ce_backward_inplace(kernel_dtype(logits), logits.data_ptr(), rows, logits.size(1),
                                     logits.stride(0), labels.data_ptr<int64_t>(), vocab_start,
                                     lse.data_ptr<float>(), p_coef.data_ptr<float>(),
                                     t_coef.data_ptr<float>(),
                                     c10::cuda::getCurrentCUDAStream().stream()),
             "ce_backward_inplace");
}

// ------------------------------------------------------------------ RoPE + query scale ------------------
tk::View4 view4(const std::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  tk::View4 v;
  if (!t.has_value()) return v;
  const at::Tensor& x = *t;
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, name, " must be [S, B, H, D] with unit stride on D");
  TORCH_CHECK(x.device() == like.device() && x.scalar_type() == like.scalar_type(), name,
              " must match q/k in device and dtype");
  TORCH_CHECK(x.size(0) == like.size(0) && x.size(1) == like.size(1) && x.size(3) == like.size(3),
              name, " has mismatched [S, B, *, D]");
  v.ptr = x.data_ptr();
  v.stride_s = x.stride(0);
  v.stride_b = x.stride(1);
  v.stride_h = x.stride(2);
  return v;
}

void rope_query_scale(const std::optional<at::Tensor>& q_in, const std::optional<at::Tensor>& q_out,
                      const std::optional<at::Tensor>& k_in, const std::optional<at::Tensor>& k_out,
                      const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                      int64_t freq_batch, const std::optional<at::Tensor>& cu_seqlens,
                      const std::optional<at::Tensor>& positions,
                      const std::optional<at::Tensor>& ssmax_scale,
                      const std::optional<at::Tensor>& q_saved,
                      const std::optional<at::Tensor>& ds_partial, int64_t mode, bool rotate,
                      bool inverse, double floor_scale, double attn_scale) {
  TORCH_CHECK(q_in.has_value() || k_in.has_value(), "rope_query_scale needs q or k");
  TORCH_CHECK(q_in.has_value() == q_out.has_value() && k_in.has_value() == k_out.has_value(),
              "every input needs an output (which may alias it)");
  const at::Tensor& like = q_in.has_value() ? *q_in : *k_in;
  TORCH_CHECK(like.is_cuda(), "q / k must be CUDA tensors");
  TORCH_CHECK(like.dim() == 4, "q / k must be [S, B, H, D] (thd as [T, 1, H, D])");

  tk::RopeParams p;
  p.dtype = kernel_dtype(like);
  p.seq = like.size(0);
  p.batch = like.size(1);
  p.head_dim = static_cast<int>(like.size(3));
  p.heads_q = q_in.has_value() ? static_cast<int>(q_in->size(2)) : 0;
  p.heads_k = k_in.has_value() ? static_cast<int>(k_in->size(2)) : 0;
  p.q_in = view4(q_in, like, "q_in");
  p.q_out = view4(q_out, like, "q_out");
  p.k_in = view4(k_in, like, "k_in");
  p.k_out = view4(k_out, like, "k_out");
  if (q_in.has_value()) TORCH_CHECK(q_out->size(2) == p.heads_q, "q_out heads mismatch");
  if (k_in.has_value()) TORCH_CHECK(k_out->size(2) == p.heads_k, "k_out heads mismatch");
  const int64_t rows = p.seq * p.batch;

  p.rotate = rotate;
  p.inverse = inverse;
  if (rotate) {
    TORCH_CHECK(cos.has_value() && sin.has_value(), "rotate needs cos / sin tables");
    TORCH_CHECK(cos->dim() == 2 && cos->sizes() == sin->sizes(), "cos / sin must be [rows, rot_dim]");
    check_vector(*cos, at::kFloat, -1, like, "cos");
    check_vector(*sin, at::kFloat, -1, like, "sin");
    p.rot_dim = static_cast<int>(cos->size(1));
    TORCH_CHECK(p.rot_dim % 2 == 0 && p.rot_dim <= p.head_dim, "rot_dim must be even and <= head dim");
    p.cos = cos->data_ptr<float>();
    p.sin = sin->data_ptr<float>();
    p.freq_rows = cos->size(0);
    p.freq_batch = freq_batch;
    TORCH_CHECK(freq_batch == 1 || freq_batch == p.batch, "freq_batch must be 1 or B");
  }
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(p.batch == 1, "cu_seqlens needs the packed thd layout ([T, 1, H, D])");
    check_vector(*cu_seqlens, at::kInt, -1, like, "cu_seqlens");
    TORCH_CHECK(cu_seqlens->numel() >= 2, "cu_seqlens needs at least one document");
    p.cu_seqlens = cu_seqlens->data_ptr<int32_t>();
    p.num_docs = static_cast<int>(cu_seqlens->numel() - 1);
  }
  if (positions.has_value()) {
    check_vector(*positions, at::kInt, rows, like, "positions");
    p.positions = positions->data_ptr<int32_t>();
  }
  TORCH_CHECK(mode >= tk::kScaleNone && mode <= tk::kScaleTemperature, "bad query-scale mode ", mode);
  p.mode = static_cast<int>(mode);
  if (mode == tk::kScaleSSMax && q_in.has_value()) {  // the factor only touches q
    TORCH_CHECK(ssmax_scale.has_value(), "SSMax needs ssmax_scale");
    check_vector(*ssmax_scale, at::kFloat, p.heads_q, like, "ssmax_scale");
    p.ssmax_scale = ssmax_scale->data_ptr<float>();
  }
  p.floor_scale = static_cast<float>(floor_scale);
  p.attn_scale = static_cast<float>(attn_scale);
  if (ds_partial.has_value()) {
    TORCH_CHECK(inverse && mode == tk::kScaleSSMax && q_in.has_value() && q_saved.has_value(),
                "ds_partial needs the backward SSMax pass with q and the saved q");
    check_vector(*ds_partial, at::kFloat, rows * p.heads_q, like, "ds_partial");
    p.q_saved = view4(q_saved, like, "q_saved");
    TORCH_CHECK(q_saved->size(2) == p.heads_q, "q_saved heads mismatch");
    p.ds_partial = ds_partial->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(like.device());
  check_cuda(tk::rope_query_scale(p, c10::cuda::getCurrentCUDAStream().stream()), "rope_query_scale");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Tri CUDA kernels: fused softmax cross-entropy pieces and fused RoPE + query scale";
  m.def("ce_forward_stats", &ce_forward_stats, "per-row max / sum-exp / target logit of a logits chunk",
        py::arg("logits"), py::arg("labels"), py::arg("vocab_start"), py::arg("row_max"),
        py::arg("row_sumexp"), py::arg("target_logit"));
  m.def("ce_backward_inplace", &ce_backward_inplace,
        "logits <- p_coef * exp(logits - lse) - t_coef * onehot(target), in place", py::arg("logits"),
        py::arg("labels"), py::arg("vocab_start"), py::arg("lse"), py::arg("p_coef"), py::arg("t_coef"));
  m.def("rope_query_scale", &rope_query_scale, "fused RoPE + query scale on q / k (forward or transpose)",
        py::arg("q_in"), py::arg("q_out"), py::arg("k_in"), py::arg("k_out"), py::arg("cos"),
        py::arg("sin"), py::arg("freq_batch"), py::arg("cu_seqlens"), py::arg("positions"),
        py::arg("ssmax_scale"), py::arg("q_saved"), py::arg("ds_partial"), py::arg("mode"),
        py::arg("rotate"), py::arg("inverse"), py::arg("floor_scale"), py::arg("attn_scale"));
}
