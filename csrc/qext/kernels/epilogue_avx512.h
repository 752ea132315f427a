// The AVX-512 epilogue of the integer GEMM (qgemm.h: requantization or float output of raw int32
// sums), shared by the VNNI GEMM, the AMX GEMM and the AMX implicit convolution. Include only
// from translation units compiled with the AVX-512 flags (CMakeLists.txt). Bit-identical to
// requantize() of qgemm.cpp; the tests compare every path with the scalar reference.
#pragma once

// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_*() after inlining
// (GCC bug 105593, fixed in 13); the diagnostics are located in the header, so silence them there.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cstdint>
#include <limits>

#include "qext/kernels/qgemm_isa.h"

namespace qext::kernels::detail::avx512 {

constexpr int kPanelBlocks = 3;  // 16-column blocks one panel holds

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
// How a requantized vector is narrowed to bytes. When out_max is the top of the byte's range, a
// saturating narrow applies it and the vpminsd is left out (one vector instruction in 13).
enum class Narrow {
  kTruncate,  // clamp to [out_min, out_max], keep the low 8 bits
  // out_max 255, out_min >= 0: clamp below, add zp, vpmovusdb. x + zp may wrap past INT32_MAX, but
  // only to unsigned values above 255, which saturate as they should.
  kSaturateUnsigned,
  // out_max 127, out_min >= -128, zp <= 0 (x + zp cannot wrap): clamp below, add zp, vpmovsdb.
  kSaturateSigned,
};

// Per-call constants of the requantization.
struct RequantConsts {
  __m512i lo, hi, zp;
  Narrow narrow;
};

// corr[n] = bias[n] - a_zero_point * row_sums[n] modulo 2^32 (correction_block).
inline __m512i correction(const int32_t* row_sums, int32_t a_zero_point, const int32_t* bias,
                          int64_t n0, int nv) {
  alignas(64) int32_t out[16];
  correction_block(row_sums, a_zero_point, bias, n0, nv, out);
  return _mm512_load_si512(out);
}

// fold_zero_point (every column's exponent in [kFoldMinExponent, -1], see PairPath): the output
// zero point is added in the rounding term, zp * 2^(31+r), and the odd columns shift by 32 less,
// which leaves their results in the high dwords.
inline RequantCols requant_cols(const RequantEpilogue& ep, int64_t n0, int nv,
                                bool fold_zero_point = false) {
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
    round[i % 2][i / 2] =
        (int64_t{1} << (30 + r)) + m.offset +
        (fold_zero_point ? int64_t{ep.out_zero_point} * (int64_t{1} << (31 + r)) : 0);
    shift[i % 2][i / 2] = 31 + r - (fold_zero_point && i % 2 ? 32 : 0);
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

inline FloatCols float_cols(const FloatEpilogue& ep, int64_t n0, int nv) {
  FloatCols c;
  c.corr = correction(ep.row_sums, ep.a_zero_point, ep.bias, n0, nv);
  c.scale = _mm512_maskz_loadu_ps(column_mask(nv), ep.scale + n0);
  return c;
}

inline RequantConsts requant_consts(const RequantEpilogue& ep) {
  // The dispatcher checked that out_min - zp and out_max - zp fit int32.
  const Narrow narrow = ep.out_max == 255 && ep.out_min >= 0 ? Narrow::kSaturateUnsigned
                        : ep.out_max == 127 && ep.out_min >= -128 && ep.out_zero_point <= 0
                            ? Narrow::kSaturateSigned
                            : Narrow::kTruncate;
  return {_mm512_set1_epi32(static_cast<int32_t>(int64_t{ep.out_min} - ep.out_zero_point)),
          _mm512_set1_epi32(static_cast<int32_t>(int64_t{ep.out_max} - ep.out_zero_point)),
          _mm512_set1_epi32(ep.out_zero_point), narrow};
}

// (x * M + round) >> shift in 64-bit lanes: `even` for the even columns (the products of the low
// dwords), `odd` for the odd ones (the high dwords moved down by vpshufd, off the shift port;
// vpmuldq takes the signed low dwords).
inline void rounded_products(__m512i x, const RequantCols& p, __m512i* even, __m512i* odd) {
  const __m512i x_odd =
      _mm512_shuffle_epi32(x, static_cast<_MM_PERM_ENUM>(_MM_SHUFFLE(3, 3, 1, 1)));
  *even =
      _mm512_srav_epi64(_mm512_add_epi64(_mm512_mul_epi32(x, p.mult), p.round_even), p.shift_even);
  *odd = _mm512_srav_epi64(_mm512_add_epi64(_mm512_mul_epi32(x_odd, p.mult_odd), p.round_odd),
                           p.shift_odd);
}

// requantize() of qgemm.cpp on 16 lanes, before the clamp: acc is the raw product sum (before the
// correction); with z = x * M and r = max(-exponent, 0), floor((z + 2^(30+r) + offset) /
// 2^(31+r)) in 64-bit lanes. |z + 2^(30+r) + offset| < 2^62 + 2^61 + 2^30, and the result fits
// int32 since M < 2^31.
inline __m512i requant16_unclamped(__m512i acc, const RequantCols& p) {
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
  __m512i even, odd;
  rounded_products(x, p, &even, &odd);
  // The results are the low dwords of each 64-bit lane: interleave them in one permute (dword i of
  // x is dword i of even for even i, dword i - 1 of odd for odd i).
  const __m512i interleave =
      _mm512_set_epi32(30, 14, 28, 12, 26, 10, 24, 8, 22, 6, 20, 4, 18, 2, 16, 0);
  return _mm512_permutex2var_epi32(even, interleave, odd);
}

// requant16_unclamped + zp for columns set up with fold_zero_point (no left shifts there): the odd
// columns' results are already in the high dwords, so a blend (either port) replaces the permute.
inline __m512i requant16_folded(__m512i acc, const RequantCols& p) {
  __m512i even, odd;
  rounded_products(_mm512_add_epi32(acc, p.corr), p, &even, &odd);
  return _mm512_mask_blend_epi32(0xAAAA, even, odd);
}

inline __m512 float16(__m512i acc, const FloatCols& p, bool relu) {
  __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc, p.corr)), p.scale);
  // vmaxps returns the second operand for NaN and for +-0: v > 0 ? v : +0, as the reference.
  if (relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
  return v;
}

