// 1-D k-means kernels (kernels/kmeans1d.h): the lazily built RankIndex against brute-force counts,
// sums and std::sort on many distributions; init and Lloyd against hand-computed cases and a plain
// Lloyd loop over the unsorted data (nearest centroid by distance, double sums) from the same
// init; k-means++ properties; the label kernels (scalar tree and AVX2) bit for bit against the
// plain count over the boundaries.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "qext/kernels/fake_quantize_avx2.h"
#include "qext/kernels/kmeans1d.h"

namespace qext::kernels {
namespace {

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

enum class Shape { kNormal, kUniform, kDuplicates, kNarrow, kZerosAndTiny, kWideExponents };

const char* name(Shape s) {
  switch (s) {
    case Shape::kNormal:
      return "normal";
    case Shape::kUniform:
      return "uniform";
    case Shape::kDuplicates:
      return "duplicates";
    case Shape::kNarrow:
      return "narrow";
    case Shape::kZerosAndTiny:
      return "zeros_and_tiny";
    case Shape::kWideExponents:
      return "wide_exponents";
  }
  return "";
}

template <typename T>
std::vector<T> make_data(Shape shape, int64_t n, uint32_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  std::vector<T> x(n);
  for (int64_t i = 0; i < n; ++i) {
    double v = 0.0;
    switch (shape) {
      case Shape::kNormal:
        v = normal(gen);
        break;
      case Shape::kUniform:
        v = uniform(gen);
        break;
      case Shape::kDuplicates:  // few distinct values, many repeats
        v = std::round(normal(gen) * 4.0) / 4.0;
        break;
      case Shape::kNarrow:  // one binade, most values in a few nodes: deep splits
        v = 1.0 + 1e-5 * (uniform(gen) + 1.0);
        break;
      case Shape::kZerosAndTiny: {
        const int kind = static_cast<int>(gen() % 4);
        const double tiny = static_cast<double>(std::numeric_limits<T>::denorm_min());
        v = kind == 0 ? 0.0 : kind == 1 ? -0.0 : uniform(gen) * 1000.0 * tiny;
        break;
      }
      case Shape::kWideExponents:
        v = std::ldexp(uniform(gen), static_cast<int>(gen() % 80) - 40);
        break;
    }
    x[i] = static_cast<T>(v);
  }
  return x;
}

// Count and long double sum of the values <= t.
template <typename T>
std::pair<int64_t, long double> brute_below(const std::vector<T>& x, double t) {
  int64_t count = 0;
  long double sum = 0.0L;
  for (const T v : x) {
    if (static_cast<double>(v) <= t) {
      ++count;
      sum += v;
    }
  }
  return {count, sum};
}

// Plain Lloyd on the unsorted values: nearest centroid by distance (ties to the lower index), sums
// in double, an empty cluster keeps its centroid; stops when no centroid changes.
template <typename T>
std::vector<double> plain_lloyd(const std::vector<T>& x, std::vector<double> c, int64_t iters) {
  const size_t k = c.size();
  for (int64_t it = 0; it < iters; ++it) {
    std::vector<double> sum(k, 0.0);
    std::vector<int64_t> count(k, 0);
    for (const T v : x) {
      size_t best = 0;
      for (size_t j = 1; j < k; ++j) {
        if (std::abs(v - c[j]) < std::abs(v - c[best])) best = j;
      }
      sum[best] += v;
      ++count[best];
    }
    std::vector<double> next(k);
    for (size_t j = 0; j < k; ++j) next[j] = count[j] > 0 ? sum[j] / count[j] : c[j];
    if (next == c) break;
    c = next;
  }
  return c;
}

// Centroids and labels as the ops compute them: kmeans1d, then the labels of the boundaries.
template <typename T>
std::pair<std::vector<double>, std::vector<uint8_t>> cluster(const std::vector<T>& x, int64_t k,
                                                             KMeansInit init, int64_t iters,
                                                             uint64_t seed = 0) {
  std::vector<double> c(k);
  T bad{};
  EXPECT_TRUE(
      kmeans1d(x.data(), static_cast<int64_t>(x.size()), k, init, iters, seed, c.data(), &bad));
  std::vector<T> bounds(k);
  label_boundaries(c.data(), k, bounds.data());
  std::vector<uint8_t> labels(x.size());
  assign_labels_ref(x.data(), static_cast<int64_t>(x.size()), bounds.data(), k, labels.data());
  return {c, labels};
}

// ------------------------------------------------------------------------------------------------
// RankIndex
// ------------------------------------------------------------------------------------------------

template <typename T>
void check_index(Shape shape, int64_t n, uint32_t seed) {
  SCOPED_TRACE(std::string(name(shape)) + " n=" + std::to_string(n));
  const std::vector<T> x = make_data<T>(shape, n, seed);
  RankIndex<T> data(x.data(), n);
  std::vector<T> sorted = x;
  std::sort(sorted.begin(), sorted.end());
  long double magnitude = 0.0L;
  for (const T v : x) magnitude += std::abs(static_cast<long double>(v));

  // Thresholds: values of the data and their float neighbours (ties), midpoints, zeros, extremes.
  std::mt19937 gen(seed + 1);
  std::vector<double> thresholds = {0.0,
                                    -0.0,
                                    std::numeric_limits<double>::infinity(),
                                    -std::numeric_limits<double>::infinity(),
                                    static_cast<double>(sorted.front()) - 1.0,
                                    static_cast<double>(sorted.back()) + 1.0};
  for (int i = 0, draws = n > 100000 ? 8 : n > 10000 ? 25 : 200; i < draws; ++i) {
    const T a = x[gen() % n], b = x[gen() % n];
    thresholds.push_back(a);
    thresholds.push_back(std::nextafter(a, std::numeric_limits<T>::infinity()));
    thresholds.push_back(std::nextafter(a, -std::numeric_limits<T>::infinity()));
    thresholds.push_back(0.5 * static_cast<double>(a) + 0.5 * static_cast<double>(b));
  }
  for (const double t : thresholds) {
    const auto [count, sum] = brute_below(x, t);
    const typename RankIndex<T>::Prefix p = data.below(t);
    ASSERT_EQ(p.count, count) << "t=" << t;
    const long double ours = static_cast<long double>(p.hi) + static_cast<long double>(p.lo);
    ASSERT_LE(std::abs(ours - sum), 1e-15L * magnitude) << "t=" << t;
  }
  const int64_t step = n <= 5000 ? 1 : n / 997;
  for (int64_t r = 0; r < n; r += step) {
    const T v = data.at_rank(r);
    ASSERT_EQ(v, sorted[r]) << "rank " << r;
    ASSERT_FALSE(v == 0 && std::signbit(v)) << "rank " << r << ": -0 is returned as +0";
  }
  ASSERT_EQ(data.at_rank(n - 1), sorted.back());
}

TEST(RankIndex, MatchesBruteForceFloat) {
  for (const Shape shape : {Shape::kNormal, Shape::kUniform, Shape::kDuplicates, Shape::kNarrow,
                            Shape::kZerosAndTiny, Shape::kWideExponents}) {
    // 70000 and 300000 take the streaming scatter and split nodes far below the root.
    for (const int64_t n : {1, 7, 200, 5000, 70000, 300000}) {
      check_index<float>(shape, n, static_cast<uint32_t>(n) + static_cast<uint32_t>(shape));
    }
  }
}

TEST(RankIndex, MatchesBruteForceDouble) {
  for (const Shape shape : {Shape::kNormal, Shape::kDuplicates, Shape::kNarrow,
                            Shape::kZerosAndTiny, Shape::kWideExponents}) {
    for (const int64_t n : {1, 300, 70000}) {
      check_index<double>(shape, n, static_cast<uint32_t>(n) * 3 + static_cast<uint32_t>(shape));
    }
  }
}

TEST(RankIndex, SignedZerosAreEqual) {
  const std::vector<float> x = {-0.0f, 0.0f, -0.0f, 1.0f, -1.0f};
  RankIndex<float> data(x.data(), x.size());
  EXPECT_EQ(data.below(0.0).count, 4);
  EXPECT_EQ(data.below(-0.0).count, 4);
  EXPECT_EQ(data.below(-1e-300).count, 1);
  EXPECT_FALSE(std::signbit(data.at_rank(1)));
  EXPECT_FALSE(std::signbit(data.at_rank(3)));
}

TEST(RankIndex, DependsOnTheValuesOnly) {
  std::vector<float> x = make_data<float>(Shape::kNormal, 100000, 5);
  RankIndex<float> a(x.data(), x.size());
  std::shuffle(x.begin(), x.end(), std::mt19937(6));
  RankIndex<float> b(x.data(), x.size());
  for (const double t : {-2.0, -0.3, 0.0, 0.7, 1.9}) {
    const auto pa = a.below(t), pb = b.below(t);
    EXPECT_EQ(pa.count, pb.count);
    EXPECT_EQ(pa.hi, pb.hi);
    EXPECT_EQ(pa.lo, pb.lo);
  }
}

// ------------------------------------------------------------------------------------------------
// Init and Lloyd
// ------------------------------------------------------------------------------------------------

TEST(KMeans1D, HandComputedCase) {
  // Linear init {0, 12}, midpoint 6: clusters {0, 1, 2} and {10, 11, 12}, means 1 and 11; the
  // second iteration changes nothing.
  const std::vector<float> x = {12, 0, 11, 1, 10, 2};
  RankIndex<float> data(x.data(), 6);
  std::vector<double> c(2);
  init_centroids(data, 2, KMeansInit::kLinear, 0, c.data());
  EXPECT_EQ(c, (std::vector<double>{0, 12}));
  EXPECT_EQ(lloyd(data, 2, 30, c.data()), 1);
  EXPECT_EQ(c, (std::vector<double>{1, 11}));
  const auto [centroids, labels] = cluster(x, 2, KMeansInit::kLinear, 30);
  EXPECT_EQ(labels, (std::vector<uint8_t>{1, 0, 1, 0, 1, 0}));
}

TEST(KMeans1D, TieGoesToTheLowerCluster) {
  // Init {0, 4}: 2 is as far from both and joins cluster 0, mean 1; then midpoint 2.5.
  const auto [c, labels] = cluster(std::vector<float>{4, 2, 0}, 2, KMeansInit::kLinear, 30);
  EXPECT_EQ(c, (std::vector<double>{1, 4}));
  EXPECT_EQ(labels, (std::vector<uint8_t>{1, 0, 0}));
  // A tie in the final labels: centroids {0, 4}, 2 goes to label 0.
  const auto [c0, labels0] = cluster(std::vector<float>{4, 2, 0}, 2, KMeansInit::kLinear, 0);
  EXPECT_EQ(c0, (std::vector<double>{0, 4}));
  EXPECT_EQ(labels0, (std::vector<uint8_t>{1, 0, 0}));
}

TEST(KMeans1D, EmptyClusterKeepsItsCentroid) {
  // Init {0, 5, 10}: nothing is nearest to 5.
  const std::vector<float> x = {0, 0, 0, 10, 10, 10};
  RankIndex<float> data(x.data(), 6);
  std::vector<double> c(3);
  init_centroids(data, 3, KMeansInit::kLinear, 0, c.data());
  EXPECT_EQ(lloyd(data, 3, 30, c.data()), 0);
  EXPECT_EQ(c, (std::vector<double>{0, 5, 10}));
}

TEST(KMeans1D, Inits) {
  const std::vector<float> x = {5, 3, -3, 8, 1, 2, 4, 6, 7};
  RankIndex<float> data(x.data(), 9);
  std::vector<double> c(3);
  init_centroids(data, 3, KMeansInit::kLinear, 0, c.data());
  EXPECT_EQ(c, (std::vector<double>{-3, 2.5, 8}));
  c.resize(1);
  init_centroids(data, 1, KMeansInit::kLinear, 0, c.data());
  EXPECT_EQ(c, (std::vector<double>{2.5}));
  // Sorted: -3 1 2 3 4 5 6 7 8; ranks floor((2j + 1) * 9 / 6) = 1, 4, 7.
  c.resize(3);
  init_centroids(data, 3, KMeansInit::kDensity, 0, c.data());
  EXPECT_EQ(c, (std::vector<double>{1, 4, 7}));
}

TEST(KMeans1D, ZeroIterationsKeepsTheInit) {
  const std::vector<float> x = make_data<float>(Shape::kNormal, 1000, 3);
  RankIndex<float> data(x.data(), 1000);
  std::vector<double> init(8), c(8);
  init_centroids(data, 8, KMeansInit::kDensity, 0, init.data());
  c = init;
  EXPECT_EQ(lloyd(data, 8, 0, c.data()), 0);
  EXPECT_EQ(c, init);
}

template <typename T>
void check_against_plain_lloyd(Shape shape, int64_t n, int64_t k, KMeansInit init, int64_t iters) {
  SCOPED_TRACE(std::string(name(shape)) + " n=" + std::to_string(n) + " k=" + std::to_string(k) +
               " init=" + std::to_string(static_cast<int>(init)) +
               " iters=" + std::to_string(iters));
  const std::vector<T> x = make_data<T>(shape, n, static_cast<uint32_t>(n + k));
  RankIndex<T> data(x.data(), n);
  std::vector<double> c(k);
  init_centroids(data, k, init, 7, c.data());
  ASSERT_TRUE(std::is_sorted(c.begin(), c.end()));
  const std::vector<double> expected = plain_lloyd(x, c, iters);
  const int64_t moved = lloyd(data, k, iters, c.data());
  ASSERT_LE(moved, iters);
  ASSERT_TRUE(std::is_sorted(c.begin(), c.end()));
  for (int64_t j = 0; j < k; ++j) {
    ASSERT_NEAR(c[j], expected[j], 1e-12 * std::max(1.0, std::abs(expected[j])))
        << "centroid " << j;
  }
  // Labels: the nearest centroid by distance wherever the two nearest are not (nearly) tied.
  std::vector<T> bounds(k);
  label_boundaries(c.data(), k, bounds.data());
  std::vector<uint8_t> labels(n);
  assign_labels_ref(x.data(), n, bounds.data(), k, labels.data());
  for (int64_t i = 0; i < n; ++i) {
    const double v = x[i];
    int64_t best = 0;
    for (int64_t j = 1; j < k; ++j) {
      if (std::abs(v - c[j]) < std::abs(v - c[best])) best = j;
    }
    const double margin =
        labels[i] == best ? 1.0 : std::abs(std::abs(v - c[labels[i]]) - std::abs(v - c[best]));
    ASSERT_GT(margin, 1e-12 * std::max(1.0, std::abs(v)))
        << "value " << v << " label " << int(labels[i]) << " nearest " << best;
  }
}

TEST(KMeans1D, MatchesPlainLloydFloat) {
  for (const KMeansInit init : {KMeansInit::kLinear, KMeansInit::kDensity, KMeansInit::kPlusPlus}) {
    for (const int64_t k : {1, 2, 5, 16, 64, 256}) {
      check_against_plain_lloyd<float>(Shape::kNormal, k <= 16 ? 20000 : 4000, k, init, 30);
    }
    check_against_plain_lloyd<float>(Shape::kUniform, 100000, 16, init, 30);
    check_against_plain_lloyd<float>(Shape::kDuplicates, 5000, 32, init, 30);
    check_against_plain_lloyd<float>(Shape::kWideExponents, 5000, 16, init, 30);
    check_against_plain_lloyd<float>(Shape::kNormal, 300, 16, init, 200);
  }
}

TEST(KMeans1D, MatchesPlainLloydDouble) {
  for (const KMeansInit init : {KMeansInit::kLinear, KMeansInit::kDensity, KMeansInit::kPlusPlus}) {
    check_against_plain_lloyd<double>(Shape::kNormal, 20000, 16, init, 30);
    check_against_plain_lloyd<double>(Shape::kDuplicates, 3000, 8, init, 30);
  }
}

TEST(KMeans1D, PlusPlusIsSeededAndPicksDataValues) {
  const std::vector<float> x = make_data<float>(Shape::kNormal, 50000, 11);
  RankIndex<float> data(x.data(), 50000);
  std::vector<double> a(16), b(16), other(16);
  init_centroids(data, 16, KMeansInit::kPlusPlus, 42, a.data());
  init_centroids(data, 16, KMeansInit::kPlusPlus, 42, b.data());
  init_centroids(data, 16, KMeansInit::kPlusPlus, 43, other.data());
  EXPECT_EQ(a, b);
  EXPECT_NE(a, other);
  EXPECT_TRUE(std::is_sorted(a.begin(), a.end()));
  for (const double c : a) EXPECT_NE(std::find(x.begin(), x.end(), static_cast<float>(c)), x.end());
}

TEST(KMeans1D, PlusPlusFindsSeparatedClusters) {
  // Three tight groups far apart: D^2 sampling puts one initial centroid in each.
  std::vector<float> x;
  std::mt19937 gen(3);
  std::normal_distribution<float> noise(0.0f, 0.01f);
  for (int i = 0; i < 3000; ++i) x.push_back(static_cast<float>(i % 3) * 10.0f + noise(gen));
  RankIndex<float> data(x.data(), 3000);
  for (uint64_t seed = 0; seed < 20; ++seed) {
    std::vector<double> c(3);
    init_centroids(data, 3, KMeansInit::kPlusPlus, seed, c.data());
    for (int g = 0; g < 3; ++g) EXPECT_NEAR(c[g], g * 10.0, 0.1) << "seed " << seed;
  }
}

TEST(KMeans1D, PlusPlusWithFewerDistinctValuesThanK) {
  const std::vector<float> x = {1, 2, 1, 2, 1};
  for (uint64_t seed = 0; seed < 4; ++seed) {
    const auto [c, labels] = cluster(x, 4, KMeansInit::kPlusPlus, 0, seed);
    EXPECT_TRUE(std::is_sorted(c.begin(), c.end()));
    EXPECT_EQ(c.front(), 1);
    EXPECT_EQ(c.back(), 2);
  }
}

TEST(KMeans1D, NonFiniteValuesAreReported) {
  const float inf = std::numeric_limits<float>::infinity();
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), inf, -inf}) {
    std::vector<float> x = make_data<float>(Shape::kNormal, 1000, 1);
    x[517] = bad;
    std::vector<double> c(4, -7.0);
    float seen = 0;
    EXPECT_FALSE(kmeans1d(x.data(), 1000, 4, KMeansInit::kLinear, 30, 0, c.data(), &seen));
    EXPECT_TRUE(std::isnan(bad) ? std::isnan(seen) : seen == bad);
    EXPECT_EQ(c, std::vector<double>(4, -7.0));
  }
}

