// AVX2 depthwise convolution and residual add (qconv_isa.h). Compiled with -mavx2 -mfma
// (CMakeLists.txt); reached only through isa_supported(Isa::kAvx2) dispatch. Both are bit-identical
// to the scalar references in qconv.cpp / qelementwise.cpp: the arithmetic is the same integer
// arithmetic, lane by lane.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "qext/kernels/qconv_isa.h"
#include "qext/kernels/requantize_avx2.h"

namespace qext::kernels::detail {

namespace {

// Per-channel bias and requantize() constants (requantize_avx2.h) for the 8 channels from c, for
// the starts the depthwise kernel uses: multiples of 8, and channels - 16 / channels - 8 (the last,
// overlapping block). Channels past the end (narrow layers) get neutral values.
struct ChannelRequant {
  std::vector<int32_t> bias;
  std::vector<FixedPointMultiplier> mult;
  std::vector<avx2::Requant8> aligned, tail;
  int64_t channels;

  ChannelRequant(const RequantEpilogue& ep, int64_t channels, int64_t padded) : channels(channels) {
    bias.assign(padded, 0);
    mult.assign(padded, FixedPointMultiplier{1 << 30, 0});
    for (int64_t c = 0; c < channels; ++c) {
      bias[c] = ep.bias ? ep.bias[c] : 0;
      mult[c] = ep.multiplier[c];
    }
    for (int64_t c = 0; c < padded; c += 8) aligned.push_back(at_start(c, padded));
    for (const int64_t c : {channels - 16, channels - 8}) {
      tail.push_back(c >= 0 ? at_start(c, padded) : aligned[0]);
    }
  }

  avx2::Requant8 at_start(int64_t c, int64_t padded) const {
    return avx2::make_requant8(mult.data() + c, static_cast<int>(std::min<int64_t>(8, padded - c)));
  }

  const avx2::Requant8& at(int64_t c) const {
    if (c % 8 == 0) return aligned[c / 8];
    return tail[c == channels - 16 ? 0 : 1];
  }
};

// requantize() of 8 accumulators of channels c..c+7, without the zero point and clamp.
inline __m256i requant8(__m256i acc, const ChannelRequant& q, int64_t c) {
  return avx2::requantize8(acc, q.at(c));
}

// clamp(x + zp, lo, hi) as clamp(x, lo - zp, hi - zp) + zp (no int32 overflow), then the low bytes
// of 16 lanes in order.
struct OutputClamp {
  __m256i lo, hi, zp;

  explicit OutputClamp(const RequantEpilogue& ep) {
    auto sat = [](int64_t v) {
      return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(v, INT32_MIN), INT32_MAX));
    };
    lo = _mm256_set1_epi32(sat(int64_t{ep.out_min} - ep.out_zero_point));
    hi = _mm256_set1_epi32(sat(int64_t{ep.out_max} - ep.out_zero_point));
    zp = _mm256_set1_epi32(ep.out_zero_point);
  }

  __m256i apply(__m256i x) const {
    return _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(x, lo), hi), zp);
  }

  // Low 8 bits of each int32 lane of a (channels 0..7) and b (8..15).
  static __m128i low_bytes(__m256i a, __m256i b) {
    const __m256i byte = _mm256_set1_epi32(0xFF);
    // packus_epi32 interleaves 128-bit halves: [a0..3 b0..3 | a4..7 b4..7] -> reorder 64-bit
    // blocks.
    const __m256i w16 = _mm256_permute4x64_epi64(
        _mm256_packus_epi32(_mm256_and_si256(a, byte), _mm256_and_si256(b, byte)), 0xD8);
    return _mm_packus_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
  }
};

// 16 channels of one tap: acc += (x - za) * w, products exact in int16 (|x - za| <= 255, |w| <=
// 128).
inline void mac16(const uint8_t* xp, const int8_t* wp, __m256i za16, __m256i* acc0, __m256i* acc1) {
  const __m256i xv = _mm256_sub_epi16(
      _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xp))), za16);
  const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp)));
  const __m256i p = _mm256_mullo_epi16(xv, wv);
  *acc0 = _mm256_add_epi32(*acc0, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(p)));
  *acc1 = _mm256_add_epi32(*acc1, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(p, 1)));
}

}  // namespace

