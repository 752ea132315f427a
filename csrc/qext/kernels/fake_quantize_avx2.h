// AVX2 (+FMA) versions of the float32 row kernels in fake_quantize_ref.h (fake quantization,
// quantize, dequantize). Element results (y, mask bits, dx, q, x) are bit-identical to the
// reference. The dscale / dzero_point sums are not: with one quantizer per row they are factored
// (constant factors of the saturated terms pulled out of the sums) and summed in short float runs
// flushed to double, so they agree with the reference to float rounding of a few hundred terms;
// with one quantizer per element the terms are the reference's, summed in double. Call only when
// cpu_has_avx2() is true.
#pragma once

#include <cstdint>

#include "qext/kernels/fake_quantize_ref.h"

namespace qext::kernels {

// True when this CPU runs AVX2 and FMA instructions.
bool cpu_has_avx2();

// How the float outputs are written. kStreaming uses non-temporal stores (where the output is
// 32-byte aligned): no read-for-ownership of the output lines and no cache pollution, about 1.3x
// the bandwidth for tensors far larger than the caches; worse for outputs read again soon.
enum class Store { kCached, kStreaming };

void fake_quantize_row_avx2(const float* x, float* y, int64_t n, const QuantizerRow& row,
                            uint8_t* mask, int64_t mask_bit0, Store store = Store::kCached);

// dx[i] = mask bit i ? dy[i] : 0 for i in [begin, end).
void masked_grad_avx2(const float* dy, const uint8_t* mask, float* dx, int64_t begin, int64_t end,
                      Store store = Store::kCached);

void learnable_grad_row_avx2(const float* x, const float* dy, float* dx, int64_t n,
                             const QuantizerRow& row, double* dscale_sum, double* dzp_sum,
                             Store store = Store::kCached);

// quantize_row_ref for float32 input; Q is uint8_t, int8_t or int32_t. NaN is detected without a
// per-element branch: false means some x[i] is NaN (q is then partly garbage).
template <typename Q>
bool quantize_row_avx2(const float* x, Q* q, int64_t n, const QuantizerRow& row);

// dequantize_row_ref for float32 output; Q is uint8_t, int8_t or int32_t.
template <typename Q>
void dequantize_row_avx2(const Q* q, float* x, int64_t n, const QuantizerRow& row);

}  // namespace qext::kernels
