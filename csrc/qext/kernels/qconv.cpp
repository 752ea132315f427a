// im2col, weight layouts and the scalar depthwise reference of the converted convolution (qconv.h).
#include "qext/kernels/qconv.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "qext/kernels/qconv_isa.h"
#include "qext/kernels/qgemm_isa.h"

namespace qext::kernels {

int64_t Conv2dGeometry::group_k() const { return kernel_h * kernel_w * (in_channels / groups); }

using detail::copy_flip;

void im2col_u8(const uint8_t* x, const int64_t s[4], const Conv2dGeometry& g, int64_t group,
               int64_t p0, int64_t rows, uint8_t pad_value, uint8_t flip, uint8_t* out,
               int64_t ldo) {
  const int64_t cg = g.in_channels / g.groups;
  const uint8_t pad = pad_value ^ flip;
  const uint8_t* xg = x + group * cg * s[1];
  const bool channels_last = s[1] == 1;
  // With channels last and the runs of neighbouring kw taps adjacent in memory (one group, dilation
  // 1, dense pixels), the in-image taps of one kernel row are one contiguous run.
  const bool rows_contiguous = channels_last && g.dilation_w * s[3] == cg;
  const int64_t tap_row = g.kernel_w * cg;  // bytes of one kernel row in a GEMM row

  int64_t ow = p0 % g.out_w;
  int64_t oh = (p0 / g.out_w) % g.out_h;
  int64_t n = p0 / (g.out_w * g.out_h);
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* o = out + r * ldo;
    const uint8_t* xn = xg + n * s[0];
    const int64_t ih0 = oh * g.stride_h - g.pad_h;
    const int64_t iw0 = ow * g.stride_w - g.pad_w;
    int64_t kw_lo, kw_hi;
    detail::valid_taps(iw0, g.dilation_w, g.kernel_w, g.in_w, &kw_lo, &kw_hi);
    for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
      uint8_t* ok = o + kh * tap_row;
      const int64_t ih = ih0 + kh * g.dilation_h;
      if (ih < 0 || ih >= g.in_h || kw_lo == kw_hi) {
        std::memset(ok, pad, static_cast<size_t>(tap_row));
        continue;
      }
      const uint8_t* xrow = xn + ih * s[2];
      detail::fill_bytes(ok, pad, kw_lo * cg);
      if (rows_contiguous) {
        copy_flip(ok + kw_lo * cg, xrow + (iw0 + kw_lo * g.dilation_w) * s[3], (kw_hi - kw_lo) * cg,
                  flip);
      } else if (channels_last) {
        for (int64_t kw = kw_lo; kw < kw_hi; ++kw) {
          copy_flip(ok + kw * cg, xrow + (iw0 + kw * g.dilation_w) * s[3], cg, flip);
        }
      } else {
        for (int64_t kw = kw_lo; kw < kw_hi; ++kw) {
          const uint8_t* xp = xrow + (iw0 + kw * g.dilation_w) * s[3];
          uint8_t* op = ok + kw * cg;
          for (int64_t c = 0; c < cg; ++c) op[c] = xp[c * s[1]] ^ flip;
        }
      }
      detail::fill_bytes(ok + kw_hi * cg, pad, (g.kernel_w - kw_hi) * cg);
    }
    if (++ow == g.out_w) {
      ow = 0;
      if (++oh == g.out_h) {
        oh = 0;
        ++n;
      }
    }
  }
}

void conv_weight_to_gemm(const int8_t* w, const Conv2dGeometry& g, int64_t group, int8_t* out) {
  const int64_t cg = g.in_channels / g.groups;
  const int64_t og = g.out_channels / g.groups;
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t k = g.group_k();
  for (int64_t o = 0; o < og; ++o) {
    const int8_t* wo = w + (group * og + o) * cg * taps;  // [cg][kh][kw] of this output channel
    int8_t* row = out + o * k;
    for (int64_t t = 0; t < taps; ++t) {
      for (int64_t c = 0; c < cg; ++c) row[t * cg + c] = wo[c * taps + t];
    }
  }
}