// Lowest exponent whose columns can fold the zero point into the rounding (requant_cols): with
// r <= 21 and |zp| <= 256, zp * 2^(31+r) <= 2^60, so the 64-bit sum stays below 2^63.
constexpr int kFoldMinExponent = -21;
constexpr int32_t kFoldMaxZeroPoint = 256;

// How RequantPanel stores its blocks 0 and 1 (columns n0 .. n0 + 31).
enum class PairPath {
  kNone,  // block by block: vpmovusdb / vpmovsdb / vpmovdb stores of 16 bytes
  // Both blocks full, every exponent in [kFoldMinExponent, -1] (no left shift; the zero point folds
  // into the rounding and the result plus zp fits int32, since |result| < 2^30 for r >= 1), and
  // [out_min, out_max] within the uint8 (kUnsigned) or the int8 (kSigned) range: two rows of both
  // blocks are narrowed together by saturating packs, clamped once per 64 bytes, stored as 32-byte
  // rows. About 30% faster than block by block (microbenchmark, 2 x 624 rows of 32 columns).
  kUnsigned,
  kSigned,
};

inline PairPath pair_path(const RequantEpilogue& ep, int64_t n0, int64_t N, int nb) {
  if (nb < 2 || N - n0 < 32) return PairPath::kNone;
  if (ep.out_zero_point < -kFoldMaxZeroPoint || ep.out_zero_point > kFoldMaxZeroPoint) {
    return PairPath::kNone;
  }
  for (int64_t n = n0; n < n0 + 32; ++n) {
    const int32_t e = ep.multiplier[n].exponent;
    if (e > -1 || e < kFoldMinExponent) return PairPath::kNone;
  }
  if (ep.out_min >= 0 && ep.out_max <= 255) return PairPath::kUnsigned;
  if (ep.out_min >= -128 && ep.out_max <= 127) return PairPath::kSigned;
  return PairPath::kNone;
}

