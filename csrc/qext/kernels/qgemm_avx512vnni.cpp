// AVX-512 VNNI integer GEMM and the AVX-512 epilogue shared with the AMX path; bit-identical to the
// scalar reference (qgemm_ref.cpp).
//
// Exactness: vpdpbusd multiplies u8 x s8 pairs into int32 (no int16 intermediate: each 4-term sum
// is at most 4 * 255 * 128 in magnitude) and adds them to the int32 accumulator with wrap-around
// (the saturating form is vpdpbusds, not used), i.e. modulo 2^32 like the reference's uint32 sums.
// The epilogue (requant16) is the reference's requantize() in 64-bit lanes; the tests compare every
// path bit for bit.
//
// Blocking: a micro-kernel computes kMr rows x kNb column blocks (16 columns each) over all of K in
// kMr * kNb zmm accumulators: per packed group (4 k) it loads one zmm of weights per column block
// (64 bytes = 16 columns x 4 k), broadcasts 4 bytes of each A row and issues kMr * kNb vpdpbusd
// (2 per cycle on Sapphire Rapids; 24 independent accumulators hide its 5-cycle latency). The sums
// go to a small stack tile and the epilogue writes C with masked stores (column tails). Column
// panels of kNb blocks are the outer loop (the panel of the packed weight stays in L1/L2 across the
// row blocks), row blocks the inner one; M and N tails use the smaller instantiations. A is read in
// place: the last, partial group of K (K % 4 != 0) goes through a zero-padded copy of the 1..3
// valid bytes, so no byte past a row's end is read.
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_*() after inlining
// (GCC bug 105593, fixed in 13); the diagnostics are located in the header, so silence them there.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <utility>

#include "qext/kernels/qgemm_isa.h"

