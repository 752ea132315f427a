// The AVX2 float32 kernels against the scalar reference kernels, bit for bit, and the reference
// against hand-computed cases.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
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

}  // namespace
}  // namespace qext::kernels