// The epilogue of one column panel (up to kPanelBlocks blocks of 16 columns), prepared once (the
// per-column set-up costs about as much as a few rows) and applied to any number of rows.
struct RequantPanel {
  RequantCols cols[kPanelBlocks];  // blocks 0 and 1 set up with fold_zero_point when pair != kNone
  __mmask16 mask[kPanelBlocks];
  RequantConsts k;
  __m512i out_min8, out_max8;  // out_min / out_max in every byte (the pair path)
  PairPath pair;
  int nb;
  uint8_t* c;  // column n0 of row 0
  int64_t ldc;

  RequantPanel(const RequantEpilogue& ep, int64_t n0, int64_t N, int nb_, uint8_t* c_, int64_t ldc_)
      : k(requant_consts(ep)),
        out_min8(_mm512_set1_epi8(static_cast<char>(ep.out_min))),
        out_max8(_mm512_set1_epi8(static_cast<char>(ep.out_max))),
        pair(pair_path(ep, n0, N, nb_)),
        nb(nb_),
        c(c_),
        ldc(ldc_) {
    for (int j = 0; j < nb; ++j) {
      const int64_t valid = N - n0 - 16 * j;
      cols[j] = requant_cols(ep, n0 + 16 * j, static_cast<int>(std::min<int64_t>(valid, 16)),
                             j < 2 && pair != PairPath::kNone);
      mask[j] = column_mask(valid);
    }
  }

  // Rows row0 .. row0 + rows - 1 of the panel's blocks from raw products (row i of block j at
  // acc + i * ld_acc + 16 j).
  inline void store_rows(int64_t row0, int64_t rows, const int32_t* acc, int64_t ld_acc) const {
    int j = 0;
    if (pair != PairPath::kNone) {
      if (pair == PairPath::kSigned) {
        store_pairs<true>(row0, rows, acc, ld_acc);
      } else {
        store_pairs<false>(row0, rows, acc, ld_acc);
      }
      j = 2;
    }
    for (; j < nb; ++j) store_block(j, row0, rows, acc + 16 * j, ld_acc);
  }

