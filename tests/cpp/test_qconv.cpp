// Converted-convolution, residual-add, average- and max-pooling kernels (qconv.h, qelementwise.h):
// im2col against a naive gather, im2col + GEMM and the depthwise kernel against a direct int64
// convolution, the AVX2 paths bit for bit against the scalar references, the add against int64 and
// double references, average pooling against an independent double-precision reference, the max
// pooling kernels (NCHW and channels-last) bit for bit against their scalar reference, and
// hand-computed cases (ties round half up).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "qext/kernels/qconv.h"
#include "qext/kernels/qelementwise.h"
#include "qext/kernels/qgemm.h"

namespace qext::kernels {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

int64_t out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dilation) {
  return (in + 2 * pad - dilation * (k - 1) - 1) / stride + 1;
}

Conv2dGeometry make_geometry(int64_t batch, int64_t cin, int64_t h, int64_t w, int64_t cout,
                             int64_t kh, int64_t kw, int64_t stride, int64_t pad, int64_t dilation,
                             int64_t groups) {
  Conv2dGeometry g{};
  g.batch = batch;
  g.in_channels = cin;
  g.in_h = h;
  g.in_w = w;
  g.out_channels = cout;
  g.kernel_h = kh;
  g.kernel_w = kw;
  g.stride_h = stride;
  // The horizontal parameters differ from the vertical ones so that a mix-up shows.
  g.stride_w = stride % 2 + 1;
  g.pad_h = pad;
  g.pad_w = std::max<int64_t>(0, pad - 1);
  g.dilation_h = dilation;
  g.dilation_w = dilation;
  g.groups = groups;
  g.out_h = out_size(h, kh, g.stride_h, g.pad_h, g.dilation_h);
  g.out_w = out_size(w, kw, g.stride_w, g.pad_w, g.dilation_w);
  return g;
}

template <typename T>
std::vector<T> random_bytes(int64_t n, std::mt19937& rng, int lo, int hi) {
  std::uniform_int_distribution<int> dist(lo, hi);
  std::vector<T> v(static_cast<size_t>(n));
  for (auto& e : v) e = static_cast<T>(dist(rng));
  return v;
}

// Strides of x element (n, c, h, w): NCHW or NHWC with an optional gap after each pixel's channels.
std::vector<int64_t> strides(const Conv2dGeometry& g, bool channels_last, int64_t pixel_gap) {
  if (!channels_last) return {g.in_channels * g.in_h * g.in_w, g.in_h * g.in_w, g.in_w, 1};
  const int64_t pixel = g.in_channels + pixel_gap;
  return {pixel * g.in_h * g.in_w, 1, pixel * g.in_w, pixel};
}

int64_t x_bytes(const Conv2dGeometry& g, const std::vector<int64_t>& s) {
  return (g.batch - 1) * s[0] + (g.in_channels - 1) * s[1] + (g.in_h - 1) * s[2] +
         (g.in_w - 1) * s[3] + 1;
}

// ---------------------------------------------------------------------------------------------
// im2col
// ---------------------------------------------------------------------------------------------

void check_im2col(const Conv2dGeometry& g, bool channels_last, int64_t pixel_gap, uint8_t flip,
                  std::mt19937& rng) {
  const std::vector<int64_t> s = strides(g, channels_last, pixel_gap);
  const std::vector<uint8_t> x = random_bytes<uint8_t>(x_bytes(g, s), rng, 0, 255);
  const int64_t cg = g.in_channels / g.groups;
  const int64_t k = g.group_k();
  const int64_t ldo = k + 3;
  const int64_t total = g.batch * g.out_h * g.out_w;
  const uint8_t pad_value = 0x7D;
  for (int64_t group = 0; group < g.groups; ++group) {
    // The whole range in one call, then a piece starting mid-image.
    for (const auto& [p0, rows] : {std::pair<int64_t, int64_t>{0, total},
                                   std::pair<int64_t, int64_t>{total / 3, total - total / 3 - 1}}) {
      std::vector<uint8_t> out(static_cast<size_t>(std::max<int64_t>(rows, 1) * ldo), 0xEE);
      im2col_u8(x.data(), s.data(), g, group, p0, rows, pad_value, flip, out.data(), ldo);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t p = p0 + r;
        const int64_t n = p / (g.out_h * g.out_w), oh = (p / g.out_w) % g.out_h, ow = p % g.out_w;
        for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
          for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
            for (int64_t c = 0; c < cg; ++c) {
              const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dilation_h;
              const int64_t iw = ow * g.stride_w - g.pad_w + kw * g.dilation_w;
              const bool inside = ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w;
              const uint8_t expected =
                  (inside ? x[n * s[0] + (group * cg + c) * s[1] + ih * s[2] + iw * s[3]]
                          : pad_value) ^
                  flip;
              ASSERT_EQ(out[r * ldo + (kh * g.kernel_w + kw) * cg + c], expected)
                  << "row " << p << " tap " << kh << "," << kw << " c " << c << " group " << group;
            }
          }
        }
        for (int64_t j = k; j < ldo; ++j) ASSERT_EQ(out[r * ldo + j], 0xEE) << "wrote past K";
      }
    }
  }
}

TEST(Im2col, MatchesNaiveGatherAcrossLayouts) {
  std::mt19937 rng(1);
  struct Case {
    int64_t batch, cin, h, w, kh, kw, stride, pad, dilation, groups;
  };
  const Case cases[] = {
      {2, 3, 7, 6, 3, 3, 1, 1, 1, 1},   // same padding
      {1, 8, 9, 9, 3, 3, 2, 1, 1, 1},   // stride 2
      {2, 6, 8, 7, 3, 2, 1, 2, 2, 2},   // dilation, groups, asymmetric kernel
      {1, 12, 5, 5, 5, 5, 2, 2, 1, 3},  // 5x5, groups of 4
      {3, 4, 4, 5, 1, 1, 1, 0, 1, 1},   // 1x1
      {1, 5, 3, 3, 3, 3, 1, 2, 1, 1},   // padding larger than the image border: rows all padding
      {1, 2, 6, 7, 2, 3, 3, 0, 2, 2},   // depthwise-like grouping
      // Runs of every length class of copy_flip: 10, 16, 18 and 75 channels per group, 80..240
      // bytes of a kernel row.
      {1, 40, 5, 5, 3, 3, 1, 1, 1, 4},
      {1, 48, 6, 6, 3, 3, 1, 1, 1, 3},
      {1, 36, 5, 5, 3, 3, 1, 1, 1, 2},
      {1, 150, 4, 4, 3, 3, 1, 1, 1, 2},
      {1, 80, 5, 5, 3, 3, 1, 1, 1, 1},
  };
  for (const Case& c : cases) {
    const Conv2dGeometry g = make_geometry(c.batch, c.cin, c.h, c.w, c.cin * 2, c.kh, c.kw,
                                           c.stride, c.pad, c.dilation, c.groups);
    ASSERT_GT(g.out_h, 0);
    ASSERT_GT(g.out_w, 0);
    for (const bool channels_last : {false, true}) {
      for (const uint8_t flip : {uint8_t{0}, uint8_t{0x80}}) {
        SCOPED_TRACE(::testing::Message()
                     << "cin " << c.cin << " k " << c.kh << "x" << c.kw << " groups " << c.groups
                     << " nhwc " << channels_last << " flip " << int{flip});
        check_im2col(g, channels_last, 0, flip, rng);
        if (channels_last) check_im2col(g, true, 3, flip, rng);  // channel runs not adjacent
      }
    }
  }
}

TEST(Im2col, GroupKAndWeightLayout) {
  const Conv2dGeometry g = make_geometry(1, 6, 5, 5, 4, 3, 2, 1, 1, 1, 2);
  EXPECT_EQ(g.group_k(), 3 * 2 * 3);
  std::vector<int8_t> w(static_cast<size_t>(4 * 3 * 3 * 2));
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<int8_t>(i);
  std::vector<int8_t> gemm(static_cast<size_t>(2 * g.group_k()));
  conv_weight_to_gemm(w.data(), g, 1, gemm.data());
  // Group 1, local output channel 1 = channel 3; its tap (kh = 2, kw = 1), input channel c = 2:
  // torch index ((3 * 3 + 2) * 3 + 2) * 2 + 1, GEMM column (2 * 2 + 1) * 3 + 2.
  EXPECT_EQ(gemm[1 * g.group_k() + (2 * 2 + 1) * 3 + 2], w[((3 * 3 + 2) * 3 + 2) * 2 + 1]);
  EXPECT_EQ(gemm[0], w[2 * 3 * 3 * 2]);  // group 1 starts at output channel 2
}

// ---------------------------------------------------------------------------------------------
// Convolution: im2col + GEMM and depthwise against a direct int64 convolution
// ---------------------------------------------------------------------------------------------

struct QuantConv {
  Conv2dGeometry g;
  std::vector<uint8_t> x;  // NCHW or NHWC per `s`, levels in x's own encoding
  std::vector<int64_t> s;
  std::vector<int8_t> w;  // [out][in / groups][kh][kw]
  std::vector<int32_t> bias;
  std::vector<FixedPointMultiplier> mult;
  int32_t x_zero_point;  // in x's own encoding: uint8 levels, or int8 levels when signed_input
  bool signed_input;
  int32_t out_zero_point, out_min, out_max;

  int32_t x_level(int64_t n, int64_t c, int64_t h, int64_t w_) const {
    const uint8_t b = x[n * s[0] + c * s[1] + h * s[2] + w_ * s[3]];
    return signed_input ? static_cast<int8_t>(b) : b;
  }
};

// The requantization of q's output channels [first, ...) (row_sums: the packed weight's, or
// nullptr for the depthwise kernel, which does not read them).
RequantEpilogue conv_epilogue(const QuantConv& q, const int32_t* row_sums, int64_t first) {
  RequantEpilogue ep{};
  ep.row_sums = row_sums;
  ep.a_zero_point = q.x_zero_point + (q.signed_input ? 128 : 0);
  ep.bias = q.bias.empty() ? nullptr : q.bias.data() + first;
  ep.multiplier = q.mult.data() + first;
  ep.out_zero_point = q.out_zero_point;
  ep.out_min = q.out_min;
  ep.out_max = q.out_max;
  return ep;
}

// sum over in-image taps of (x - zx) * w + bias in int64, requantized; NCHW output.
std::vector<uint8_t> direct_conv(const QuantConv& q) {
  const Conv2dGeometry& g = q.g;
  const int64_t cg = g.in_channels / g.groups, og = g.out_channels / g.groups;
  std::vector<uint8_t> y(static_cast<size_t>(g.batch * g.out_channels * g.out_h * g.out_w));
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t o = 0; o < g.out_channels; ++o) {
      const int64_t group = o / og;
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          int64_t acc = q.bias.empty() ? 0 : q.bias[o];
          for (int64_t c = 0; c < cg; ++c) {
            for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
              for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
                const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dilation_h;
                const int64_t iw = ow * g.stride_w - g.pad_w + kw * g.dilation_w;
                if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) continue;
                acc += int64_t{q.x_level(n, group * cg + c, ih, iw) - q.x_zero_point} *
                       q.w[((o * cg + c) * g.kernel_h + kh) * g.kernel_w + kw];
              }
            }
          }
          EXPECT_EQ(acc, static_cast<int32_t>(acc)) << "test accumulator out of int32";
          y[((n * g.out_channels + o) * g.out_h + oh) * g.out_w + ow] =
              static_cast<uint8_t>(requantize(static_cast<int32_t>(acc), q.mult[o],
                                              q.out_zero_point, q.out_min, q.out_max));
        }
      }
    }
  }
  return y;
}

