// Look-up-table kernels on packed k-means labels (kernels/kmeans_lut.h): the label format against
// hand-packed bytes and a packer written here from the format, the reference order against
// hand-computed sums where the order decides the result, and the AVX2 and AVX-512 paths bit for
// bit against the scalar reference (each skipped where the CPU cannot run it).
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "qext/kernels/fake_quantize_avx2.h"
#include "qext/kernels/kmeans_lut.h"

namespace qext::kernels {
namespace {

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

// Packs labels by the format: label i in byte i / (8 / bits), bit offset (i % (8 / bits)) * bits.
std::vector<uint8_t> pack(const std::vector<int>& labels, int bits) {
  const size_t per_byte = static_cast<size_t>(8 / bits);
  std::vector<uint8_t> out((labels.size() + per_byte - 1) / per_byte, 0);
  for (size_t i = 0; i < labels.size(); ++i) {
    out[i / per_byte] |= static_cast<uint8_t>(labels[i] << ((i % per_byte) * bits));
  }
  return out;
}

// A copy of `bytes` that ends where an inaccessible page begins: a read past the end faults.
class PageEndCopy {
 public:
  explicit PageEndCopy(const std::vector<uint8_t>& bytes) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t pages = (bytes.size() + page - 1) / page + 1;
    length_ = pages * page;
    map_ = static_cast<uint8_t*>(
        mmap(nullptr, length_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (map_ == MAP_FAILED || mprotect(map_ + length_ - page, page, PROT_NONE) != 0) {
      throw std::runtime_error("mmap / mprotect failed");
    }
    data_ = map_ + length_ - page - bytes.size();
    std::memcpy(data_, bytes.data(), bytes.size());
  }
  ~PageEndCopy() { munmap(map_, length_); }
  PageEndCopy(const PageEndCopy&) = delete;
  PageEndCopy& operator=(const PageEndCopy&) = delete;
  const uint8_t* data() const { return data_; }

 private:
  uint8_t* map_ = nullptr;
  uint8_t* data_ = nullptr;
  size_t length_ = 0;
};

// Random floats over many magnitudes and both signs, with zeros and values so small that their
// products round to +-0 (the sign of a zero sum must come out the same on every path).
float random_value(std::mt19937& rng) {
  const uint32_t kind = rng() % 16;
  const float sign = rng() % 2 == 0 ? 1.0f : -1.0f;
  if (kind == 0) return 0.0f;
  if (kind == 1) return sign * 1e-30f;
  std::uniform_real_distribution<float> mant(0.5f, 1.0f);
  return sign * std::ldexp(mant(rng), static_cast<int>(rng() % 24) - 12);
}

// A random weight as packed labels plus codebook, and its dense decoding (built label by label).
struct Weight {
  int bits = 0;
  int64_t k = 0, rows = 0, cols = 0;
  bool per_channel = false;
  std::vector<int> labels;
  std::vector<float> centroids, dense;
  std::vector<uint8_t> packed;

  LutWeight view(const uint8_t* labels_at) const {
    return {labels_at, bits, centroids.data(), k, per_channel, rows, cols};
  }
};

Weight make_weight(int bits, int64_t k, int64_t rows, int64_t cols, bool per_channel,
                   std::mt19937& rng) {
  Weight w;
  w.bits = bits, w.k = k, w.rows = rows, w.cols = cols, w.per_channel = per_channel;
  w.centroids.resize(static_cast<size_t>((per_channel ? rows : 1) * k));
  for (auto& c : w.centroids) c = random_value(rng);
  w.labels.resize(static_cast<size_t>(rows * cols));
  for (auto& l : w.labels) l = static_cast<int>(rng() % k);
  if (rows * cols > 0) w.labels.back() = static_cast<int>(k - 1);  // the last byte is used
  w.packed = pack(w.labels, bits);
  w.dense.resize(w.labels.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      const size_t i = static_cast<size_t>(r * cols + j);
      w.dense[i] = w.centroids[static_cast<size_t>((per_channel ? r * k : 0) + w.labels[i])];
    }
  }
  return w;
}

std::vector<float> random_floats(size_t n, std::mt19937& rng) {
  std::vector<float> v(n);
  for (auto& f : v) f = random_value(rng);
  return v;
}

// The first element whose bits differ, as text ("" when bit-identical).
std::string first_difference(const std::vector<float>& got, const std::vector<float>& want) {
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0) {
      return "element " + std::to_string(i) + ": got " + std::to_string(got[i]) + " want " +
             std::to_string(want[i]);
    }
  }
  return "";
}