namespace qext::kernels::detail {
namespace {

constexpr int kMr = 8;  // rows per micro-kernel
constexpr int kNb = 3;  // 16-column blocks per micro-kernel

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline __mmask16 column_mask(int64_t valid) {
  return valid >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : static_cast<__mmask16>((1u << static_cast<unsigned>(valid)) - 1u);
}

// Per-column parameters of one 16-column block.
// The 64-bit lanes (round_*, shift_*) hold the even columns 0, 2, .., 14 (_even) and the odd ones
// 1, 3, .., 15 (_odd); mult_odd has the odd columns' multipliers in the low dwords.
struct RequantCols {
  __m512i corr, mult, mult_odd, lshift;
  __m512i round_even, round_odd, shift_even, shift_odd;
  bool any_lshift;  // some column has exponent > 0
};
struct FloatCols {
  __m512i corr;
  __m512 scale;
};
// Per-call constants of the requantization.
struct RequantConsts {
  __m512i lo, hi, zp;
};

// corr[n] = bias[n] - a_zero_point * row_sums[n] modulo 2^32; columns past nv get harmless values.
inline __m512i correction(const int32_t* row_sums, int32_t a_zero_point, const int32_t* bias,
                          int64_t n0, int nv) {
  alignas(64) int32_t out[16];
  for (int i = 0; i < 16; ++i) {
    uint32_t v = 0;
    if (i < nv) {
      v = 0u - static_cast<uint32_t>(a_zero_point) * static_cast<uint32_t>(row_sums[n0 + i]);
      if (bias != nullptr) v += static_cast<uint32_t>(bias[n0 + i]);
    }
    out[i] = static_cast<int32_t>(v);
  }
  return _mm512_load_si512(out);
}

RequantCols requant_cols(const RequantEpilogue& ep, int64_t n0, int nv) {
  alignas(64) int32_t mult[16], lsh[16];
  alignas(64) int64_t round[2][8], shift[2][8];
  RequantCols c;
  c.any_lshift = false;
  for (int i = 0; i < 16; ++i) {
    const FixedPointMultiplier m =
        i < nv ? ep.multiplier[n0 + i] : FixedPointMultiplier{1 << 30, 0};
    const int r = std::max(-m.exponent, 0);
    mult[i] = m.multiplier;
    lsh[i] = std::max(m.exponent, 0);
    c.any_lshift |= lsh[i] > 0;
    round[i % 2][i / 2] = (int64_t{1} << (30 + r)) + m.offset;
    shift[i % 2][i / 2] = 31 + r;
  }
  c.corr = correction(ep.row_sums, ep.a_zero_point, ep.bias, n0, nv);
  c.mult = _mm512_load_si512(mult);
  c.mult_odd = _mm512_srli_epi64(c.mult, 32);
  c.lshift = _mm512_load_si512(lsh);
  c.round_even = _mm512_load_si512(round[0]);
  c.round_odd = _mm512_load_si512(round[1]);
  c.shift_even = _mm512_load_si512(shift[0]);
  c.shift_odd = _mm512_load_si512(shift[1]);
  return c;
}

FloatCols float_cols(const FloatEpilogue& ep, int64_t n0, int nv) {
  FloatCols c;
  c.corr = correction(ep.row_sums, ep.a_zero_point, ep.bias, n0, nv);
  c.scale = _mm512_maskz_loadu_ps(column_mask(nv), ep.scale + n0);
  return c;
}

RequantConsts requant_consts(const RequantEpilogue& ep) {
  // The dispatcher checked that out_min - zp and out_max - zp fit int32.
  return {_mm512_set1_epi32(static_cast<int32_t>(int64_t{ep.out_min} - ep.out_zero_point)),
          _mm512_set1_epi32(static_cast<int32_t>(int64_t{ep.out_max} - ep.out_zero_point)),
          _mm512_set1_epi32(ep.out_zero_point)};
}

// requantize() of qgemm.cpp on 16 lanes; acc is the raw product sum (before the correction):
// with z = x * M and r = max(-exponent, 0), floor((z + 2^(30+r) + offset) / 2^(31+r)) in 64-bit
// lanes. |z + 2^(30+r) + offset| < 2^62 + 2^61 + 2^30, and the result fits int32 since M < 2^31.
inline __m512i requant16(__m512i acc, const RequantCols& p, const RequantConsts& k) {
  __m512i x = _mm512_add_epi32(acc, p.corr);
  if (p.any_lshift) {
    // Saturating x * 2^lshift: the shift overflowed iff shifting back does not give x; then the
    // result is INT32_MIN or INT32_MAX by the sign of x ((x >> 31) ^ INT32_MAX).
    const __m512i s = _mm512_sllv_epi32(x, p.lshift);
    const __mmask16 ok = _mm512_cmpeq_epi32_mask(_mm512_srav_epi32(s, p.lshift), x);
    const __m512i sat = _mm512_xor_si512(_mm512_srai_epi32(x, 31),
                                         _mm512_set1_epi32(std::numeric_limits<int32_t>::max()));
    x = _mm512_mask_blend_epi32(ok, sat, s);
  }
  // Even columns: the product of the low dwords of the 64-bit lanes; odd columns: of the high
  // dwords moved down (vpshufd, off the shift port). vpmuldq takes the signed low dwords.
  const __m512i x_odd =
      _mm512_shuffle_epi32(x, static_cast<_MM_PERM_ENUM>(_MM_SHUFFLE(3, 3, 1, 1)));
  __m512i even = _mm512_mul_epi32(x, p.mult);
  __m512i odd = _mm512_mul_epi32(x_odd, p.mult_odd);
  even = _mm512_srav_epi64(_mm512_add_epi64(even, p.round_even), p.shift_even);
  odd = _mm512_srav_epi64(_mm512_add_epi64(odd, p.round_odd), p.shift_odd);
  // The results are the low dwords; move the odd ones up and interleave.
  odd = _mm512_shuffle_epi32(odd, static_cast<_MM_PERM_ENUM>(_MM_SHUFFLE(2, 2, 0, 0)));
  x = _mm512_mask_blend_epi32(static_cast<__mmask16>(0xAAAA), even, odd);
  // clamp(x + zp, out_min, out_max) = clamp(x, out_min - zp, out_max - zp) + zp (no overflow).
  x = _mm512_min_epi32(_mm512_max_epi32(x, k.lo), k.hi);
  return _mm512_add_epi32(x, k.zp);
}

inline __m512 float16(__m512i acc, const FloatCols& p, bool relu) {
  __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc, p.corr)), p.scale);
  // vmaxps returns the second operand for NaN and for +-0: v > 0 ? v : +0, as the reference.
  if (relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
  return v;
}

// The epilogue of one column panel (up to kNb blocks of 16 columns), applied by the micro-kernels.
struct RequantPanel {
  RequantCols cols[kNb];
  __mmask16 mask[kNb];
  RequantConsts k;
  uint8_t* c;  // column n0 of row 0
  int64_t ldc;