void depthwise_weight_to_hwc(const int8_t* w, const Conv2dGeometry& g, int8_t* w_hwc) {
  const int64_t channels = g.out_channels;
  const int64_t taps = g.kernel_h * g.kernel_w;
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t t = 0; t < taps; ++t) w_hwc[t * channels + c] = w[c * taps + t];
  }
}

namespace detail {

void depthwise_conv2d_scalar(const uint8_t* x, const Conv2dGeometry& g, const int8_t* w_hwc,
                             const RequantEpilogue& ep, int64_t n, int64_t oh0, int64_t oh1,
                             uint8_t* y) {
  const int64_t channels = g.in_channels;
  std::vector<int32_t> acc(static_cast<size_t>(channels));
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const int64_t ih0 = oh * g.stride_h - g.pad_h;
    int64_t kh_lo, kh_hi;
    valid_taps(ih0, g.dilation_h, g.kernel_h, g.in_h, &kh_lo, &kh_hi);
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const int64_t iw0 = ow * g.stride_w - g.pad_w;
      int64_t kw_lo, kw_hi;
      valid_taps(iw0, g.dilation_w, g.kernel_w, g.in_w, &kw_lo, &kw_hi);
      for (int64_t c = 0; c < channels; ++c) acc[c] = ep.bias ? ep.bias[c] : 0;
      for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
        const int64_t ih = ih0 + kh * g.dilation_h;
        for (int64_t kw = kw_lo; kw < kw_hi; ++kw) {
          const int64_t iw = iw0 + kw * g.dilation_w;
          const uint8_t* xp = x + ((n * g.in_h + ih) * g.in_w + iw) * channels;
          const int8_t* wp = w_hwc + (kh * g.kernel_w + kw) * channels;
          for (int64_t c = 0; c < channels; ++c) {
            acc[c] += (static_cast<int32_t>(xp[c]) - ep.a_zero_point) * static_cast<int32_t>(wp[c]);
          }
        }
      }
      uint8_t* yp = y + ((n * g.out_h + oh) * g.out_w + ow) * channels;
      for (int64_t c = 0; c < channels; ++c) {
        yp[c] = static_cast<uint8_t>(
            requantize(acc[c], ep.multiplier[c], ep.out_zero_point, ep.out_min, ep.out_max));
      }
    }
  }
}

}  // namespace detail

void depthwise_conv2d_u8s8(Isa isa, const uint8_t* x, const Conv2dGeometry& g, const int8_t* w_hwc,
                           const RequantEpilogue& ep, int64_t n, int64_t oh0, int64_t oh1,
                           uint8_t* y) {
  if (isa == Isa::kScalar) {
    detail::depthwise_conv2d_scalar(x, g, w_hwc, ep, n, oh0, oh1, y);
  } else if (isa == Isa::kAvx2) {
    detail::depthwise_conv2d_avx2(x, g, w_hwc, ep, n, oh0, oh1, y);
  } else {
    detail::depthwise_conv2d_avx512(x, g, w_hwc, ep, n, oh0, oh1, y);
  }
}

bool conv_implicit_supported(const Conv2dGeometry& g) { return g.dilation_w == 1; }

std::vector<ConvSegment> conv_implicit_segments(const Conv2dGeometry& g) {
  const int64_t C = g.in_channels / g.groups, phases = std::min(g.stride_w, g.kernel_w);
  std::vector<ConvSegment> segments;
  int64_t k0 = 0;
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t phase = 0; phase < phases; ++phase) {
      const int64_t taps = (g.kernel_w - phase + g.stride_w - 1) / g.stride_w;
      const auto bytes = static_cast<int64_t>(packed_k(taps * C));
      segments.push_back({kh, phase, taps, k0, bytes});
      k0 += bytes;
    }
  }
  return segments;
}

