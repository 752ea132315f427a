// Compiled with -mavx2 -mfma -mavx512f (see CMakeLists.txt); reached only through
// lut_cpu_has_avx512() checks. AVX-512 paths of the look-up-table kernels (kmeans_lut.h): the 16
// lanes of the accumulation order are one zmm register, and a codebook of up to 16 centroids is one
// zmm that vpermps indexes with 16 labels at once (32 centroids: vpermt2ps): a quarter of the AVX2
// path's shuffles per decoded 4-bit weight, and twice its multiply-add width.
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_*() after inlining
// (GCC bug 105593, fixed in 13); the diagnostics are located in the header, so silence them there.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cstring>

#include "qext/kernels/kmeans_lut.h"
#include "qext/kernels/kmeans_lut_isa.h"
#include "qext/kernels/kmeans_lut_simd.h"

namespace qext::kernels {
namespace {

// ------------------------------------------------------------------------------------------------
// Decoding
// ------------------------------------------------------------------------------------------------

// 32 bits of the stream from `at` on, after skipping `shift` (< 8) bits.
template <bool kAligned>
inline uint32_t bits32(const uint8_t* at, int shift) {
  if constexpr (kAligned) {
    uint32_t v;
    std::memcpy(&v, at, sizeof(v));
    return v;
  } else {
    uint64_t v;
    std::memcpy(&v, at, sizeof(v));
    return static_cast<uint32_t>(v >> shift);
  }
}

// Labels e .. e + 15 as int32 lanes, read from the group's first byte on (the caller makes sure
// that 16 bytes from there lie inside the stream). 4-bit lanes keep the next labels' bits above
// bit 3: the 16-entry lookup reads only bits 0..3.
template <int kBits, bool kAligned>
inline __m512i labels16(const uint8_t* p, int64_t e) {
  const int64_t bit = e * kBits;
  const uint8_t* at = p + (bit >> 3);
  const int shift = static_cast<int>(bit & 7);
  if constexpr (kBits == 8) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
  } else if constexpr (kBits == 4) {
    // Lanes 0..7 take the word of labels e .. e + 7, lanes 8..15 that of e + 8 .. e + 15.
    const __m512i words = _mm512_mask_set1_epi32(_mm512_set1_epi32(bits32<kAligned>(at, shift)),
                                                 0xFF00, bits32<kAligned>(at + 4, shift));
    const __m512i shifts =
        _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    return _mm512_srlv_epi32(words, shifts);
  } else {
    // 16 labels of 1 or 2 bits are one 32-bit word.
    const __m512i shifts =
        _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                           _mm512_set1_epi32(kBits));
    const __m512i lanes = _mm512_srlv_epi32(_mm512_set1_epi32(bits32<kAligned>(at, shift)), shifts);
    return _mm512_and_si512(lanes, _mm512_set1_epi32((1 << kBits) - 1));
  }
}

// How a label becomes its centroid: one permute for k <= 16, a two-table permute for k <= 32, a
// gather from the codebook beyond.
enum class Lookup { kPerm16, kPerm32, kGather };

struct RowLut {
  __m512 lo, hi;
  const float* codebook;

  RowLut(const float* cb, int64_t k) : codebook(cb) {
    float first[32] = {};  // centroids 0..31, zero-padded past k
    std::copy_n(cb, std::min<int64_t>(k, 32), first);
    lo = _mm512_loadu_ps(first);
    hi = _mm512_loadu_ps(first + 16);
  }
};

template <Lookup kLookup>
inline __m512 lookup(__m512i label, const RowLut& lut) {
  if constexpr (kLookup == Lookup::kPerm16) {
    return _mm512_permutexvar_ps(label, lut.lo);
  } else if constexpr (kLookup == Lookup::kPerm32) {
    return _mm512_permutex2var_ps(lut.lo, label, lut.hi);
  } else {
    return _mm512_i32gather_ps(label, lut.codebook, 4);
  }
}

