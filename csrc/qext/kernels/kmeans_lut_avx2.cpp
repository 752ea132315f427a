// Compiled with -mavx2 -mfma (see CMakeLists.txt); reached only through cpu_has_avx2() checks.
// AVX2 paths of the look-up-table kernels (kmeans_lut.h). The 16 lanes of the accumulation order
// are two ymm registers: lo = lanes 0..7 (k % 16 < 8), hi = lanes 8..15.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "qext/kernels/kmeans_lut.h"
#include "qext/kernels/kmeans_lut_isa.h"
#include "qext/kernels/kmeans_lut_simd.h"

namespace qext::kernels {
namespace {

// ------------------------------------------------------------------------------------------------
// Label range
// ------------------------------------------------------------------------------------------------

// The largest field of the whole bytes p[0, n).
template <int kBits>
int max_field(const uint8_t* p, int64_t n) {
  constexpr int kMask = (1 << kBits) - 1;
  const __m256i mask = _mm256_set1_epi8(static_cast<char>(kMask));
  __m256i top = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    // A 16-bit shift moves the next byte's low bits into the top of each byte; the mask drops them.
    for (int s = 0; s < 8; s += kBits) {
      top = _mm256_max_epu8(top, _mm256_and_si256(_mm256_srli_epi16(v, s), mask));
    }
  }
  alignas(32) uint8_t lanes[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), top);
  int best = *std::max_element(lanes, lanes + 32);
  for (; i < n; ++i) {
    for (int s = 0; s < 8; s += kBits) best = std::max(best, (p[i] >> s) & kMask);
  }
  return best;
}

// ------------------------------------------------------------------------------------------------
// Decoding
// ------------------------------------------------------------------------------------------------

// Labels e .. e + 7 as int32 lanes, read from the group's first byte on (the caller makes sure that
// 8 bytes from there lie inside the stream). When every group starts on a byte boundary (kAligned)
// the bytes are broadcast straight from memory, which spares the shuffle port a move. 4-bit lanes
// keep the next labels' bits above bit 3: the permute lookups read only bits 0..3.
template <int kBits, bool kAligned>
inline __m256i labels8(const uint8_t* p, int64_t e) {
  const int64_t bit = e * kBits;
  const uint8_t* at = p + (bit >> 3);
  if constexpr (kBits == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at)));
  } else {
    uint32_t word;
    if constexpr (kAligned) {
      std::memcpy(&word, at, sizeof(word));
    } else {
      uint64_t wide;  // at most 4 + 32 bits of it are used
      std::memcpy(&wide, at, sizeof(wide));
      word = static_cast<uint32_t>(wide >> (bit & 7));
    }
    const __m256i shifts = _mm256_setr_epi32(0, kBits, 2 * kBits, 3 * kBits, 4 * kBits, 5 * kBits,
                                             6 * kBits, 7 * kBits);
    const __m256i lanes = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
    if constexpr (kBits == 4) return lanes;
    return _mm256_and_si256(lanes, _mm256_set1_epi32((1 << kBits) - 1));
  }
}

// How a label becomes its centroid: a register permute for k <= 8, two and a blend on label bit 3
// for k <= 16, a gather from the codebook beyond.
enum class Lookup { kPerm8, kPerm16, kGather };

struct RowLut {
  __m256 lo, hi;
  const float* codebook;

  RowLut(const float* cb, int64_t k) : codebook(cb) {
    float first[16] = {};  // centroids 0..15, zero-padded past k
    std::copy_n(cb, std::min<int64_t>(k, 16), first);
    lo = _mm256_loadu_ps(first);
    hi = _mm256_loadu_ps(first + 8);
  }
};

template <Lookup kLookup>
inline __m256 lookup(__m256i label, const RowLut& lut) {
  if constexpr (kLookup == Lookup::kPerm8) {
    return _mm256_permutevar8x32_ps(lut.lo, label);
  } else if constexpr (kLookup == Lookup::kPerm16) {
    const __m256 lo = _mm256_permutevar8x32_ps(lut.lo, label);
    const __m256 hi = _mm256_permutevar8x32_ps(lut.hi, label);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(label, 28)));
  } else {
    return _mm256_i32gather_ps(lut.codebook, label, 4);
  }
}

template <int kBits, Lookup kLookup>
void decode_rows(const LutWeight& w, int64_t r0, int64_t r1, float* out, int64_t ld) {
  decode_rows_by_groups<8, kBits, RowLut>(
      w, r0, r1, out, ld, [&](const RowLut& lut, int64_t e, float* dst, auto aligned) {
        _mm256_storeu_ps(
            dst, lookup<kLookup>(labels8<kBits, decltype(aligned)::value>(w.labels, e), lut));
      });
}

