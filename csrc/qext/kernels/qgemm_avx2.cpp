// AVX2 integer GEMM (no VNNI), bit-identical to the scalar reference (qgemm_ref.cpp).
//
// Two micro-kernels read the same packed weight and share the K loop and the epilogue. Each call
// scans its A once (M rows of K bytes, cheap next to the GEMM) and takes the 7-bit kernel when no
// byte exceeds 127, the widening kernel otherwise. How each avoids int16 saturation:
// - Widening (any uint8 A): vpmaddubsw (u8 x s8 -> pairwise sum saturated to int16) would not be
//   exact, 255 * -128 * 2 = -65280 does not fit int16. Instead both operands are widened to int16
//   (A zero-extended by vpshufb, W sign-extended by shifts) and multiplied with vpmaddwd, whose
//   pairwise sums of int16 products are int32: |a0 w0 + a2 w2| <= 2 * 255 * 128 = 65280, far from
//   its one saturating case (-32768 * -32768 twice).
// - 7-bit (every A byte <= 127, e.g. the int8_avx2 preset's reduce_range levels 0..127):
//   vpmaddubsw is exact there, |a0 w0 + a1 w1| <= 2 * 127 * 128 = 32512 < 32767, and vpmaddwd
//   against int16 ones adds its pairs into int32 (|a0 w0 + ... + a3 w3| <= 65024, no saturation).
// The int32 accumulators then wrap modulo 2^32 exactly like the reference's uint32 sums, and the
// epilogue below is the reference's requantize() step by step.
//
// Blocking: 4 rows x 16 columns (one packed column block) per micro-kernel, K in the packed 4-byte
// groups. One group of the packed weight (64 bytes = 16 columns x 4 k) is two ymm; each row has
// two accumulators, columns 0..7 and 8..15, one int32 lane per column.
// - Widening: in each weight ymm the int16 word 2n holds (W[n][0], W[n][1]) and word 2n + 1 holds
//   (W[n][2], W[n][3]), so (word << 8) >> 8 (arithmetic) gives W[n][0] / W[n][2] and word >> 8
//   gives W[n][1] / W[n][3]; against A broadcast as int16 words (a0, a2) and (a1, a3), two
//   vpmaddwd give each column's 4-term dot product. Per row and group (64 MAC): 4 vpmaddwd,
//   2 vpshufb, 4 vpaddd, and the weight shifts; about 12 MAC/cycle measured.
// - 7-bit: the A dword (a0..a3) broadcast against the packed bytes as they are. Per row and group:
//   2 vpmaddubsw, 2 vpmaddwd (ones), 2 vpaddd. The 4 multiplies bound it at 32 MAC/cycle (two
//   multiply ports); the adds share those ports, about 24 MAC/cycle measured. More rows would
//   not raise that bound, and with 5 or 6 rows GCC 12 spills accumulators.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>

#include "qext/kernels/qgemm_isa.h"
#include "qext/kernels/requantize_avx2.h"

namespace qext::kernels::detail {
namespace {

constexpr int kMr = 4;

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// acc[r][0..1] += the products of one packed group (16 columns x 4 k) with row r's A dword
// a_dword(r), r < MR. Exact for any uint8 A (see the file comment).
struct WideningKernel {
  // Byte j of each dword of the broadcast A: a_j. Zero-extend a0, a2 (a1, a3) to int16 words.
  const __m256i ctl02 = _mm256_set1_epi32(static_cast<int32_t>(0x80028000u));
  const __m256i ctl13 = _mm256_set1_epi32(static_cast<int32_t>(0x80038001u));

