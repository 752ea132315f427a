// CUDA kernels of the k-means codebook ops. Same op names, signatures, checks and errors as the
// CPU kernels (ops/cpu/kmeans_codebook_kernel.cpp). Kernels that read label values record the
// first bad offset with an integer atomicMin (its result does not depend on the order), and the
// host reads it back once after the launch: a bad label is a clear error, not a device assert.
//
// The centroid gradient is deterministic: no floating-point atomics. Each block sums one piece
// of one codebook (the pieces of qext/kernels/codebook_grad.h); within a block, each warp keeps
// its own row of k double sums in shared memory, and per step the lanes holding the same label
// (__match_any_sync) are added in lane order by the lowest of them, which alone updates that bin.
// The block then writes its warp rows, added in warp order, as the piece's partial row, and a
// second kernel adds the partial rows of each codebook in piece order. The order differs from
// the CPU's, so the two agree to double rounding, not bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "qext/kernels/codebook_grad.h"
#include "qext/kernels/packed_labels.h"
#include "qext/ops/common/codebook_args.h"
#include "qext/ops/cuda/affine_kernel.cuh"

namespace qext::ops {
namespace {

using at::cuda::detail::IntDivider;
using kernels::CodebookLayout;
using kernels::GradPieces;

// Elements per piece of the centroid gradient: small enough for a few thousand blocks on large
// weights, large enough that the partial rows stay a small fraction of the work.
constexpr int64_t kCudaPieceElements = int64_t{1} << 13;
constexpr int kWarps = kThreads / 32;

template <typename L>
__device__ __forceinline__ uint64_t label_value(const L* labels, int64_t j) {
  return kernels::label_as_unsigned(labels[j]);
}

// One int64 on the device holding `n` (no bad offset yet), for kernels to atomicMin into.
at::Tensor first_bad_slot(int64_t n, const at::Tensor& like) {
  return at::full({1}, n, like.options().dtype(at::kLong));
}

__device__ __forceinline__ void report_bad(int64_t* first_bad, int64_t offset) {
  atomicMin(reinterpret_cast<unsigned long long*>(first_bad),
            static_cast<unsigned long long>(offset));
}

// The offset recorded in `slot`, or -1 when it still holds n. Synchronizes with the stream.
int64_t read_first_bad(const at::Tensor& slot, int64_t n) {
  const int64_t offset = slot.item<int64_t>();
  return offset < n ? offset : -1;
}

int grid_for(int64_t work) {
  return static_cast<int>(std::max<int64_t>(
      1, std::min(ceil_div(work, kThreads), multiprocessor_count() * kBlocksPerSm)));
}

// ---- kmeans_dequantize ------------------------------------------------------------------------
template <typename V, typename L, typename index_t>
__global__ void __launch_bounds__(kThreads)
    kmeans_dequantize_kernel(const V* __restrict__ centroids, const L* __restrict__ labels,
                             V* __restrict__ out, index_t n, IntDivider<index_t> inner_div,
                             IntDivider<index_t> codebooks_div, index_t k,
                             int64_t* __restrict__ first_bad) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t j = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += stride) {
    const uint64_t label = label_value(labels, j);
    if (label >= k) {
      report_bad(first_bad, j);
      continue;
    }
    const index_t codebook = codebooks_div.divmod(inner_div.div(j)).mod;
    out[j] = centroids[codebook * k + static_cast<index_t>(label)];
  }
}

