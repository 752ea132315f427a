// CPU kernels of the k-means codebook ops (ops/kmeans_codebook.h). The loops live in qext/kernels
// (codebook_grad.h, packed_labels.h); this file checks the arguments, cuts the work into chunks
// and runs them with at::parallel_for. Label errors name the first bad label in row-major order,
// whatever the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>

#include "qext/kernels/codebook_grad.h"
#include "qext/kernels/packed_labels.h"
#include "qext/ops/common/codebook_args.h"

namespace qext::ops {
namespace {

using kernels::CodebookLayout;
using kernels::GradPieces;

// Elements per parallel chunk of the element-wise passes.
constexpr int64_t kGrain = int64_t{1} << 15;

// The smallest offset reported by the chunks of a parallel pass (-1 reports nothing).
class FirstBad {
 public:
  void report(int64_t offset) {
    if (offset < 0) return;
    int64_t seen = first_.load(std::memory_order_relaxed);
    while (offset < seen && !first_.compare_exchange_weak(seen, offset)) {
    }
  }
  bool found() const { return first_.load() != kNone; }
  int64_t offset() const { return first_.load(); }

 private:
  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::atomic<int64_t> first_{kNone};
};

at::Tensor kmeans_dequantize_cpu(const at::Tensor& centroids, const at::Tensor& labels,
                                 std::optional<int64_t> axis, bool mean) {
  const CodebookLayout layout = detail::check_dequantize_args(centroids, labels, axis);
  const at::Tensor table = centroids.contiguous();
  const at::Tensor lab = labels.contiguous();
  at::Tensor out = at::empty(labels.sizes(), centroids.options());
  FirstBad first_bad;
  detail::visit_label_type(lab.scalar_type(), [&](auto label_type) {
    using L = decltype(label_type);
    detail::visit_value_width(table.scalar_type(), [&](auto value_type) {
      using V = decltype(value_type);
      const V* values = static_cast<const V*>(table.const_data_ptr());
      const L* l = lab.const_data_ptr<L>();
      V* o = static_cast<V*>(out.mutable_data_ptr());
      at::parallel_for(0, lab.numel(), kGrain, [&](int64_t begin, int64_t end) {
        first_bad.report(kernels::dequantize_labels(values, l, layout, begin, end, o));
      });
    });
  });
  if (first_bad.found()) {
    detail::throw_label_out_of_codebook(lab, first_bad.offset(), layout.k,
                                        "qext::kmeans_dequantize");
  }
  return out;
}

// Task t = p * codebooks + c sums piece p of codebook c into partial row t; a chunk of
// consecutive tasks runs piece by piece, several codebooks per call (one sweep over memory when
// codebooks are interleaved). The pieces follow from the shape alone (kernels/codebook_grad.h) and
// their rows are added in piece order, so the result has the same bits for every thread count.
at::Tensor kmeans_centroid_grad_cpu(const at::Tensor& grad, const at::Tensor& labels, int64_t k,
                                    std::optional<int64_t> axis, bool mean) {
  const CodebookLayout layout = detail::check_centroid_grad_args(grad, labels, k, axis);
  const at::Tensor lab = labels.contiguous();
  // The kernels read float32 or float64; float16 / bfloat16 widen exactly to float32.
  at::Tensor g = grad.contiguous();
  if (g.scalar_type() != at::kDouble) g = g.to(at::kFloat);

  const GradPieces pieces = kernels::plan_grad_pieces(layout);
  const int64_t codebooks = layout.codebooks;
  const int64_t tasks = pieces.per_codebook() * codebooks;
  const auto host = grad.options().device(at::kCPU);
  at::Tensor partial_sums = at::empty({tasks * k}, host.dtype(at::kDouble));
  at::Tensor partial_counts = at::empty({mean ? tasks * k : 0}, host.dtype(at::kLong));
  double* sums = partial_sums.mutable_data_ptr<double>();
  int64_t* counts = mean ? partial_counts.mutable_data_ptr<int64_t>() : nullptr;
  const int64_t task_elements = std::max<int64_t>(1, pieces.rows * pieces.cols);
  FirstBad first_bad;
  detail::visit_label_type(lab.scalar_type(), [&](auto label_type) {
    using L = decltype(label_type);
    const L* l = lab.const_data_ptr<L>();
    auto run = [&](const auto* gp) {
      at::parallel_for(0, tasks, std::max<int64_t>(1, kGrain / task_elements),
                       [&](int64_t t0, int64_t t1) {
                         for (int64_t t = t0; t < t1;) {
                           const int64_t c0 = t % codebooks;
                           const int64_t c1 = std::min(codebooks, c0 + (t1 - t));
                           const int64_t entries = (c1 - c0) * k;
                           std::fill_n(sums + t * k, entries, 0.0);
                           if (counts != nullptr) std::fill_n(counts + t * k, entries, int64_t{0});
                           first_bad.report(kernels::accumulate_grad_piece(
                               gp, l, layout, pieces, t / codebooks, c0, c1, sums + t * k,
                               counts != nullptr ? counts + t * k : nullptr));
                           t += c1 - c0;
                         }
                       });
    };
    if (g.scalar_type() == at::kDouble) {
      run(g.const_data_ptr<double>());
    } else {
      run(g.const_data_ptr<float>());
    }
  });
  if (first_bad.found()) {
    detail::throw_label_out_of_codebook(lab, first_bad.offset(), k, "qext::_kmeans_centroid_grad");
  }

  at::Tensor out = at::empty(detail::centroid_grad_shape(layout, axis), host.dtype(at::kDouble));
  double* o = out.mutable_data_ptr<double>();
  at::parallel_for(0, codebooks, std::max<int64_t>(1, kGrain / (k * pieces.per_codebook() + 1)),
                   [&](int64_t c0, int64_t c1) {
                     kernels::finish_centroid_grad(sums, counts, layout, pieces, c0, c1, o);
                   });
  return out.to(grad.scalar_type());
}

// Runs f(begin, end) in parallel over chunks of [0, n) that start at multiples of 8 labels: whole
// packed bytes at every width.
template <typename F>
void for_each_group_chunk(int64_t n, F&& f) {
  at::parallel_for(0, (n + 7) / 8, kGrain / 8,
                   [&](int64_t g0, int64_t g1) { f(g0 * 8, std::min(n, g1 * 8)); });
}

at::Tensor pack_labels_cpu(const at::Tensor& labels, int64_t bits) {
  detail::check_pack_args(labels, bits);
  const at::Tensor lab = labels.contiguous();
  const int64_t n = lab.numel();
  at::Tensor packed =
      at::empty({kernels::packed_labels_bytes(n, bits)}, labels.options().dtype(at::kByte));
  uint8_t* out = packed.mutable_data_ptr<uint8_t>();
  FirstBad first_bad;
  detail::visit_label_type(lab.scalar_type(), [&](auto label_type) {
    using L = decltype(label_type);
    const L* l = lab.const_data_ptr<L>();
    for_each_group_chunk(n, [&](int64_t begin, int64_t end) {
      const int64_t bad = kernels::pack_labels(l + begin, end - begin, static_cast<int>(bits),
                                               out + begin * bits / 8);
      first_bad.report(bad < 0 ? bad : begin + bad);
    });
  });
  if (first_bad.found()) detail::throw_label_too_wide(lab, first_bad.offset(), bits);
  return packed;
}

at::Tensor unpack_labels_cpu(const at::Tensor& packed, int64_t bits, at::IntArrayRef shape) {
  const int64_t n = detail::check_unpack_args(packed, bits, shape);
  const at::Tensor bytes = packed.contiguous();
  at::Tensor labels = at::empty(shape, packed.options().dtype(at::kByte));
  const uint8_t* in = bytes.const_data_ptr<uint8_t>();
  uint8_t* out = labels.mutable_data_ptr<uint8_t>();
  for_each_group_chunk(n, [&](int64_t begin, int64_t end) {
    kernels::unpack_labels(in + begin * bits / 8, end - begin, static_cast<int>(bits), out + begin);
  });
  return labels;
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, CPU, m) {
  m.impl("kmeans_dequantize", kmeans_dequantize_cpu);
  m.impl("_kmeans_centroid_grad", kmeans_centroid_grad_cpu);
  m.impl("pack_labels", pack_labels_cpu);
  m.impl("unpack_labels", unpack_labels_cpu);
}

}  // namespace qext::ops