  template <int MR, class ADword>
  void step(const int8_t* group, ADword a_dword, __m256i (&acc)[kMr][2]) const {
    const __m256i w0 = load256(group);
    const __m256i w1 = load256(group + 32);
    const __m256i w0_13 = _mm256_srai_epi16(w0, 8);
    const __m256i w0_02 = _mm256_srai_epi16(_mm256_slli_epi16(w0, 8), 8);
    const __m256i w1_13 = _mm256_srai_epi16(w1, 8);
    const __m256i w1_02 = _mm256_srai_epi16(_mm256_slli_epi16(w1, 8), 8);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256i ab = _mm256_set1_epi32(static_cast<int32_t>(a_dword(r)));
      const __m256i a02 = _mm256_shuffle_epi8(ab, ctl02);
      const __m256i a13 = _mm256_shuffle_epi8(ab, ctl13);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_add_epi32(_mm256_madd_epi16(w0_02, a02),
                                                               _mm256_madd_epi16(w0_13, a13)));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_add_epi32(_mm256_madd_epi16(w1_02, a02),
                                                               _mm256_madd_epi16(w1_13, a13)));
    }
  }
};

// The same step, exact only when every A byte is <= 127 (see the file comment).
struct SevenBitKernel {
  const __m256i ones = _mm256_set1_epi16(1);