at::Tensor kmeans_dequantize_cuda(const at::Tensor& centroids, const at::Tensor& labels,
                                  std::optional<int64_t> axis, bool mean) {
  const CodebookLayout layout = detail::check_dequantize_args(centroids, labels, axis);
  const c10::cuda::CUDAGuard guard(labels.device());
  const at::Tensor table = centroids.contiguous();
  const at::Tensor lab = labels.contiguous();
  at::Tensor out = at::empty(labels.sizes(), centroids.options());
  const int64_t n = lab.numel();
  if (n == 0) return out;
  const at::Tensor slot = first_bad_slot(n, lab);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  detail::visit_label_type(lab.scalar_type(), [&](auto label_type) {
    using L = decltype(label_type);
    detail::visit_value_width(table.scalar_type(), [&](auto value_type) {
      using V = decltype(value_type);
      auto launch = [&](auto index_type) {
        using index_t = decltype(index_type);
        kmeans_dequantize_kernel<V, L, index_t><<<grid_for(n), kThreads, 0, stream>>>(
            static_cast<const V*>(table.const_data_ptr()), lab.const_data_ptr<L>(),
            static_cast<V*>(out.mutable_data_ptr()), static_cast<index_t>(n),
            IntDivider<index_t>(static_cast<index_t>(std::max<int64_t>(layout.inner, 1))),
            IntDivider<index_t>(static_cast<index_t>(std::max<int64_t>(layout.codebooks, 1))),
            static_cast<index_t>(layout.k), slot.mutable_data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      // Offsets and codebook * k + label both stay below n + 256 * codebooks.
      if (use_32bit_index(n + table.numel())) {
        launch(uint32_t{});
      } else {
        launch(uint64_t{});
      }
    });
  });
  const int64_t bad = read_first_bad(slot, n);
  if (bad >= 0) detail::throw_label_out_of_codebook(lab, bad, layout.k, "qext::kmeans_dequantize");
  return out;
}

// ---- _kmeans_centroid_grad --------------------------------------------------------------------
// Block t sums piece t / codebooks of codebook t % codebooks into partial row t (k doubles, and
// k counts when partial_counts is not null). Shared memory: kWarps rows of k doubles, kWarps rows
// of k ints (counts), and 32 doubles per warp of scratch. Consecutive lanes take consecutive
// inner indices; with inner == 1 (codebooks innermost) they read at a stride of `codebooks`
// elements, and the blocks of neighbouring codebooks find the same lines in L2.
template <typename T, typename L>
__global__ void __launch_bounds__(kThreads)
    centroid_grad_pieces_kernel(const T* __restrict__ grad, const L* __restrict__ labels,
                                CodebookLayout layout, GradPieces pieces,
                                double* __restrict__ partial_sums,
                                int64_t* __restrict__ partial_counts,
                                int64_t* __restrict__ first_bad) {
  extern __shared__ double shared[];
  const int k = static_cast<int>(layout.k);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  double* rows = shared;                                        // [kWarps][k]
  double* scratch = shared + kWarps * k;                        // [kWarps][32]
  int* counts = reinterpret_cast<int*>(scratch + kWarps * 32);  // [kWarps][k]
  for (int e = threadIdx.x; e < kWarps * k; e += blockDim.x) {
    rows[e] = 0.0;
    counts[e] = 0;
  }
  __syncthreads();

  const int64_t task = blockIdx.x;
  const int64_t codebook = task % layout.codebooks, piece = task / layout.codebooks;
  const int64_t o0 = piece / pieces.col_pieces * pieces.rows;
  const int64_t i0 = piece % pieces.col_pieces * pieces.cols;
  const int len = static_cast<int>(std::min(layout.inner, i0 + pieces.cols) - i0);
  const int total = static_cast<int>(std::min(layout.outer, o0 + pieces.rows) - o0) * len;
  double* row = rows + warp * k;
  double* my_scratch = scratch + warp * 32;
  int* count_row = counts + warp * k;
  // Every lane of a warp runs the same number of steps (the bound depends on the warp only).
  for (int base = warp * 32; base < total; base += kWarps * 32) {
    const int e = base + lane;
    int label = k;  // k: no element (past the end, or a bad label)
    double value = 0.0;
    if (e < total) {
      const int64_t offset =
          ((o0 + e / len) * layout.codebooks + codebook) * layout.inner + i0 + e % len;
      const uint64_t l = label_value(labels, offset);
      if (l < static_cast<uint64_t>(k)) {
        label = static_cast<int>(l);
        value = static_cast<double>(static_cast<acc_t<T>>(grad[offset]));
      } else {
        report_bad(first_bad, offset);
      }
    }
    const unsigned peers = __match_any_sync(0xffffffffu, label);
    my_scratch[lane] = value;
    __syncwarp();
    if (label < k && lane == __ffs(peers) - 1) {
      double sum = 0.0;
      for (unsigned m = peers; m != 0; m &= m - 1) sum += my_scratch[__ffs(m) - 1];
      row[label] += sum;
      count_row[label] += __popc(peers);
    }
    __syncwarp();
  }
  __syncthreads();
  for (int b = threadIdx.x; b < k; b += blockDim.x) {
    double sum = 0.0;
    int64_t count = 0;
    for (int w = 0; w < kWarps; ++w) {
      sum += rows[w * k + b];
      count += counts[w * k + b];
    }
    partial_sums[task * k + b] = sum;
    if (partial_counts != nullptr) partial_counts[task * k + b] = count;
  }
}

// out[e] for e = c * k + b: the partial rows of codebook c added in piece order (and divided by
// the cluster's size when partial_counts is given).
__global__ void __launch_bounds__(kThreads)
    centroid_grad_finish_kernel(const double* __restrict__ partial_sums,
                                const int64_t* __restrict__ partial_counts, int64_t pieces,
                                int64_t entries, double* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < entries;
       e += stride) {
    double sum = 0.0;
    int64_t count = 0;
    for (int64_t p = 0; p < pieces; ++p) {
      sum += partial_sums[p * entries + e];
      if (partial_counts != nullptr) count += partial_counts[p * entries + e];
    }
    if (partial_counts != nullptr) sum = count > 0 ? sum / static_cast<double>(count) : 0.0;
    out[e] = sum;
  }
}

at::Tensor kmeans_centroid_grad_cuda(const at::Tensor& grad, const at::Tensor& labels, int64_t k,
                                     std::optional<int64_t> axis, bool mean) {
  const CodebookLayout layout = detail::check_centroid_grad_args(grad, labels, k, axis);
  const c10::cuda::CUDAGuard guard(labels.device());
  const at::Tensor lab = labels.contiguous();
  const at::Tensor g = grad.contiguous();
  const GradPieces pieces = kernels::plan_grad_pieces(layout, kCudaPieceElements);
  const int64_t tasks = pieces.per_codebook() * layout.codebooks;
  const auto doubles = grad.options().dtype(at::kDouble);
  at::Tensor partial_sums = at::empty({tasks * k}, doubles);
  at::Tensor partial_counts = at::empty({mean ? tasks * k : 0}, grad.options().dtype(at::kLong));
  at::Tensor out = at::empty(detail::centroid_grad_shape(layout, axis), doubles);
  const int64_t n = lab.numel();
  const at::Tensor slot = first_bad_slot(n, lab);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (tasks > 0) {
    const size_t shared_bytes = kWarps * (k * (sizeof(double) + sizeof(int)) + 32 * sizeof(double));
    detail::visit_label_type(lab.scalar_type(), [&](auto label_type) {
      using L = decltype(label_type);
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, g.scalar_type(), "kmeans_centroid_grad_cuda", [&] {
            centroid_grad_pieces_kernel<scalar_t, L>
                <<<static_cast<unsigned>(tasks), kThreads, shared_bytes, stream>>>(
                    g.const_data_ptr<scalar_t>(), lab.const_data_ptr<L>(), layout, pieces,
                    partial_sums.mutable_data_ptr<double>(),
                    mean ? partial_counts.mutable_data_ptr<int64_t>() : nullptr,
                    slot.mutable_data_ptr<int64_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    });
  }
  const int64_t entries = layout.codebooks * k;
  if (entries > 0) {
    centroid_grad_finish_kernel<<<grid_for(entries), kThreads, 0, stream>>>(
        partial_sums.const_data_ptr<double>(),
        mean ? partial_counts.const_data_ptr<int64_t>() : nullptr, pieces.per_codebook(), entries,
        out.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t bad = read_first_bad(slot, n);
  if (bad >= 0) detail::throw_label_out_of_codebook(lab, bad, k, "qext::_kmeans_centroid_grad");
  return out.to(grad.scalar_type());
}

// ---- pack_labels / unpack_labels --------------------------------------------------------------
// Thread per packed byte: its 8 / bits labels, lowest bits first; padding bits zero.
template <typename L>
__global__ void __launch_bounds__(kThreads)
    pack_labels_kernel(const L* __restrict__ labels, int64_t n, int bits,
                       uint8_t* __restrict__ packed, int64_t bytes,
                       int64_t* __restrict__ first_bad) {
  const int per_byte = 8 / bits;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < bytes;
       b += stride) {
    unsigned byte = 0;
    for (int j = 0; j < per_byte && b * per_byte + j < n; ++j) {
      const int64_t i = b * per_byte + j;
      const uint64_t label = label_value(labels, i);
      if (label >> bits != 0) report_bad(first_bad, i);
      byte |= static_cast<unsigned>(label) << (j * bits);
    }
    packed[b] = static_cast<uint8_t>(byte);
  }
}

__global__ void __launch_bounds__(kThreads)
    unpack_labels_kernel(const uint8_t* __restrict__ packed, int64_t n, int bits,
                         uint8_t* __restrict__ labels) {
  const int per_byte = 8 / bits;
  const unsigned mask = (1u << bits) - 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    labels[i] = static_cast<uint8_t>((packed[i / per_byte] >> (i % per_byte * bits)) & mask);
  }
}

at::Tensor pack_labels_cuda(const at::Tensor& labels, int64_t bits) {
  detail::check_pack_args(labels, bits);
  const c10::cuda::CUDAGuard guard(labels.device());
  const at::Tensor lab = labels.contiguous();
  const int64_t n = lab.numel();
  const int64_t bytes = kernels::packed_labels_bytes(n, bits);
  at::Tensor packed = at::empty({bytes}, labels.options().dtype(at::kByte));
  if (n == 0) return packed;
  const at::Tensor slot = first_bad_slot(n, lab);
  detail::visit_label_type(lab.scalar_type(), [&](auto label_type) {
    using L = decltype(label_type);
    pack_labels_kernel<L><<<grid_for(bytes), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        lab.const_data_ptr<L>(), n, static_cast<int>(bits), packed.mutable_data_ptr<uint8_t>(),
        bytes, slot.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t bad = read_first_bad(slot, n);
  if (bad >= 0) detail::throw_label_too_wide(lab, bad, bits);
  return packed;
}

at::Tensor unpack_labels_cuda(const at::Tensor& packed, int64_t bits, at::IntArrayRef shape) {
  const int64_t n = detail::check_unpack_args(packed, bits, shape);
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor bytes = packed.contiguous();
  at::Tensor labels = at::empty(shape, packed.options().dtype(at::kByte));
  if (n == 0) return labels;
  unpack_labels_kernel<<<grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      bytes.const_data_ptr<uint8_t>(), n, static_cast<int>(bits),
      labels.mutable_data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return labels;
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, CUDA, m) {
  m.impl("kmeans_dequantize", kmeans_dequantize_cuda);
  m.impl("_kmeans_centroid_grad", kmeans_centroid_grad_cuda);
  m.impl("pack_labels", pack_labels_cuda);
  m.impl("unpack_labels", unpack_labels_cuda);
}

}  // namespace qext::ops