// The ops layer's lowering: per group, im2col (pad = zero point, flip int8 levels to uint8) and the
// GEMM on the group's packed weight. NCHW output.
std::vector<uint8_t> gemm_conv(const QuantConv& q, Isa isa) {
  const Conv2dGeometry& g = q.g;
  const int64_t og = g.out_channels / g.groups, k = g.group_k();
  const int64_t rows = g.batch * g.out_h * g.out_w;
  const uint8_t flip = q.signed_input ? 0x80 : 0;
  const int64_t lda = k + 5;
  std::vector<uint8_t> a(static_cast<size_t>(rows * lda));
  std::vector<uint8_t> c(static_cast<size_t>(rows * g.out_channels));
  for (int64_t group = 0; group < g.groups; ++group) {
    im2col_u8(q.x.data(), q.s.data(), g, group, 0, rows, static_cast<uint8_t>(q.x_zero_point), flip,
              a.data(), lda);
    std::vector<int8_t> wg(static_cast<size_t>(og * k));
    conv_weight_to_gemm(q.w.data(), g, group, wg.data());
    std::vector<int8_t> packed(packed_weight_bytes(og, k));
    std::vector<int32_t> row_sums(static_cast<size_t>(og));
    pack_weight(wg.data(), og, k, k, packed.data(), row_sums.data());
    const RequantEpilogue ep = conv_epilogue(q, row_sums.data(), group * og);
    qgemm_u8s8(isa, rows, og, k, a.data(), lda, packed.data(), ep, c.data() + group * og,
               g.out_channels);
  }
  // [n][oh][ow][o] -> NCHW
  std::vector<uint8_t> y(c.size());
  for (int64_t p = 0; p < rows; ++p) {
    const int64_t n = p / (g.out_h * g.out_w), hw = p % (g.out_h * g.out_w);
    for (int64_t o = 0; o < g.out_channels; ++o) {
      y[(n * g.out_channels + o) * g.out_h * g.out_w + hw] = c[p * g.out_channels + o];
    }
  }
  return y;
}

QuantConv random_conv(const Conv2dGeometry& g, bool channels_last, bool signed_input,
                      std::mt19937& rng) {
  QuantConv q;
  q.g = g;
  q.s = strides(g, channels_last, 0);
  q.signed_input = signed_input;
  q.x = random_bytes<uint8_t>(x_bytes(g, q.s), rng, 0, 255);
  q.w = random_bytes<int8_t>(g.out_channels * g.group_k(), rng, -128, 127);
  std::uniform_int_distribution<int> zp(signed_input ? -128 : 0, signed_input ? 127 : 255);
  q.x_zero_point = zp(rng);
  q.bias = random_bytes<int32_t>(g.out_channels, rng, -30000, 30000);
  std::uniform_real_distribution<double> log_m(-14.0, -8.0);
  for (int64_t o = 0; o < g.out_channels; ++o) {
    FixedPointMultiplier m{};
    EXPECT_TRUE(quantize_multiplier(std::exp2(log_m(rng)), &m));
    q.mult.push_back(m);
  }
  if (signed_input) {
    q.out_zero_point = zp(rng);
    q.out_min = -128;
    q.out_max = 127;
  } else {
    q.out_zero_point = zp(rng);
    q.out_min = 0;
    q.out_max = 255;
  }
  return q;
}

TEST(ConvGemm, Im2colPlusGemmEqualsDirectConvolution) {
  std::mt19937 rng(2);
  struct Case {
    int64_t batch, cin, h, w, cout, kh, kw, stride, pad, dilation, groups;
  };
  const Case cases[] = {
      {2, 3, 9, 8, 5, 3, 3, 1, 1, 1, 1},   {1, 16, 7, 7, 24, 3, 3, 2, 1, 1, 1},
      {2, 8, 8, 9, 8, 3, 3, 1, 2, 2, 2},   {1, 12, 6, 6, 6, 5, 5, 1, 2, 1, 3},
      {1, 20, 5, 6, 33, 1, 1, 1, 0, 1, 1}, {1, 4, 10, 10, 4, 3, 3, 2, 1, 1, 4},
  };
  for (const Case& c : cases) {
    const Conv2dGeometry g = make_geometry(c.batch, c.cin, c.h, c.w, c.cout, c.kh, c.kw, c.stride,
                                           c.pad, c.dilation, c.groups);
    for (const bool channels_last : {false, true}) {
      for (const bool signed_input : {false, true}) {
        SCOPED_TRACE(::testing::Message()
                     << "cin " << c.cin << " cout " << c.cout << " k " << c.kh << " groups "
                     << c.groups << " nhwc " << channels_last << " int8 " << signed_input);
        const QuantConv q = random_conv(g, channels_last, signed_input, rng);
        const std::vector<uint8_t> expected = direct_conv(q);
        EXPECT_EQ(gemm_conv(q, Isa::kScalar), expected);
        // Not all outputs clamp to one value: the comparison sees real requantized levels.
        EXPECT_GT(std::set<uint8_t>(expected.begin(), expected.end()).size(), 8u);
      }
    }
  }
}

// Geometry for the implicit-GEMM path (make_geometry ties the horizontal parameters to the
// vertical ones and varies dilation_w).
Conv2dGeometry implicit_geometry(int64_t batch, int64_t cin, int64_t h, int64_t w, int64_t cout,
                                 int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w,
                                 int64_t dilation_h, int64_t stride_h = 1, int64_t stride_w = 1) {
  Conv2dGeometry g = make_geometry(batch, cin, h, w, cout, kh, kw, 1, 0, 1, 1);
  g.stride_h = stride_h;
  g.stride_w = stride_w;
  g.pad_h = pad_h;
  g.pad_w = pad_w;
  g.dilation_h = dilation_h;
  g.out_h = out_size(h, kh, stride_h, pad_h, dilation_h);
  g.out_w = out_size(w, kw, stride_w, pad_w, 1);
  return g;
}

// conv2d_implicit_u8s8 over all images in pieces of `chunk` rows, in two calls split at a row
// that is not a piece boundary (the second call's pieces start mid-image); NCHW output.
// A grouped q runs group by group (per_group) or as the dense convolution with the
// block-diagonal weight of pack_grouped_weight_dense.
std::vector<uint8_t> implicit_conv(const QuantConv& q, int64_t chunk, bool per_group = false) {
  Conv2dGeometry g = q.g;
  const int64_t og = g.out_channels / g.groups, kg = g.group_k();
  const auto group_bytes = static_cast<int64_t>(packed_weight_bytes(og, kg));
  std::vector<int8_t> wg(static_cast<size_t>(og * kg)), packed(group_bytes * g.groups);
  std::vector<int32_t> row_sums(static_cast<size_t>(g.out_channels));
  for (int64_t group = 0; group < g.groups; ++group) {
    conv_weight_to_gemm(q.w.data(), g, group, wg.data());
    pack_weight(wg.data(), og, kg, kg, packed.data() + group * group_bytes,
                row_sums.data() + group * og);
  }
  if (g.groups > 1 && !per_group) {
    const Conv2dGeometry grouped = g;
    g.groups = 1;
    std::vector<int8_t> dense(packed_weight_bytes(g.out_channels, g.group_k()), 0x55);
    pack_grouped_weight_dense(packed.data(), grouped, dense.data());
    packed = std::move(dense);
  }
  const int64_t implicit_k = conv_implicit_k(g);
  std::vector<int8_t> weight(g.groups * packed_weight_bytes(g.out_channels / g.groups, implicit_k),
                             0x55);
  pack_conv_weight_implicit(packed.data(), g, weight.data());
  const RequantEpilogue ep = conv_epilogue(q, row_sums.data(), 0);
  std::vector<uint8_t> nhwc(static_cast<size_t>(g.batch * g.out_h * g.out_w * g.out_channels),
                            0xEE);
  const int64_t total_rows = g.batch * g.out_h, split = total_rows / 2 + 1;
  for (const auto& [begin, end] : {std::pair{int64_t{0}, split}, std::pair{split, total_rows}}) {
    conv2d_implicit_u8s8(q.x.data(), g, weight.data(), ep, begin, end, chunk,
                         static_cast<uint8_t>(q.x_zero_point), q.signed_input ? 0x80 : 0,
                         nhwc.data());
  }
  std::vector<uint8_t> y(nhwc.size());
  const int64_t hw = g.out_h * g.out_w;
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t p = 0; p < hw; ++p) {
      for (int64_t o = 0; o < g.out_channels; ++o) {
        y[(n * g.out_channels + o) * hw + p] = nhwc[(n * hw + p) * g.out_channels + o];
      }
    }
  }
  return y;
}

