// The AVX2 float32 kernels (fake quantization, quantize, dequantize) against the scalar reference
// kernels, bit for bit, and the reference against hand-computed cases.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

#include "qext/kernels/fake_quantize_avx2.h"
#include "qext/kernels/fake_quantize_ref.h"

namespace qext::kernels {
namespace {

struct Channels {
  std::vector<float> scale, inv_scale, zero_point;
  float quant_min, quant_max;

  QuantizerRow row(int64_t channel, int64_t step) const {
    return {scale.data() + channel,
            inv_scale.data() + channel,
            zero_point.data() + channel,
            step,
            quant_min,
            quant_max};
  }
};

Channels make_channels(int64_t count, int32_t quant_min, int32_t quant_max, std::mt19937& rng) {
  std::uniform_real_distribution<float> scale_dist(0.01f, 0.5f);
  std::uniform_int_distribution<int32_t> zp_dist(quant_min, quant_max);
  Channels c{{}, {}, {}, static_cast<float>(quant_min), static_cast<float>(quant_max)};
  for (int64_t i = 0; i < count; ++i) {
    const float s = scale_dist(rng);
    c.scale.push_back(s);
    c.inv_scale.push_back(1.0f / s);
    c.zero_point.push_back(static_cast<float>(zp_dist(rng)));
  }
  return c;
}

// Random values, with exact quantization ties (k + 0.5) * scale, NaN and +-inf mixed in.
std::vector<float> make_input(int64_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 20.0f);
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) {
    switch (i % 17) {
      case 3:
        x[i] = (std::floor(dist(rng)) + 0.5f) * scale;
        break;
      case 11:
        x[i] = i % 2 ? std::numeric_limits<float>::quiet_NaN()
                     : std::numeric_limits<float>::infinity();
        break;
      default:
        x[i] = dist(rng);
    }
  }
  return x;
}

// 32-byte aligned float buffer, so the streaming-store paths are exercised.
struct AlignedFloats {
  explicit AlignedFloats(int64_t n)
      : data_(static_cast<float*>(std::aligned_alloc(32, (n * sizeof(float) + 31) / 32 * 32))) {}
  ~AlignedFloats() { std::free(data_); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  float* data() { return data_; }
  float& operator[](int64_t i) { return data_[i]; }

 private:
  float* data_;
};

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

TEST(FakeQuantizeReference, HandComputedCases) {
  const float scale = 0.5f, inv = 2.0f, zp = 3.0f;
  const AffineQuantizer q{scale, inv, zp, 0.0f, 15.0f};
  bool in_range = false;
  // 1.3 / 0.5 = 2.6 -> 3, + 3 = 6 -> (6 - 3) * 0.5 = 1.5
  EXPECT_EQ(fake_quantize_value(1.3f, q, &in_range), 1.5f);
  EXPECT_TRUE(in_range);
  // Ties round to even: 0.25 / 0.5 = 0.5 -> 0; 0.75 / 0.5 = 1.5 -> 2.
  EXPECT_EQ(fake_quantize_value(0.25f, q, &in_range), 0.0f);
  EXPECT_EQ(fake_quantize_value(0.75f, q, &in_range), 1.0f);
  // Clamped: -10 -> level -17 -> 0 -> (0 - 3) * 0.5 = -1.5, out of range.
  EXPECT_EQ(fake_quantize_value(-10.0f, q, &in_range), -1.5f);
  EXPECT_FALSE(in_range);
  EXPECT_EQ(fake_quantize_value(100.0f, q, &in_range), 6.0f);
  EXPECT_FALSE(in_range);
  EXPECT_TRUE(std::isnan(fake_quantize_value(std::nanf(""), q, &in_range)));
  EXPECT_FALSE(in_range);
  EXPECT_EQ(fake_quantize_value(-std::numeric_limits<float>::infinity(), q, &in_range), -1.5f);
  // Double inputs compute in double with the float reciprocal.
  EXPECT_EQ(fake_quantize_value(1.3, q, &in_range), 1.5);
}

TEST(FakeQuantizeReference, LearnableGradHandComputed) {
  const AffineQuantizer q{0.5f, 2.0f, 3.0f, 0.0f, 15.0f};
  // In range: x = 1.3 -> x_fq = 1.5; dscale = dy * (1.5 - 1.3) / 0.5 = 0.4 * dy.
  auto g = learnable_grad_value(1.3f, 2.0f, q);
  EXPECT_EQ(g.dx, 2.0f);
  EXPECT_FLOAT_EQ(g.dscale, 2.0f * (1.5f - 1.3f) * 2.0f);
  EXPECT_EQ(g.dzero_point, 0.0f);
  // Above the range: dscale = dy * (15 - 3), dzero_point = -dy * 0.5.
  g = learnable_grad_value(100.0f, 2.0f, q);
  EXPECT_EQ(g.dx, 0.0f);
  EXPECT_EQ(g.dscale, 24.0f);
  EXPECT_EQ(g.dzero_point, -1.0f);
  // Below: dscale = dy * (0 - 3).
  g = learnable_grad_value(-100.0f, 2.0f, q);
  EXPECT_EQ(g.dscale, -6.0f);
}

class Avx2Kernels : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cpu_has_avx2()) GTEST_SKIP() << "CPU has no AVX2";
  }
};