  RequantPanel(const RequantEpilogue& ep, int64_t n0, int64_t N, int nb, uint8_t* c_, int64_t ldc_)
      : k(requant_consts(ep)), c(c_), ldc(ldc_) {
    for (int j = 0; j < nb; ++j) {
      const int64_t valid = N - n0 - 16 * j;
      cols[j] = requant_cols(ep, n0 + 16 * j, static_cast<int>(std::min<int64_t>(valid, 16)));
      mask[j] = column_mask(valid);
    }
  }
  // Rows row0 .. row0 + rows - 1 of column block j from raw products (row i at acc + i * ld_acc).
  // The parameters are copied to locals first: the byte stores may alias *this, which would make
  // the compiler reload them for every row.
  inline void store_rows(int j, int64_t row0, int64_t rows, const int32_t* acc,
                         int64_t ld_acc) const {
    const RequantCols p = cols[j];
    const RequantConsts kk = k;
    const __mmask16 m = mask[j];
    uint8_t* dst = c + row0 * ldc + 16 * j;
    for (int64_t i = 0; i < rows; ++i) {
      const __m512i v = _mm512_maskz_loadu_epi32(m, acc + i * ld_acc);
      _mm512_mask_cvtepi32_storeu_epi8(dst + i * ldc, m, requant16(v, p, kk));
    }
  }
};

struct FloatPanel {
  FloatCols cols[kNb];
  __mmask16 mask[kNb];
  bool relu;
  float* c;
  int64_t ldc;

  FloatPanel(const FloatEpilogue& ep, int64_t n0, int64_t N, int nb, float* c_, int64_t ldc_)
      : relu(ep.relu), c(c_), ldc(ldc_) {
    for (int j = 0; j < nb; ++j) {
      const int64_t valid = N - n0 - 16 * j;
      cols[j] = float_cols(ep, n0 + 16 * j, static_cast<int>(std::min<int64_t>(valid, 16)));
      mask[j] = column_mask(valid);
    }
  }
  inline void store_rows(int j, int64_t row0, int64_t rows, const int32_t* acc,
                         int64_t ld_acc) const {
    const FloatCols p = cols[j];
    const __mmask16 m = mask[j];
    const bool r = relu;
    float* dst = c + row0 * ldc + 16 * j;
    for (int64_t i = 0; i < rows; ++i) {
      const __m512i v = _mm512_maskz_loadu_epi32(m, acc + i * ld_acc);
      _mm512_mask_storeu_ps(dst + i * ldc, m, float16(v, p, r));
    }
  }
};

// acc[r][j] += A[r][4 g .. 4 g + 3] . W[16 j + n][4 g .. 4 g + 3] for one packed group g: wg is the
// group in column block 0 (block j at wg + j * bstride), row r's 4 bytes at ag + r * ld.
template <int MR, int NB>
__attribute__((always_inline)) inline void dp_group(__m512i (&acc)[MR][NB], const int8_t* wg,
                                                    int64_t bstride, const uint8_t* ag,
                                                    int64_t ld) {
  __m512i wv[NB];
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_si512(wg + j * bstride);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const __m512i av = _mm512_set1_epi32(static_cast<int32_t>(load_u32(ag + r * ld)));
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, wv[j]);
  }
}

// out[r][16 j + n] = sum_k A[r][k] W[16 j + n][k] for MR rows (A at a, row stride lda) and NB
// column blocks (block j at w + j * bstride), accumulated over all of K in MR * NB zmm registers.
// The groups run in one loop; at the last, partial group (K % 4 != 0) the A pointer switches to a
// zero-padded copy of the rows' 1..3 remaining bytes. Keep this shape, and the epilogue out of this
// function: a separate tail step after the loop, or the epilogue on the registers, makes GCC 12
// keep memory copies of the accumulators inside the loop (about half the speed).
// With fewer than 8 accumulators the vpdpbusd latency (5 cycles, 2 per cycle) would stall, so small
// tiles keep a second accumulator set for the odd groups and add it at the end (exact: both wrap
// modulo 2^32).
template <int MR, int NB>
__attribute__((noinline)) void dot_tile(int64_t K, const uint8_t* a, int64_t lda, const int8_t* w,
                                        int64_t bstride, int32_t* out) {
  constexpr bool kSplit = MR * NB < 8;
  __m512i acc[MR][NB], acc1[MR][NB];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[r][j] = acc1[r][j] = _mm512_setzero_si512();
  }
  const int64_t full = K / 4, rem = K % 4, groups = (K + 3) / 4;
  alignas(64) uint8_t tail[4 * MR] = {};
  if (rem != 0) {
    for (int r = 0; r < MR; ++r) {
      std::memcpy(tail + 4 * r, a + r * lda + 4 * full, static_cast<size_t>(rem));
    }
  }
  const uint8_t* ag = a;
  int64_t ld = lda;
  int64_t g = 0;
  if constexpr (kSplit) {
    for (; g + 2 <= full; g += 2) {
      dp_group<MR, NB>(acc, w + 64 * g, bstride, ag, ld);
      dp_group<MR, NB>(acc1, w + 64 * (g + 1), bstride, ag + 4, ld);
      ag += 8;
    }
  }
  for (; g < groups; ++g) {
    if (g == full) {
      ag = tail;
      ld = 4;
    }
    dp_group<MR, NB>(acc, w + 64 * g, bstride, ag, ld);
    ag += 4;
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      const __m512i v = kSplit ? _mm512_add_epi32(acc[r][j], acc1[r][j]) : acc[r][j];
      _mm512_store_si512(out + (r * NB + j) * 16, v);
    }
  }
}

