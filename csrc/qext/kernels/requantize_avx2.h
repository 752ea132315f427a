// requantize() of qgemm.h on 8 int32 lanes with AVX2, for the AVX2 translation units (compiled
// with -mavx2) of the GEMM and the depthwise convolution. Bit-identical to the scalar requantize().
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "qext/kernels/qgemm.h"

namespace qext::kernels::avx2 {

// The constants of 8 consecutive channels. The 64-bit ones (round_*, shift_*, unbias_*) hold the
// even channels (0, 2, 4, 6) and the odd ones (1, 3, 5, 7) apart, in the lanes of the products
// that _mm256_mul_epi32 gives.
struct Requant8 {
  __m256i mult, mult_odd, lshift;
  __m256i round_even, round_odd, shift_even, shift_odd, unbias_even, unbias_odd;
};

// Channels past `count` (< 8) get a harmless multiplier.
inline Requant8 make_requant8(const FixedPointMultiplier* m, int count) {
  alignas(32) int32_t mult[8], lsh[8];
  alignas(32) int64_t round[2][4], shift[2][4], unbias[2][4];  // [parity][lane]
  for (int i = 0; i < 8; ++i) {
    const FixedPointMultiplier f = i < count ? m[i] : FixedPointMultiplier{1 << 30, 0};
    mult[i] = f.multiplier;
    lsh[i] = std::max(f.exponent, 0);
    const int n = 31 + std::min(std::max(-f.exponent, 0), 31);  // total right shift, 31..62
    // floor((x * M + 2^(n-1)) / 2^n) by a logical shift: x * M + 2^62 is never negative (|x * M| <
    // 2^62), and the 2^(62-n) that adds to the quotient is taken off again.
    round[i % 2][i / 2] = (int64_t{1} << (n - 1)) + f.offset + (int64_t{1} << 62);
    shift[i % 2][i / 2] = n;
    unbias[i % 2][i / 2] = int64_t{1} << (62 - n);
  }
  auto load = [](const void* p) { return _mm256_load_si256(static_cast<const __m256i*>(p)); };
  Requant8 r;
  r.mult = load(mult);
  r.mult_odd = _mm256_srli_epi64(r.mult, 32);
  r.lshift = load(lsh);
  r.round_even = load(round[0]);
  r.round_odd = load(round[1]);
  r.shift_even = load(shift[0]);
  r.shift_odd = load(shift[1]);
  r.unbias_even = load(unbias[0]);
  r.unbias_odd = load(unbias[1]);
  return r;
}

// requantize() before the zero point and the clamp: saturate_int32(x * 2^lshift), then
// floor((x * M + 2^(n-1) + offset) / 2^n).
inline __m256i requantize8(__m256i x, const Requant8& p) {
  // Saturating x * 2^lshift: the shift overflowed iff shifting back does not give x.
  const __m256i s = _mm256_sllv_epi32(x, p.lshift);
  const __m256i ok = _mm256_cmpeq_epi32(_mm256_srav_epi32(s, p.lshift), x);
  const __m256i sat = _mm256_xor_si256(_mm256_srai_epi32(x, 31),
                                       _mm256_set1_epi32(std::numeric_limits<int32_t>::max()));
  x = _mm256_blendv_epi8(sat, s, ok);
  // The quotient fits int32 (M < 2^31); the odd channels' quotients move to the high dwords.
  __m256i even = _mm256_mul_epi32(x, p.mult);
  __m256i odd = _mm256_mul_epi32(_mm256_srli_epi64(x, 32), p.mult_odd);
  even = _mm256_sub_epi64(_mm256_srlv_epi64(_mm256_add_epi64(even, p.round_even), p.shift_even),
                          p.unbias_even);
  odd = _mm256_sub_epi64(_mm256_srlv_epi64(_mm256_add_epi64(odd, p.round_odd), p.shift_odd),
                         p.unbias_odd);
  return _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

}  // namespace qext::kernels::avx2