TEST_F(Avx2Kernels, FakeQuantizeRowMatchesReferenceBitForBit) {
  std::mt19937 rng(0);
  const int32_t ranges[][2] = {{-128, 127}, {0, 255}, {-8, 7}, {0, 3}, {-32768, 32767}, {0, 65535}};
  for (const auto& range : ranges) {
    for (int64_t step : {0, 1}) {
      for (int64_t n : {1, 7, 8, 9, 63, 64, 65, 1000}) {
        for (int64_t bit0 : {0, 3, 8, 13}) {
          const Channels ch = make_channels(step ? n : 1, range[0], range[1], rng);
          const std::vector<float> x = make_input(n, ch.scale[0], rng);
          std::vector<float> y_ref(n);
          AlignedFloats y_avx(n);
          std::vector<uint8_t> m_ref((n + bit0) / 8 + 2, 0), m_avx(m_ref.size(), 0);
          fake_quantize_row_ref(x.data(), y_ref.data(), n, ch.row(0, step), m_ref.data(), bit0);
          for (Store store : {Store::kCached, Store::kStreaming}) {
            std::fill(m_avx.begin(), m_avx.end(), 0);
            fake_quantize_row_avx2(x.data(), y_avx.data(), n, ch.row(0, step), m_avx.data(), bit0,
                                   store);
            for (int64_t i = 0; i < n; ++i) {
              ASSERT_TRUE(same_bits(y_ref[i], y_avx[i]))
                  << "i=" << i << " x=" << x[i] << " ref=" << y_ref[i] << " avx=" << y_avx[i];
            }
            ASSERT_EQ(m_ref, m_avx) << "n=" << n << " bit0=" << bit0;
          }
        }
      }
    }
  }
}

TEST_F(Avx2Kernels, MaskedGradMatchesReference) {
  std::mt19937 rng(1);
  const int64_t n = 1003;
  std::vector<float> dy = make_input(n, 0.1f, rng);
  std::vector<uint8_t> mask((n + 31) / 32 * 4);
  for (auto& b : mask) b = static_cast<uint8_t>(rng());
  for (int64_t begin : {0, 5, 64}) {
    std::vector<float> ref(n, -1.0f);
    AlignedFloats avx(n);
    masked_grad_ref(dy.data(), mask.data(), ref.data(), begin, n);
    for (Store store : {Store::kCached, Store::kStreaming}) {
      masked_grad_avx2(dy.data(), mask.data(), avx.data(), begin, n, store);
      for (int64_t i = begin; i < n; ++i) ASSERT_TRUE(same_bits(ref[i], avx[i])) << "i=" << i;
    }
  }
}

