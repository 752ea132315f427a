// AVX-512 VNNI depthwise convolution (qconv_isa.h). Compiled with the AVX-512 flags
// (CMakeLists.txt); depthwise_conv2d_u8s8 calls it for Isa::kAvx512Vnni and Isa::kAmx.
//
// The input rows are copied, once each, into padded rows of Cp (C rounded up to 64) bytes per
// pixel, whatever lies outside the image (rows, columns, channels past C) holding the input zero
// point za. Every tap of every output pixel is then in the buffer, and
//   sum over in-image taps of (x - za) w  =  sum over all taps of x w  -  za * sum_t w[t],
// since a padded tap's x w is za w. That is the GEMM epilogue's form with row_sums[c] = the sum of
// channel c's taps, so the shared AVX-512 epilogue (epilogue_avx512.h) requantizes whole output
// rows, bit-identical to the scalar reference.
//
// Dot products, 4 taps x 64 channels per step (32 for layers of at most 32 channels): two rounds of
// byte and word unpacks turn the 4 tap vectors into 4 vectors of (tap 0, 1, 2, 3) byte quadruples,
// one per channel, which vpdpbusd multiplies with weights laid out the same way. Accumulator j,
// 128-bit lane L, dword i holds channel 16 L + 4 j + i; a 4 x 4 transpose of 128-bit lanes restores
// channel order.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qext/kernels/epilogue_avx512.h"
#include "qext/kernels/qconv_isa.h"

namespace qext::kernels::detail {
namespace {

// One step's vector of input bytes: 64 channels in a zmm, or 32 in a ymm for layers of at most 32
// channels (a zmm would be half padding). The unpacks work within 128-bit lanes of 16 channels.
struct Zmm {
  using V = __m512i;
  static constexpr int64_t kWidth = 64;
  static V zero() { return _mm512_setzero_si512(); }
  static V load(const void* p) { return _mm512_loadu_si512(p); }
  static V unpacklo8(V a, V b) { return _mm512_unpacklo_epi8(a, b); }
  static V unpackhi8(V a, V b) { return _mm512_unpackhi_epi8(a, b); }
  static V unpacklo16(V a, V b) { return _mm512_unpacklo_epi16(a, b); }
  static V unpackhi16(V a, V b) { return _mm512_unpackhi_epi16(a, b); }
  static V dpbusd(V acc, V a, V b) { return _mm512_dpbusd_epi32(acc, a, b); }
  // The 64 channels of acc[0..3] (accumulator order, see the file comment) in channel order.
  static void store_channel_order(const V (&acc)[4], int32_t* out) {
    const V t0 = _mm512_shuffle_i32x4(acc[0], acc[1], 0x44);            // a0.l0 a0.l1 a1.l0 a1.l1
    const V t1 = _mm512_shuffle_i32x4(acc[2], acc[3], 0x44);            // a2.l0 a2.l1 a3.l0 a3.l1
    const V t2 = _mm512_shuffle_i32x4(acc[0], acc[1], 0xEE);            // a0.l2 a0.l3 a1.l2 a1.l3
    const V t3 = _mm512_shuffle_i32x4(acc[2], acc[3], 0xEE);            // a2.l2 a2.l3 a3.l2 a3.l3
    _mm512_storeu_si512(out, _mm512_shuffle_i32x4(t0, t1, 0x88));       // channels 0..15
    _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(t0, t1, 0xDD));  // 16..31
    _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(t2, t3, 0x88));  // 32..47
    _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(t2, t3, 0xDD));  // 48..63
  }
};
struct Ymm {
  using V = __m256i;
  static constexpr int64_t kWidth = 32;
  static V zero() { return _mm256_setzero_si256(); }
  static V load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static V unpacklo8(V a, V b) { return _mm256_unpacklo_epi8(a, b); }
  static V unpackhi8(V a, V b) { return _mm256_unpackhi_epi8(a, b); }
  static V unpacklo16(V a, V b) { return _mm256_unpacklo_epi16(a, b); }
  static V unpackhi16(V a, V b) { return _mm256_unpackhi_epi16(a, b); }
  static V dpbusd(V acc, V a, V b) { return _mm256_dpbusd_epi32(acc, a, b); }
  static void store_channel_order(const V (&acc)[4], int32_t* out) {
    auto store = [](int32_t* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); };
    store(out, _mm256_permute2x128_si256(acc[0], acc[1], 0x20));       // channels 0..7
    store(out + 8, _mm256_permute2x128_si256(acc[2], acc[3], 0x20));   // 8..15
    store(out + 16, _mm256_permute2x128_si256(acc[0], acc[1], 0x31));  // 16..23
    store(out + 24, _mm256_permute2x128_si256(acc[2], acc[3], 0x31));  // 24..31
  }
};

