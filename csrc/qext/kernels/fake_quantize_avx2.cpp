// Compiled with -mavx2 -mfma (see CMakeLists.txt); reached only through cpu_has_avx2() checks.
#include "qext/kernels/fake_quantize_avx2.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace qext::kernels {

bool cpu_has_avx2() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}

namespace {

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// The quantizer constants for 8 consecutive elements: broadcast once for a uniform row, loaded per
// block when every element has its own channel.
template <bool kPerElement>
struct Params8 {
  __m256 scale, inv_scale, zero_point;

  Params8(const QuantizerRow& row, int64_t i) {
    if constexpr (kPerElement) {
      scale = _mm256_loadu_ps(row.scale + i);
      inv_scale = _mm256_loadu_ps(row.inv_scale + i);
      zero_point = _mm256_loadu_ps(row.zero_point + i);
    } else {
      scale = _mm256_set1_ps(row.scale[0]);
      inv_scale = _mm256_set1_ps(row.inv_scale[0]);
      zero_point = _mm256_set1_ps(row.zero_point[0]);
    }
  }
};

// Stores 8 floats; streaming stores need a 32-byte aligned address (checked once per row).
template <bool kStream>
inline void store8(float* p, __m256 v) {
  if constexpr (kStream) {
    _mm256_stream_ps(p, v);
  } else {
    _mm256_storeu_ps(p, v);
  }
}

bool aligned32(const float* p) { return (reinterpret_cast<uintptr_t>(p) & 31) == 0; }

// Runs body<kStream>() with streaming stores when asked for and `out` is aligned for them.
template <typename Body>
void with_store(Store store, const float* out, Body&& body) {
  if (store == Store::kStreaming && aligned32(out)) {
    body(std::true_type{});
    _mm_sfence();  // make the non-temporal stores visible before anyone reads the output
  } else {
    body(std::false_type{});
  }
}

// Number of leading elements to handle in scalar code so that the mask bit of element `head` is
// the first bit of a byte.
int64_t mask_head(int64_t n, const uint8_t* mask, int64_t mask_bit0) {
  return mask == nullptr ? 0 : std::min(n, (8 - (mask_bit0 & 7)) & 7);
}

template <bool kPerElement, bool kStream>
void fake_quantize_row(const float* x, float* y, int64_t n, const QuantizerRow& row, uint8_t* mask,
                       int64_t mask_bit0, int64_t head) {
  fake_quantize_row_ref(x, y, head, row, mask, mask_bit0);
  const __m256 lo = _mm256_set1_ps(row.quant_min), hi = _mm256_set1_ps(row.quant_max);
  Params8<kPerElement> p(row, 0);
  int64_t i = head;
  for (; i + 8 <= n; i += 8) {
    if constexpr (kPerElement) p = Params8<kPerElement>(row, i);
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), p.inv_scale);
    const __m256 level = _mm256_add_ps(_mm256_round_ps(v, kRound), p.zero_point);
    // max/min return their second operand when either is NaN: NaN levels pass through.
    const __m256 clamped = _mm256_min_ps(hi, _mm256_max_ps(lo, level));
    store8<kStream>(y + i, _mm256_mul_ps(_mm256_sub_ps(clamped, p.zero_point), p.scale));
    if (mask != nullptr) {
      const __m256 in_range =
          _mm256_and_ps(_mm256_cmp_ps(level, lo, _CMP_GE_OQ), _mm256_cmp_ps(level, hi, _CMP_LE_OQ));
      mask[(mask_bit0 + i) >> 3] = static_cast<uint8_t>(_mm256_movemask_ps(in_range));
    }
  }
  fake_quantize_row_ref(x + i, y + i, n - i, row.from(i), mask, mask_bit0 + i);
}