void depthwise_conv2d_avx2(const uint8_t* x, const Conv2dGeometry& g, const int8_t* w_hwc,
                           const RequantEpilogue& ep, int64_t n, int64_t oh0, int64_t oh1,
                           uint8_t* y) {
  const int64_t channels = g.in_channels;
  // The int16 products need a zero point within the uint8 levels, and requant8 multipliers of
  // quantize_multiplier()'s form (nonnegative, exponent in [-31, 30]); always so for valid layers.
  // Anything else takes the reference path, which defines the result.
  bool vector_ok = ep.a_zero_point >= 0 && ep.a_zero_point <= 255;
  for (int64_t c = 0; c < channels && vector_ok; ++c) {
    const FixedPointMultiplier m = ep.multiplier[c];
    vector_ok = m.multiplier >= 0 && m.exponent >= -31 && m.exponent <= 30;
  }
  if (!vector_ok) {
    depthwise_conv2d_scalar(x, g, w_hwc, ep, n, oh0, oh1, y);
    return;
  }
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t pairs = (taps + 1) / 2;
  const ChannelRequant q(ep, channels, std::max<int64_t>(channels, 16));
  const OutputClamp out(ep);
  const __m256i za16 = _mm256_set1_epi16(static_cast<int16_t>(ep.a_zero_point));
  auto load8 = [](const int32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  };
  auto store16 = [&](uint8_t* dst, __m256i acc0, __m256i acc1, int64_t c) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                     OutputClamp::low_bytes(out.apply(requant8(acc0, q, c)),
                                            out.apply(requant8(acc1, q, c + 8))));
  };

  // Blocks of 16 channels; a last partial block is moved back to end at `channels`, overlapping
  // the previous one (it recomputes some channels, writing the same bytes). Fewer than 16
  // channels: one block through zero-padded 16-byte buffers.
  std::vector<int64_t> blocks;
  for (int64_t c = 0; c + 16 <= channels; c += 16) blocks.push_back(c);
  if (channels % 16 != 0 && channels > 16) blocks.push_back(channels - 16);
  const bool narrow = channels < 16;
  std::vector<int8_t> w_narrow(static_cast<size_t>(narrow ? taps * 16 : 0), 0);
  for (int64_t t = 0; t < taps && narrow; ++t) {
    std::memcpy(w_narrow.data() + t * 16, w_hwc + t * channels, static_cast<size_t>(channels));
  }

  // Interior pixels (every tap in the image) run two taps per vpmaddwd: x of taps 2j and 2j+1
  // interleaved by unpacklo/hi_epi16 against weights pre-interleaved the same way (so channels
  // 0-3, 8-11 land in one accumulator and 4-7, 12-15 in the other). The zero point is folded into
  // the bias: sum (x - za) w = sum x w - za sum w, all mod 2^32 (exact: the result fits int32).
  // Per block and pair: 8 int16 pairs (one vector) for the "lo" channels, then 8 for the "hi" ones.
  std::vector<int16_t> w_pairs(blocks.size() * pairs * 32);
  std::vector<int32_t> bias_interior(static_cast<size_t>(std::max<int64_t>(channels, 16)), 0);
  for (size_t b = 0; b < blocks.size(); ++b) {
    for (int64_t j = 0; j < pairs; ++j) {
      int16_t* dst = w_pairs.data() + (b * pairs + j) * 32;
      for (int half = 0; half < 2; ++half) {    // lo, hi
        for (int lane = 0; lane < 2; ++lane) {  // 128-bit lane
          for (int i = 0; i < 4; ++i) {
            const int64_t c = blocks[b] + lane * 8 + half * 4 + i;
            int16_t* d = dst + half * 16 + lane * 8 + i * 2;
            d[0] = w_hwc[(2 * j) * channels + c];
            d[1] = 2 * j + 1 < taps ? w_hwc[(2 * j + 1) * channels + c] : 0;
          }
        }
      }
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    uint32_t sum_w = 0;
    for (int64_t t = 0; t < taps; ++t)
      sum_w += static_cast<uint32_t>(int32_t{w_hwc[t * channels + c]});
    bias_interior[c] = static_cast<int32_t>(static_cast<uint32_t>(q.bias[c]) -
                                            static_cast<uint32_t>(ep.a_zero_point) * sum_w);
  }
  std::vector<int64_t> tap_offset(static_cast<size_t>(taps + 1), 0);
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      tap_offset[kh * g.kernel_w + kw] =
          (kh * g.dilation_h * g.in_w + kw * g.dilation_w) * channels;
    }
  }

  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const int64_t ih0 = oh * g.stride_h - g.pad_h;
    int64_t kh_lo, kh_hi;
    valid_taps(ih0, g.dilation_h, g.kernel_h, g.in_h, &kh_lo, &kh_hi);
    const bool rows_inside = kh_lo == 0 && kh_hi == g.kernel_h;
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const int64_t iw0 = ow * g.stride_w - g.pad_w;
      int64_t kw_lo, kw_hi;
      valid_taps(iw0, g.dilation_w, g.kernel_w, g.in_w, &kw_lo, &kw_hi);
      uint8_t* yp = y + ((n * g.out_h + oh) * g.out_w + ow) * channels;
      // Pixel (ih0, iw0) may lie in the padding; only offsets of valid taps are added to it.
      const int64_t origin = ((n * g.in_h + ih0) * g.in_w + iw0) * channels;
      auto x_at = [&](int64_t kh, int64_t kw) {
        return x + origin + tap_offset[kh * g.kernel_w + kw];
      };

      if (narrow) {
        __m256i acc0 = load8(q.bias.data()), acc1 = load8(q.bias.data() + 8);
        alignas(16) uint8_t xbuf[16] = {};
        for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
          for (int64_t kw = kw_lo; kw < kw_hi; ++kw) {
            std::memcpy(xbuf, x_at(kh, kw), static_cast<size_t>(channels));
            mac16(xbuf, w_narrow.data() + (kh * g.kernel_w + kw) * 16, za16, &acc0, &acc1);
          }
        }
        alignas(16) uint8_t ybuf[16];
        store16(ybuf, acc0, acc1, 0);
        std::memcpy(yp, ybuf, static_cast<size_t>(channels));
      } else if (rows_inside && kw_lo == 0 && kw_hi == g.kernel_w) {
        const uint8_t* xo = x + origin;
        for (size_t b = 0; b < blocks.size(); ++b) {
          const int64_t c = blocks[b];
          const int16_t* wp = w_pairs.data() + b * pairs * 32;
          __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
          for (int64_t j = 0; j < pairs; ++j, wp += 32) {
            const __m256i x0 = _mm256_cvtepu8_epi16(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(xo + tap_offset[2 * j] + c)));
            const __m256i x1 =
                2 * j + 1 < taps
                    ? _mm256_cvtepu8_epi16(_mm_loadu_si128(
                          reinterpret_cast<const __m128i*>(xo + tap_offset[2 * j + 1] + c)))
                    : _mm256_setzero_si256();
            acc0 = _mm256_add_epi32(
                acc0, _mm256_madd_epi16(_mm256_unpacklo_epi16(x0, x1),
                                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp))));
            acc1 = _mm256_add_epi32(
                acc1,
                _mm256_madd_epi16(_mm256_unpackhi_epi16(x0, x1),
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 16))));
          }
          // Back to channel order: [0-3 | 8-11] and [4-7 | 12-15] -> 0-7 and 8-15.
          const __m256i lo = _mm256_add_epi32(_mm256_permute2x128_si256(acc0, acc1, 0x20),
                                              load8(bias_interior.data() + c));
          const __m256i hi = _mm256_add_epi32(_mm256_permute2x128_si256(acc0, acc1, 0x31),
                                              load8(bias_interior.data() + c + 8));
          store16(yp + c, lo, hi, c);
        }
      } else {
        for (const int64_t c : blocks) {
          __m256i acc0 = load8(q.bias.data() + c), acc1 = load8(q.bias.data() + c + 8);
          for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
            for (int64_t kw = kw_lo; kw < kw_hi; ++kw) {
              mac16(x_at(kh, kw) + c, w_hwc + (kh * g.kernel_w + kw) * channels + c, za16, &acc0,
                    &acc1);
            }
          }
          store16(yp + c, acc0, acc1, c);
        }
      }
    }
  }
}