TEST(ConvImplicit, WeightLayouts) {
  // 5 output channels, 2x3 kernel over 40 channels: kernel rows of 120 bytes padded to 128 (the
  // 240-byte patch needs 4 k blocks too: padded rows it is).
  const Conv2dGeometry g = implicit_geometry(1, 40, 6, 6, 5, 2, 3, 1, 1, 1);
  const std::vector<ConvSegment> rows = conv_implicit_segments(g);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[1].kh, 1);
  EXPECT_EQ(rows[1].taps, 3);
  EXPECT_EQ(rows[1].k0, 128);
  EXPECT_EQ(rows[1].bytes, 128);
  ASSERT_FALSE(conv_implicit_gathers_patches(g));
  ASSERT_FALSE(conv_implicit_weight_is_packed(g));
  ASSERT_EQ(conv_implicit_k(g), 2 * 128);
  const int64_t k = g.group_k(), row = 120;
  std::vector<int8_t> wg(static_cast<size_t>(5 * k));
  for (size_t i = 0; i < wg.size(); ++i) wg[i] = static_cast<int8_t>(i % 251 - 125);
  std::vector<int8_t> packed(packed_weight_bytes(5, k));
  std::vector<int32_t> sums(5);
  pack_weight(wg.data(), 5, k, k, packed.data(), sums.data());
  std::vector<int8_t> spans(packed_weight_bytes(5, 2 * 128), 0x55);
  pack_conv_weight_implicit(packed.data(), g, spans.data());
  // Unpacked by hand (qgemm.h layout): W'[n][kh * 128 + b] is W[n][kh * 120 + b] for b < 120,
  // else 0.
  for (int64_t n = 0; n < 16; ++n) {
    for (int64_t kk = 0; kk < 2 * 128; ++kk) {
      const int64_t kh = kk / 128, b = kk % 128;
      const int8_t expected = (n < 5 && b < row) ? wg[n * k + kh * row + b] : 0;
      ASSERT_EQ(spans[(kk / 4) * 64 + n * 4 + kk % 4], expected) << "n " << n << " k " << kk;
    }
  }
  // One channel: the 9-byte patch (one k block) rather than three padded rows; C = 64: rows of
  // 64 bytes already. Both use the packed weight as it is.
  const Conv2dGeometry g1 = implicit_geometry(1, 1, 6, 6, 8, 3, 3, 0, 0, 1);
  EXPECT_TRUE(conv_implicit_gathers_patches(g1));
  EXPECT_EQ(conv_implicit_k(g1), 64);
  EXPECT_TRUE(conv_implicit_weight_is_packed(g1));
  // 32 channels, 3x3: 5 patch k blocks against 6 padded-row ones is not worth the gather.
  EXPECT_FALSE(conv_implicit_gathers_patches(implicit_geometry(1, 32, 6, 6, 8, 3, 3, 0, 0, 1)));
  const Conv2dGeometry g64 = implicit_geometry(1, 64, 4, 4, 16, 3, 1, 0, 0, 1);
  EXPECT_FALSE(conv_implicit_gathers_patches(g64));
  EXPECT_TRUE(conv_implicit_weight_is_packed(g64));
  const int64_t k64 = g64.group_k();
  std::vector<int8_t> w64(static_cast<size_t>(16 * k64), 3), p64(packed_weight_bytes(16, k64)),
      s64(packed_weight_bytes(16, k64));
  std::vector<int32_t> sums64(16);
  pack_weight(w64.data(), 16, k64, k64, p64.data(), sums64.data());
  pack_conv_weight_implicit(p64.data(), g64, s64.data());
  EXPECT_EQ(s64, p64);
}

TEST(ConvImplicit, StridedWeightLayout) {
  // 3x3 over 40 channels, stride 2 across: per kernel row the taps kw = 0, 2 (80 bytes, padded to
  // 128), then kw = 1 (40 bytes, padded to 64). 3 output channels.
  const Conv2dGeometry g = implicit_geometry(1, 40, 9, 9, 3, 3, 3, 1, 1, 1, 2, 2);
  const std::vector<ConvSegment> segments = conv_implicit_segments(g);
  ASSERT_EQ(segments.size(), 6u);
  const int64_t expected[6][5] = {{0, 0, 2, 0, 128},  {0, 1, 1, 128, 64},  {1, 0, 2, 192, 128},
                                  {1, 1, 1, 320, 64}, {2, 0, 2, 384, 128}, {2, 1, 1, 512, 64}};
  for (int i = 0; i < 6; ++i) {
    const ConvSegment& s = segments[i];
    EXPECT_EQ((std::vector<int64_t>{s.kh, s.phase, s.taps, s.k0, s.bytes}),
              std::vector<int64_t>(expected[i], expected[i] + 5))
        << "segment " << i;
  }
  ASSERT_FALSE(conv_implicit_gathers_patches(g));  // the 360-byte patch: 384 against 576
  ASSERT_FALSE(conv_implicit_weight_is_packed(g));
  ASSERT_EQ(conv_implicit_k(g), 576);
  const int64_t k = g.group_k();
  std::vector<int8_t> wg(static_cast<size_t>(3 * k));
  for (size_t i = 0; i < wg.size(); ++i) wg[i] = static_cast<int8_t>(i % 253 - 126);
  std::vector<int8_t> packed(packed_weight_bytes(3, k));
  std::vector<int32_t> sums(3);
  pack_weight(wg.data(), 3, k, k, packed.data(), sums.data());
  std::vector<int8_t> implicit(packed_weight_bytes(3, 576), 0x55);
  pack_conv_weight_implicit(packed.data(), g, implicit.data());
  // Unpacked by hand: k = kh * 192 + b; b < 80: tap kw = 2 (b / 40), b in [128, 168): tap kw = 1.
  for (int64_t n = 0; n < 16; ++n) {
    for (int64_t kk = 0; kk < 576; ++kk) {
      const int64_t kh = kk / 192, b = kk % 192;
      int8_t want = 0;
      if (n < 3 && b < 80) want = wg[n * k + (kh * 3 + 2 * (b / 40)) * 40 + b % 40];
      if (n < 3 && b >= 128 && b < 168) want = wg[n * k + (kh * 3 + 1) * 40 + b - 128];
      ASSERT_EQ(implicit[(kk / 4) * 64 + n * 4 + kk % 4], want) << "n " << n << " k " << kk;
    }
  }
  // 1x1 stride 2 over 64 channels: one 64-byte segment, the packed weight itself.
  EXPECT_TRUE(
      conv_implicit_weight_is_packed(implicit_geometry(1, 64, 8, 8, 4, 1, 1, 0, 0, 1, 2, 2)));
}

TEST(ConvImplicit, AmxEqualsDirectConvolution) {
  if (!isa_supported(Isa::kAmx)) GTEST_SKIP() << "no AMX";
  std::mt19937 rng(3);
  struct Case {
    int64_t batch, cin, h, w, cout, kh, kw, pad_h, pad_w, dilation_h, chunk;
  };
  // A rows read in place from the padded input, 64-byte aligned (0) or straddling cache lines (1),
  // or from gathered patches (2).
  std::set<int> modes;
  // The last three have one channel: patches of up to 16 bytes take the byte-permute gather (2x5
  // dilated, 4x4), larger ones the copies (5x5).
  const Case cases[] = {
      {2, 1, 28, 28, 32, 3, 3, 0, 0, 1, 26}, {1, 3, 9, 8, 5, 3, 3, 1, 1, 1, 2},
      {2, 32, 13, 13, 64, 3, 3, 0, 0, 1, 4}, {1, 64, 12, 11, 64, 3, 3, 1, 1, 1, 5},
      {1, 16, 7, 9, 40, 5, 5, 2, 2, 1, 3},   {1, 80, 6, 7, 100, 2, 3, 1, 0, 2, 1},
      {3, 20, 5, 6, 33, 1, 1, 0, 0, 1, 5},   {1, 8, 17, 3, 16, 3, 1, 1, 0, 2, 7},
      {1, 128, 4, 4, 24, 3, 3, 1, 1, 1, 4},  {1, 7, 40, 40, 9, 3, 3, 1, 1, 1, 40},
      {2, 96, 5, 9, 20, 1, 3, 0, 1, 1, 2},   {2, 1, 11, 12, 7, 2, 5, 1, 2, 2, 3},
      {1, 1, 9, 10, 20, 4, 4, 0, 1, 1, 2},   {1, 1, 12, 12, 8, 5, 5, 2, 2, 1, 4},
  };
  for (const Case& c : cases) {
    const Conv2dGeometry g = implicit_geometry(c.batch, c.cin, c.h, c.w, c.cout, c.kh, c.kw,
                                               c.pad_h, c.pad_w, c.dilation_h);
    ASSERT_TRUE(conv_implicit_supported(g));
    modes.insert(conv_implicit_gathers_patches(g) ? 2 : g.in_channels % 64 == 0 ? 0 : 1);
    for (const bool signed_input : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "cin " << c.cin << " cout " << c.cout << " k " << c.kh
                                        << "x" << c.kw << " pad " << c.pad_h << "," << c.pad_w
                                        << " dil_h " << c.dilation_h << " int8 " << signed_input);
      const QuantConv q = random_conv(g, /*channels_last=*/true, signed_input, rng);
      const std::vector<uint8_t> expected = direct_conv(q);
      EXPECT_EQ(implicit_conv(q, c.chunk), expected);
      EXPECT_GT(std::set<uint8_t>(expected.begin(), expected.end()).size(), 8u);
    }
  }
  EXPECT_EQ(modes.size(), 3u) << "every way of reading A rows is covered";
}

TEST(ConvImplicit, StridedEqualsDirectConvolution) {
  if (!isa_supported(Isa::kAmx)) GTEST_SKIP() << "no AMX";
  std::mt19937 rng(6);
  struct Case {
    int64_t batch, cin, h, w, cout, kh, kw, pad_h, pad_w, dilation_h, stride_h, stride_w, chunk;
  };
  // Phase planes: 2x2 of 64 (aligned) and 32 channels, odd padded widths, stride only across or
  // only down, 3x2, a kernel narrower than the stride (2x2 stride 3: planes of one tap), 1x1
  // stride 2 (one plane in use), dilation 2 with stride 2 (one row phase in use). Patches: the 7x7
  // stride-2 stem on 3 channels, one channel with the byte-permute gather (3x3 stride 2, 1x4
  // stride 3) and with copies (5x5 stride 2).
  const Case cases[] = {
      {2, 64, 11, 12, 64, 3, 3, 1, 1, 1, 2, 2, 3}, {1, 32, 13, 9, 40, 3, 3, 1, 1, 1, 2, 2, 2},
      {1, 24, 7, 15, 33, 3, 3, 0, 2, 1, 1, 2, 4},  {2, 48, 14, 6, 20, 3, 3, 1, 1, 1, 2, 1, 3},
      {1, 40, 16, 17, 24, 3, 5, 2, 1, 1, 3, 2, 2}, {1, 72, 10, 10, 17, 2, 2, 0, 1, 1, 3, 3, 1},
      {2, 64, 9, 9, 48, 1, 1, 0, 0, 1, 2, 2, 5},   {1, 64, 13, 12, 16, 3, 3, 2, 1, 2, 2, 2, 2},
      {1, 3, 23, 21, 16, 7, 7, 3, 3, 1, 2, 2, 4},  {2, 1, 15, 16, 8, 3, 3, 1, 1, 1, 2, 2, 3},
      {1, 1, 9, 22, 12, 1, 4, 0, 1, 1, 1, 3, 2},   {1, 1, 17, 15, 8, 5, 5, 2, 2, 1, 2, 2, 3},
  };
  std::set<std::string> modes;
  for (const Case& c : cases) {
    const Conv2dGeometry g =
        implicit_geometry(c.batch, c.cin, c.h, c.w, c.cout, c.kh, c.kw, c.pad_h, c.pad_w,
                          c.dilation_h, c.stride_h, c.stride_w);
    ASSERT_TRUE(conv_implicit_supported(g));
    modes.insert(conv_implicit_gathers_patches(g) ? (c.cin == 1 ? "one-channel patches" : "patches")
                                                  : "planes");
    for (const bool signed_input : {false, true}) {
      SCOPED_TRACE(::testing::Message()
                   << "cin " << c.cin << " " << c.h << "x" << c.w << " cout " << c.cout << " k "
                   << c.kh << "x" << c.kw << " stride " << c.stride_h << "," << c.stride_w
                   << " pad " << c.pad_h << "," << c.pad_w << " dil_h " << c.dilation_h << " int8 "
                   << signed_input);
      const QuantConv q = random_conv(g, /*channels_last=*/true, signed_input, rng);
      const std::vector<uint8_t> expected = direct_conv(q);
      EXPECT_EQ(implicit_conv(q, c.chunk), expected);
      EXPECT_GT(std::set<uint8_t>(expected.begin(), expected.end()).size(), 8u);
    }
  }
  EXPECT_EQ(modes.size(), 3u);
}

