// AVX-512 VNNI depthwise convolution (qconv_isa.h). Compiled with the AVX-512 flags
// (CMakeLists.txt); depthwise_conv2d_u8s8 calls it for Isa::kAvx512Vnni and Isa::kAmx.
//
// The input rows are copied, once each, into padded rows of Cp (16, 32, or C rounded up to 64)
// bytes per pixel, whatever lies outside the image (rows, columns, channels past C) holding the
// input zero point za. Every tap of every output pixel is then in the buffer, and
//   sum over in-image taps of (x - za) w  =  sum over all taps of x w  -  za * sum_t w[t],
// since a padded tap's x w is za w. That is the GEMM epilogue's form with row_sums[c] = the sum of
// channel c's taps, so the shared AVX-512 epilogue (epilogue_avx512.h) requantizes whole output
// rows, bit-identical to the scalar reference.
//
// Dot products, 4 taps x 64 bytes per step: two rounds of byte and word unpacks turn the 4 tap
// vectors into 4 vectors of (tap 0, 1, 2, 3) byte quadruples, one per byte position, which
// vpdpbusd multiplies with weights laid out the same way. Accumulator j, 128-bit lane L, dword i
// holds byte position 16 L + 4 j + i; a 4 x 4 transpose of 128-bit lanes restores their order. A
// vector holds 64 channels of one output pixel, or, in layers of at most 32 (16) channels, 32 (16)
// channels of each of 2 (4) consecutive output pixels: the unpacks stay within 128-bit lanes, so
// the lanes of different pixels never mix.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qext/kernels/epilogue_avx512.h"
#include "qext/kernels/qconv_isa.h"

namespace qext::kernels::detail {
namespace {

// The 64 sums of acc[0..3] (accumulator order, see the file comment) in byte-position order.
void store_position_order(const __m512i (&acc)[4], int32_t* out) {
  const __m512i t0 = _mm512_shuffle_i32x4(acc[0], acc[1], 0x44);      // a0.l0 a0.l1 a1.l0 a1.l1
  const __m512i t1 = _mm512_shuffle_i32x4(acc[2], acc[3], 0x44);      // a2.l0 a2.l1 a3.l0 a3.l1
  const __m512i t2 = _mm512_shuffle_i32x4(acc[0], acc[1], 0xEE);      // a0.l2 a0.l3 a1.l2 a1.l3
  const __m512i t3 = _mm512_shuffle_i32x4(acc[2], acc[3], 0xEE);      // a2.l2 a2.l3 a3.l2 a3.l3
  _mm512_storeu_si512(out, _mm512_shuffle_i32x4(t0, t1, 0x88));       // positions 0..15
  _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(t0, t1, 0xDD));  // 16..31
  _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(t2, t3, 0x88));  // 32..47
  _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(t2, t3, 0xDD));  // 48..63
}

// The weights in the order of the unpacked input quadruples, for pixels of Cp bytes: for tap group
// q (taps 4 q .. 4 q + 3), 64-byte chunk m of a pixel and accumulator j, 64 bytes; byte 16 L + 4 i
// + t is tap 4 q + t of the channel at byte position 16 L + 4 j + i (chunk m's channel, or, with Cp
// of 16 or 32, that position's channel within its pixel; 0 past the taps or the channels).
std::vector<int8_t> quadruple_weights(const int8_t* w_hwc, int64_t channels, int64_t taps,
                                      int64_t tap_groups, int64_t chunks, int64_t Cp) {
  std::vector<int8_t> w(static_cast<size_t>(tap_groups * chunks * 4 * 64), 0);
  for (int64_t q = 0; q < tap_groups; ++q) {
    for (int64_t m = 0; m < chunks; ++m) {
      for (int64_t j = 0; j < 4; ++j) {
        int8_t* dst = w.data() + ((q * chunks + m) * 4 + j) * 64;
        for (int64_t lane = 0; lane < 4; ++lane) {
          for (int64_t i = 0; i < 4; ++i) {
            const int64_t c = m * 64 + (16 * lane + 4 * j + i) % std::min<int64_t>(Cp, 64);
            for (int64_t t = 0; t < 4; ++t) {
              const int64_t tap = 4 * q + t;
              if (c < channels && tap < taps)
                dst[16 * lane + 4 * i + t] = w_hwc[tap * channels + c];
            }
          }
        }
      }
    }
  }
  return w;
}