detail::LutDecodeFn decoder_for(int bits, int64_t k) {
  switch (bits) {
    case 1:
      return decode_rows<1, Lookup::kPerm8>;
    case 2:
      return decode_rows<2, Lookup::kPerm8>;
    case 4:
      return k <= 8 ? decode_rows<4, Lookup::kPerm8> : decode_rows<4, Lookup::kPerm16>;
    default:
      return k <= 8    ? decode_rows<8, Lookup::kPerm8>
             : k <= 16 ? decode_rows<8, Lookup::kPerm16>
                       : decode_rows<8, Lookup::kGather>;
  }
}

// ------------------------------------------------------------------------------------------------
// Linear
// ------------------------------------------------------------------------------------------------

// y[i][j] = x[i] . w[j] (+ bias[j]) for MR rows of x and NR rows of the decoded weight (rows of ldw
// floats, zero past K up to a multiple of 16).
template <int MR, int NR>
void micro_kernel(int64_t K, const float* x, int64_t ldx, const float* w, int64_t ldw,
                  const float* bias, float* y, int64_t ldy) {
  // The loops over the register block are unrolled so that acc stays in registers.
  __m256 acc[MR][NR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j][0] = acc[i][j][1] = _mm256_setzero_ps();
  }
  const int64_t k16 = K / kLutLanes * kLutLanes;
  for (int64_t k = 0; k < k16; k += kLutLanes) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m256 wv[NR];
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * ldw + k + 8 * h);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 xv = _mm256_loadu_ps(x + i * ldx + k + 8 * h);
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) acc[i][j][h] = _mm256_fmadd_ps(xv, wv[j], acc[i][j][h]);
      }
    }
  }
  if (k16 < K) {
    // Lanes past K keep their sums exactly (a masked x load reads nothing past the row).
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int rem = static_cast<int>(K - k16);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem - 8 * h), iota);
      __m256 wv[NR];
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * ldw + k16 + 8 * h);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 xv = _mm256_maskload_ps(x + i * ldx + k16 + 8 * h, live);
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) {
          acc[i][j][h] = _mm256_blendv_ps(acc[i][j][h], _mm256_fmadd_ps(xv, wv[j], acc[i][j][h]),
                                          _mm256_castsi256_ps(live));
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const float r = reduce_halves(_mm256_add_ps(acc[i][j][0], acc[i][j][1]));
      y[i * ldy + j] = bias != nullptr ? r + bias[j] : r;
    }
  }
}

// Register blocks: up to 3 rows of x times 2 weight rows (12 accumulators, 12 independent FMA
// chains; with the weight and input registers that is the 16 ymm registers).
constexpr detail::LutMicroFn kMicro[] = {micro_kernel<1, 1>, micro_kernel<1, 2>,
                                         micro_kernel<2, 1>, micro_kernel<2, 2>,
                                         micro_kernel<3, 1>, micro_kernel<3, 2>};

}  // namespace

int max_label_avx2(const uint8_t* packed, int64_t begin, int64_t end, int bits) {
  const int64_t per_byte = 8 / bits;
  // Elements outside the whole bytes [first, last) go through the scalar path.
  const int64_t first = (begin + per_byte - 1) / per_byte;
  const int64_t last = end / per_byte;
  if (first >= last) return max_label_ref(packed, begin, end, bits);
  const int edges = std::max(max_label_ref(packed, begin, first * per_byte, bits),
                             max_label_ref(packed, last * per_byte, end, bits));
  const uint8_t* p = packed + first;
  const int64_t n = last - first;
  switch (bits) {
    case 1:
      return std::max(edges, max_field<1>(p, n));
    case 2:
      return std::max(edges, max_field<2>(p, n));
    case 4:
      return std::max(edges, max_field<4>(p, n));
    default:
      return std::max(edges, max_field<8>(p, n));
  }
}

void lut_decode_rows_avx2(const LutWeight& w, int64_t r0, int64_t r1, float* out, int64_t ld) {
  decoder_for(w.bits, w.k)(w, r0, r1, out, ld);
}

void lut_linear_avx2(const LutWeight& w, int64_t M, const float* x, int64_t ldx, const float* bias,
                     int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const detail::LutIsaKernels isa{decoder_for(w.bits, w.k), kMicro, 3, 2};
  detail::lut_linear_blocked(isa, w, M, x, ldx, bias, n0, n1, y, ldy);
}

}  // namespace qext::kernels