  template <int MR, class ADword>
  void step(const int8_t* group, ADword a_dword, __m256i (&acc)[kMr][2]) const {
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256i ab = _mm256_set1_epi32(static_cast<int32_t>(a_dword(r)));
      for (int h = 0; h < 2; ++h) {
        const __m256i pairs = _mm256_maddubs_epi16(ab, load256(group + 32 * h));
        acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
};

// out[r][0..1] = sum over the first K k of A[r][k] * W[n][k], columns 0..7 / 8..15 of `block`.
// Shaped for GCC 12's register allocation of the K loop: out of line, with its own accumulators,
// the partial group first and the accumulators stored one column half after the other. Inlined
// into the epilogue, with the partial group last, or with out[r][0], out[r][1] stored in turn, it
// copies or spills accumulators in every step: 10-20% of the 7-bit kernel's speed.
template <class Kernel, int MR>
__attribute__((noinline)) void kernel_mxk(int64_t K, const uint8_t* a, int64_t lda,
                                          const int8_t* block, __m256i (&out)[kMr][2]) {
  const Kernel kernel;
  __m256i acc[kMr][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const uint8_t* rows[MR];
  for (int r = 0; r < MR; ++r) rows[r] = a + r * lda;
  const int64_t full = K / 4;
  if (const int64_t rem = K % 4; rem != 0) {
    // The last group has 1..3 valid k: copy those bytes of A (never read past a row's end) into a
    // zero-padded dword; the packed weight is zero there anyway.
    uint32_t av[MR];
    for (int r = 0; r < MR; ++r) {
      av[r] = 0;
      std::memcpy(&av[r], rows[r] + 4 * full, static_cast<size_t>(rem));
    }
    kernel.template step<MR>(
        block + 64 * full, [&](int r) { return av[r]; }, acc);
  }
  for (int64_t g = 0; g < full; ++g) {
    kernel.template step<MR>(
        block + 64 * g, [&](int r) { return load_u32(rows[r] + 4 * g); }, acc);
  }
  for (int r = 0; r < MR; ++r) out[r][0] = acc[r][0];
  for (int r = 0; r < MR; ++r) out[r][1] = acc[r][1];
}

// True when no byte of A's M rows of K bytes exceeds 127 (the 7-bit kernel is then exact).
bool is_7bit(int64_t M, int64_t K, const uint8_t* a, int64_t lda) {
  for (int64_t m = 0; m < M; ++m) {
    const uint8_t* row = a + m * lda;
    __m256i any = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) any = _mm256_or_si256(any, load256(row + k));
    unsigned tail = 0;
    for (; k < K; ++k) tail |= row[k];
    if (_mm256_movemask_epi8(any) != 0 || (tail & 0x80u) != 0) return false;
  }
  return true;
}

// Column parameters of one 16-column block, as two ymm each (columns 0..7, 8..15).
struct RequantCols {
  __m256i corr[2];
  avx2::Requant8 q[2];
};
struct FloatCols {
  __m256i corr[2];
  __m256 scale[2];
};

inline __m256i load8(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

RequantCols requant_cols(const RequantEpilogue& ep, int64_t n0, int nv) {
  alignas(32) int32_t corr[16];
  correction_block(ep.row_sums, ep.a_zero_point, ep.bias, n0, nv, corr);
  RequantCols c;
  for (int h = 0; h < 2; ++h) {
    c.corr[h] = load8(corr + 8 * h);
    c.q[h] = avx2::make_requant8(ep.multiplier + n0 + 8 * h, std::clamp(nv - 8 * h, 0, 8));
  }
  return c;
}

FloatCols float_cols(const FloatEpilogue& ep, int64_t n0, int nv) {
  alignas(32) int32_t corr[16];
  alignas(32) float scale[16];
  correction_block(ep.row_sums, ep.a_zero_point, ep.bias, n0, nv, corr);
  for (int i = 0; i < 16; ++i) scale[i] = i < nv ? ep.scale[n0 + i] : 0.0f;
  FloatCols c;
  for (int h = 0; h < 2; ++h) {
    c.corr[h] = load8(corr + 8 * h);
    c.scale[h] = _mm256_loadu_ps(scale + 8 * h);
  }
  return c;
}

// requantize() of qgemm.cpp on 8 lanes (lane h selects the column half).
inline __m256i requant8(__m256i acc, const RequantCols& p, int h, __m256i lo, __m256i hi,
                        __m256i zp) {
  __m256i x = avx2::requantize8(_mm256_add_epi32(acc, p.corr[h]), p.q[h]);
  // clamp(x + zp, out_min, out_max) = clamp(x, out_min - zp, out_max - zp) + zp (no overflow).
  x = _mm256_min_epi32(_mm256_max_epi32(x, lo), hi);
  return _mm256_add_epi32(x, zp);
}

template <class Kernel, int MR>
void block_requant(int64_t K, const uint8_t* a, int64_t lda, const int8_t* block,
                   const RequantCols& cols, const RequantEpilogue& ep, int nv, uint8_t* c,
                   int64_t ldc) {
  __m256i acc[kMr][2];
  kernel_mxk<Kernel, MR>(K, a, lda, block, acc);
  const __m256i lo = _mm256_set1_epi32(ep.out_min - ep.out_zero_point);
  const __m256i hi = _mm256_set1_epi32(ep.out_max - ep.out_zero_point);
  const __m256i zp = _mm256_set1_epi32(ep.out_zero_point);
  // Low byte of each dword: lane-local bytes 0..3 (columns 0..7 into dword 0 of each 128-bit lane,
  // 8..15 into dword 1), then dwords (0, 4, 1, 5) give columns 0..15 in order.
  const __m256i pick0 =
      _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1,
                       -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i pick1 =
      _mm256_setr_epi8(-1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                       0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 3, 6, 7);
  for (int r = 0; r < MR; ++r) {
    const __m256i q0 = requant8(acc[r][0], cols, 0, lo, hi, zp);
    const __m256i q1 = requant8(acc[r][1], cols, 1, lo, hi, zp);
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_or_si256(_mm256_shuffle_epi8(q0, pick0), _mm256_shuffle_epi8(q1, pick1)), order);
    const __m128i out = _mm256_castsi256_si128(bytes);
    uint8_t* dst = c + r * ldc;
    if (nv == 16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), out);
    } else {
      alignas(16) uint8_t tmp[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), out);
      std::memcpy(dst, tmp, static_cast<size_t>(nv));
    }
  }
}