// ------------------------------------------------------------------------------------------------
// Labels
// ------------------------------------------------------------------------------------------------

TEST(KMeansLabels, SearchLevels) {
  EXPECT_EQ(search_levels(1), 0);
  EXPECT_EQ(search_levels(2), 1);
  EXPECT_EQ(search_levels(3), 2);
  EXPECT_EQ(search_levels(16), 4);
  EXPECT_EQ(search_levels(17), 5);
  EXPECT_EQ(search_levels(256), 8);
  EXPECT_EQ(search_tree_size(256), 255);
}

TEST(KMeansLabels, BoundaryIsTheLargestFloatAtMostTheMidpoint) {
  std::mt19937 gen(9);
  std::normal_distribution<double> normal;
  for (int i = 0; i < 10000; ++i) {
    double c[2] = {normal(gen), normal(gen)};
    if (i % 3 == 0) c[1] = std::nextafter(static_cast<float>(c[0]), 10.0f);  // exact midpoints
    std::sort(c, c + 2);
    float bound;
    label_boundaries(c, 2, &bound);
    const double m = 0.5 * c[0] + 0.5 * c[1];
    ASSERT_LE(bound, m);
    ASSERT_GT(std::nextafter(bound, std::numeric_limits<float>::infinity()), m);
  }
}