// Adds the 8 float lanes of v, widened to double, to the accumulator pair acc[0..1].
inline void add_widened(__m256 v, __m256d* acc) {
  acc[0] = _mm256_add_pd(acc[0], _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  acc[1] = _mm256_add_pd(acc[1], _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

inline double horizontal_sum(const __m256d* acc) {
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(acc[0], acc[1]));
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// Adds the 8 float lanes of v to sums[0..7] in double.
inline void add_to_sums(__m256 v, double* sums) {
  _mm256_storeu_pd(
      sums, _mm256_add_pd(_mm256_loadu_pd(sums), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
  _mm256_storeu_pd(sums + 4, _mm256_add_pd(_mm256_loadu_pd(sums + 4),
                                           _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
}

// Float accumulators are flushed to double every kFlushBlocks blocks of 8 elements: short float
// partial sums keep the error at float rounding of a few hundred terms.
constexpr int64_t kFlushBlocks = 64;

// One quantizer for the whole row. The saturated terms have constant factors, so the row sums
// need only the sums of dy below and above the range:
//   sum dscale = inv_scale * sum_in dy * (x_fq - x) + (qmin - z) sum_below dy + (qmax - z)
//   sum_above dy sum dzero_point = -scale * (sum_below dy + sum_above dy)
template <bool kStream>
void learnable_grad_row_uniform(const float* x, const float* dy, float* dx, int64_t n,
                                const QuantizerRow& row, double* dscale_sum, double* dzp_sum) {
  const __m256 lo = _mm256_set1_ps(row.quant_min), hi = _mm256_set1_ps(row.quant_max);
  const Params8<false> p(row, 0);
  __m256d in_acc[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
  __m256d below_acc[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
  __m256d above_acc[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t i = 0;
  while (i + 8 <= n) {
    __m256 in_part = _mm256_setzero_ps(), below_part = in_part, above_part = in_part;
    const int64_t block_end = std::min(n, i + 8 * kFlushBlocks);
    for (; i + 8 <= block_end; i += 8) {
      const __m256 xv = _mm256_loadu_ps(x + i), g = _mm256_loadu_ps(dy + i);
      const __m256 level =
          _mm256_add_ps(_mm256_round_ps(_mm256_mul_ps(xv, p.inv_scale), kRound), p.zero_point);
      // NaN levels compare false with everything: no lane of any sum.
      const __m256 below = _mm256_cmp_ps(level, lo, _CMP_LT_OQ);
      const __m256 above = _mm256_cmp_ps(level, hi, _CMP_GT_OQ);
      const __m256 in_range =
          _mm256_and_ps(_mm256_cmp_ps(level, lo, _CMP_GE_OQ), _mm256_cmp_ps(level, hi, _CMP_LE_OQ));
      const __m256 x_fq = _mm256_mul_ps(_mm256_sub_ps(level, p.zero_point), p.scale);
      const __m256 g_in = _mm256_and_ps(g, in_range);
      store8<kStream>(dx + i, g_in);
      // Masked after the product: x_fq - x is NaN for NaN or infinite x.
      in_part = _mm256_add_ps(in_part,
                              _mm256_and_ps(in_range, _mm256_mul_ps(g, _mm256_sub_ps(x_fq, xv))));
      below_part = _mm256_add_ps(below_part, _mm256_and_ps(g, below));
      above_part = _mm256_add_ps(above_part, _mm256_and_ps(g, above));
    }
    add_widened(in_part, in_acc);
    add_widened(below_part, below_acc);
    add_widened(above_part, above_acc);
  }
  const double below = horizontal_sum(below_acc), above = horizontal_sum(above_acc);
  const double zero_point = row.zero_point[0];
  dscale_sum[0] += horizontal_sum(in_acc) * row.inv_scale[0] +
                   (row.quant_min - zero_point) * below + (row.quant_max - zero_point) * above;
  dzp_sum[0] += -static_cast<double>(row.scale[0]) * (below + above);
  learnable_grad_row_ref(x + i, dy + i, dx + i, n - i, row, dscale_sum, dzp_sum);
}

// One quantizer per element (channels innermost): the terms go to per-channel sums.
template <bool kStream>
void learnable_grad_row_per_element(const float* x, const float* dy, float* dx, int64_t n,
                                    const QuantizerRow& row, double* dscale_sum, double* dzp_sum) {
  const __m256 lo = _mm256_set1_ps(row.quant_min), hi = _mm256_set1_ps(row.quant_max);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const Params8<true> p(row, i);
    const __m256 xv = _mm256_loadu_ps(x + i), g = _mm256_loadu_ps(dy + i);
    const __m256 level =
        _mm256_add_ps(_mm256_round_ps(_mm256_mul_ps(xv, p.inv_scale), kRound), p.zero_point);
    const __m256 below = _mm256_cmp_ps(level, lo, _CMP_LT_OQ);
    const __m256 in_range =
        _mm256_and_ps(_mm256_cmp_ps(level, lo, _CMP_GE_OQ), _mm256_cmp_ps(level, hi, _CMP_LE_OQ));
    // Outside the range but not NaN (a NaN level compares unordered with everything).
    const __m256 outside = _mm256_andnot_ps(in_range, _mm256_cmp_ps(level, level, _CMP_ORD_Q));

    const __m256 x_fq = _mm256_mul_ps(_mm256_sub_ps(level, p.zero_point), p.scale);
    const __m256 dscale_in = _mm256_mul_ps(_mm256_mul_ps(g, _mm256_sub_ps(x_fq, xv)), p.inv_scale);
    const __m256 bound = _mm256_blendv_ps(hi, lo, below);
    const __m256 dscale_out = _mm256_mul_ps(g, _mm256_sub_ps(bound, p.zero_point));
    const __m256 dzp_out = _mm256_mul_ps(_mm256_xor_ps(g, sign), p.scale);

    store8<kStream>(dx + i, _mm256_and_ps(g, in_range));
    add_to_sums(
        _mm256_or_ps(_mm256_and_ps(in_range, dscale_in), _mm256_and_ps(outside, dscale_out)),
        dscale_sum + i);
    add_to_sums(_mm256_and_ps(outside, dzp_out), dzp_sum + i);
  }
  learnable_grad_row_ref(x + i, dy + i, dx + i, n - i, row.from(i), dscale_sum + i, dzp_sum + i);
}

// 8 int32 lanes (values that fit Q) stored as 8 Q.
inline void store8(int32_t* q, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), v); }

inline __m128i pack_to_int16(__m256i v) {
  return _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}

inline void store8(uint8_t* q, __m256i v) {
  const __m128i w = pack_to_int16(v);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packus_epi16(w, w));
}

inline void store8(int8_t* q, __m256i v) {
  const __m128i w = pack_to_int16(v);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packs_epi16(w, w));
}

// 8 Q widened to int32 lanes.
inline __m256i load8(const int32_t* q) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
}

inline __m256i load8(const uint8_t* q) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
}

inline __m256i load8(const int8_t* q) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
}

// Calls body(i, params) for the blocks [i, i + 8) of [0, n) and returns where they end. The
// constants of a uniform row are broadcast once, outside the loop (stores through Q* may alias the
// row, so the compiler could not hoist them itself).
template <bool kPerElement, typename Body>
int64_t for_each_block8(const QuantizerRow& row, int64_t n, Body&& body) {
  int64_t i = 0;
  if constexpr (kPerElement) {
    for (; i + 8 <= n; i += 8) body(i, Params8<true>(row, i));
  } else {
    const Params8<false> p(row, 0);
    for (; i + 8 <= n; i += 8) body(i, p);
  }
  return i;
}

// The reference clamps nearbyint(v) + z to [lo, hi] in float (v = x * inv_scale). This computes
// nearbyint(clamp(v, lo - z, hi - z)) + z in int32 instead, three float operations fewer: rounding
// is monotone and keeps integers, so clamping to integer bounds commutes with it, and where the
// float sum of the reference rounds (|v| >= 2^24) both clamp to the same bound. cvtps2dq rounds in
// the current rounding mode, as std::nearbyint does.
template <bool kPerElement, typename Q>
bool quantize_row(const float* x, Q* q, int64_t n, const QuantizerRow& row) {
  const __m256 lo = _mm256_set1_ps(row.quant_min), hi = _mm256_set1_ps(row.quant_max);
  __m256 nan = _mm256_setzero_ps();  // lanes that saw a NaN
  const int64_t end = for_each_block8<kPerElement>(row, n, [&](int64_t i, const auto& p) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), p.inv_scale);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256 clamped = _mm256_min_ps(_mm256_sub_ps(hi, p.zero_point),
                                         _mm256_max_ps(_mm256_sub_ps(lo, p.zero_point), v));
    // Integers inside Q's range: the packing in store8 is exact.
    store8(q + i, _mm256_add_epi32(_mm256_cvtps_epi32(clamped), _mm256_cvtps_epi32(p.zero_point)));
  });
  return _mm256_testz_ps(nan, nan) && quantize_row_ref(x + end, q + end, n - end, row.from(end));
}