TEST(ConvImplicit, GroupedEqualsDirectConvolution) {
  if (!isa_supported(Isa::kAmx)) GTEST_SKIP() << "no AMX";
  std::mt19937 rng(5);
  struct Case {
    int64_t batch, cin, h, w, cout, kh, kw, pad, groups, stride;
  };
  // Every case runs group by group and as the block-diagonal dense convolution: 2- to 32-column
  // groups of 3 to 32 channels, strides 1 and 2, input planes copied by lane transposes (16 or 32
  // channels per group, 64-byte pixels; the last 64 x 7 x 11 case leaves pixels over) or per pixel
  // (a masked tail).
  const Case cases[] = {
      {2, 64, 9, 8, 64, 3, 3, 1, 4, 1},  {1, 12, 7, 7, 18, 3, 3, 1, 3, 1},
      {1, 32, 6, 9, 40, 1, 3, 0, 2, 1},  {1, 6, 8, 8, 4, 5, 5, 2, 2, 1},
      {2, 48, 5, 5, 96, 3, 3, 1, 8, 1},  {2, 64, 11, 11, 64, 3, 3, 1, 2, 2},
      {1, 96, 9, 10, 48, 3, 3, 1, 3, 2}, {1, 64, 8, 8, 40, 3, 3, 1, 2, 1},
      {1, 64, 7, 11, 32, 3, 3, 1, 4, 1},
  };
  for (const Case& c : cases) {
    Conv2dGeometry g = implicit_geometry(c.batch, c.cin, c.h, c.w, c.cout, c.kh, c.kw, c.pad, c.pad,
                                         1, c.stride, c.stride);
    g.groups = c.groups;
    ASSERT_TRUE(conv_implicit_supported(g));
    ASSERT_FALSE(conv_implicit_gathers_patches(g));  // groups always read planes
    for (const bool signed_input : {false, true}) {
      SCOPED_TRACE(::testing::Message()
                   << "cin " << c.cin << " cout " << c.cout << " groups " << c.groups << " stride "
                   << c.stride << " int8 " << signed_input);
      const QuantConv q = random_conv(g, /*channels_last=*/true, signed_input, rng);
      const std::vector<uint8_t> expected = direct_conv(q);
      EXPECT_EQ(implicit_conv(q, 3), expected);
      EXPECT_EQ(implicit_conv(q, 2, /*per_group=*/true), expected);
      EXPECT_GT(std::set<uint8_t>(expected.begin(), expected.end()).size(), 8u);
    }
  }
}

TEST(ConvImplicit, TileLoadsPerGroupAndBlockDiagonal) {
  // 3x3 over 64 channels into 64: 4 groups of 16 take 3 k blocks x 3 loads each (36), the
  // block-diagonal dense convolution 9 k blocks x 8 (72).
  Conv2dGeometry g = implicit_geometry(1, 64, 8, 8, 64, 3, 3, 1, 1, 1);
  EXPECT_EQ(conv_implicit_tile_loads(g), 72);
  g.groups = 4;
  EXPECT_EQ(conv_implicit_tile_loads(g), 36);
  // Into 4 channels, 2 groups of 32: 6 k blocks (96-byte rows padded to 128) x 3 loads x 2 (36)
  // against 9 x 3 (27).
  g.out_channels = 4;
  g.groups = 2;
  EXPECT_EQ(conv_implicit_tile_loads(g), 36);
  g.groups = 1;
  EXPECT_EQ(conv_implicit_tile_loads(g), 27);
}

TEST(ConvImplicit, ExtremeLevelsAndRejections) {
  if (!isa_supported(Isa::kAmx)) GTEST_SKIP() << "no AMX";
  std::mt19937 rng(4);
  const Conv2dGeometry g = implicit_geometry(1, 64, 10, 10, 32, 3, 3, 1, 1, 1);
  QuantConv q = random_conv(g, true, false, rng);
  // 255 inputs against -128 weights, zero point 0: the largest sums the exactness bound allows.
  std::fill(q.x.begin(), q.x.end(), 255);
  std::fill(q.w.begin(), q.w.end(), -128);
  q.x_zero_point = 0;
  EXPECT_EQ(implicit_conv(q, 3), direct_conv(q));
  std::fill(q.w.begin(), q.w.end(), 127);
  EXPECT_EQ(implicit_conv(q, 10), direct_conv(q));

  std::vector<uint8_t> x(10 * 10 * 64), y(10 * 10 * 32);
  std::vector<int8_t> w(packed_weight_bytes(32, 3 * 192));
  std::vector<int32_t> sums(32);
  std::vector<FixedPointMultiplier> mult(32, FixedPointMultiplier{1 << 30, 0, 0});
  const RequantEpilogue ep{sums.data(), 0, nullptr, mult.data(), 0, 0, 255};
  Conv2dGeometry dilated = g;
  dilated.dilation_w = 2;
  dilated.out_w = 6;
  EXPECT_FALSE(conv_implicit_supported(dilated));
  EXPECT_THROW(conv2d_implicit_u8s8(x.data(), dilated, w.data(), ep, 0, 1, 1, 0, 0, y.data()),
               std::invalid_argument);
  EXPECT_THROW(conv2d_implicit_u8s8(x.data(), g, w.data(), ep, 0, 11, 4, 0, 0, y.data()),
               std::invalid_argument);  // 10 output rows
  EXPECT_THROW(conv2d_implicit_u8s8(x.data(), g, w.data(), ep, -1, 3, 4, 0, 0, y.data()),
               std::invalid_argument);
  EXPECT_THROW(conv2d_implicit_u8s8(x.data(), g, w.data(), ep, 0, 3, 0, 0, 0, y.data()),
               std::invalid_argument);  // pieces of no rows
  std::vector<FixedPointMultiplier> bad(32, FixedPointMultiplier{5, 0, 0});
  const RequantEpilogue bad_ep{sums.data(), 0, nullptr, bad.data(), 0, 0, 255};
  EXPECT_THROW(conv2d_implicit_u8s8(x.data(), g, w.data(), bad_ep, 0, 1, 1, 0, 0, y.data()),
               std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Depthwise
// ---------------------------------------------------------------------------------------------

struct DepthwiseRun {
  std::vector<uint8_t> x_nhwc;  // uint8 levels
  std::vector<int8_t> w_hwc;
  RequantEpilogue ep;
};

// Depthwise through the kernel on NHWC uint8 levels, all images, rows split in two calls.
std::vector<uint8_t> run_depthwise(Isa isa, const QuantConv& q) {
  const Conv2dGeometry& g = q.g;
  const int64_t channels = g.in_channels;
  std::vector<uint8_t> x(static_cast<size_t>(g.batch * g.in_h * g.in_w * channels));
  const uint8_t flip = q.signed_input ? 0x80 : 0;
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t h = 0; h < g.in_h; ++h) {
      for (int64_t w = 0; w < g.in_w; ++w) {
        for (int64_t c = 0; c < channels; ++c) {
          x[((n * g.in_h + h) * g.in_w + w) * channels + c] =
              q.x[n * q.s[0] + c * q.s[1] + h * q.s[2] + w * q.s[3]] ^ flip;
        }
      }
    }
  }
  std::vector<int8_t> w_hwc(q.w.size());
  depthwise_weight_to_hwc(q.w.data(), g, w_hwc.data());
  const RequantEpilogue ep = conv_epilogue(q, nullptr, 0);
  std::vector<uint8_t> y(static_cast<size_t>(g.batch * g.out_h * g.out_w * channels), 0xEE);
  const int64_t split = g.out_h / 2;
  for (int64_t n = 0; n < g.batch; ++n) {
    depthwise_conv2d_u8s8(isa, x.data(), g, w_hwc.data(), ep, n, 0, split, y.data());
    depthwise_conv2d_u8s8(isa, x.data(), g, w_hwc.data(), ep, n, split, g.out_h, y.data());
  }
  // NHWC -> NCHW for the comparison with direct_conv.
  std::vector<uint8_t> nchw(y.size());
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t hw = 0; hw < g.out_h * g.out_w; ++hw) {
      for (int64_t c = 0; c < channels; ++c) {
        nchw[(n * channels + c) * g.out_h * g.out_w + hw] =
            y[(n * g.out_h * g.out_w + hw) * channels + c];
      }
    }
  }
  return nchw;
}

Conv2dGeometry depthwise_geometry(int64_t batch, int64_t channels, int64_t h, int64_t w, int64_t k,
                                  int64_t stride, int64_t pad, int64_t dilation) {
  Conv2dGeometry g{};
  g.batch = batch;
  g.in_channels = g.out_channels = g.groups = channels;
  g.in_h = h;
  g.in_w = w;
  g.kernel_h = g.kernel_w = k;
  g.stride_h = g.stride_w = stride;
  g.pad_h = g.pad_w = pad;
  g.dilation_h = g.dilation_w = dilation;
  g.out_h = out_size(h, k, stride, pad, dilation);
  g.out_w = out_size(w, k, stride, pad, dilation);
  return g;
}

TEST(Depthwise, ScalarEqualsDirectAndGemmAndVectorPathsAreBitIdentical) {
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> pick_c(1, 70), pick_hw(3, 13), pick_k(0, 1), pick_s(1, 2);
  const bool avx2 = isa_supported(Isa::kAvx2), vnni = isa_supported(Isa::kAvx512Vnni);
  for (int iter = 0; iter < 48; ++iter) {
    // 16, 32, 64, then random; 96, 130, 200 (several 64-channel chunks of the VNNI path) at the end
    const int64_t channels = iter < 4    ? int64_t{16} << iter % 3
                             : iter < 42 ? pick_c(rng)
                                         : std::array<int64_t, 3>{96, 130, 200}[iter % 3];
    const int64_t k = pick_k(rng) ? 5 : 3;
    const int64_t stride = pick_s(rng);
    const int64_t pad = iter % 4 == 3 ? 0 : k / 2;
    const int64_t dilation = iter % 7 == 6 ? 2 : 1;
    const int64_t h = std::max<int64_t>(pick_hw(rng), dilation * (k - 1) + 1 - 2 * pad);
    const int64_t w = std::max<int64_t>(pick_hw(rng), dilation * (k - 1) + 1 - 2 * pad);
    const Conv2dGeometry g =
        depthwise_geometry(1 + iter % 2, channels, h, w, k, stride, pad, dilation);
    const bool signed_input = iter % 3 == 1;
    QuantConv q = random_conv(g, iter % 2 == 0, signed_input, rng);
    if (iter % 5 == 4) {
      // Extreme levels: inputs at the ends of their range, weights at theirs, the input zero point
      // at the opposite end so (x - zx) reaches +-255.
      std::uniform_int_distribution<int> coin(0, 1);
      for (auto& b : q.x) b = coin(rng) ? 0x00 : 0xFF;
      for (auto& v : q.w) v = coin(rng) ? -128 : 127;
      if (signed_input) {
        for (auto& b : q.x) b ^= 0x80;  // -128 / 127 as int8 bytes
        q.x_zero_point = coin(rng) ? -128 : 127;
      } else {
        q.x_zero_point = coin(rng) ? 0 : 255;
      }
    }
    SCOPED_TRACE(::testing::Message()
                 << "iter " << iter << " C " << channels << " k " << k << " stride " << stride
                 << " pad " << pad << " dilation " << dilation << " int8 " << signed_input);
    const std::vector<uint8_t> expected = direct_conv(q);
    const std::vector<uint8_t> scalar = run_depthwise(Isa::kScalar, q);
    ASSERT_EQ(scalar, expected);
    ASSERT_EQ(gemm_conv(q, Isa::kScalar), expected);  // the same numbers as the lowered form
    if (avx2) {
      ASSERT_EQ(run_depthwise(Isa::kAvx2, q), scalar);
      ASSERT_EQ(run_depthwise(best_isa(), q), scalar);
    }
    if (vnni) ASSERT_EQ(run_depthwise(Isa::kAvx512Vnni, q), scalar);
  }
}