void depthwise_rows(const uint8_t* x, const Conv2dGeometry& g, const int8_t* w_hwc,
                    const RequantEpilogue& ep, int64_t n, int64_t oh0, int64_t oh1, uint8_t* y) {
  const int64_t C = g.in_channels, taps = g.kernel_h * g.kernel_w, tap_groups = (taps + 3) / 4;
  // Bytes per pixel in the padded rows: 16 or 32 for layers of at most that many channels (4 or 2
  // output pixels per vector: 1 x 32 x 112 x 112, 3x3 went from 0.92x to 1.07x oneDNN, and 8 x 16
  // x 56 x 56 from 0.49x to 0.94x), else C rounded up to 64 (chunks of one pixel per vector).
  const int64_t Cp = C <= 16 ? 16 : C <= 32 ? 32 : (C + 63) / 64 * 64;
  const int64_t chunks = std::max<int64_t>(Cp / 64, 1), pixels = std::max<int64_t>(64 / Cp, 1);
  const int64_t Wp = g.in_w + 2 * g.pad_w, row_bytes = Wp * Cp, pixel_step = g.stride_w * Cp;
  // A vector's pixels past out_w are computed and dropped; their taps read up to pixels - 1 pixel
  // steps past the padded row, into slack that stays zero.
  const int64_t row_pitch = row_bytes + (pixels - 1) * pixel_step;
  const auto za = static_cast<uint8_t>(ep.a_zero_point);
  const std::vector<int8_t> wq = quadruple_weights(w_hwc, C, taps, tap_groups, chunks, Cp);

  std::vector<int32_t> tap_sums(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    int32_t s = 0;
    for (int64_t t = 0; t < taps; ++t) s += w_hwc[t * C + c];
    tap_sums[c] = s;
  }
  RequantEpilogue row_ep = ep;
  row_ep.row_sums = tap_sums.data();
  std::vector<avx512::RequantPanel> panels;  // 32 channels each (the paired stores)
  for (int64_t n0 = 0; n0 < C; n0 += 32) {
    panels.emplace_back(row_ep, n0, C, C - n0 > 16 ? 2 : 1, y + n0, C);
  }

  // Padded input rows, cached: consecutive output rows share kernel_h - 1 of their stride-1 rows.
  // Input row ih lives in slot ih mod `slots` (the rows of one output row are at most `slots` - 1
  // apart, so they never collide); rows outside the image all read one row of za.
  const int64_t slots = (g.kernel_h - 1) * g.dilation_h + g.stride_h + 1;
  std::vector<uint8_t> cache(static_cast<size_t>((slots + 1) * row_pitch));
  std::vector<int64_t> cached(static_cast<size_t>(slots), -1);  // the input row in each slot
  uint8_t* const outside = cache.data() + slots * row_pitch;
  std::memset(outside, za, static_cast<size_t>(row_bytes));
  const __m512i za_bytes = _mm512_set1_epi8(static_cast<char>(za));
  const __mmask64 pixel_mask = Cp >= 64 ? ~__mmask64{0} : (__mmask64{1} << Cp) - 1;
  auto padded_row = [&](int64_t ih) -> const uint8_t* {
    if (ih < 0 || ih >= g.in_h) return outside;
    const int64_t slot = ih % slots;
    uint8_t* row = cache.data() + slot * row_pitch;
    if (cached[slot] == ih) return row;
    cached[slot] = ih;
    const uint8_t* src = x + (n * g.in_h + ih) * g.in_w * C;
    std::memset(row, za, static_cast<size_t>(g.pad_w * Cp));
    std::memset(row + (g.pad_w + g.in_w) * Cp, za, static_cast<size_t>(g.pad_w * Cp));
    if (Cp == C) {
      std::memcpy(row + g.pad_w * Cp, src, static_cast<size_t>(g.in_w * C));
      return row;
    }
    // Each pixel's C bytes, then za up to Cp: masked loads over a vector of za.
    for (int64_t iw = 0; iw < g.in_w; ++iw) {
      uint8_t* dst = row + (g.pad_w + iw) * Cp;
      for (int64_t c = 0; c < Cp; c += 64) {
        const int64_t valid = std::clamp<int64_t>(C - c, 0, 64);
        const __mmask64 mask = valid == 64 ? ~__mmask64{0} : (__mmask64{1} << valid) - 1;
        _mm512_mask_storeu_epi8(dst + c, pixel_mask,
                                _mm512_mask_loadu_epi8(za_bytes, mask, src + iw * C + c));
      }
    }
    return row;
  };
  // Tap bytes of the vector's pixels: contiguous when they are (one pixel, or stride 1), else
  // gathered from pixel_step apart.
  auto load = [&](const uint8_t* p) {
    if (pixels == 1 || pixel_step == Cp) return _mm512_loadu_si512(p);
    if (pixels == 2) {
      return _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + pixel_step)), 1);
    }
    auto piece = [&](int64_t k) {
      return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k * pixel_step));
    };
    const __m512i v = _mm512_inserti32x4(_mm512_castsi128_si512(piece(0)), piece(1), 1);
    return _mm512_inserti32x4(_mm512_inserti32x4(v, piece(2), 2), piece(3), 3);
  };

  const int64_t vectors = (g.out_w + pixels - 1) / pixels;  // per chunk of an output row
  std::vector<int32_t> sums(static_cast<size_t>(vectors * pixels * Cp));
  // Where each tap of output column 0 reads; the taps past `taps` in the last group repeat tap 0,
  // against zero weights.
  std::vector<const uint8_t*> tap_at(static_cast<size_t>(4 * tap_groups));
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    for (int64_t t = 0; t < 4 * tap_groups; ++t) {
      const int64_t tap = t < taps ? t : 0, kh = tap / g.kernel_w, kw = tap % g.kernel_w;
      tap_at[t] =
          padded_row(oh * g.stride_h - g.pad_h + kh * g.dilation_h) + kw * g.dilation_w * Cp;
    }
    for (int64_t ow = 0; ow < g.out_w; ow += pixels) {
      for (int64_t m = 0; m < chunks; ++m) {
        __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                          _mm512_setzero_si512()};
        const int8_t* wm = wq.data() + m * 4 * 64;
        const int64_t at = ow * pixel_step + m * 64;
        for (int64_t q = 0; q < tap_groups; ++q, wm += chunks * 4 * 64) {
          const __m512i t0 = load(tap_at[4 * q] + at), t1 = load(tap_at[4 * q + 1] + at);
          const __m512i t2 = load(tap_at[4 * q + 2] + at), t3 = load(tap_at[4 * q + 3] + at);
          const __m512i t01_lo = _mm512_unpacklo_epi8(t0, t1),
                        t01_hi = _mm512_unpackhi_epi8(t0, t1);
          const __m512i t23_lo = _mm512_unpacklo_epi8(t2, t3),
                        t23_hi = _mm512_unpackhi_epi8(t2, t3);
          const __m512i quads[4] = {
              _mm512_unpacklo_epi16(t01_lo, t23_lo), _mm512_unpackhi_epi16(t01_lo, t23_lo),
              _mm512_unpacklo_epi16(t01_hi, t23_hi), _mm512_unpackhi_epi16(t01_hi, t23_hi)};
          for (int j = 0; j < 4; ++j) {
            acc[j] = _mm512_dpbusd_epi32(acc[j], quads[j], _mm512_loadu_si512(wm + j * 64));
          }
        }
        store_position_order(acc, sums.data() + ow * Cp + m * 64);
      }
    }
    const int64_t pixel0 = (n * g.out_h + oh) * g.out_w;
    for (size_t p = 0; p < panels.size(); ++p) {
      panels[p].store_rows(pixel0, g.out_w, sums.data() + 32 * static_cast<int64_t>(p), Cp);
    }
  }
}

}  // namespace

void depthwise_conv2d_avx512(const uint8_t* x, const Conv2dGeometry& g, const int8_t* w_hwc,
                             const RequantEpilogue& ep, int64_t n, int64_t oh0, int64_t oh1,
                             uint8_t* y) {
  // The padding holds za as a byte; any other zero point takes the reference path.
  if (ep.a_zero_point < 0 || ep.a_zero_point > 255) {
    depthwise_conv2d_scalar(x, g, w_hwc, ep, n, oh0, oh1, y);
  } else {
    depthwise_rows(x, g, w_hwc, ep, n, oh0, oh1, y);
  }
}

}  // namespace qext::kernels::detail
