// CPU kernel of qext::kmeans: the shared host clustering (one codebook per thread at a time), then
// the labels, spread over threads (AVX2 tree descent for float32 where the CPU has it).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "qext/kernels/fake_quantize_avx2.h"
#include "qext/kernels/kmeans1d.h"
#include "qext/ops/common/kmeans_args.h"

namespace qext::ops {
namespace {

constexpr int64_t kGrain = 1 << 16;

template <typename T>
void label_run(const T* x, int64_t n, const T* tree, int levels, uint8_t* labels) {
  kernels::assign_labels(x, n, tree, levels, labels);
}

template <>
void label_run<float>(const float* x, int64_t n, const float* tree, int levels, uint8_t* labels) {
  if (kernels::cpu_has_avx2()) {
    kernels::assign_labels_avx2(x, n, tree, levels, labels);
  } else {
    kernels::assign_labels(x, n, tree, levels, labels);
  }
}

std::tuple<at::Tensor, at::Tensor> kmeans_cpu(const at::Tensor& weight, int64_t k,
                                              std::optional<int64_t> axis, c10::string_view init,
                                              int64_t max_iters, int64_t seed) {
  const detail::KMeansArgs args = detail::check_kmeans_args(weight, k, axis, init, max_iters, seed);
  const at::Tensor rows = detail::kmeans_rows(weight, args);
  detail::Codebooks books = detail::cluster_rows(rows, args, weight.scalar_type());
  at::Tensor labels = at::empty(rows.sizes(), rows.options().dtype(at::kByte));
  const int levels = kernels::search_levels(k);
  const int64_t tree_size = books.trees.size(1), n = args.row_size;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "kmeans_labels", [&] {
    const scalar_t* x = rows.const_data_ptr<scalar_t>();
    const scalar_t* trees = books.trees.const_data_ptr<scalar_t>();
    uint8_t* out = labels.mutable_data_ptr<uint8_t>();
    at::parallel_for(0, rows.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t pos = begin; pos < end;) {  // runs within one codebook
        const int64_t row = pos / n, len = std::min(end, (row + 1) * n) - pos;
        label_run(x + pos, len, trees + row * tree_size, levels, out + pos);
        pos += len;
      }
    });
  });
  return {books.centroids, detail::labels_like(labels, weight, args)};
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, CPU, m) { m.impl("kmeans", kmeans_cpu); }

}  // namespace qext::ops