TEST(Depthwise, VectorRequantizationCornerCases) {
  // Multipliers with left shifts that saturate, right shifts up to 31, zero points and clamps that
  // cut: all against the scalar path.
  if (!isa_supported(Isa::kAvx2)) GTEST_SKIP() << "no AVX2";
  std::mt19937 rng(4);
  const Conv2dGeometry g = depthwise_geometry(1, 37, 6, 5, 3, 1, 1, 1);
  QuantConv q = random_conv(g, true, false, rng);
  const double ms[] = {0x1p-32, 0x1p-31 * 1.7, 1e-5, 0.37, 0.5, 1.0, 1.5, 3.999, 1000.0, 0x1p29};
  for (int64_t c = 0; c < g.in_channels; ++c)
    ASSERT_TRUE(quantize_multiplier(ms[c % 10], &q.mult[c]));
  for (auto& b : q.bias) b = b * 1000;  // large accumulators: the left shift saturates
  for (const auto& [zp, lo, hi] : {std::tuple<int32_t, int32_t, int32_t>{0, 0, 255},
                                   std::tuple<int32_t, int32_t, int32_t>{200, 50, 230},
                                   std::tuple<int32_t, int32_t, int32_t>{-100, 0, 255}}) {
    q.out_zero_point = zp;
    q.out_min = lo;
    q.out_max = hi;
    EXPECT_EQ(run_depthwise(Isa::kAvx2, q), run_depthwise(Isa::kScalar, q));
    if (isa_supported(Isa::kAvx512Vnni)) {
      EXPECT_EQ(run_depthwise(Isa::kAvx512Vnni, q), run_depthwise(Isa::kScalar, q));
    }
    EXPECT_EQ(run_depthwise(Isa::kScalar, q), direct_conv(q));
  }
}

// ---------------------------------------------------------------------------------------------
// Add
// ---------------------------------------------------------------------------------------------

// The AddParams formula, recomputed here in int64.
int32_t add_int64(int32_t qa, int32_t qb, const AddParams& p) {
  const int64_t v = (qa - p.za) * p.a_mult + (qb - p.zb) * p.b_mult;
  const int64_t q = static_cast<int64_t>(std::floor(
                        static_cast<long double>(v) / std::ldexp(1.0L, p.shift) + 0.5L)) +
                    p.zo;
  return static_cast<int32_t>(std::clamp<int64_t>(q, p.lo, p.hi));
}

TEST(Add, ParamsAndRejection) {
  AddParams p{};
  ASSERT_TRUE(make_add_params(0.1, 0.05, 0.2, 10, 20, 30, 0, 255, false, &p));
  EXPECT_LT(std::max(std::abs(p.a_mult), std::abs(p.b_mult)), int64_t{1} << 31);
  // The shift is the largest that keeps both below 2^31: one more bit would reach 2^31.
  EXPECT_GE(std::llround(std::ldexp(0.5, p.shift + 1)), int64_t{1} << 31);
  EXPECT_EQ(p.a_mult, std::llround(std::ldexp(0.5, p.shift)));
  EXPECT_EQ(p.b_mult, std::llround(std::ldexp(0.25, p.shift)));
  EXPECT_EQ(p.za, 10);
  EXPECT_EQ(p.lo, 0);
  ASSERT_TRUE(make_add_params(0.1, 0.05, 0.2, 10, 20, 30, 0, 255, true, &p));
  EXPECT_EQ(p.lo, 30);  // ReLU: the output zero point
  ASSERT_TRUE(make_add_params(0.1, 0.05, 0.2, 10, 20, 200, 0, 150, true, &p));
  EXPECT_EQ(p.lo, 150);  // a 0 above hi clamps everything to hi

  AddParams untouched{1, 2, 3, 4, 5, 6, 7, 8};
  const AddParams before = untouched;
  for (const double bad : {0.0, -0.1, kNaN, kInf, -kInf}) {
    EXPECT_FALSE(make_add_params(bad, 0.1, 0.1, 0, 0, 0, 0, 255, false, &untouched)) << bad;
    EXPECT_FALSE(make_add_params(0.1, bad, 0.1, 0, 0, 0, 0, 255, false, &untouched)) << bad;
    EXPECT_FALSE(make_add_params(0.1, 0.1, bad, 0, 0, 0, 0, 255, false, &untouched)) << bad;
  }
  EXPECT_FALSE(make_add_params(1.0, 1e-12, 1.0, 0, 0, 0, 0, 255, false, &untouched));  // ratio tiny
  EXPECT_FALSE(make_add_params(1e10, 1.0, 1.0, 0, 0, 0, 0, 255, false, &untouched));   // ratio huge
  EXPECT_FALSE(make_add_params(1.0, 1.0, 1.0, -1, 0, 0, 0, 255, false, &untouched));
  EXPECT_FALSE(make_add_params(1.0, 1.0, 1.0, 0, 256, 0, 0, 255, false, &untouched));
  EXPECT_FALSE(make_add_params(1.0, 1.0, 1.0, 0, 0, 0, 10, 9, false, &untouched));
  EXPECT_FALSE(make_add_params(1.0, 1.0, 1.0, 0, 0, 0, -128, 127, false, &untouched));
  EXPECT_EQ(untouched.a_mult, before.a_mult);
  EXPECT_EQ(untouched.shift, before.shift);
  EXPECT_EQ(untouched.za, before.za);
}

TEST(Add, HandComputedTiesRoundHalfUp) {
  AddParams p{};
  // sa / so = sb / so = 1/2: out = round((qa - za) / 2 + (qb - zb) / 2) + zo.
  ASSERT_TRUE(make_add_params(0.5, 0.5, 1.0, 10, 10, 100, 0, 255, false, &p));
  EXPECT_EQ(add_level(11, 10, p), 101);    // +0.5 -> 1
  EXPECT_EQ(add_level(9, 10, p), 100);     // -0.5 -> 0 (half up, not away from zero)
  EXPECT_EQ(add_level(13, 10, p), 102);    // 1.5 -> 2
  EXPECT_EQ(add_level(7, 10, p), 99);      // -1.5 -> -1
  EXPECT_EQ(add_level(12, 13, p), 103);    // 1 + 1.5 = 2.5 -> 3
  EXPECT_EQ(add_level(255, 255, p), 255);  // 245 + 100 clamps
  EXPECT_EQ(add_level(0, 0, p), 90);
  // Equal scales and zero points 0: plain saturating addition.
  ASSERT_TRUE(make_add_params(0.1, 0.1, 0.1, 0, 0, 0, 0, 255, false, &p));
  EXPECT_EQ(add_level(100, 27, p), 127);
  EXPECT_EQ(add_level(200, 100, p), 255);
  // ReLU with zo = 128: negative sums stop at 128.
  ASSERT_TRUE(make_add_params(1.0, 1.0, 1.0, 128, 128, 128, 0, 255, true, &p));
  EXPECT_EQ(add_level(100, 100, p), 128);
  EXPECT_EQ(add_level(130, 140, p), 142);
  // Through add_u8 with int8 levels: -3 + 5 with zero points 0 (uint8 domain 128) = 2.
  ASSERT_TRUE(make_add_params(1.0, 1.0, 1.0, 128, 128, 128, 0, 255, false, &p));
  const uint8_t a[] = {static_cast<uint8_t>(int8_t{-3})}, b[] = {5};
  uint8_t out[1];
  add_u8(Isa::kScalar, a, b, 1, p, out, 0x80, 0x80, 0x80);
  EXPECT_EQ(static_cast<int8_t>(out[0]), 2);
}

TEST(Add, MatchesReferencesAndAvx2IsBitIdentical) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> log_s(-8.0, 2.0);
  std::uniform_int_distribution<int> level(0, 255), len(0, 300);
  const bool avx2 = isa_supported(Isa::kAvx2);
  int64_t near_ties = 0, compared = 0;
  for (int iter = 0; iter < 60; ++iter) {
    const double sa = std::exp2(log_s(rng)), sb = std::exp2(log_s(rng));
    const double so = iter % 4 == 0 ? sa : std::exp2(log_s(rng) + 1.0);
    const int32_t za = level(rng), zb = level(rng), zo = level(rng);
    const int32_t lo = iter % 3 == 0 ? 20 : 0, hi = iter % 3 == 0 ? 230 : 255;
    const bool relu = iter % 5 == 2;
    AddParams p{};
    if (!make_add_params(sa, sb, so, za, zb, zo, lo, hi, relu, &p)) {
      ADD_FAILURE() << "rejected " << sa << " " << sb << " " << so;
      continue;
    }
    const int64_t n = iter < 3 ? 4096 + iter : len(rng);
    const uint8_t af = iter % 2 ? 0x80 : 0, bf = iter % 3 ? 0x80 : 0, of = iter % 4 ? 0 : 0x80;
    const std::vector<uint8_t> a = random_bytes<uint8_t>(n, rng, 0, 255);
    const std::vector<uint8_t> b = random_bytes<uint8_t>(n, rng, 0, 255);
    std::vector<uint8_t> scalar(static_cast<size_t>(n));
    add_u8(Isa::kScalar, a.data(), b.data(), n, p, scalar.data(), af, bf, of);
    const double ra = sa / so, rb = sb / so;
    const int32_t lo_eff = relu ? std::min(std::max(lo, zo), hi) : lo;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t qa = a[i] ^ af, qb = b[i] ^ bf;
      const int32_t got = scalar[i] ^ of;
      ASSERT_EQ(got, add_int64(qa, qb, p)) << i;
      // Double reference from the real ratios: equal away from ties.
      const double real = (qa - za) * ra + (qb - zb) * rb;
      // The documented precision: the multipliers are within 1/2 of ratio * 2^shift.
      if (std::abs(real - std::floor(real) - 0.5) < 1e-9 + 255.0 * std::ldexp(1.0, -p.shift)) {
        ++near_ties;
        continue;
      }
      ++compared;
      const int64_t want =
          std::clamp<int64_t>(static_cast<int64_t>(std::floor(real + 0.5)) + zo, lo_eff, hi);
      ASSERT_EQ(got, want) << "qa " << qa << " qb " << qb << " real " << real;
    }
    if (avx2) {
      std::vector<uint8_t> fast(static_cast<size_t>(n));
      add_u8(Isa::kAvx2, a.data(), b.data(), n, p, fast.data(), af, bf, of);
      ASSERT_EQ(fast, scalar) << "iter " << iter << " n " << n;
      // In place (out aliases a).
      std::vector<uint8_t> inplace = a;
      add_u8(inplace.data(), b.data(), n, p, inplace.data(), af, bf, of);
      ASSERT_EQ(inplace, scalar);
    }
  }
  EXPECT_GT(compared, 15000);
  EXPECT_LT(near_ties, compared / 20);
}