template <int kBits, Lookup kLookup>
void decode_rows(const LutWeight& w, int64_t r0, int64_t r1, float* out, int64_t ld) {
  decode_rows_by_groups<16, kBits, RowLut>(
      w, r0, r1, out, ld, [&](const RowLut& lut, int64_t e, float* dst, auto aligned) {
        _mm512_storeu_ps(
            dst, lookup<kLookup>(labels16<kBits, decltype(aligned)::value>(w.labels, e), lut));
      });
}

detail::LutDecodeFn decoder_for(int bits, int64_t k) {
  switch (bits) {
    case 1:
      return decode_rows<1, Lookup::kPerm16>;
    case 2:
      return decode_rows<2, Lookup::kPerm16>;
    case 4:
      return decode_rows<4, Lookup::kPerm16>;
    default:
      return k <= 16   ? decode_rows<8, Lookup::kPerm16>
             : k <= 32 ? decode_rows<8, Lookup::kPerm32>
                       : decode_rows<8, Lookup::kGather>;
  }
}

// ------------------------------------------------------------------------------------------------
// Linear
// ------------------------------------------------------------------------------------------------

// y[i][j] = x[i] . w[j] (+ bias[j]) for MR rows of x and NR rows of the decoded weight (rows of ldw
// floats, zero past K up to a multiple of 16). The loops over the register block are unrolled so
// that acc stays in registers.
template <int MR, int NR>
void micro_kernel(int64_t K, const float* x, int64_t ldx, const float* w, int64_t ldw,
                  const float* bias, float* y, int64_t ldy) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  const int64_t k16 = K / kLutLanes * kLutLanes;
  for (int64_t k = 0; k < k16; k += kLutLanes) {
    __m512 wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_ps(w + j * ldw + k);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k16 < K) {
    // Lanes past K keep their sums exactly (the masked x load reads nothing past the row).
    const __mmask16 live = static_cast<__mmask16>((1u << (K - k16)) - 1);
    __m512 wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_ps(w + j * ldw + k16);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(live, x + i * ldx + k16);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_mask3_fmadd_ps(xv, wv[j], acc[i][j], live);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      // t_j = s_j + s_(j+8): the low and high 256 bits.
      const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i][j]), 1));
      const float r = reduce_halves(_mm256_add_ps(_mm512_castps512_ps256(acc[i][j]), hi));
      y[i * ldy + j] = bias != nullptr ? r + bias[j] : r;
    }
  }
}

// Register blocks: up to 4 rows of x times 4 weight rows (16 accumulators, 16 independent FMA
// chains; 21 of the 32 zmm registers with the weight and input registers).
constexpr detail::LutMicroFn kMicro[] = {
    micro_kernel<1, 1>, micro_kernel<1, 2>, micro_kernel<1, 3>, micro_kernel<1, 4>,
    micro_kernel<2, 1>, micro_kernel<2, 2>, micro_kernel<2, 3>, micro_kernel<2, 4>,
    micro_kernel<3, 1>, micro_kernel<3, 2>, micro_kernel<3, 3>, micro_kernel<3, 4>,
    micro_kernel<4, 1>, micro_kernel<4, 2>, micro_kernel<4, 3>, micro_kernel<4, 4>};

}  // namespace

void lut_decode_rows_avx512(const LutWeight& w, int64_t r0, int64_t r1, float* out, int64_t ld) {
  decoder_for(w.bits, w.k)(w, r0, r1, out, ld);
}

void lut_linear_avx512(const LutWeight& w, int64_t M, const float* x, int64_t ldx,
                       const float* bias, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const detail::LutIsaKernels isa{decoder_for(w.bits, w.k), kMicro, 4, 4};
  detail::lut_linear_blocked(isa, w, M, x, ldx, bias, n0, n1, y, ldy);
}

}  // namespace qext::kernels