TEST(KMeansLabels, TreeAndAvx2MatchTheReference) {
  std::mt19937 gen(4);
  std::normal_distribution<float> normal;
  for (int64_t k = 1; k <= 256; ++k) {
    std::vector<float> bounds(k - 1);
    for (float& b : bounds) b = normal(gen);
    if (k > 4) bounds[k / 2] = bounds[k / 2 - 1];  // equal boundaries (equal centroids)
    std::sort(bounds.begin(), bounds.end());
    // Values: random, each boundary and its neighbours (ties), beyond both ends; odd lengths for
    // the tails of the vector loop.
    std::vector<float> x(1000 + k % 37);
    for (size_t i = 0; i < x.size(); ++i) {
      if (k > 1 && i % 4 == 0) {
        const float b = bounds[gen() % (k - 1)];
        const int side = static_cast<int>(gen() % 3);
        x[i] = side == 0 ? b : std::nextafter(b, side == 1 ? 100.0f : -100.0f);
      } else {
        x[i] = normal(gen) * 1.5f;
      }
    }
    std::vector<float> tree(search_tree_size(k));
    build_search_tree(bounds.data(), k, tree.data());
    std::vector<uint8_t> ref(x.size()), tree_labels(x.size(), 255), avx2(x.size(), 255);
    assign_labels_ref(x.data(), x.size(), bounds.data(), k, ref.data());
    assign_labels(x.data(), x.size(), tree.data(), search_levels(k), tree_labels.data());
    ASSERT_EQ(tree_labels, ref) << "k=" << k;
    if (cpu_has_avx2()) {
      assign_labels_avx2(x.data(), x.size(), tree.data(), search_levels(k), avx2.data());
      ASSERT_EQ(avx2, ref) << "k=" << k;
    }
  }
  if (!cpu_has_avx2()) GTEST_SKIP() << "no AVX2 on this CPU: the AVX2 labels were not checked";
}

TEST(KMeansLabels, TreeMatchesTheReferenceDouble) {
  std::mt19937 gen(5);
  std::normal_distribution<double> normal;
  for (const int64_t k : {1, 2, 3, 7, 16, 100, 256}) {
    std::vector<double> bounds(k - 1);
    for (double& b : bounds) b = normal(gen);
    std::sort(bounds.begin(), bounds.end());
    std::vector<double> x(500);
    for (size_t i = 0; i < x.size(); ++i)
      x[i] = k > 1 && i % 3 == 0 ? bounds[gen() % (k - 1)] : normal(gen);
    std::vector<double> tree(search_tree_size(k));
    build_search_tree(bounds.data(), k, tree.data());
    std::vector<uint8_t> ref(x.size()), labels(x.size());
    assign_labels_ref(x.data(), x.size(), bounds.data(), k, ref.data());
    assign_labels(x.data(), x.size(), tree.data(), search_levels(k), labels.data());
    ASSERT_EQ(labels, ref) << "k=" << k;
  }
}

}  // namespace
}  // namespace qext::kernels