namespace {

int64_t segments_k(const Conv2dGeometry& g) {
  const std::vector<ConvSegment> segments = conv_implicit_segments(g);
  return segments.empty() ? 0 : segments.back().k0 + segments.back().bytes;
}

}  // namespace

bool conv_implicit_gathers_patches(const Conv2dGeometry& g) {
  return g.groups == 1 && 2 * packed_k(g.group_k()) <= segments_k(g);
}

int64_t conv_implicit_k(const Conv2dGeometry& g) {
  return conv_implicit_gathers_patches(g) ? packed_k(g.group_k()) : segments_k(g);
}

int64_t conv_implicit_row_pixels(const Conv2dGeometry& g) {
  return conv_implicit_gathers_patches(g) ? g.out_w
                                          : (g.in_w + 2 * g.pad_w + g.stride_w - 1) / g.stride_w;
}

int64_t conv_implicit_tile_loads(const Conv2dGeometry& g) {
  // Per k block of a 32-pixel block: two A tiles and one B tile per 16 columns of a stripe of
  // 32 (the AMX kernel's blocking).
  const int64_t og = g.out_channels / g.groups, stripe = 2 * kPackN;
  const int64_t last = og % stripe;
  const int64_t per_k_block = og / stripe * 4 + (last == 0 ? 0 : last > kPackN ? 4 : 3);
  return g.groups * conv_implicit_k(g) / kPackK * per_k_block;
}

bool conv_implicit_weight_is_packed(const Conv2dGeometry& g) {
  const bool one_segment_per_row = g.stride_w == 1 || g.kernel_w == 1;
  return conv_implicit_gathers_patches(g) ||
         (one_segment_per_row && g.kernel_w * (g.in_channels / g.groups) % kPackK == 0);
}

namespace {

// Byte of W[n][k] in the packed layout (qgemm.h): block n / 16, group k / 4, lane 4 (n % 16) + k
// % 4.
int64_t packed_index(int64_t n, int64_t k, int64_t K) {
  return static_cast<int64_t>(packed_block_offset(n / kPackN * kPackN, K)) + (k / 4) * 4 * kPackN +
         (n % kPackN) * 4 + k % 4;
}

}  // namespace

void pack_grouped_weight_dense(const int8_t* grouped, const Conv2dGeometry& g, int8_t* out) {
  const int64_t C = g.in_channels, OC = g.out_channels, cg = C / g.groups, og = OC / g.groups;
  const int64_t taps = g.kernel_h * g.kernel_w, Kg = g.group_k(), K = taps * C;
  const auto group_bytes = static_cast<int64_t>(packed_weight_bytes(og, Kg));
  std::memset(out, 0, packed_weight_bytes(OC, K));
  for (int64_t o = 0; o < OC; ++o) {
    const int64_t group = o / og;
    const int8_t* w = grouped + group * group_bytes;
    for (int64_t t = 0; t < taps; ++t) {  // GEMM k order (kh, kw, c)
      for (int64_t c = 0; c < cg; ++c) {
        out[packed_index(o, t * C + group * cg + c, K)] = w[packed_index(o % og, t * cg + c, Kg)];
      }
    }
  }
}

