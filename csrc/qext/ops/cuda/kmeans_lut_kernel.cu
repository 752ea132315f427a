// CUDA kernels of the look-up-table ops (schemas in ops/kmeans_lut.cpp), with the CPU kernels'
// argument checks (ops/common/kmeans_lut_args.h) and results bit-identical to them.
//
// kmeans_linear runs the accumulation order of kernels/kmeans_lut.h with 16 threads per output:
// thread j holds lane j, s_j = fmaf chain over k = j, j + 16, ... in order from +0, then
// xor-shuffles add the lanes in the contract's tree (float addition is commutative, so both
// threads of a pair hold the same sum):
//   by 8: thread j holds t_(j mod 8) = s_j + s_(j+8)      by 1: t_0 + t_1 at thread 0
//   by 2: (t_0 + t_1) + (t_2 + t_3) at thread 0          by 4: ... + ((t_4 + t_5) + (t_6 + t_7))
// A block is 16 lanes x 16 output channels; each thread walks kRowsPerThread rows of x with one
// decoded weight. Labels >= k are found by a max-label pass (only when k < 2^bits) before any
// output is computed.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "qext/kernels/kmeans_lut.h"
#include "qext/ops/common/kmeans_lut_args.h"

namespace qext::ops {
namespace {

using detail::LutWeightArgs;

constexpr int kLanes = 16;
static_assert(kLanes == qext::kernels::kLutLanes, "one lane per thread of the 16");
constexpr int kChannelsPerBlock = 16;
constexpr int kRowsPerThread = 4;
constexpr int kThreads = 256;  // elementwise kernels
constexpr int kMaxBlocks = 4096;
constexpr unsigned kFullMask = 0xffffffffu;

// The packed format with shifts instead of divisions: label i sits in byte i >> log_per_byte.
struct PackedLabels {
  const uint8_t* bytes;
  int bits;
  int log_per_byte;  // log2(8 / bits)

  __device__ __forceinline__ int operator[](int64_t i) const {
    const int shift = static_cast<int>(i & ((1 << log_per_byte) - 1)) * bits;
    return (__ldg(bytes + (i >> log_per_byte)) >> shift) & ((1 << bits) - 1);
  }
};

PackedLabels packed_of(const LutWeightArgs& w) {
  const int log_per_byte = w.bits == 1 ? 3 : w.bits == 2 ? 2 : w.bits == 4 ? 1 : 0;
  return {w.labels.data_ptr<uint8_t>(), w.bits, log_per_byte};
}

__global__ void max_label_kernel(PackedLabels labels, int64_t numel, int* top) {
  int best = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    best = max(best, labels[i]);
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    best = max(best, __shfl_xor_sync(kFullMask, best, offset));
  }
  if ((threadIdx.x & 31) == 0) atomicMax(top, best);
}

__global__ void decode_kernel(PackedLabels labels, const float* __restrict__ centroids,
                              float* __restrict__ out, int64_t numel, int64_t cols, int64_t k,
                              bool per_channel) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t codebook = per_channel ? i / cols * k : 0;
    out[i] = __ldg(centroids + codebook + labels[i]);
  }
}

__global__ void linear_kernel(const float* __restrict__ x, PackedLabels labels,
                              const float* __restrict__ centroids, const float* __restrict__ bias,
                              float* __restrict__ y, int64_t M, int64_t N, int64_t K, int64_t k,
                              bool per_channel) {
  const int lane = threadIdx.x;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kChannelsPerBlock + threadIdx.y;
  const bool live = n < N;
  const float* codebook = centroids + (per_channel && live ? n * k : 0);
  // Every thread of a block runs the same m0 iterations: the shuffles see full warps.
  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRowsPerThread; m0 < M;
       m0 += static_cast<int64_t>(gridDim.y) * kRowsPerThread) {
    float s[kRowsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) s[i] = 0.0f;
    if (live) {
      for (int64_t j = lane; j < K; j += kLanes) {
        const float w = __ldg(codebook + labels[n * K + j]);
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          if (m0 + i < M) s[i] = fmaf(__ldg(x + (m0 + i) * K + j), w, s[i]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      float r = s[i];
      r += __shfl_xor_sync(kFullMask, r, 8);
      r += __shfl_xor_sync(kFullMask, r, 1);
      r += __shfl_xor_sync(kFullMask, r, 2);
      r += __shfl_xor_sync(kFullMask, r, 4);
      if (lane == 0 && live && m0 + i < M) {
        y[(m0 + i) * N + n] = bias != nullptr ? r + __ldg(bias + n) : r;
      }
    }
  }
}

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

// The kernels index the codebook with the labels as they are: a label >= k is an error.
void check_labels(const LutWeightArgs& w, const char* op) {
  if (!w.labels_can_exceed_k()) return;
  at::Tensor top = at::zeros({1}, w.labels.options().dtype(at::kInt));
  max_label_kernel<<<blocks_for(w.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      packed_of(w), w.numel(), top.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (top.item<int>() >= w.k) detail::throw_label_out_of_range(w.labels.cpu(), w, op);
}

at::Tensor kmeans_linear_cuda(const at::Tensor& input, const at::Tensor& packed_labels,
                              const at::Tensor& centroids, int64_t bits,
                              at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "qext::kmeans_linear";
  const c10::cuda::CUDAGuard guard(packed_labels.device());
  const detail::LutLinearCall call =
      detail::check_lut_linear(input, packed_labels, centroids, bits, weight_shape, bias, op);
  const LutWeightArgs& w = call.w;
  check_labels(w, op);
  at::Tensor y = at::empty(call.out_sizes, call.x.options());
  const int64_t M = call.rows;
  if (M == 0) return y;
  const dim3 block(kLanes, kChannelsPerBlock);
  const dim3 grid(
      static_cast<unsigned>((w.rows + kChannelsPerBlock - 1) / kChannelsPerBlock),
      static_cast<unsigned>(std::min<int64_t>((M + kRowsPerThread - 1) / kRowsPerThread, 65535)));
  linear_kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
      call.x.data_ptr<float>(), packed_of(w), w.centroids.data_ptr<float>(),
      call.bias.defined() ? call.bias.data_ptr<float>() : nullptr, y.data_ptr<float>(), M, w.rows,
      w.cols, w.k, w.per_channel);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor kmeans_decode_cuda(const at::Tensor& packed_labels, const at::Tensor& centroids,
                              int64_t bits, at::IntArrayRef weight_shape) {
  constexpr const char* op = "qext::kmeans_decode";
  const c10::cuda::CUDAGuard guard(packed_labels.device());
  const LutWeightArgs w = detail::check_lut_weight(packed_labels, centroids, bits, weight_shape,
                                                   /*dims=*/0, op);
  check_labels(w, op);
  at::Tensor out = at::empty(weight_shape, w.centroids.options());
  decode_kernel<<<blocks_for(w.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      packed_of(w), w.centroids.data_ptr<float>(), out.data_ptr<float>(), w.numel(), w.cols, w.k,
      w.per_channel);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, CUDA, m) {
  m.impl("kmeans_linear", kmeans_linear_cuda);
  m.impl("kmeans_decode", kmeans_decode_cuda);
}

}  // namespace qext::ops