TEST_F(Avx2Kernels, LearnableGradMatchesReference) {
  std::mt19937 rng(2);
  for (int64_t step : {0, 1}) {
    for (int64_t n : {1, 8, 13, 777, 5000}) {
      const Channels ch = make_channels(step ? n : 1, -8, 7, rng);
      const std::vector<float> x = make_input(n, ch.scale[0], rng);
      std::normal_distribution<float> grad_dist(0.0f, 1.0f);
      std::vector<float> dy(n);
      for (auto& g : dy) g = grad_dist(rng);
      std::vector<float> dx_ref(n);
      AlignedFloats dx_avx(n);
      const size_t sums = step ? n : 1;
      std::vector<double> ds_ref(sums, 0.0), dz_ref(sums, 0.0), ds_avx(sums, 0.0),
          dz_avx(sums, 0.0);
      learnable_grad_row_ref(x.data(), dy.data(), dx_ref.data(), n, ch.row(0, step), ds_ref.data(),
                             dz_ref.data());
      learnable_grad_row_avx2(x.data(), dy.data(), dx_avx.data(), n, ch.row(0, step), ds_avx.data(),
                              dz_avx.data(), n % 2 ? Store::kStreaming : Store::kCached);
      for (int64_t i = 0; i < n; ++i) ASSERT_TRUE(same_bits(dx_ref[i], dx_avx[i])) << "i=" << i;
      // The sums differ by float rounding of partial sums (see fake_quantize_avx2.h): compare
      // relative to the sum of the magnitudes of the terms.
      std::vector<double> ds_mag(sums, 0.0), dz_mag(sums, 0.0);
      for (int64_t i = 0; i < n; ++i) {
        const auto g = learnable_grad_value(x[i], dy[i], ch.row(0, step).at(i));
        ds_mag[i * step] += std::abs(g.dscale);
        dz_mag[i * step] += std::abs(g.dzero_point);
      }
      for (size_t c = 0; c < sums; ++c) {
        EXPECT_NEAR(ds_ref[c], ds_avx[c], 1e-6 * (1.0 + ds_mag[c])) << "c=" << c;
        EXPECT_NEAR(dz_ref[c], dz_avx[c], 1e-6 * (1.0 + dz_mag[c])) << "c=" << c;
      }
    }
  }
}

TEST(QuantizeReference, HandComputedCases) {
  const float scale = 0.5f, inv = 2.0f;
  const float zero_point = 3.0f;
  const QuantizerRow row{&scale, &inv, &zero_point, 0, 0.0f, 15.0f};
  // 1.3 -> 2.6 -> 3 (+3) = 6; ties to even: 0.25 -> 0.5 -> 0, 0.75 -> 1.5 -> 2; clamped at 0 and
  // 15; -0.0 -> 3; +-inf saturate.
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> x{1.3f, 0.25f, 0.75f, -10.0f, 100.0f, -0.0f, inf, -inf};
  std::vector<uint8_t> q(x.size());
  ASSERT_TRUE(quantize_row_ref(x.data(), q.data(), static_cast<int64_t>(x.size()), row));
  EXPECT_EQ(q, (std::vector<uint8_t>{6, 3, 5, 0, 15, 3, 15, 0}));
  std::vector<float> back(q.size());
  dequantize_row_ref(q.data(), back.data(), static_cast<int64_t>(q.size()), row);
  EXPECT_EQ(back, (std::vector<float>{1.5f, 0.0f, 1.0f, -1.5f, 6.0f, 0.0f, 6.0f, -1.5f}));
  const float with_nan[] = {1.0f, std::nanf("")};
  EXPECT_FALSE(quantize_row_ref(with_nan, q.data(), 2, row));
}

// Random values spread far beyond the range, exact ties (k + 0.5) * scale, +-0.0 and +-inf.
std::vector<float> make_quantize_input(int64_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 2000.0f);
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) {
    switch (i % 13) {
      case 2:
      case 5:
        x[i] = (std::floor(dist(rng) / 16.0f) + 0.5f) * scale;
        break;
      case 7:
        x[i] = i % 2 ? -0.0f : 0.0f;
        break;
      case 11:
        x[i] = i % 2 ? inf : -inf;
        break;
      default:
        x[i] = dist(rng) * scale / 16.0f;
    }
  }
  return x;
}

template <typename Q>
class QuantizeRowAvx2 : public Avx2Kernels {};

using StorageTypes = ::testing::Types<uint8_t, int8_t, int32_t>;
TYPED_TEST_SUITE(QuantizeRowAvx2, StorageTypes);