TEST(Add, Avx2ExtremeRatios) {
  // Ratios near the ends of the accepted range, where the AVX2 path's offsets and its scalar
  // fallback (quotients beyond int32) take over.
  if (!isa_supported(Isa::kAvx2)) GTEST_SKIP() << "no AVX2";
  std::mt19937 rng(6);
  const std::vector<uint8_t> a = random_bytes<uint8_t>(1000, rng, 0, 255);
  const std::vector<uint8_t> b = random_bytes<uint8_t>(1000, rng, 0, 255);
  const std::pair<double, double> ratios[] = {{0x1p-32, 0x1p-32}, {0x1p-32, 1.0},   {0x1p29, 1.0},
                                              {0x1p20, 0x1p21},   {0x1p25, 0x1p-5}, {3.0, 0x1p-30}};
  for (const auto& [ra, rb] : ratios) {
    AddParams p{};
    ASSERT_TRUE(make_add_params(ra, rb, 1.0, 128, 3, 77, 0, 255, false, &p)) << ra << " " << rb;
    std::vector<uint8_t> fast(a.size()), scalar(a.size());
    add_u8(Isa::kAvx2, a.data(), b.data(), 1000, p, fast.data(), 0, 0x80, 0);
    add_u8(Isa::kScalar, a.data(), b.data(), 1000, p, scalar.data(), 0, 0x80, 0);
    EXPECT_EQ(fast, scalar) << ra << " " << rb;
    for (int64_t i = 0; i < 1000; ++i) {
      ASSERT_EQ(scalar[i], add_int64(a[i], b[i] ^ 0x80, p)) << ra << " " << rb << " " << i;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Average pooling
// ---------------------------------------------------------------------------------------------

TEST(AvgPool, OutputSizeLikeTorch) {
  // Values from torch.nn.functional.avg_pool2d output shapes.
  EXPECT_EQ(pool_output_size(4, 3, 2, 1, true), 3);
  EXPECT_EQ(pool_output_size(5, 3, 2, 1, true), 3);
  EXPECT_EQ(pool_output_size(6, 3, 2, 1, true), 4);
  EXPECT_EQ(pool_output_size(4, 3, 2, 1, false), 2);
  EXPECT_EQ(pool_output_size(6, 3, 2, 1, false), 3);
  EXPECT_EQ(pool_output_size(5, 2, 2, 0, true), 3);
  EXPECT_EQ(pool_output_size(5, 2, 2, 0, false), 2);
  EXPECT_EQ(pool_output_size(4, 3, 3, 1, true), 2);
  EXPECT_EQ(pool_output_size(7, 2, 3, 1, true), 3);
  EXPECT_EQ(pool_output_size(3, 2, 2, 1, true), 2);  // the window starting in the right pad drops
  EXPECT_LE(pool_output_size(1, 3, 1, 0, false), 0);
}

PoolQuant unit_quant() { return PoolQuant{1.0, 0, 1.0, 0, 0, 255}; }

std::vector<uint8_t> pool(const AvgPool2dPlan& plan, const std::vector<uint8_t>& x,
                          uint8_t flip = 0) {
  const int64_t planes = static_cast<int64_t>(x.size()) / (plan.in_h * plan.in_w);
  std::vector<uint8_t> y(static_cast<size_t>(planes * plan.out_h * plan.out_w));
  avg_pool2d_u8(plan, x.data(), planes, flip, y.data());
  return y;
}

TEST(AvgPool, HandComputed) {
  // x = 0..8 on a 3x3 plane; torch.nn.functional.avg_pool2d gives (float):
  //   k2 s2 p1 ceil, include pad: [0, .75; 2.25, 6]      exclude pad: [0, 1.5; 4.5, 6]
  //   k3 s2 p1 ceil, include pad: [.889, 1.333; 2.222, 2.667]
  //   k2 s2 p1 floor, divisor_override 3: [0, 1; 3, 8]
  const std::vector<uint8_t> x = {0, 1, 2, 3, 4, 5, 6, 7, 8};
  AvgPool2dPlan plan;
  ASSERT_TRUE(make_avg_pool2d_plan(3, 3, {2, 2, 2, 2, 1, 1, true, true, 0}, unit_quant(), &plan));
  EXPECT_EQ(pool(plan, x), (std::vector<uint8_t>{0, 1, 2, 6}));
  ASSERT_TRUE(make_avg_pool2d_plan(3, 3, {2, 2, 2, 2, 1, 1, true, false, 0}, unit_quant(), &plan));
  EXPECT_EQ(pool(plan, x), (std::vector<uint8_t>{0, 2, 5, 6}));  // 1.5 -> 2, 4.5 -> 5
  ASSERT_TRUE(make_avg_pool2d_plan(3, 3, {3, 3, 2, 2, 1, 1, true, true, 0}, unit_quant(), &plan));
  EXPECT_EQ(pool(plan, x), (std::vector<uint8_t>{1, 1, 2, 3}));
  ASSERT_TRUE(make_avg_pool2d_plan(3, 3, {2, 2, 2, 2, 1, 1, false, true, 3}, unit_quant(), &plan));
  EXPECT_EQ(pool(plan, x), (std::vector<uint8_t>{0, 1, 3, 8}));
  // Adaptive 2x5 -> 1x3 of 0..9: windows [0,2), [1,4), [3,5) -> 3, 4.5, 6.
  ASSERT_TRUE(make_adaptive_avg_pool2d_plan(2, 5, 1, 3, unit_quant(), &plan));
  EXPECT_EQ(pool(plan, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}), (std::vector<uint8_t>{3, 5, 6}));
  // Zero points and scales: x - 10 = {-5, 0} over a 1x2 window, mean -2.5 * (0.2 / 0.4) = -1.25
  // -> -1; {-5, -4}: -4.5 * 0.5 = -2.25 -> -2; then + 50.
  ASSERT_TRUE(make_avg_pool2d_plan(1, 4, {1, 2, 1, 2, 0, 0, false, true, 0},
                                   PoolQuant{0.2, 10, 0.4, 50, 0, 255}, &plan));
  EXPECT_EQ(pool(plan, {5, 10, 5, 6}), (std::vector<uint8_t>{49, 48}));
  // A tie below zero rounds up: mean of {-3, 0} = -1.5 -> -1; of {-2, -1} = -1.5 -> -1; then + 50.
  ASSERT_TRUE(make_avg_pool2d_plan(1, 4, {1, 2, 1, 2, 0, 0, false, true, 0},
                                   PoolQuant{1.0, 10, 1.0, 50, 0, 255}, &plan));
  EXPECT_EQ(pool(plan, {7, 10, 8, 9}), (std::vector<uint8_t>{49, 49}));
  // int8 levels through the flip: zero points 0 become 128; mean of {-7, -8} = -7.5 -> -7.
  ASSERT_TRUE(make_avg_pool2d_plan(1, 2, {1, 2, 1, 2, 0, 0, false, true, 0},
                                   PoolQuant{1.0, 128, 1.0, 128, 0, 255}, &plan));
  const std::vector<uint8_t> neg = {static_cast<uint8_t>(int8_t{-7}),
                                    static_cast<uint8_t>(int8_t{-8})};
  EXPECT_EQ(static_cast<int8_t>(pool(plan, neg, 0x80)[0]), -7);
}

// torch's AvgPool2d, in doubles, written from its definition: windows, divisor, mean, quantize.
std::vector<double> reference_pool(const std::vector<uint8_t>& x, int64_t planes, int64_t in_h,
                                   int64_t in_w, int64_t out_h, int64_t out_w,
                                   const AvgPool2dOptions* o, const PoolQuant& q, uint8_t flip) {
  std::vector<double> y;
  for (int64_t pl = 0; pl < planes; ++pl) {
    for (int64_t oh = 0; oh < out_h; ++oh) {
      for (int64_t ow = 0; ow < out_w; ++ow) {
        int64_t hs, he, ws, we, divisor;
        if (o == nullptr) {  // adaptive
          hs = static_cast<int64_t>(std::floor(static_cast<double>(oh * in_h) / out_h));
          he = static_cast<int64_t>(std::ceil(static_cast<double>((oh + 1) * in_h) / out_h));
          ws = static_cast<int64_t>(std::floor(static_cast<double>(ow * in_w) / out_w));
          we = static_cast<int64_t>(std::ceil(static_cast<double>((ow + 1) * in_w) / out_w));
          divisor = (he - hs) * (we - ws);
        } else {
          hs = oh * o->stride_h - o->pad_h;
          ws = ow * o->stride_w - o->pad_w;
          he = std::min(hs + o->kernel_h, in_h + o->pad_h);
          we = std::min(ws + o->kernel_w, in_w + o->pad_w);
          const int64_t padded = (he - hs) * (we - ws);
          hs = std::max<int64_t>(hs, 0);
          ws = std::max<int64_t>(ws, 0);
          he = std::min(he, in_h);
          we = std::min(we, in_w);
          divisor = o->divisor_override > 0 ? o->divisor_override
                    : o->count_include_pad  ? padded
                                            : (he - hs) * (we - ws);
        }
        double sum = 0.0;  // of dequantized values (x - zx) * sx: padding adds 0.0
        for (int64_t h = hs; h < he; ++h) {
          for (int64_t w = ws; w < we; ++w) {
            sum += ((x[(pl * in_h + h) * in_w + w] ^ flip) - q.in_zero_point) * q.in_scale;
          }
        }
        y.push_back(sum / static_cast<double>(divisor) / q.out_scale);
      }
    }
  }
  return y;
}

void compare_pool(const AvgPool2dPlan& plan, const std::vector<uint8_t>& x, int64_t planes,
                  const AvgPool2dOptions* o, const PoolQuant& q, uint8_t flip, int64_t* compared,
                  int64_t* ties) {
  std::vector<uint8_t> y(static_cast<size_t>(planes * plan.out_h * plan.out_w));
  avg_pool2d_u8(plan, x.data(), planes, flip, y.data());
  const std::vector<double> ref =
      reference_pool(x, planes, plan.in_h, plan.in_w, plan.out_h, plan.out_w, o, q, flip);
  ASSERT_EQ(ref.size(), y.size());
  for (size_t i = 0; i < y.size(); ++i) {
    if (std::abs(ref[i] - std::floor(ref[i]) - 0.5) < 1e-9) {
      ++*ties;
      continue;
    }
    ++*compared;
    const int64_t want = std::clamp<int64_t>(
        static_cast<int64_t>(std::floor(ref[i] + 0.5)) + q.out_zero_point, q.out_min, q.out_max);
    ASSERT_EQ(y[i] ^ flip, want) << "output " << i << " reference " << ref[i];
  }
}

TEST(AvgPool, MatchesDoubleReference) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> pick_k(1, 4), pick_s(1, 3), pick_hw(4, 17), level(0, 255);
  std::uniform_real_distribution<double> log_s(-6.0, 0.0), ratio(0.25, 3.0);
  int64_t compared = 0, ties = 0;
  for (int iter = 0; iter < 200; ++iter) {
    AvgPool2dOptions o{};
    o.kernel_h = pick_k(rng);
    o.kernel_w = pick_k(rng);
    o.stride_h = pick_s(rng);
    o.stride_w = pick_s(rng);
    o.pad_h = std::uniform_int_distribution<int64_t>(0, o.kernel_h / 2)(rng);
    o.pad_w = std::uniform_int_distribution<int64_t>(0, o.kernel_w / 2)(rng);
    o.ceil_mode = iter % 2;
    o.count_include_pad = iter % 3 != 0;
    o.divisor_override = iter % 11 == 5 ? 1 + iter % 7 : 0;
    const int64_t in_h = pick_hw(rng), in_w = pick_hw(rng), planes = 1 + iter % 3;
    const double sx = std::exp2(log_s(rng));
    const PoolQuant q{sx,
                      level(rng),
                      sx * ratio(rng),
                      level(rng),
                      iter % 4 == 1 ? 30 : 0,
                      iter % 4 == 1 ? 220 : 255};
    const uint8_t flip = iter % 5 == 3 ? 0x80 : 0;
    const std::vector<uint8_t> x = random_bytes<uint8_t>(planes * in_h * in_w, rng, 0, 255);
    AvgPool2dPlan plan;
    const char* why = nullptr;
    ASSERT_TRUE(make_avg_pool2d_plan(in_h, in_w, o, q, &plan, &why)) << why;
    EXPECT_EQ(plan.out_h, pool_output_size(in_h, o.kernel_h, o.stride_h, o.pad_h, o.ceil_mode));
    SCOPED_TRACE(::testing::Message()
                 << "iter " << iter << " k " << o.kernel_h << "x" << o.kernel_w << " s "
                 << o.stride_h << "," << o.stride_w << " p " << o.pad_h << "," << o.pad_w
                 << " ceil " << o.ceil_mode << " incl " << o.count_include_pad);
    compare_pool(plan, x, planes, &o, q, flip, &compared, &ties);

    // Adaptive, including output sizes larger than the input (overlapping windows) and global.
    const int64_t out_h =
        iter % 6 == 0 ? 1 : std::uniform_int_distribution<int64_t>(1, in_h + 2)(rng);
    const int64_t out_w =
        iter % 6 == 0 ? 1 : std::uniform_int_distribution<int64_t>(1, in_w + 2)(rng);
    ASSERT_TRUE(make_adaptive_avg_pool2d_plan(in_h, in_w, out_h, out_w, q, &plan, &why)) << why;
    compare_pool(plan, x, planes, nullptr, q, flip, &compared, &ties);
  }
  // Global pooling of a large plane (the widest accumulators).
  {
    const PoolQuant q{0.05, 3, 0.021, 128, 0, 255};
    const std::vector<uint8_t> x = random_bytes<uint8_t>(2 * 56 * 56, rng, 0, 255);
    AvgPool2dPlan plan;
    ASSERT_TRUE(make_adaptive_avg_pool2d_plan(56, 56, 1, 1, q, &plan));
    compare_pool(plan, x, 2, nullptr, q, 0, &compared, &ties);
  }
  EXPECT_GT(compared, 10000);
  EXPECT_LT(ties, compared / 20);
}

TEST(AvgPool, RejectsBadScalesAndGeometry) {
  AvgPool2dPlan plan;
  const AvgPool2dOptions o{2, 2, 2, 2, 0, 0, false, true, 0};
  const char* why = nullptr;
  for (const double bad : {0.0, -1.0, kNaN, kInf}) {
    EXPECT_FALSE(make_avg_pool2d_plan(4, 4, o, PoolQuant{bad, 0, 1.0, 0, 0, 255}, &plan, &why));
    EXPECT_NE(why, nullptr);
    EXPECT_FALSE(make_avg_pool2d_plan(4, 4, o, PoolQuant{1.0, 0, bad, 0, 0, 255}, &plan));
    EXPECT_FALSE(
        make_adaptive_avg_pool2d_plan(4, 4, 2, 2, PoolQuant{bad, 0, 1.0, 0, 0, 255}, &plan));
    EXPECT_FALSE(
        make_adaptive_avg_pool2d_plan(4, 4, 2, 2, PoolQuant{1.0, 0, bad, 0, 0, 255}, &plan));
  }
  // Multipliers without a fixed-point form: far too small or too large.
  EXPECT_FALSE(make_avg_pool2d_plan(4, 4, o, PoolQuant{1e-12, 0, 1.0, 0, 0, 255}, &plan));
  EXPECT_FALSE(make_avg_pool2d_plan(4, 4, o, PoolQuant{1e12, 0, 1.0, 0, 0, 255}, &plan));
  // Geometry and levels.
  EXPECT_FALSE(make_avg_pool2d_plan(4, 4, {3, 3, 1, 1, 2, 2, false, true, 0}, unit_quant(), &plan));
  EXPECT_FALSE(make_avg_pool2d_plan(4, 4, {0, 3, 1, 1, 0, 0, false, true, 0}, unit_quant(), &plan));
  EXPECT_FALSE(make_avg_pool2d_plan(4, 4, {2, 2, 0, 1, 0, 0, false, true, 0}, unit_quant(), &plan));
  EXPECT_FALSE(make_avg_pool2d_plan(2, 2, {3, 3, 1, 1, 0, 0, false, true, 0}, unit_quant(), &plan));
  EXPECT_FALSE(
      make_avg_pool2d_plan(4, 4, {2, 2, 2, 2, 0, 0, false, true, -1}, unit_quant(), &plan));
  EXPECT_FALSE(make_avg_pool2d_plan(4, 4, o, PoolQuant{1.0, 0, 1.0, 0, 200, 100}, &plan));
  EXPECT_FALSE(make_avg_pool2d_plan(4, 4, o, PoolQuant{1.0, -1, 1.0, 0, 0, 255}, &plan));
  EXPECT_FALSE(make_adaptive_avg_pool2d_plan(4, 4, 0, 2, unit_quant(), &plan));
  // The failed calls left the plan empty.
  EXPECT_EQ(plan.out_h, 0);

  WideMultiplier m{7, 9};
  for (const double bad : {0.0, -1.0, kNaN, kInf, 1e-12})
    EXPECT_FALSE(make_wide_multiplier(bad, 100, &m));
  EXPECT_FALSE(make_wide_multiplier(1.0, 0, &m));
  EXPECT_FALSE(make_wide_multiplier(0x1p20, 1 << 10, &m));  // m * max_acc reaches 2^30
  EXPECT_EQ(m.mult, 7);
  ASSERT_TRUE(make_wide_multiplier(1.0 / 3.0, 255 * 9, &m));
  EXPECT_LT(255 * 9 * m.mult, int64_t{1} << 62);
  // The largest such shift: one more bit would break the bound.
  EXPECT_LT(m.shift, 62);
  EXPECT_GE(std::ldexp(1.0 / 3.0, m.shift + 1) + 1.0, (int64_t{1} << 62) / (255.0 * 9));
  EXPECT_EQ(requantize_wide(3, m, 0, -100, 100), 1);
  EXPECT_EQ(requantize_wide(-3, m, 0, -100, 100), -1);
  EXPECT_EQ(requantize_wide(-2, m, 0, -100, 100), -1);  // -0.667
  EXPECT_EQ(requantize_wide(-1, m, 0, -100, 100), 0);   // -0.333
}

// ---------------------------------------------------------------------------------------------
// Max pooling
// ---------------------------------------------------------------------------------------------

MaxPool2dOptions max_options(int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  return {k, k, s, s, p, p, d, d, ceil_mode};
}

TEST(MaxPool, OutputSizeLikeTorch) {
  // {in, kernel, stride, padding, dilation, ceil_mode, out}: out from
  // torch.nn.functional.max_pool2d output shapes.
  const std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, bool, int64_t> cases[] = {
      {7, 3, 2, 1, 2, true, 3},  {7, 3, 2, 1, 2, false, 3},   {8, 2, 3, 1, 1, true, 3},
      {8, 2, 3, 1, 1, false, 3}, {5, 3, 1, 0, 2, false, 1},   {3, 2, 2, 1, 5, true, 1},
      {6, 3, 2, 1, 1, true, 4},  {24, 2, 2, 0, 1, false, 12}, {10, 3, 3, 1, 3, true, 3},
      {4, 1, 3, 0, 1, true, 2}};
  for (const auto& [in, k, s, p, d, ceil_mode, out] : cases) {
    MaxPool2dPlan plan;
    ASSERT_TRUE(make_max_pool2d_plan(in, 1, {k, 1, s, 1, p, 0, d, 1, ceil_mode}, &plan));
    EXPECT_EQ(plan.out_h, out) << in << " " << k << " " << s << " " << p << " " << d;
  }
}

// Runs both kernels on one input given in NCHW order: the NCHW kernel as it is, the NHWC kernel on
// the transposed input (its output rows in two calls), and checks that both give the same result.
std::vector<uint8_t> max_pool_both(const MaxPool2dPlan& plan, const std::vector<uint8_t>& x,
                                   int64_t batch, int64_t channels, uint8_t flip) {
  const int64_t in_plane = plan.in_h * plan.in_w, out_plane = plan.out_h * plan.out_w;
  std::vector<uint8_t> y(static_cast<size_t>(batch * channels * out_plane));
  max_pool2d_u8(plan, x.data(), batch * channels, flip, y.data());
  std::vector<uint8_t> x_nhwc(x.size()), y_nhwc(y.size());
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t i = 0; i < in_plane; ++i) {
        x_nhwc[(n * in_plane + i) * channels + c] = x[(n * channels + c) * in_plane + i];
      }
    }
  }
  const int64_t rows = batch * plan.out_h, split = rows / 2;
  max_pool2d_nhwc_u8(plan, x_nhwc.data(), channels, 0, split, flip, y_nhwc.data());
  max_pool2d_nhwc_u8(plan, x_nhwc.data(), channels, split, rows, flip, y_nhwc.data());
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t i = 0; i < out_plane; ++i) {
        EXPECT_EQ(y_nhwc[(n * out_plane + i) * channels + c], y[(n * channels + c) * out_plane + i])
            << "image " << n << " channel " << c << " output " << i;
      }
    }
  }
  return y;
}