// The weights in the order of the unpacked input quadruples: for tap group q (taps 4 q .. 4 q + 3),
// channel chunk m (`width` channels) and accumulator j, `width` bytes; byte 16 L + 4 i + t is tap
// 4 q + t of channel width m + 16 L + 4 j + i (0 past the taps or the channels).
std::vector<int8_t> quadruple_weights(const int8_t* w_hwc, int64_t channels, int64_t taps,
                                      int64_t tap_groups, int64_t chunks, int64_t width) {
  std::vector<int8_t> w(static_cast<size_t>(tap_groups * chunks * 4 * width), 0);
  for (int64_t q = 0; q < tap_groups; ++q) {
    for (int64_t m = 0; m < chunks; ++m) {
      for (int64_t j = 0; j < 4; ++j) {
        int8_t* dst = w.data() + ((q * chunks + m) * 4 + j) * width;
        for (int64_t lane = 0; lane < width / 16; ++lane) {
          for (int64_t i = 0; i < 4; ++i) {
            const int64_t c = m * width + 16 * lane + 4 * j + i;
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

template <class Vec>
void depthwise_rows(const uint8_t* x, const Conv2dGeometry& g, const int8_t* w_hwc,
                    const RequantEpilogue& ep, int64_t n, int64_t oh0, int64_t oh1, uint8_t* y) {
  using V = typename Vec::V;
  constexpr int64_t kWidth = Vec::kWidth;
  const int64_t C = g.in_channels, taps = g.kernel_h * g.kernel_w;
  const int64_t tap_groups = (taps + 3) / 4, chunks = (C + kWidth - 1) / kWidth;
  const int64_t Cp = chunks * kWidth, Wp = g.in_w + 2 * g.pad_w, row_bytes = Wp * Cp;
  const auto za = static_cast<uint8_t>(ep.a_zero_point);
  const std::vector<int8_t> wq = quadruple_weights(w_hwc, C, taps, tap_groups, chunks, kWidth);

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
  std::vector<uint8_t> cache(static_cast<size_t>((slots + 1) * row_bytes));
  std::vector<int64_t> cached(static_cast<size_t>(slots), -1);  // the input row in each slot
  uint8_t* const outside = cache.data() + slots * row_bytes;
  std::memset(outside, za, static_cast<size_t>(row_bytes));
  const __m512i za_bytes = _mm512_set1_epi8(static_cast<char>(za));
  auto padded_row = [&](int64_t ih) -> const uint8_t* {
    if (ih < 0 || ih >= g.in_h) return outside;
    const int64_t slot = ih % slots;
    uint8_t* row = cache.data() + slot * row_bytes;
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
        const __m512i v = _mm512_mask_loadu_epi8(za_bytes, mask, src + iw * C + c);
        if (Cp - c >= 64) {
          _mm512_storeu_si512(dst + c, v);
        } else {  // a 32-byte chunk (Cp = 32)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), _mm512_castsi512_si256(v));
        }
      }
    }
    return row;
  };

  std::vector<int32_t> sums(static_cast<size_t>(g.out_w * Cp));
  // Where each tap of output column 0 reads; the taps past `taps` in the last group repeat tap 0,
  // against zero weights.
  std::vector<const uint8_t*> tap_at(static_cast<size_t>(4 * tap_groups));
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    for (int64_t t = 0; t < 4 * tap_groups; ++t) {
      const int64_t tap = t < taps ? t : 0, kh = tap / g.kernel_w, kw = tap % g.kernel_w;
      tap_at[t] =
          padded_row(oh * g.stride_h - g.pad_h + kh * g.dilation_h) + kw * g.dilation_w * Cp;
    }
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const int64_t column = ow * g.stride_w * Cp;
      for (int64_t m = 0; m < chunks; ++m) {
        V acc[4] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
        const int8_t* wm = wq.data() + m * 4 * kWidth;
        const int64_t at = column + m * kWidth;
        for (int64_t q = 0; q < tap_groups; ++q, wm += chunks * 4 * kWidth) {
          const V t0 = Vec::load(tap_at[4 * q] + at);
          const V t1 = Vec::load(tap_at[4 * q + 1] + at);
          const V t2 = Vec::load(tap_at[4 * q + 2] + at);
          const V t3 = Vec::load(tap_at[4 * q + 3] + at);
          const V t01_lo = Vec::unpacklo8(t0, t1), t01_hi = Vec::unpackhi8(t0, t1);
          const V t23_lo = Vec::unpacklo8(t2, t3), t23_hi = Vec::unpackhi8(t2, t3);
          const V quads[4] = {Vec::unpacklo16(t01_lo, t23_lo), Vec::unpackhi16(t01_lo, t23_lo),
                              Vec::unpacklo16(t01_hi, t23_hi), Vec::unpackhi16(t01_hi, t23_hi)};
          for (int j = 0; j < 4; ++j) {
            acc[j] = Vec::dpbusd(acc[j], quads[j], Vec::load(wm + j * kWidth));
          }
        }
        Vec::store_channel_order(acc, sums.data() + ow * Cp + m * kWidth);
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
  } else if (g.in_channels <= Ymm::kWidth) {
    depthwise_rows<Ymm>(x, g, w_hwc, ep, n, oh0, oh1, y);
  } else {
    depthwise_rows<Zmm>(x, g, w_hwc, ep, n, oh0, oh1, y);
  }
}

}  // namespace qext::kernels::detail