// MR rows x NB column blocks of C: the products (dot_tile), then the panel's epilogue for rows
// row0 .. row0 + MR - 1.
template <int MR, int NB, class Panel>
void micro_kernel(int64_t K, const uint8_t* a, int64_t lda, const int8_t* w, int64_t bstride,
                  const Panel& panel, int64_t row0) {
  alignas(64) int32_t tile[MR * NB * 16];
  dot_tile<MR, NB>(K, a, lda, w, bstride, tile);
  for (int j = 0; j < NB; ++j) panel.store_rows(j, row0, MR, tile + 16 * j, 16 * NB);
}

template <class Panel>
using KernelFn = void (*)(int64_t, const uint8_t*, int64_t, const int8_t*, int64_t, const Panel&,
                          int64_t);

template <class Panel, int MR, int... J>
constexpr std::array<KernelFn<Panel>, sizeof...(J)> kernel_row(std::integer_sequence<int, J...>) {
  return {&micro_kernel<MR, J + 1, Panel>...};
}

// table[mr - 1][nb - 1] = micro_kernel<mr, nb>.
template <class Panel, int... R>
constexpr std::array<std::array<KernelFn<Panel>, kNb>, sizeof...(R)> kernel_table(
    std::integer_sequence<int, R...>) {
  return {kernel_row<Panel, R + 1>(std::make_integer_sequence<int, kNb>{})...};
}

template <class Panel, class Ep, class Out>
void run(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda, const int8_t* packed_w,
         const Ep& ep, Out* c, int64_t ldc) {
  static constexpr auto table = kernel_table<Panel>(std::make_integer_sequence<int, kMr>{});
  const int64_t bstride = kPackN * packed_k(K);
  for (int64_t n0 = 0; n0 < N; n0 += kNb * kPackN) {
    const int nb = static_cast<int>(std::min<int64_t>(kNb, (N - n0 + kPackN - 1) / kPackN));
    const Panel panel(ep, n0, N, nb, c + n0, ldc);
    const int8_t* w = packed_w + packed_block_offset(n0, K);
    for (int64_t m0 = 0; m0 < M; m0 += kMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMr, M - m0));
      table[mr - 1][nb - 1](K, a + m0 * lda, lda, w, bstride, panel, m0);
    }
  }
}

template <class Panel, class Ep, class Out>
void epilogue_block(const int32_t* acc, int64_t ld_acc, int64_t M, int64_t N, const Ep& ep, Out* c,
                    int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += kPackN) {
    const Panel panel(ep, n0, N, 1, c + n0, ldc);
    panel.store_rows(0, 0, M, acc + n0, ld_acc);
  }
}

}  // namespace

void qgemm_avx512vnni(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                      const int8_t* packed_w, const RequantEpilogue& ep, uint8_t* c, int64_t ldc) {
  run<RequantPanel>(M, N, K, a, lda, packed_w, ep, c, ldc);
}

void qgemm_avx512vnni(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                      const int8_t* packed_w, const FloatEpilogue& ep, float* c, int64_t ldc) {
  run<FloatPanel>(M, N, K, a, lda, packed_w, ep, c, ldc);
}

void epilogue_block_avx512(const int32_t* acc, int64_t ld_acc, int64_t M, int64_t N,
                           const RequantEpilogue& ep, uint8_t* c, int64_t ldc) {
  epilogue_block<RequantPanel>(acc, ld_acc, M, N, ep, c, ldc);
}

void epilogue_block_avx512(const int32_t* acc, int64_t ld_acc, int64_t M, int64_t N,
                           const FloatEpilogue& ep, float* c, int64_t ldc) {
  epilogue_block<FloatPanel>(acc, ld_acc, M, N, ep, c, ldc);
}

}  // namespace qext::kernels::detail