TEST(MaxPool, HandComputed) {
  // x = 0..8 on a 3x3 plane, kernel 2, stride 2, padding 1: windows {0}, {1, 2}; {3, 6},
  // {4, 5, 7, 8}. The padding never wins, also against level 0.
  const std::vector<uint8_t> x = {0, 1, 2, 3, 4, 5, 6, 7, 8};
  MaxPool2dPlan plan;
  ASSERT_TRUE(make_max_pool2d_plan(3, 3, max_options(2, 2, 1, 1, false), &plan));
  EXPECT_EQ(max_pool_both(plan, x, 1, 1, 0), (std::vector<uint8_t>{0, 2, 6, 8}));
  // Dilation 2: a 2x2 kernel on the corners of the 3x3 plane skips the center (9).
  ASSERT_TRUE(make_max_pool2d_plan(3, 3, max_options(2, 1, 0, 2, false), &plan));
  EXPECT_EQ(max_pool_both(plan, {1, 0, 3, 0, 9, 0, 2, 0, 0}, 1, 1, 0), (std::vector<uint8_t>{3}));
  // Rectangular kernel 1x3, stride (1, 2), ceil_mode on 6 columns: the last window starts at
  // column 4 and holds columns 4 and 5 only.
  ASSERT_TRUE(make_max_pool2d_plan(1, 6, {1, 3, 1, 2, 0, 0, 1, 1, true}, &plan));
  EXPECT_EQ(max_pool_both(plan, {7, 255, 0, 3, 5, 1}, 1, 1, 0), (std::vector<uint8_t>{255, 5, 5}));
  // int8 levels through the flip, two channels: {-128, 127} -> 127 (the byte 0x7f), {-1, -2} -> -1.
  ASSERT_TRUE(make_max_pool2d_plan(1, 2, {1, 2, 1, 2, 0, 0, 1, 1, false}, &plan));
  const auto s8 = [](int v) { return static_cast<uint8_t>(static_cast<int8_t>(v)); };
  EXPECT_EQ(max_pool_both(plan, {s8(-128), s8(127), s8(-1), s8(-2)}, 1, 2, 0x80),
            (std::vector<uint8_t>{s8(127), s8(-1)}));
  // Unsigned, the same bytes: 0x80 and 0xff win.
  EXPECT_EQ(max_pool_both(plan, {s8(-128), s8(127), s8(-1), s8(-2)}, 1, 2, 0),
            (std::vector<uint8_t>{s8(-128), s8(-1)}));
  // A window with no tap in the image (dilation 5 from the padding, ceil_mode): the lowest level,
  // as torch's quantized max_pool2d gives.
  ASSERT_TRUE(make_max_pool2d_plan(3, 3, max_options(2, 2, 1, 5, true), &plan));
  ASSERT_EQ(plan.out_h * plan.out_w, 1);
  EXPECT_EQ(max_pool_both(plan, x, 1, 1, 0), (std::vector<uint8_t>{0}));
  EXPECT_EQ(max_pool_both(plan, x, 1, 1, 0x80), (std::vector<uint8_t>{0x80}));
}