void pack_conv_weight_implicit(const int8_t* packed, const Conv2dGeometry& g, int8_t* out) {
  const int64_t N = g.out_channels / g.groups, K = g.group_k(), C = g.in_channels / g.groups;
  const int64_t K_implicit = conv_implicit_k(g);
  const auto in_bytes = packed_weight_bytes(N, K), out_bytes = packed_weight_bytes(N, K_implicit);
  if (conv_implicit_weight_is_packed(g)) {
    std::memcpy(out, packed, in_bytes * static_cast<size_t>(g.groups));
    return;
  }
  std::memset(out, 0, out_bytes * static_cast<size_t>(g.groups));
  const int64_t columns = (N + kPackN - 1) / kPackN * kPackN;
  // Moves the `bytes` k from src_k on of every column to dst_k on.
  auto move = [&](int64_t dst_k, int64_t src_k, int64_t bytes) {
    if (bytes % 4 == 0 && src_k % 4 == 0) {  // whole 4-k groups of a block's 16 columns: 64 bytes
      for (int64_t n = 0; n < columns; n += kPackN) {
        for (int64_t k = 0; k < bytes; k += 4) {
          std::memcpy(out + packed_index(n, dst_k + k, K_implicit),
                      packed + packed_index(n, src_k + k, K), 4 * kPackN);
        }
      }
      return;
    }
    for (int64_t n = 0; n < columns; ++n) {
      for (int64_t k = 0; k < bytes; ++k) {
        out[packed_index(n, dst_k + k, K_implicit)] = packed[packed_index(n, src_k + k, K)];
      }
    }
  };
  const std::vector<ConvSegment> segments = conv_implicit_segments(g);
  for (int64_t group = 0; group < g.groups; ++group, packed += in_bytes, out += out_bytes) {
    for (const ConvSegment& s : segments) {
      const int64_t row_k = s.kh * g.kernel_w * C;  // the GEMM's k of the kernel row's first tap
      if (g.stride_w == 1) {                        // the row's taps are one run in both layouts
        move(s.k0, row_k, s.taps * C);
        continue;
      }
      for (int64_t t = 0; t < s.taps; ++t) {
        move(s.k0 + t * C, row_k + (s.phase + t * g.stride_w) * C, C);
      }
    }
  }
}

namespace {

template <typename Epilogue, typename Out>
void conv2d_implicit(const uint8_t* x, const Conv2dGeometry& g, const int8_t* weight,
                     const Epilogue& ep, int64_t row_begin, int64_t row_end, int64_t piece_rows,
                     uint8_t pad_value, uint8_t flip, Out* y) {
  if (!conv_implicit_supported(g)) {
    throw std::invalid_argument("conv2d_implicit_u8s8: needs dilation_w 1, got " +
                                std::to_string(g.dilation_w));
  }
  if (!isa_supported(Isa::kAmx)) {
    throw std::invalid_argument("conv2d_implicit_u8s8: AMX is not available on this CPU");
  }
  if (row_begin < 0 || row_end > g.batch * g.out_h) {
    throw std::invalid_argument("conv2d_implicit_u8s8: rows [" + std::to_string(row_begin) + ", " +
                                std::to_string(row_end) + ") out of range for " +
                                std::to_string(g.batch * g.out_h) + " output rows");
  }
  if (piece_rows < 1) {
    throw std::invalid_argument("conv2d_implicit_u8s8: piece_rows=" + std::to_string(piece_rows) +
                                " must be >= 1");
  }
  if (row_begin >= row_end || g.out_w <= 0 || g.out_channels <= 0) return;
  if (x == nullptr || weight == nullptr || y == nullptr) {
    throw std::invalid_argument("conv2d_implicit_u8s8: null x, weight or y");
  }
  detail::check_epilogue(ep, g.out_channels, "conv2d_implicit_u8s8");
  detail::conv2d_implicit_amx(x, g, weight, ep, row_begin, row_end, piece_rows, pad_value, flip, y);
}

}  // namespace

void conv2d_implicit_u8s8(const uint8_t* x, const Conv2dGeometry& g, const int8_t* weight,
                          const RequantEpilogue& ep, int64_t row_begin, int64_t row_end,
                          int64_t piece_rows, uint8_t pad_value, uint8_t flip, uint8_t* y) {
  conv2d_implicit(x, g, weight, ep, row_begin, row_end, piece_rows, pad_value, flip, y);
}

void conv2d_implicit_u8s8(const uint8_t* x, const Conv2dGeometry& g, const int8_t* weight,
                          const FloatEpilogue& ep, int64_t row_begin, int64_t row_end,
                          int64_t piece_rows, uint8_t pad_value, uint8_t flip, float* y) {
  conv2d_implicit(x, g, weight, ep, row_begin, row_end, piece_rows, pad_value, flip, y);
}

}  // namespace qext::kernels