// Ranges inside the storage type Q, the full type range among them (int32: the 17-bit span).
template <typename Q>
std::vector<std::pair<int32_t, int32_t>> ranges_of() {
  if constexpr (std::is_same_v<Q, uint8_t>) return {{0, 255}, {0, 15}, {3, 200}};
  if constexpr (std::is_same_v<Q, int8_t>) return {{-128, 127}, {-8, 7}, {-127, 127}};
  return {{-65536, 65535}, {-32768, 32767}, {0, 65535}, {-8, 7}};
}

TYPED_TEST(QuantizeRowAvx2, MatchesReferenceBitForBit) {
  using Q = TypeParam;
  std::mt19937 rng(3);
  for (const auto& [quant_min, quant_max] : ranges_of<Q>()) {
    for (int64_t step : {0, 1}) {
      for (int64_t n : {1, 7, 8, 9, 15, 16, 17, 63, 1000, 1003}) {
        const Channels ch = make_channels(step ? n : 1, quant_min, quant_max, rng);
        const std::vector<float> x = make_quantize_input(n, ch.scale[0], rng);
        std::vector<Q> q_ref(n), q_avx(n);
        ASSERT_TRUE(quantize_row_ref(x.data(), q_ref.data(), n, ch.row(0, step)));
        ASSERT_TRUE(quantize_row_avx2(x.data(), q_avx.data(), n, ch.row(0, step)));
        ASSERT_EQ(q_ref, q_avx) << "range [" << quant_min << ", " << quant_max << "] n=" << n
                                << " step=" << step;

        std::vector<float> x_ref(n), x_avx(n);
        dequantize_row_ref(q_ref.data(), x_ref.data(), n, ch.row(0, step));
        dequantize_row_avx2(q_ref.data(), x_avx.data(), n, ch.row(0, step));
        for (int64_t i = 0; i < n; ++i)
          ASSERT_TRUE(same_bits(x_ref[i], x_avx[i])) << "i=" << i << " q=" << +q_ref[i];
      }
    }
  }
}

TYPED_TEST(QuantizeRowAvx2, DequantizesEveryStoredValue) {
  using Q = TypeParam;
  // Every value of the type (int32: a spread of large ones), whatever the range it came from.
  std::vector<Q> q;
  if constexpr (sizeof(Q) == 1) {
    for (int v = std::numeric_limits<Q>::min(); v <= std::numeric_limits<Q>::max(); ++v)
      q.push_back(static_cast<Q>(v));
  } else {
    std::mt19937 rng(4);
    for (int i = 0; i < 1001; ++i) q.push_back(static_cast<Q>(rng()));
  }
  std::mt19937 rng(5);
  for (int64_t step : {0, 1}) {
    const auto n = static_cast<int64_t>(q.size());
    const Channels ch = make_channels(step ? n : 1, -128, 127, rng);
    std::vector<float> x_ref(n), x_avx(n);
    dequantize_row_ref(q.data(), x_ref.data(), n, ch.row(0, step));
    dequantize_row_avx2(q.data(), x_avx.data(), n, ch.row(0, step));
    for (int64_t i = 0; i < n; ++i) ASSERT_TRUE(same_bits(x_ref[i], x_avx[i])) << "i=" << i;
  }
}

TYPED_TEST(QuantizeRowAvx2, ReportsNaNAnywhere) {
  using Q = TypeParam;
  std::mt19937 rng(6);
  const auto [quant_min, quant_max] = ranges_of<Q>()[0];
  for (int64_t n : {1, 8, 9, 40}) {
    for (int64_t step : {0, 1}) {
      const Channels ch = make_channels(step ? n : 1, quant_min, quant_max, rng);
      for (int64_t at = 0; at < n; ++at) {
        std::vector<float> x = make_quantize_input(n, ch.scale[0], rng);
        x[at] = std::numeric_limits<float>::quiet_NaN();
        std::vector<Q> q(n);
        EXPECT_FALSE(quantize_row_avx2(x.data(), q.data(), n, ch.row(0, step)))
            << "NaN at " << at << " of " << n;
      }
    }
  }
}

}  // namespace
}  // namespace qext::kernels