TEST(MaxPool, KernelsMatchReference) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> pick_k(1, 3), pick_s(1, 3), pick_d(1, 2), pick_hw(1, 13);
  // Levels with the extremes (0, 255 and the int8 ones, 0x80 and 0x7f) frequent.
  const uint8_t extremes[] = {0, 255, 0x80, 0x7f};
  std::uniform_int_distribution<int> level(0, 255), pick_extreme(0, 7), pick_c(0, 5);
  const int64_t channel_counts[] = {1, 3, 16, 17, 64, 100};
  int64_t run = 0, outputs = 0;
  for (int iter = 0; iter < 600; ++iter) {
    // Every tenth case has only full 2x2 windows (2x2 kernel, no padding, floor mode): the
    // channels-last kernel's one-pass path.
    const bool full_2x2 = iter % 10 == 0;
    MaxPool2dOptions o{};
    o.kernel_h = full_2x2 ? 2 : pick_k(rng);
    o.kernel_w = full_2x2 ? 2 : pick_k(rng);
    o.stride_h = pick_s(rng);
    o.stride_w = pick_s(rng);
    o.pad_h = full_2x2 ? 0 : std::uniform_int_distribution<int64_t>(0, o.kernel_h / 2)(rng);
    o.pad_w = full_2x2 ? 0 : std::uniform_int_distribution<int64_t>(0, o.kernel_w / 2)(rng);
    o.dilation_h = pick_d(rng);
    o.dilation_w = pick_d(rng);
    o.ceil_mode = iter % 2 == 1;
    const int64_t in_h = pick_hw(rng), in_w = pick_hw(rng), batch = 1 + iter % 3;
    const int64_t channels = channel_counts[pick_c(rng)];
    const bool is_signed = iter % 4 >= 2;
    SCOPED_TRACE(::testing::Message()
                 << "iter " << iter << " in " << in_h << "x" << in_w << " C " << channels << " k "
                 << o.kernel_h << "x" << o.kernel_w << " s " << o.stride_h << "," << o.stride_w
                 << " p " << o.pad_h << "," << o.pad_w << " d " << o.dilation_h << ","
                 << o.dilation_w << " ceil " << o.ceil_mode << " signed " << is_signed);
    MaxPool2dPlan plan;
    if (!make_max_pool2d_plan(in_h, in_w, o, &plan)) {
      // Only inputs smaller than the dilated kernel are refused.
      EXPECT_TRUE(pool_output_size(in_h, o.dilation_h * (o.kernel_h - 1) + 1, o.stride_h, o.pad_h,
                                   o.ceil_mode) < 1 ||
                  pool_output_size(in_w, o.dilation_w * (o.kernel_w - 1) + 1, o.stride_w, o.pad_w,
                                   o.ceil_mode) < 1);
      continue;
    }
    std::vector<uint8_t> x(static_cast<size_t>(batch * channels * in_h * in_w));
    for (auto& v : x) {
      const int e = pick_extreme(rng);
      v = e < 4 ? extremes[e] : static_cast<uint8_t>(level(rng));
    }
    const std::vector<uint8_t> y = max_pool_both(plan, x, batch, channels, is_signed ? 0x80 : 0);
    std::vector<uint8_t> want(y.size());
    max_pool2d_reference(o, batch, channels, in_h, in_w, plan.out_h, plan.out_w,
                         /*channels_last=*/false, is_signed, x.data(), want.data());
    ASSERT_EQ(y, want);
    ++run;
    outputs += static_cast<int64_t>(y.size());
  }
  EXPECT_GT(run, 450);
  EXPECT_GT(outputs, 100000);
}

TEST(MaxPool, ReferenceReadsChannelsLast) {
  // The reference's channels-last indexing against its NCHW one on transposed data.
  std::mt19937 rng(3);
  const int64_t batch = 2, channels = 5, in_h = 6, in_w = 7;
  const MaxPool2dOptions o{3, 2, 2, 1, 1, 1, 1, 2, true};
  MaxPool2dPlan plan;
  ASSERT_TRUE(make_max_pool2d_plan(in_h, in_w, o, &plan));
  const std::vector<uint8_t> x = random_bytes<uint8_t>(batch * channels * in_h * in_w, rng, 0, 255);
  std::vector<uint8_t> x_nhwc(x.size());
  const int64_t in_plane = in_h * in_w, out_plane = plan.out_h * plan.out_w;
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t i = 0; i < in_plane; ++i)
        x_nhwc[(n * in_plane + i) * channels + c] = x[(n * channels + c) * in_plane + i];
  std::vector<uint8_t> y(static_cast<size_t>(batch * channels * out_plane)), y_nhwc(y.size());
  max_pool2d_reference(o, batch, channels, in_h, in_w, plan.out_h, plan.out_w, false, true,
                       x.data(), y.data());
  max_pool2d_reference(o, batch, channels, in_h, in_w, plan.out_h, plan.out_w, true, true,
                       x_nhwc.data(), y_nhwc.data());
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t i = 0; i < out_plane; ++i)
        ASSERT_EQ(y_nhwc[(n * out_plane + i) * channels + c],
                  y[(n * channels + c) * out_plane + i]);
}

TEST(MaxPool, RejectsBadGeometry) {
  MaxPool2dPlan plan;
  const char* why = nullptr;
  const auto rejected = [&](int64_t in_h, int64_t in_w, const MaxPool2dOptions& o,
                            const char* word) {
    why = nullptr;
    EXPECT_FALSE(make_max_pool2d_plan(in_h, in_w, o, &plan, &why));
    ASSERT_NE(why, nullptr);
    EXPECT_NE(std::string(why).find(word), std::string::npos) << why;
  };
  rejected(0, 4, max_options(2, 2, 0, 1, false), "empty");
  rejected(4, 4, {0, 2, 1, 1, 0, 0, 1, 1, false}, "kernel_size");
  rejected(4, 4, {2, 2, 1, 0, 0, 0, 1, 1, false}, "stride");
  rejected(4, 4, {2, 2, 1, 1, 0, 0, 0, 1, false}, "dilation");
  rejected(4, 4, {2, 2, 1, 1, 0, 0, 1, -1, false}, "dilation");
  rejected(4, 4, max_options(3, 1, 2, 1, false), "padding");  // above half the kernel
  rejected(4, 4, {2, 2, 1, 1, 0, -1, 1, 1, false}, "padding");
  rejected(4, 4, max_options(int64_t{1} << 31, 1, 0, 1, false), "kernel_size");
  rejected(2, 2, max_options(3, 1, 0, 1, false), "output");  // input smaller than the kernel
  rejected(4, 4, max_options(3, 1, 0, 2, false), "output");  // ... than the dilated kernel
  // The failed calls left the plan empty.
  EXPECT_EQ(plan.out_h, 0);
  EXPECT_TRUE(plan.h_first.empty());
}

TEST(Layout, TransposeMatchesDefinition) {
  // Full 16 x 16 blocks, ragged edges on either side, single rows / columns, and the NCHW <-> NHWC
  // shapes of a 64-channel 56x56 image.
  std::mt19937 rng(21);
  const std::pair<int64_t, int64_t> shapes[] = {{16, 16},   {1, 1},    {1, 37}, {37, 1},
                                                {17, 33},   {32, 48},  {64, 9}, {5, 3136},
                                                {64, 3136}, {3136, 64}};
  for (const auto& [rows, cols] : shapes) {
    std::vector<uint8_t> src(static_cast<size_t>(rows * cols));
    for (auto& v : src) v = static_cast<uint8_t>(rng());
    std::vector<uint8_t> dst(src.size(), 0xEE);
    transpose_u8(src.data(), rows, cols, dst.data());
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        ASSERT_EQ(dst[c * rows + r], src[r * cols + c])
            << rows << "x" << cols << " at " << r << "," << c;
      }
    }
  }
}

}  // namespace
}  // namespace qext::kernels
