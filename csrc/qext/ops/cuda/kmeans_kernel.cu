// CUDA kernel of qext::kmeans. The clustering itself runs on the host, with the code of the CPU
// kernel, on a copy of the values: its result is a function of the values alone, so both devices
// return the same centroids bit for bit, and the labels (the per-element work) are computed here
// with the same comparisons.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "qext/kernels/kmeans1d.h"
#include "qext/ops/common/kmeans_args.h"

namespace qext::ops {
namespace {

constexpr int kThreads = 256;

// labels[i] = tree_label(x[i]) with the search tree of i's codebook (row i / row_size).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kmeans_labels_kernel(const T* __restrict__ x, int64_t n, int64_t row_size,
                         const T* __restrict__ trees, int64_t tree_size, int levels,
                         uint8_t* __restrict__ labels) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    labels[i] =
        static_cast<uint8_t>(kernels::tree_label(x[i], trees + (i / row_size) * tree_size, levels));
  }
}

std::tuple<at::Tensor, at::Tensor> kmeans_cuda(const at::Tensor& weight, int64_t k,
                                               std::optional<int64_t> axis, c10::string_view init,
                                               int64_t max_iters, int64_t seed) {
  const detail::KMeansArgs args = detail::check_kmeans_args(weight, k, axis, init, max_iters, seed);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor rows = detail::kmeans_rows(weight, args);
  const detail::Codebooks books = detail::cluster_rows(rows.cpu(), args, weight.scalar_type());
  const at::Tensor trees = books.trees.to(weight.device());
  at::Tensor labels = at::empty(rows.sizes(), rows.options().dtype(at::kByte));
  const int64_t n = rows.numel();
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "kmeans_labels_cuda", [&] {
    kmeans_labels_kernel<scalar_t>
        <<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            rows.const_data_ptr<scalar_t>(), n, args.row_size, trees.const_data_ptr<scalar_t>(),
            trees.size(1), kernels::search_levels(k), labels.mutable_data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {books.centroids.to(weight.device()), detail::labels_like(labels, weight, args)};
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, CUDA, m) { m.impl("kmeans", kmeans_cuda); }

}  // namespace qext::ops
