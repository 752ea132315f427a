// Observer statistics kernels: AVX2 min/max against the scalar reference, histogram binning and
// scale / zero-point selection against hand-computed cases.
#include <gtest/gtest.h>

#include <limits>
#include <random>
#include <vector>

#include "qext/kernels/fake_quantize_avx2.h"
#include "qext/kernels/observe_avx2.h"
#include "qext/kernels/observe_ref.h"

namespace qext::kernels {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

std::vector<float> random_with_non_finite(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = i % 13 == 5 ? std::numeric_limits<float>::quiet_NaN()
                       : (i % 29 == 7 ? (i % 2 ? kInf : -kInf) : dist(rng));
  }
  return x;
}

TEST(ObserveReference, MinMaxSkipsNonFinite) {
  const std::vector<float> x = {1.5f, std::nanf(""), -kInf, -2.0f, kInf, 0.25f};
  float lo = kInf, hi = -kInf;
  minmax_finite_ref(x.data(), static_cast<int64_t>(x.size()), &lo, &hi);
  EXPECT_EQ(lo, -2.0f);
  EXPECT_EQ(hi, 1.5f);
  // Nothing finite: the identities stay.
  const std::vector<float> none = {std::nanf(""), kInf};
  lo = kInf, hi = -kInf;
  minmax_finite_ref(none.data(), 2, &lo, &hi);
  EXPECT_EQ(lo, kInf);
  EXPECT_EQ(hi, -kInf);
}

TEST(ObserveReference, HistogramBins) {
  // [0, 4) in 4 bins: 0 -> 0, 0.99 -> 0, 1 -> 1, 3.5 -> 3, 4 (max) -> 3, outside and NaN skipped.
  const std::vector<float> x = {0.0f, 0.99f, 1.0f, 3.5f, 4.0f, -0.1f, 4.1f, std::nanf("")};
  std::vector<int64_t> counts(4, 0);
  histogram_ref(x.data(), static_cast<int64_t>(x.size()), 0.0, 4.0, 1.0, 4, counts.data());
  EXPECT_EQ(counts, (std::vector<int64_t>{2, 1, 0, 2}));
}

TEST(ObserveReference, ChooseQParamsHandComputed) {
  // Affine uint8 over [-1, 3]: scale 4/255, zero point 0 - round(-1 / (4/255)) = 64 (63.75).
  QParams q = choose_qparams_ref(-1.0f, 3.0f, 0, 255, false, 1.1920929e-07f);
  EXPECT_FLOAT_EQ(q.scale, 4.0f / 255.0f);
  EXPECT_EQ(q.zero_point, 64);
  // Symmetric int8 over [-1, 3]: scale 3 / 127.5, zero point 0.
  q = choose_qparams_ref(-1.0f, 3.0f, -128, 127, true, 1.1920929e-07f);
  EXPECT_FLOAT_EQ(q.scale, 3.0f / 127.5f);
  EXPECT_EQ(q.zero_point, 0);
  // Symmetric unsigned: zero point in the middle; 7-bit activations [0, 127] -> 64.
  EXPECT_EQ(choose_qparams_ref(-1.0f, 3.0f, 0, 255, true, 1e-7f).zero_point, 128);
  EXPECT_EQ(choose_qparams_ref(-1.0f, 3.0f, 0, 127, true, 1e-7f).zero_point, 64);
  // A range that only holds positive values still includes 0; an all-zero range gets eps.
  EXPECT_EQ(choose_qparams_ref(2.0f, 3.0f, 0, 255, false, 1e-7f).zero_point, 0);
  EXPECT_FLOAT_EQ(choose_qparams_ref(0.0f, 0.0f, 0, 255, false, 1e-7f).scale, 1e-7f);
}

TEST(ObserveAvx2, MinMaxMatchesReference) {
  if (!cpu_has_avx2()) GTEST_SKIP() << "CPU has no AVX2";
  std::mt19937 rng(0);
  for (int64_t n : {0, 1, 7, 15, 16, 17, 1000, 4099}) {
    const std::vector<float> x = random_with_non_finite(n, rng);
    float lo_ref = kInf, hi_ref = -kInf, lo = kInf, hi = -kInf;
    minmax_finite_ref(x.data(), n, &lo_ref, &hi_ref);
    minmax_finite_avx2(x.data(), n, &lo, &hi);
    EXPECT_EQ(lo, lo_ref) << "n=" << n;
    EXPECT_EQ(hi, hi_ref) << "n=" << n;

    std::vector<float> lo_e(n, 0.5f), hi_e(n, 0.5f), lo_e_ref(lo_e), hi_e_ref(hi_e);
    minmax_finite_per_element_ref(x.data(), n, lo_e_ref.data(), hi_e_ref.data());
    minmax_finite_per_element_avx2(x.data(), n, lo_e.data(), hi_e.data());
    EXPECT_EQ(lo_e, lo_e_ref) << "n=" << n;
    EXPECT_EQ(hi_e, hi_e_ref) << "n=" << n;
  }
}

}  // namespace
}  // namespace qext::kernels