template <bool kPerElement, typename Q>
void dequantize_row(const Q* q, float* x, int64_t n, const QuantizerRow& row) {
  const int64_t end = for_each_block8<kPerElement>(row, n, [&](int64_t i, const auto& p) {
    const __m256 v = _mm256_cvtepi32_ps(load8(q + i));
    _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_sub_ps(v, p.zero_point), p.scale));
  });
  dequantize_row_ref(q + end, x + end, n - end, row.from(end));
}

}  // namespace

template <typename Q>
bool quantize_row_avx2(const float* x, Q* q, int64_t n, const QuantizerRow& row) {
  return row.step == 0 ? quantize_row<false>(x, q, n, row) : quantize_row<true>(x, q, n, row);
}

template <typename Q>
void dequantize_row_avx2(const Q* q, float* x, int64_t n, const QuantizerRow& row) {
  if (row.step == 0) {
    dequantize_row<false>(q, x, n, row);
  } else {
    dequantize_row<true>(q, x, n, row);
  }
}

#define QEXT_INSTANTIATE_QUANTIZE_ROWS(Q)                                             \
  template bool quantize_row_avx2<Q>(const float*, Q*, int64_t, const QuantizerRow&); \
  template void dequantize_row_avx2<Q>(const Q*, float*, int64_t, const QuantizerRow&);