// The codebook sizes worth covering for a width: 1, the permute / gather boundaries, 2^bits.
std::vector<int64_t> codebook_sizes(int bits) {
  std::vector<int64_t> ks;
  for (int64_t k : {1, 2, 3, 8, 9, 16, 17, 200, 256}) {
    if (k <= (int64_t{1} << bits)) ks.push_back(k);
  }
  return ks;
}

// The SIMD paths, each tested bit for bit against the scalar reference where the CPU runs it.
struct SimdPath {
  const char* name;
  bool (*supported)();
  void (*decode)(const LutWeight&, int64_t, int64_t, float*, int64_t);
  void (*linear)(const LutWeight&, int64_t, const float*, int64_t, const float*, int64_t, int64_t,
                 float*, int64_t);
};

const SimdPath kSimdPaths[] = {
    {"avx2", cpu_has_avx2, lut_decode_rows_avx2, lut_linear_avx2},
    {"avx512", lut_cpu_has_avx512, lut_decode_rows_avx512, lut_linear_avx512},
};

void PrintTo(const SimdPath& path, std::ostream* os) { *os << path.name; }

class KmeansLutSimd : public ::testing::TestWithParam<SimdPath> {
 protected:
  void SetUp() override {
    if (!GetParam().supported()) GTEST_SKIP() << "this CPU cannot run " << GetParam().name;
  }
};

// ------------------------------------------------------------------------------------------------
// Format
// ------------------------------------------------------------------------------------------------

TEST(KmeansLutFormat, BitsAndSizes) {
  for (int64_t bits = -1; bits <= 9; ++bits) {
    EXPECT_EQ(is_label_bits(bits), bits == 1 || bits == 2 || bits == 4 || bits == 8) << bits;
  }
  EXPECT_EQ(packed_labels_bytes(0, 4), 0);
  EXPECT_EQ(packed_labels_bytes(5, 2), 2);
  EXPECT_EQ(packed_labels_bytes(9, 1), 2);
  EXPECT_EQ(packed_labels_bytes(3, 4), 2);
  EXPECT_EQ(packed_labels_bytes(3, 8), 3);
}

TEST(KmeansLutFormat, ReadsHandPackedBytes) {
  // bits = 2, labels {1, 2, 3, 0, 2}: byte 0 = 1 | 2 << 2 | 3 << 4 | 0 << 6 = 0x39, byte 1 = 2.
  const uint8_t two[] = {0x39, 0x02};
  const int want2[] = {1, 2, 3, 0, 2};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(read_packed_label(two, i, 2), want2[i]) << i;
  // bits = 4, labels {0xA, 0x3, 0xF}: bytes 0x3A, 0x0F. bits = 1: 0b10110001 -> 1,0,0,0,1,1,0,1.
  const uint8_t four[] = {0x3A, 0x0F};
  EXPECT_EQ(read_packed_label(four, 0, 4), 0xA);
  EXPECT_EQ(read_packed_label(four, 1, 4), 0x3);
  EXPECT_EQ(read_packed_label(four, 2, 4), 0xF);
  const uint8_t one[] = {0xB1};
  const int want1[] = {1, 0, 0, 0, 1, 1, 0, 1};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(read_packed_label(one, i, 1), want1[i]) << i;
  EXPECT_EQ(pack({1, 2, 3, 0, 2}, 2), (std::vector<uint8_t>{0x39, 0x02}));
}

TEST(KmeansLutFormat, MaxLabelAndFirstOutOfRange) {
  const std::vector<uint8_t> p = pack({1, 2, 3, 0, 2}, 2);
  EXPECT_EQ(max_label_ref(p.data(), 0, 5, 2), 3);
  EXPECT_EQ(max_label_ref(p.data(), 3, 5, 2), 2);
  EXPECT_EQ(max_label_ref(p.data(), 2, 2, 2), 0);
  EXPECT_EQ(find_label_at_least(p.data(), 0, 5, 2, 3), 2);
  EXPECT_EQ(find_label_at_least(p.data(), 3, 5, 2, 2), 4);
  EXPECT_EQ(find_label_at_least(p.data(), 0, 5, 2, 4), -1);
}

