// Scheduled blending index for the dynamic data mixture (tri_megatron._data_helpers).
//
// Global sample i -> (dataset d, the d-th dataset's sample k). The weights w_d(i) are piecewise linear
// in the sample position between knots (constant before the first and after the last knot). The rule
// is megatron-core's greedy build_blending_indices, applied to cumulative targets
//     C_d(i) = sum_{j<=i} w_d(j):
// sample i goes to argmax_d (C_d(i) - count_d) (first index on ties), then count_d += 1. Hence
// |count_d(i) - C_d(i)| stays O(1) samples, and a window of W samples realises the scheduled share to
// within a few samples / W. C_d is evaluated in closed form per linear segment, so rounding does not
// accumulate over hundreds of millions of samples.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

template <typename SampleT>
std::vector<int64_t> build_impl(int16_t *dataset_index, SampleT *dataset_sample_index, int64_t n,
                                const std::vector<double> &pos, const std::vector<double> &w,
                                int64_t num_datasets) {
  const int64_t m = static_cast<int64_t>(pos.size());
  const int64_t k = num_datasets;
  std::vector<int64_t> counts(k, 0);
  std::vector<double> base(k, 0.0), a(k, 0.0), b(k, 0.0);

  // segment boundaries: integer sample indices where the weight function changes slope
  std::vector<int64_t> bounds;
  bounds.push_back(0);
  for (int64_t j = 0; j < m; ++j) {
    double c = std::ceil(pos[j]);
    if (c > 0 && c < static_cast<double>(n)) bounds.push_back(static_cast<int64_t>(c));
  }
  bounds.push_back(n);

  for (size_t s_i = 0; s_i + 1 < bounds.size(); ++s_i) {
    const int64_t s = bounds[s_i], e = bounds[s_i + 1];
    if (e <= s) continue;
    // within [s, e) w_d(j) = a_d + b_d * (j - s). a and b come from the knots alone (not from e), so the
    // index for N samples is a prefix of the index for any larger N: longer runs keep the same order.
    const double x = static_cast<double>(s);
    int64_t lo = -1;  // knot interval [pos[lo], pos[lo+1]) holding s; -1 before the first, m-1 after the last
    while (lo + 1 < m && pos[lo + 1] <= x) ++lo;
    for (int64_t d = 0; d < k; ++d) {
      if (lo < 0 || lo >= m - 1) {
        a[d] = w[(lo < 0 ? 0 : m - 1) * k + d];
        b[d] = 0.0;
      } else {
        const double w0 = w[lo * k + d], w1 = w[(lo + 1) * k + d];
        b[d] = (w1 - w0) / (pos[lo + 1] - pos[lo]);
        a[d] = w0 + b[d] * (x - pos[lo]);
      }
    }
    for (int64_t j = s; j < e; ++j) {
      const double cnt = static_cast<double>(j - s + 1);
      const double tri = 0.5 * cnt * (cnt - 1.0);
      int64_t best = 0;
      double best_err = -std::numeric_limits<double>::infinity();
      for (int64_t d = 0; d < k; ++d) {
        const double target = base[d] + cnt * a[d] + tri * b[d];
        const double err = target - static_cast<double>(counts[d]);
        if (err > best_err) {
          best_err = err;
          best = d;
        }
      }
      dataset_index[j] = static_cast<int16_t>(best);
      dataset_sample_index[j] = static_cast<SampleT>(counts[best]);
      counts[best] += 1;
    }
    const double cnt = static_cast<double>(e - s);
    for (int64_t d = 0; d < k; ++d) base[d] += cnt * a[d] + 0.5 * cnt * (cnt - 1.0) * b[d];
  }
  return counts;
}

py::array_t<int64_t> build_mixture_index(py::array_t<int16_t, py::array::c_style> dataset_index,
                                         py::array dataset_sample_index,
                                         py::array_t<double, py::array::c_style | py::array::forcecast> knot_positions,
                                         py::array_t<double, py::array::c_style | py::array::forcecast> knot_weights) {
  if (dataset_index.ndim() != 1 || dataset_sample_index.ndim() != 1)
    throw std::invalid_argument("dataset_index and dataset_sample_index must be 1-D");
  const int64_t n = dataset_index.shape(0);
  if (dataset_sample_index.shape(0) != n)
    throw std::invalid_argument("dataset_index and dataset_sample_index must have the same length");
  if (knot_positions.ndim() != 1 || knot_weights.ndim() != 2 || knot_weights.shape(0) != knot_positions.shape(0))
    throw std::invalid_argument("knot_weights must be [num_knots, num_datasets] with num_knots = len(knot_positions)");
  const int64_t m = knot_positions.shape(0);
  const int64_t k = knot_weights.shape(1);
  if (m < 1 || k < 1) throw std::invalid_argument("need at least one knot and one dataset");
  if (k > std::numeric_limits<int16_t>::max()) throw std::invalid_argument("too many datasets (max 32767)");

  std::vector<double> pos(knot_positions.data(), knot_positions.data() + m);
  std::vector<double> w(knot_weights.data(), knot_weights.data() + m * k);
  for (int64_t j = 1; j < m; ++j)
    if (!(pos[j] > pos[j - 1])) throw std::invalid_argument("knot positions must be strictly increasing");
  for (double x : w)
    if (!(x >= 0.0) || !std::isfinite(x)) throw std::invalid_argument("weights must be finite and >= 0");

  if (!(dataset_sample_index.flags() & py::array::c_style) || !dataset_sample_index.writeable())
    throw std::invalid_argument("dataset_sample_index must be a writeable C-contiguous array");
  if (!dataset_index.writeable()) throw std::invalid_argument("dataset_index must be writeable");
  int16_t *di = dataset_index.mutable_data();
  std::vector<int64_t> counts;
  const auto dt = dataset_sample_index.dtype();
  if (dt.is(py::dtype::of<int64_t>())) {
    auto *dsi = static_cast<int64_t *>(dataset_sample_index.mutable_data());
    py::gil_scoped_release release;
    counts = build_impl<int64_t>(di, dsi, n, pos, w, k);
  } else if (dt.is(py::dtype::of<int32_t>())) {
    if (n > std::numeric_limits<int32_t>::max())
      throw std::invalid_argument("int32 dataset_sample_index needs fewer than 2^31 samples");
    auto *dsi = static_cast<int32_t *>(dataset_sample_index.mutable_data());
    py::gil_scoped_release release;
    counts = build_impl<int32_t>(di, dsi, n, pos, w, k);
  } else {
    throw std::invalid_argument("dataset_sample_index must be int32 or int64");
  }
  py::array_t<int64_t> out(k);
  auto o = out.mutable_unchecked<1>();
  for (int64_t d = 0; d < k; ++d) o(d) = counts[d];
  return out;
}

}  // namespace

PYBIND11_MODULE(_data_helpers, mod) {
  mod.doc() = "C++ helpers for tri_megatron.data: the scheduled (dynamic) blending index";
  mod.def("build_mixture_index", &build_mixture_index, py::arg("dataset_index"), py::arg("dataset_sample_index"),
          py::arg("knot_positions"), py::arg("knot_weights"),
          "Fill dataset_index[i], dataset_sample_index[i] for every global sample i from piecewise-linear "
          "weights (knot positions in samples, weights [knots, datasets]); returns the per-dataset counts.");
}