QEXT_INSTANTIATE_QUANTIZE_ROWS(uint8_t)
QEXT_INSTANTIATE_QUANTIZE_ROWS(int8_t)
QEXT_INSTANTIATE_QUANTIZE_ROWS(int32_t)
#undef QEXT_INSTANTIATE_QUANTIZE_ROWS

void fake_quantize_row_avx2(const float* x, float* y, int64_t n, const QuantizerRow& row,
                            uint8_t* mask, int64_t mask_bit0, Store store) {
  const int64_t head = mask_head(n, mask, mask_bit0);
  with_store(store, y + head, [&](auto stream) {
    if (row.step == 0) {
      fake_quantize_row<false, stream.value>(x, y, n, row, mask, mask_bit0, head);
    } else {
      fake_quantize_row<true, stream.value>(x, y, n, row, mask, mask_bit0, head);
    }
  });
}

void masked_grad_avx2(const float* dy, const uint8_t* mask, float* dx, int64_t begin, int64_t end,
                      Store store) {
  const int64_t head_end = std::min(end, (begin + 7) & ~int64_t{7});
  masked_grad_ref(dy, mask, dx, begin, head_end);
  const __m256i bit_of_lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  int64_t i = head_end;
  with_store(store, dx + head_end, [&](auto stream) {
    for (; i + 8 <= end; i += 8) {
      const __m256i bits = _mm256_and_si256(_mm256_set1_epi32(mask[i >> 3]), bit_of_lane);
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, bit_of_lane));
      store8<stream.value>(dx + i, _mm256_and_ps(_mm256_loadu_ps(dy + i), keep));
    }
  });
  masked_grad_ref(dy, mask, dx, i, end);
}

void learnable_grad_row_avx2(const float* x, const float* dy, float* dx, int64_t n,
                             const QuantizerRow& row, double* dscale_sum, double* dzp_sum,
                             Store store) {
  with_store(store, dx, [&](auto stream) {
    if (row.step == 0) {
      learnable_grad_row_uniform<stream.value>(x, dy, dx, n, row, dscale_sum, dzp_sum);
    } else {
      learnable_grad_row_per_element<stream.value>(x, dy, dx, n, row, dscale_sum, dzp_sum);
    }
  });
}

}  // namespace qext::kernels