void add_u8_avx2(const uint8_t* a, const uint8_t* b, int64_t n, const AddParams& p, uint8_t* out,
                 uint8_t a_flip, uint8_t b_flip, uint8_t out_flip) {
  // The vector path keeps floor((v + 2^(shift-1)) / 2^shift) in int32 lanes; it is exact when that
  // quotient is below 2^30 in magnitude (every ratio below about 2^21). Larger ratios (absurd for
  // real models) take the scalar path.
  const int64_t max_v = 255 * (std::abs(p.a_mult) + std::abs(p.b_mult));
  if (p.shift < 1 || p.shift > 62 || (max_v >> p.shift) >= (int64_t{1} << 30)) {
    add_u8_scalar(a, b, n, p, out, a_flip, b_flip, out_flip);
    return;
  }
  // floor(w / 2^shift) for w = v + 2^(shift-1) with an arithmetic shift that AVX2 lacks for 64-bit
  // lanes: add 2^62 (a multiple of 2^shift) so that the sum is positive (|v| < 2^41), shift
  // logically, and subtract 2^(62 - shift) from the low 32 bits again (mod 2^32).
  const __m256i offset = _mm256_set1_epi64x((int64_t{1} << 62) + (int64_t{1} << (p.shift - 1)));
  const __m128i count = _mm_cvtsi32_si128(p.shift);
  const uint32_t bias_low = 62 - p.shift >= 32 ? 0u : (uint32_t{1} << (62 - p.shift));
  const __m256i zo =
      _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(p.zo) - bias_low));
  const __m256i lo = _mm256_set1_epi32(p.lo), hi = _mm256_set1_epi32(p.hi);
  const __m256i za = _mm256_set1_epi32(p.za), zb = _mm256_set1_epi32(p.zb);
  // mul_epi32 reads the low 32 bits of each 64-bit lane: the multipliers are < 2^31.
  const __m256i am = _mm256_set1_epi64x(p.a_mult), bm = _mm256_set1_epi64x(p.b_mult);
  const __m128i af = _mm_set1_epi8(static_cast<char>(a_flip));
  const __m128i bf = _mm_set1_epi8(static_cast<char>(b_flip));
  const __m256i of = _mm256_set1_epi8(static_cast<char>(out_flip));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);

  auto eight = [&](const uint8_t* pa, const uint8_t* pb) {
    const __m256i da =
        _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_xor_si128(
                             _mm_loadl_epi64(reinterpret_cast<const __m128i*>(pa)), af)),
                         za);
    const __m256i db =
        _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_xor_si128(
                             _mm_loadl_epi64(reinterpret_cast<const __m128i*>(pb)), bf)),
                         zb);
    const __m256i even = _mm256_add_epi64(_mm256_mul_epi32(da, am), _mm256_mul_epi32(db, bm));
    const __m256i odd = _mm256_add_epi64(_mm256_mul_epi32(_mm256_srli_epi64(da, 32), am),
                                         _mm256_mul_epi32(_mm256_srli_epi64(db, 32), bm));
    const __m256i qe = _mm256_srl_epi64(_mm256_add_epi64(even, offset), count);
    const __m256i qo = _mm256_srl_epi64(_mm256_add_epi64(odd, offset), count);
    const __m256i v = _mm256_add_epi32(_mm256_blend_epi32(qe, _mm256_slli_epi64(qo, 32), 0xAA), zo);
    return _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
  };

  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i r0 = eight(a + i, b + i), r1 = eight(a + i + 8, b + i + 8);
    const __m256i r2 = eight(a + i + 16, b + i + 16), r3 = eight(a + i + 24, b + i + 24);
    // Levels are in [0, 255]: the saturating packs are exact. The packs interleave 128-bit halves;
    // the permutation restores element order.
    const __m256i bytes =
        _mm256_packus_epi16(_mm256_packs_epi32(r0, r1), _mm256_packs_epi32(r2, r3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm256_xor_si256(_mm256_permutevar8x32_epi32(bytes, order), of));
  }
  add_u8_scalar(a + i, b + i, n - i, p, out + i, a_flip, b_flip, out_flip);
}

}  // namespace qext::kernels::detail