 private:
  // Blocks 0 and 1 (PairPath). The parameters are copied to locals first: the byte stores may alias
  // *this, which would make the compiler reload them for every row.
  template <bool kSigned>
  inline void store_pairs(int64_t row0, int64_t rows, const int32_t* acc, int64_t ld_acc) const {
    const RequantCols p0 = cols[0], p1 = cols[1];
    const __m512i lo = out_min8, hi = out_max8;
    // After the two packs, dword t of 128-bit lane l holds columns 4 l .. 4 l + 3 of: (t = 0) row
    // a's block 0, (1) row a's block 1, (2) row b's block 0, (3) row b's block 1. `order` puts row
    // a's 32 bytes in the low half and row b's in the high half.
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    auto pack_rows = [&](const int32_t* a, const int32_t* b) {
      const __m512i ra = _mm512_packs_epi32(requant16_folded(_mm512_loadu_si512(a), p0),
                                            requant16_folded(_mm512_loadu_si512(a + 16), p1));
      const __m512i rb = _mm512_packs_epi32(requant16_folded(_mm512_loadu_si512(b), p0),
                                            requant16_folded(_mm512_loadu_si512(b + 16), p1));
      const __m512i bytes = _mm512_permutexvar_epi32(
          order, kSigned ? _mm512_packs_epi16(ra, rb) : _mm512_packus_epi16(ra, rb));
      return kSigned ? _mm512_min_epi8(_mm512_max_epi8(bytes, lo), hi)
                     : _mm512_min_epu8(_mm512_max_epu8(bytes, lo), hi);
    };
    uint8_t* dst = c + row0 * ldc;
    int64_t i = 0;
    for (; i + 2 <= rows; i += 2) {
      const __m512i bytes = pack_rows(acc + i * ld_acc, acc + (i + 1) * ld_acc);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * ldc), _mm512_castsi512_si256(bytes));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (i + 1) * ldc),
                          _mm512_extracti64x4_epi64(bytes, 1));
    }
    if (i < rows) {  // an odd last row, paired with itself
      const __m512i bytes = pack_rows(acc + i * ld_acc, acc + i * ld_acc);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * ldc), _mm512_castsi512_si256(bytes));
    }
  }

  // Block j alone. Locals as in store_pairs.
  inline void store_block(int j, int64_t row0, int64_t rows, const int32_t* acc,
                          int64_t ld_acc) const {
    const RequantCols p = cols[j];
    const __m512i lo = k.lo, hi = k.hi, zp = k.zp;
    const __mmask16 m = mask[j];
    uint8_t* dst = c + row0 * ldc + 16 * j;
    // clamp(x + zp, out_min, out_max) = clamp(x, out_min - zp, out_max - zp) + zp (no overflow);
    // the upper clamp by the saturating narrow where it is the same.
    auto rows_loop = [&](auto narrow) {
      for (int64_t i = 0; i < rows; ++i) {
        const __m512i x = requant16_unclamped(_mm512_maskz_loadu_epi32(m, acc + i * ld_acc), p);
        narrow(dst + i * ldc, _mm512_max_epi32(x, lo));
      }
    };
    switch (k.narrow) {
      case Narrow::kSaturateUnsigned:
        rows_loop([m, zp](uint8_t* out, __m512i x) {
          _mm512_mask_cvtusepi32_storeu_epi8(out, m, _mm512_add_epi32(x, zp));
        });
        break;
      case Narrow::kSaturateSigned:
        rows_loop([m, zp](uint8_t* out, __m512i x) {
          _mm512_mask_cvtsepi32_storeu_epi8(out, m, _mm512_add_epi32(x, zp));
        });
        break;
      case Narrow::kTruncate:
        rows_loop([m, hi, zp](uint8_t* out, __m512i x) {
          _mm512_mask_cvtepi32_storeu_epi8(out, m, _mm512_add_epi32(_mm512_min_epi32(x, hi), zp));
        });
        break;
    }
  }
};

struct FloatPanel {
  FloatCols cols[kPanelBlocks];
  __mmask16 mask[kPanelBlocks];
  bool relu;
  int nb;
  float* c;
  int64_t ldc;

  FloatPanel(const FloatEpilogue& ep, int64_t n0, int64_t N, int nb_, float* c_, int64_t ldc_)
      : relu(ep.relu), nb(nb_), c(c_), ldc(ldc_) {
    for (int j = 0; j < nb; ++j) {
      const int64_t valid = N - n0 - 16 * j;
      cols[j] = float_cols(ep, n0 + 16 * j, static_cast<int>(std::min<int64_t>(valid, 16)));
      mask[j] = column_mask(valid);
    }
  }
  // As RequantPanel::store_rows.
  inline void store_rows(int64_t row0, int64_t rows, const int32_t* acc, int64_t ld_acc) const {
    for (int j = 0; j < nb; ++j) {
      const FloatCols p = cols[j];
      const __mmask16 m = mask[j];
      const bool r = relu;
      float* dst = c + row0 * ldc + 16 * j;
      for (int64_t i = 0; i < rows; ++i) {
        const __m512i v = _mm512_maskz_loadu_epi32(m, acc + i * ld_acc + 16 * j);
        _mm512_mask_storeu_ps(dst + i * ldc, m, float16(v, p, r));
      }
    }
  }
};

}  // namespace qext::kernels::detail::avx512