template <class Kernel, int MR>
void block_float(int64_t K, const uint8_t* a, int64_t lda, const int8_t* block,
                 const FloatCols& cols, const FloatEpilogue& ep, int nv, float* c, int64_t ldc) {
  __m256i acc[kMr][2];
  kernel_mxk<Kernel, MR>(K, a, lda, block, acc);
  for (int r = 0; r < MR; ++r) {
    __m256 v[2];
    for (int h = 0; h < 2; ++h) {
      v[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(acc[r][h], cols.corr[h])),
                           cols.scale[h]);
      // vmaxps returns the second operand for NaN and for +-0: v > 0 ? v : +0, as the reference.
      if (ep.relu) v[h] = _mm256_max_ps(v[h], _mm256_setzero_ps());
    }
    float* dst = c + r * ldc;
    if (nv == 16) {
      _mm256_storeu_ps(dst, v[0]);
      _mm256_storeu_ps(dst + 8, v[1]);
    } else {
      alignas(32) float tmp[16];
      _mm256_store_ps(tmp, v[0]);
      _mm256_store_ps(tmp + 8, v[1]);
      std::memcpy(dst, tmp, sizeof(float) * static_cast<size_t>(nv));
    }
  }
}

// f(std::integral_constant<int, rows>) for a run-time rows in [1, R].
template <int R, class F>
inline void with_rows(int64_t rows, F f) {
  if constexpr (R > 0) {
    if (rows == R) return f(std::integral_constant<int, R>{});
    with_rows<R - 1>(rows, f);
  }
}

// Column blocks outer (the packed block stays in cache across the rows), kMr-row blocks inner.
// block(kernel, rows, a, packed block, cols, nv, c) runs one micro-kernel and its epilogue.
template <class Kernel, class Ep, class Out, class MakeCols, class Block>
void run_with(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
              const int8_t* packed_w, const Ep& ep, Out* c, int64_t ldc, MakeCols make_cols,
              Block block) {
  for (int64_t n0 = 0; n0 < N; n0 += kPackN) {
    const int nv = static_cast<int>(std::min<int64_t>(kPackN, N - n0));
    const int8_t* wblock = packed_w + packed_block_offset(n0, K);
    const auto cols = make_cols(ep, n0, nv);
    int64_t m0 = 0;
    for (; m0 + kMr <= M; m0 += kMr) {
      block(Kernel{}, std::integral_constant<int, kMr>{}, a + m0 * lda, wblock, cols, nv,
            c + m0 * ldc + n0);
    }
    with_rows<kMr - 1>(M - m0, [&](auto mr) {
      block(Kernel{}, mr, a + m0 * lda, wblock, cols, nv, c + m0 * ldc + n0);
    });
  }
}

template <class Ep, class Out, class MakeCols, class Block>
void run(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda, const int8_t* packed_w,
         const Ep& ep, Out* c, int64_t ldc, MakeCols make_cols, Block block) {
  if (is_7bit(M, K, a, lda)) {
    run_with<SevenBitKernel>(M, N, K, a, lda, packed_w, ep, c, ldc, make_cols, block);
  } else {
    run_with<WideningKernel>(M, N, K, a, lda, packed_w, ep, c, ldc, make_cols, block);
  }
}

}  // namespace

void qgemm_avx2(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                const int8_t* packed_w, const RequantEpilogue& ep, uint8_t* c, int64_t ldc) {
  run(M, N, K, a, lda, packed_w, ep, c, ldc, requant_cols,
      [&](auto kernel, auto mr, const uint8_t* ar, const int8_t* wb, const RequantCols& cols,
          int nv, uint8_t* cr) {
        block_requant<decltype(kernel), decltype(mr)::value>(K, ar, lda, wb, cols, ep, nv, cr, ldc);
      });
}

void qgemm_avx2(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                const int8_t* packed_w, const FloatEpilogue& ep, float* c, int64_t ldc) {
  run(M, N, K, a, lda, packed_w, ep, c, ldc, float_cols,
      [&](auto kernel, auto mr, const uint8_t* ar, const int8_t* wb, const FloatCols& cols, int nv,
          float* cr) {
        block_float<decltype(kernel), decltype(mr)::value>(K, ar, lda, wb, cols, ep, nv, cr, ldc);
      });
}

}  // namespace qext::kernels::detail