TEST(KmeansLutFormat, MaxLabelAvx2MatchesReference) {
  if (!cpu_has_avx2()) GTEST_SKIP() << "this CPU cannot run avx2";
  std::mt19937 rng(5);
  for (int bits : {1, 2, 4, 8}) {
    const int top = (1 << bits) - 1;
    for (int64_t n : {1, 7, 31, 64, 255, 700, 5000}) {
      for (int trial = 0; trial < 6; ++trial) {
        // Small labels with one planted maximum, so every field position must be seen.
        std::vector<int> labels(static_cast<size_t>(n));
        for (auto& l : labels) l = static_cast<int>(rng() % ((top + 1) / 2 + 1)) % (top + 1);
        labels[rng() % n] = top - static_cast<int>(rng() % 2);
        const PageEndCopy packed(pack(labels, bits));
        const int64_t begin = static_cast<int64_t>(rng() % n);
        const int64_t end = begin + static_cast<int64_t>(rng() % (n - begin + 1));
        ASSERT_EQ(max_label_avx2(packed.data(), begin, end, bits),
                  max_label_ref(packed.data(), begin, end, bits))
            << "bits " << bits << " n " << n << " [" << begin << ", " << end << ")";
        ASSERT_EQ(max_label_avx2(packed.data(), 0, n, bits),
                  max_label_ref(packed.data(), 0, n, bits));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Decoding
// ------------------------------------------------------------------------------------------------

TEST(KmeansLutDecode, ReferenceIsCodebookOfLabels) {
  std::mt19937 rng(7);
  for (int bits : {1, 2, 4, 8}) {
    for (bool per_channel : {false, true}) {
      const Weight w = make_weight(bits, int64_t{1} << bits, 5, 13, per_channel, rng);
      std::vector<float> out(w.dense.size());
      lut_decode_rows_ref(w.view(w.packed.data()), 0, w.rows, out.data(), w.cols);
      EXPECT_EQ(first_difference(out, w.dense), "") << "bits " << bits;
    }
  }
}

TEST_P(KmeansLutSimd, DecodeMatchesReference) {
  std::mt19937 rng(9);
  for (int bits : {1, 2, 4, 8}) {
    for (int64_t k : codebook_sizes(bits)) {
      for (bool per_channel : {false, true}) {
        for (int64_t cols : {1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 45, 128}) {
          const int64_t rows = 1 + static_cast<int64_t>(rng() % 6);
          const Weight w = make_weight(bits, k, rows, cols, per_channel, rng);
          const PageEndCopy packed(w.packed);
          const LutWeight view = w.view(packed.data());
          // Rows [r0, rows), written with a row stride past cols (the gap must stay untouched).
          const int64_t r0 = static_cast<int64_t>(rng() % rows), ld = cols + 3;
          std::vector<float> fast(static_cast<size_t>((rows - r0) * ld), -5.5f), ref = fast;
          GetParam().decode(view, r0, rows, fast.data(), ld);
          lut_decode_rows_ref(view, r0, rows, ref.data(), ld);
          ASSERT_EQ(first_difference(fast, ref), "")
              << "bits " << bits << " k " << k << " per_channel " << per_channel << " rows " << rows
              << " cols " << cols << " r0 " << r0;
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// The accumulation order
// ------------------------------------------------------------------------------------------------

// x . w with w = 1 for the given nonzero x entries (index, value), K = 32.
float dot_of(std::initializer_list<std::pair<int, float>> entries) {
  std::vector<float> x(32, 0.0f), w(32, 1.0f);
  for (const auto& [i, v] : entries) x[static_cast<size_t>(i)] = v;
  float y = 0.0f;
  linear_ref(1, 1, 32, x.data(), 32, w.data(), 32, nullptr, &y, 1);
  return y;
}

TEST(KmeansLutOrder, LanesAndTreeDecideTheRounding) {
  const float big = 16777216.0f;  // 2^24: adding 1 is a tie that rounds back to even 2^24
  // Lane 1 holds 1 + 1 = 2 before it meets 2^24: exact (in k order it would be 2^24).
  EXPECT_EQ(dot_of({{0, big}, {1, 1.0f}, {17, 1.0f}}), big + 2.0f);
  // Lane 0 meets k = 16 in one fma: 2^24 + 1 is a tie, back to 2^24.
  EXPECT_EQ(dot_of({{0, big}, {16, 1.0f}}), big);
  // t_0 = s_0 + s_8 first: 2^24 + 1 -> 2^24; then t_1 = 1 alone: the same tie again.
  EXPECT_EQ(dot_of({{0, big}, {8, 1.0f}, {1, 1.0f}}), big);
  // (t0 + t1) + (t2 + t3): t2 + t3 = 2 is formed before it meets 2^24.
  EXPECT_EQ(dot_of({{0, big}, {2, 1.0f}, {3, 1.0f}}), big + 2.0f);
  // ... but t1 pairs with t0: 2^24 + 1 -> 2^24, and t4 + t5 = 2 joins last.
  EXPECT_EQ(dot_of({{0, big}, {1, 1.0f}, {4, 1.0f}, {5, 1.0f}}), big + 2.0f);
  EXPECT_EQ(dot_of({{0, big}, {1, 1.0f}, {4, 1.0f}}), big);
  // The bias is added to the reduced sum.
  std::vector<float> x(3, 1.0f), w(3, 1.0f);
  const float bias = 0.5f;
  float y = 0.0f;
  linear_ref(1, 1, 3, x.data(), 3, w.data(), 3, &bias, &y, 1);
  EXPECT_EQ(y, 3.5f);
}

TEST(KmeansLutOrder, ReferenceCloseToDoubleDot) {
  std::mt19937 rng(13);
  std::normal_distribution<float> normal;
  const int64_t M = 3, N = 4, K = 300;
  std::vector<float> x(M * K), w(N * K), bias(N), y(M * N);
  for (auto& v : x) v = normal(rng);
  for (auto& v : w) v = normal(rng);
  for (auto& v : bias) v = normal(rng);
  linear_ref(M, N, K, x.data(), K, w.data(), K, bias.data(), y.data(), N);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double exact = bias[n], magnitude = std::fabs(bias[n]);
      for (int64_t k = 0; k < K; ++k) {
        exact += double{x[m * K + k]} * w[n * K + k];
        magnitude += std::fabs(double{x[m * K + k]} * w[n * K + k]);
      }
      EXPECT_NEAR(y[m * N + n], exact, magnitude * 4e-6) << m << ", " << n;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Linear on packed labels
// ------------------------------------------------------------------------------------------------

struct LinearCase {
  int64_t M, N, K;
};

// y columns [n0, n1) from `path` on w, and the reference linear_ref on the dense weight; the
// other columns (and the row padding) keep a canary.
using LinearFn = decltype(&lut_linear_ref);

void expect_linear_matches(const Weight& w, const LinearCase& c, int64_t n0, int64_t n1,
                           bool with_bias, LinearFn path, std::mt19937& rng) {
  const int64_t ldx = c.K + static_cast<int64_t>(rng() % 3), ldy = c.N + 2;
  const std::vector<float> x = random_floats(static_cast<size_t>(c.M * ldx), rng);
  const std::vector<float> bias = random_floats(static_cast<size_t>(c.N), rng);
  const float* b = with_bias ? bias.data() : nullptr;
  const PageEndCopy packed(w.packed);
  std::vector<float> got(static_cast<size_t>(c.M * ldy), -3.25f), want = got;
  path(w.view(packed.data()), c.M, x.data(), ldx, b, n0, n1, got.data(), ldy);
  const float* dense_rows = w.dense.data() + n0 * c.K;
  linear_ref(c.M, n1 - n0, c.K, x.data(), ldx, dense_rows, c.K, b == nullptr ? nullptr : b + n0,
             want.data() + n0, ldy);
  ASSERT_EQ(first_difference(got, want), "")
      << "bits " << w.bits << " k " << w.k << " per_channel " << w.per_channel << " M " << c.M
      << " N " << c.N << " K " << c.K << " columns [" << n0 << ", " << n1 << ") bias " << with_bias;
}

void check_linear_path(LinearFn path) {
  std::mt19937 rng(17);
  const LinearCase cases[] = {{1, 1, 1},  {1, 7, 16},   {1, 5, 33},   {2, 9, 15},   {3, 4, 8},
                              {4, 3, 47}, {5, 11, 64},  {7, 6, 100},  {1, 33, 257}, {8, 2, 31},
                              {6, 17, 1}, {13, 5, 129}, {1, 64, 300}, {3, 3, 1030}};
  for (int bits : {1, 2, 4, 8}) {
    for (int64_t k : codebook_sizes(bits)) {
      for (bool per_channel : {false, true}) {
        for (const LinearCase& c : cases) {
          const Weight w = make_weight(bits, k, c.N, c.K, per_channel, rng);
          const int64_t n0 = static_cast<int64_t>(rng() % c.N);
          const int64_t n1 = n0 + 1 + static_cast<int64_t>(rng() % (c.N - n0));
          expect_linear_matches(w, c, 0, c.N, rng() % 2 == 0, path, rng);
          expect_linear_matches(w, c, n0, n1, rng() % 2 == 0, path, rng);
          if (::testing::Test::HasFatalFailure()) return;
        }
      }
    }
  }
}

TEST(KmeansLutLinear, ReferenceOnLabelsMatchesDenseReference) { check_linear_path(lut_linear_ref); }

TEST_P(KmeansLutSimd, LinearMatchesReference) { check_linear_path(GetParam().linear); }

TEST_P(KmeansLutSimd, LinearLargeShapesMatchReference) {
  // Several decode blocks (8192 floats each) and M past the register blocks.
  std::mt19937 rng(23);
  for (const LinearCase& c : {LinearCase{1, 300, 1000}, LinearCase{10, 70, 513}}) {
    const Weight w = make_weight(4, 16, c.N, c.K, true, rng);
    expect_linear_matches(w, c, 0, c.N, true, GetParam().linear, rng);
    expect_linear_matches(w, c, 37, c.N - 5, false, GetParam().linear, rng);
  }
}

TEST_P(KmeansLutSimd, UnderflowingSumKeepsItsNegativeZero) {
  // Every product is -1e-60, which rounds to -0: each lane's sum, and so y, is -0 (K = 21 leaves
  // lanes 5..15 without a term in the last block: they must keep their -0, not gain +0).
  const int64_t K = 21;
  const std::vector<float> x(K, -1e-30f);
  const float centroid = 1e-30f;
  const std::vector<uint8_t> labels = pack(std::vector<int>(K, 0), 4);
  const LutWeight w{labels.data(), 4, &centroid, 1, false, 1, K};
  float ref = 1.0f, fast = 1.0f;
  lut_linear_ref(w, 1, x.data(), K, nullptr, 0, 1, &ref, 1);
  GetParam().linear(w, 1, x.data(), K, nullptr, 0, 1, &fast, 1);
  EXPECT_EQ(ref, 0.0f);
  EXPECT_TRUE(std::signbit(ref));
  EXPECT_TRUE(std::signbit(fast));
}

TEST_P(KmeansLutSimd, NonFiniteValuesPropagateAlike) {
  std::mt19937 rng(29);
  const LinearCase c{3, 5, 40};
  Weight w = make_weight(4, 16, c.N, c.K, false, rng);
  w.centroids[3] = std::numeric_limits<float>::infinity();
  w.centroids[4] = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < w.dense.size(); ++i) w.dense[i] = w.centroids[w.labels[i]];
  const std::vector<float> x = random_floats(static_cast<size_t>(c.M * c.K), rng);
  std::vector<float> got(c.M * c.N), want(c.M * c.N);
  GetParam().linear(w.view(w.packed.data()), c.M, x.data(), c.K, nullptr, 0, c.N, got.data(), c.N);
  linear_ref(c.M, c.N, c.K, x.data(), c.K, w.dense.data(), c.K, nullptr, want.data(), c.N);
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(want[i])) {
      EXPECT_TRUE(std::isnan(got[i])) << i;
    } else {
      EXPECT_EQ(got[i], want[i]) << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, KmeansLutSimd, ::testing::ValuesIn(kSimdPaths),
                         [](const ::testing::TestParamInfo<SimdPath>& info) {
                           return std::string(info.param.name);
                         });

}  // namespace
}  // namespace qext::kernels
