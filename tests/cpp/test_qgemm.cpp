// Integer GEMM kernels (kernels/qgemm.h): the packed layout against its byte formula, the
// fixed-point requantization against hand-computed cases and an independent 128-bit model, the
// scalar reference against a plain int64 GEMM on the unpacked weights, and every ISA path that this
// CPU supports bit for bit against the scalar reference (others are skipped).
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "qext/kernels/qgemm.h"
#include "qext/kernels/qgemm_isa.h"

namespace qext::kernels {
namespace {

constexpr int32_t kI32Max = std::numeric_limits<int32_t>::max();
constexpr int32_t kI32Min = std::numeric_limits<int32_t>::min();

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

// Bytes whose end touches an inaccessible page: reading one byte past the end faults.
class GuardedBytes {
 public:
  explicit GuardedBytes(size_t size) : size_(size) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t data_pages = (size + page - 1) / page;
    map_bytes_ = (data_pages + 1) * page;
    void* p = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
    base_ = static_cast<uint8_t*>(p);
    if (mprotect(base_ + data_pages * page, page, PROT_NONE) != 0) {
      throw std::runtime_error("mprotect failed");
    }
    data_ = base_ + data_pages * page - size;
  }
  ~GuardedBytes() { munmap(base_, map_bytes_); }
  GuardedBytes(const GuardedBytes&) = delete;
  GuardedBytes& operator=(const GuardedBytes&) = delete;
  uint8_t* data() { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* base_ = nullptr;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  size_t map_bytes_ = 0;
};

// floor(n / 2^s) for a 128-bit n, by division (independent of the shifts in the kernels).
__int128 floor_div_pow2(__int128 n, int s) {
  const __int128 d = static_cast<__int128>(1) << s;
  __int128 q = n / d;  // truncates toward zero
  if (n % d != 0 && n < 0) --q;
  return q;
}

// The requantization of qgemm.h written out in 128-bit integers.
int32_t requantize_model(int32_t acc, FixedPointMultiplier m, int32_t zp, int32_t lo, int32_t hi) {
  __int128 x = acc;
  if (m.exponent > 0) {
    x *= static_cast<__int128>(1) << m.exponent;
    if (x > kI32Max) x = kI32Max;
    if (x < kI32Min) x = kI32Min;
  }
  const int n = 31 + (m.exponent < 0 ? -m.exponent : 0);
  x = floor_div_pow2(x * m.multiplier + (static_cast<__int128>(1) << (n - 1)) + m.offset, n);
  x += zp;
  if (x < lo) x = lo;
  if (x > hi) x = hi;
  return static_cast<int32_t>(x);
}

// A random GEMM problem with its packed weight and epilogue data.
struct Problem {
  int64_t M = 0, N = 0, K = 0, lda = 0;
  std::vector<uint8_t> a;  // M x lda
  std::vector<int8_t> w;   // N x K
  std::vector<int8_t> packed;
  std::vector<int32_t> row_sums, bias;
  std::vector<FixedPointMultiplier> mult;
  std::vector<float> scale;
  int32_t a_zero_point = 0;
  bool with_bias = true;
};

enum class Fill { kRandom, kMin, kMax };

Problem make_problem(int64_t M, int64_t N, int64_t K, std::mt19937& rng,
                     Fill a_fill = Fill::kRandom, Fill w_fill = Fill::kRandom) {
  Problem p;
  p.M = M, p.N = N, p.K = K;
  p.lda = K + static_cast<int64_t>(rng() % 5);
  p.a.resize(static_cast<size_t>(M * p.lda));
  for (auto& v : p.a) {
    v = a_fill == Fill::kMin ? 0 : a_fill == Fill::kMax ? 255 : static_cast<uint8_t>(rng());
  }
  p.w.resize(static_cast<size_t>(N * K));
  for (auto& v : p.w) {
    v = w_fill == Fill::kMin   ? int8_t{-128}
        : w_fill == Fill::kMax ? int8_t{127}
                               : static_cast<int8_t>(rng());
  }
  p.packed.resize(packed_weight_bytes(N, K));
  p.row_sums.resize(static_cast<size_t>(N));
  pack_weight(p.w.data(), N, K, K, p.packed.data(), p.row_sums.data());
  p.a_zero_point = static_cast<int32_t>(rng() % 256);
  p.with_bias = rng() % 4 != 0;
  p.bias.resize(static_cast<size_t>(N));
  for (auto& b : p.bias) b = static_cast<int32_t>(rng() % 200001) - 100000;
  p.mult.resize(static_cast<size_t>(N));
  p.scale.resize(static_cast<size_t>(N));
  std::uniform_int_distribution<int32_t> mant(1 << 30, kI32Max);
  std::uniform_int_distribution<int32_t> expo(-31, 10);
  std::normal_distribution<float> sc(0.0f, 1e-3f);
  std::uniform_int_distribution<int32_t> offset(-(1 << 30), 1 << 30);
  for (int64_t n = 0; n < N; ++n) {
    p.mult[n] = {mant(rng), expo(rng), n % 4 == 0 ? 0 : offset(rng)};
    p.scale[n] = sc(rng);
  }
  return p;
}

RequantEpilogue requant_epilogue(const Problem& p, int32_t zp, int32_t lo, int32_t hi) {
  return {p.row_sums.data(),
          p.a_zero_point,
          p.with_bias ? p.bias.data() : nullptr,
          p.mult.data(),
          zp,
          lo,
          hi};
}

FloatEpilogue float_epilogue(const Problem& p, bool relu) {
  return {p.row_sums.data(), p.a_zero_point, p.with_bias ? p.bias.data() : nullptr, p.scale.data(),
          relu};
}

constexpr uint8_t kCanary = 0xA5;

// C (M x ldc bytes, ldc = N + 3, the padding holding a canary) from isa; A is copied into a guarded
// buffer whose last row ends at an inaccessible page.
std::vector<uint8_t> run_requant(Isa isa, const Problem& p, const RequantEpilogue& ep) {
  GuardedBytes a(static_cast<size_t>((p.M - 1) * p.lda + p.K) + 0);
  if (a.size() > 0) std::memcpy(a.data(), p.a.data(), a.size());
  const int64_t ldc = p.N + 3;
  std::vector<uint8_t> c(static_cast<size_t>(p.M * ldc), kCanary);
  qgemm_u8s8(isa, p.M, p.N, p.K, a.data(), p.lda, p.packed.data(), ep, c.data(), ldc);
  return c;
}

std::vector<float> run_float(Isa isa, const Problem& p, const FloatEpilogue& ep) {
  GuardedBytes a(static_cast<size_t>((p.M - 1) * p.lda + p.K));
  if (a.size() > 0) std::memcpy(a.data(), p.a.data(), a.size());
  const int64_t ldc = p.N + 5;
  std::vector<float> c(static_cast<size_t>(p.M * ldc), -7.25f);
  qgemm_u8s8(isa, p.M, p.N, p.K, a.data(), p.lda, p.packed.data(), ep, c.data(), ldc);
  return c;
}

// The first differing element of two M x ld outputs, as text ("" when bit-identical).
template <class T>
std::string first_difference(const std::vector<T>& got, const std::vector<T>& want, int64_t ld) {
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      return "row " + std::to_string(static_cast<int64_t>(i) / ld) + " col " +
             std::to_string(static_cast<int64_t>(i) % ld) + ": got " +
             std::to_string(static_cast<double>(got[i])) + " want " +
             std::to_string(static_cast<double>(want[i]));
    }
  }
  return "";
}

// The int64 value of acc[m][n] from the unpacked weights.
int64_t exact_acc(const Problem& p, int64_t m, int64_t n) {
  int64_t s = 0;
  for (int64_t k = 0; k < p.K; ++k) {
    s += (int64_t{p.a[m * p.lda + k]} - p.a_zero_point) * p.w[n * p.K + k];
  }
  return s + (p.with_bias ? p.bias[n] : 0);
}

// ------------------------------------------------------------------------------------------------
// Packing
// ------------------------------------------------------------------------------------------------

TEST(QgemmPack, SizesAndOffsets) {
  EXPECT_EQ(packed_k(0), 0);
  EXPECT_EQ(packed_k(1), 64);
  EXPECT_EQ(packed_k(64), 64);
  EXPECT_EQ(packed_k(65), 128);
  EXPECT_EQ(packed_weight_bytes(1, 1), 16u * 64u);
  EXPECT_EQ(packed_weight_bytes(17, 65), 32u * 128u);
  EXPECT_EQ(packed_block_offset(0, 100), 0u);
  EXPECT_EQ(packed_block_offset(32, 100), 2u * 16u * 128u);
}

TEST(QgemmPack, LayoutMatchesByteFormula) {
  std::mt19937 rng(11);
  for (int64_t N : {1, 15, 16, 17, 33}) {
    for (int64_t K : {1, 3, 4, 63, 64, 65, 130}) {
      const int64_t ldw = K + 3;
      std::vector<int8_t> w(static_cast<size_t>(N * ldw));
      for (auto& v : w) v = static_cast<int8_t>(rng());
      std::vector<int8_t> packed(packed_weight_bytes(N, K), int8_t{0x5A});
      std::vector<int32_t> sums(static_cast<size_t>(N), -1);
      pack_weight(w.data(), N, K, ldw, packed.data(), sums.data());
      const int64_t kp = packed_k(K);
      ASSERT_EQ(static_cast<int64_t>(packed.size()), (N + 15) / 16 * 16 * kp);
      for (int64_t b = 0; b < (N + 15) / 16; ++b) {
        for (int64_t g = 0; g < kp / 4; ++g) {
          for (int64_t n = 0; n < 16; ++n) {
            for (int64_t j = 0; j < 4; ++j) {
              const int64_t row = 16 * b + n, k = 4 * g + j;
              const int8_t want = row < N && k < K ? w[row * ldw + k] : int8_t{0};
              ASSERT_EQ(packed[b * 16 * kp + 64 * g + 4 * n + j], want)
                  << "N=" << N << " K=" << K << " block " << b << " group " << g << " n " << n
                  << " j " << j;
            }
          }
        }
      }
      for (int64_t n = 0; n < N; ++n) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += w[n * ldw + k];
        EXPECT_EQ(sums[n], s) << "N=" << N << " K=" << K << " n=" << n;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Fixed-point multipliers and requantization
// ------------------------------------------------------------------------------------------------

TEST(QuantizeMultiplier, RoundTripWithinHalfUnit) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> log2m(-32.0, 29.999);
  for (int i = 0; i < 20000; ++i) {
    const double m = std::exp2(log2m(rng));
    FixedPointMultiplier q{};
    ASSERT_TRUE(quantize_multiplier(m, &q)) << m;
    ASSERT_TRUE(is_valid_multiplier(q)) << m;
    ASSERT_GE(q.multiplier, 1 << 30);
    const double back = std::ldexp(static_cast<double>(q.multiplier), q.exponent - 31);
    ASSERT_LE(std::fabs(m - back), std::ldexp(1.0, q.exponent - 32)) << m;
  }
}

TEST(QuantizeMultiplier, ExactCasesAndEdges) {
  FixedPointMultiplier q{};
  ASSERT_TRUE(quantize_multiplier(1.0, &q));
  EXPECT_EQ(q.multiplier, 1 << 30);
  EXPECT_EQ(q.exponent, 1);
  ASSERT_TRUE(quantize_multiplier(0.5, &q));
  EXPECT_EQ(q.multiplier, 1 << 30);
  EXPECT_EQ(q.exponent, 0);
  ASSERT_TRUE(quantize_multiplier(0.75, &q));
  EXPECT_EQ(q.multiplier, 3 << 29);
  EXPECT_EQ(q.exponent, 0);
  ASSERT_TRUE(quantize_multiplier(0x1p-32, &q));  // smallest accepted
  EXPECT_EQ(q.multiplier, 1 << 30);
  EXPECT_EQ(q.exponent, -31);
  ASSERT_TRUE(quantize_multiplier(0x1p30 - 0.5, &q));  // largest representable
  EXPECT_EQ(q.multiplier, kI32Max);
  EXPECT_EQ(q.exponent, 30);
  // Just below a power of two: the mantissa rounds up to 2^31 and becomes 2^30, exponent + 1.
  ASSERT_TRUE(quantize_multiplier(std::nextafter(0.5, 0.0), &q));
  EXPECT_EQ(q.multiplier, 1 << 30);
  EXPECT_EQ(q.exponent, 0);
}

TEST(QuantizeMultiplier, RejectsInvalid) {
  const double bad[] = {0.0,
                        -0.0,
                        -1.0,
                        -1e-5,
                        std::numeric_limits<double>::quiet_NaN(),
                        std::numeric_limits<double>::infinity(),
                        -std::numeric_limits<double>::infinity(),
                        std::nextafter(0x1p-32, 0.0),
                        0x1p-40,
                        0x1p30,
                        0x1p30 - 0.25,  // would round to 2^31 * 2^(30 - 31): exponent 31
                        1e12};
  for (double m : bad) {
    FixedPointMultiplier q{123, 45};
    EXPECT_FALSE(quantize_multiplier(m, &q)) << m;
    EXPECT_EQ(q.multiplier, 123) << m;  // untouched
    EXPECT_EQ(q.exponent, 45) << m;
  }
  EXPECT_FALSE(is_valid_multiplier({(1 << 30) - 1, 0}));
  EXPECT_FALSE(is_valid_multiplier({1 << 30, 31}));
  EXPECT_FALSE(is_valid_multiplier({1 << 30, -32}));
  EXPECT_TRUE(is_valid_multiplier({kI32Max, -31}));
}

TEST(Requantize, HandComputedRoundHalfUp) {
  const FixedPointMultiplier half{1 << 30, 0};      // 0.5
  const FixedPointMultiplier quarter{1 << 30, -1};  // 0.25
  const FixedPointMultiplier one{1 << 30, 1};       // 1.0
  // Ties go up (toward +inf).
  EXPECT_EQ(requantize(5, half, 0, -1000, 1000), 3);    // 2.5
  EXPECT_EQ(requantize(-5, half, 0, -1000, 1000), -2);  // -2.5
  EXPECT_EQ(requantize(7, half, 0, -1000, 1000), 4);    // 3.5
  EXPECT_EQ(requantize(-7, half, 0, -1000, 1000), -3);  // -3.5
  EXPECT_EQ(requantize(4, half, 0, -1000, 1000), 2);
  EXPECT_EQ(requantize(-6, quarter, 0, -1000, 1000), -1);  // -1.5
  EXPECT_EQ(requantize(6, quarter, 0, -1000, 1000), 2);    // 1.5
  // One rounding, as documented: 5 * 0.25 = 1.25 -> 1 (gemmlowp's two roundings give 2: 5 * 2^30 /
  // 2^31 = 2.5 -> 3, then 3 / 2 = 1.5 -> 2).
  EXPECT_EQ(requantize(5, quarter, 0, -1000, 1000), 1);
  EXPECT_EQ(requantize(-5, quarter, 0, -1000, 1000), -1);  // -1.25
  EXPECT_EQ(requantize(100, one, 7, -1000, 1000), 107);
  // Clamp after the zero point.
  EXPECT_EQ(requantize(1000, one, 10, 0, 255), 255);
  EXPECT_EQ(requantize(-1000, one, 10, 0, 255), 0);
  EXPECT_EQ(requantize(-5, one, 10, 0, 255), 5);
  EXPECT_EQ(requantize(-20, one, 10, 10, 255), 10);  // ReLU: out_min = zero point
}

TEST(Requantize, SaturationAndExtremes) {
  // m = 1024: exponent 11; acc * 2^11 saturates to int32 before the multiply.
  FixedPointMultiplier m{};
  ASSERT_TRUE(quantize_multiplier(1024.0, &m));
  EXPECT_EQ(m.exponent, 11);
  EXPECT_EQ(requantize(1 << 21, m, 0, kI32Min, kI32Max), 1 << 30);  // (2^31 - 1) / 2 -> 2^30
  EXPECT_EQ(requantize(-(1 << 21), m, 0, kI32Min, kI32Max), -(1 << 30));
  EXPECT_EQ(requantize((1 << 20) - 1, m, 0, kI32Min, kI32Max), ((1 << 20) - 1) * 1024);
  EXPECT_EQ(requantize(kI32Max, {kI32Max, 30}, 0, kI32Min, kI32Max), kI32Max - 1);
  EXPECT_EQ(requantize(kI32Min, {kI32Max, 30}, 0, kI32Min, kI32Max), kI32Min + 1);
  EXPECT_EQ(requantize(kI32Min, {kI32Max, 0}, 0, kI32Min, kI32Max), kI32Min + 1);
  // (2^31 - 1)^2 / 2^62 = 1 - 2^-30 + 2^-62 -> 1.
  EXPECT_EQ(requantize(kI32Max, {kI32Max, -31}, 0, kI32Min, kI32Max), 1);
  EXPECT_EQ(requantize(kI32Min, {1 << 30, -31}, 0, kI32Min, kI32Max), 0);   // -2^30 / 2^31 -> 0
  EXPECT_EQ(requantize(kI32Min, {1 << 30, -29}, 0, kI32Min, kI32Max), -2);  // -2^30 / 2^29
  // A large zero point does not overflow: the sum is formed in int64 and clamped.
  EXPECT_EQ(requantize(kI32Max, {1 << 30, 1}, kI32Max, kI32Min, kI32Max), kI32Max);
  EXPECT_EQ(requantize(kI32Min, {1 << 30, 1}, kI32Min, kI32Min, kI32Max), kI32Min);
}

TEST(Requantize, MatchesInt128Model) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> any(kI32Min, kI32Max);
  std::uniform_int_distribution<int32_t> mant(1 << 30, kI32Max);
  std::uniform_int_distribution<int32_t> expo(-31, 30);
  const int32_t special[] = {0, 1, -1, kI32Max, kI32Min, 1 << 20, -(1 << 20), 12345, -12345};
  for (int i = 0; i < 200000; ++i) {
    const int32_t acc = i < 9 * 64 ? special[i % 9] : (i % 3 ? any(rng) : any(rng) >> (i % 31));
    const FixedPointMultiplier m{i % 7 == 0   ? (1 << 30)
                                 : i % 7 == 1 ? kI32Max
                                              : mant(rng),
                                 i < 9 * 64 ? (i / 9) - 33 : expo(rng),
                                 i % 5 == 0   ? 0
                                 : i % 5 == 1 ? (1 << 30)
                                 : i % 5 == 2
                                     ? -(1 << 30)
                                     : static_cast<int32_t>(rng() % (1u << 31)) - (1 << 30)};
    if (!is_valid_multiplier(m)) continue;
    const int32_t zp = static_cast<int32_t>(rng() % 512) - 256;
    ASSERT_EQ(requantize(acc, m, zp, kI32Min, kI32Max),
              requantize_model(acc, m, zp, kI32Min, kI32Max))
        << acc << " " << m.multiplier << " " << m.exponent;
    ASSERT_EQ(requantize(acc, m, zp, -128, 127), requantize_model(acc, m, zp, -128, 127));
  }
}

TEST(MaxExactK, Bounds) {
  const int64_t k0 = max_exact_k(0);
  EXPECT_EQ(k0, 65793);
  EXPECT_LE(k0 * 255 * 128, int64_t{kI32Max});
  EXPECT_GT((k0 + 1) * 255 * 128, int64_t{kI32Max});
  const int64_t kb = max_exact_k(1 << 30);
  EXPECT_LE(kb * 255 * 128 + (1 << 30), int64_t{kI32Max});
  EXPECT_GT((kb + 1) * 255 * 128 + (1 << 30), int64_t{kI32Max});
  EXPECT_EQ(max_exact_k(kI32Max), 0);
  EXPECT_EQ(max_exact_k(int64_t{1} << 40), 0);
  EXPECT_EQ(max_exact_k(-100), max_exact_k(100));
}

// ------------------------------------------------------------------------------------------------
// The scalar reference against an int64 GEMM on the unpacked weights
// ------------------------------------------------------------------------------------------------

TEST(QgemmScalar, MatchesInt64GemmOnUnpackedWeights) {
  std::mt19937 rng(7);
  for (int64_t M : {1, 3, 8}) {
    for (int64_t N : {1, 15, 17, 33}) {
      for (int64_t K : {1, 3, 63, 65, 130, 1000}) {
        const Problem p = make_problem(M, N, K, rng);
        const auto ep = requant_epilogue(p, 3, -128, 127);
        const auto c = run_requant(Isa::kScalar, p, ep);
        const auto fep = float_epilogue(p, false);
        const auto f = run_float(Isa::kScalar, p, fep);
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t n = 0; n < N; ++n) {
            const int64_t acc = exact_acc(p, m, n);
            ASSERT_LE(std::llabs(acc), int64_t{kI32Max});
            const int32_t q = requantize_model(static_cast<int32_t>(acc), p.mult[n], 3, -128, 127);
            ASSERT_EQ(static_cast<int8_t>(c[m * (N + 3) + n]), q)
                << "M=" << M << " N=" << N << " K=" << K << " m=" << m << " n=" << n;
            const float want = static_cast<float>(acc) * p.scale[n];
            ASSERT_EQ(std::memcmp(&f[m * (N + 5) + n], &want, 4), 0)
                << "M=" << M << " N=" << N << " K=" << K << " m=" << m << " n=" << n;
          }
          for (int64_t n = N; n < N + 3; ++n) ASSERT_EQ(c[m * (N + 3) + n], kCanary);
          for (int64_t n = N; n < N + 5; ++n) ASSERT_EQ(f[m * (N + 5) + n], -7.25f);
        }
      }
    }
  }
}

TEST(QgemmScalar, ExactAtMaxExactK) {
  // K = max_exact_k(0) with the largest |A - a_zero_point| * |W|: the sum is -2^31 + 128, exact.
  std::mt19937 rng(9);
  const int64_t K = max_exact_k(0);
  Problem p = make_problem(1, 2, K, rng, Fill::kMax, Fill::kMin);
  p.a_zero_point = 0;
  p.with_bias = false;
  p.mult[0] = p.mult[1] = {1 << 30, 1};  // 1.0
  const auto c = run_requant(Isa::kScalar, p, requant_epilogue(p, -5, -128, 127));
  std::vector<float> scale_one(2, 1.0f);
  p.scale = scale_one;
  const auto f = run_float(Isa::kScalar, p, float_epilogue(p, false));
  const int64_t want = K * 255 * -128;
  EXPECT_EQ(exact_acc(p, 0, 0), want);
  EXPECT_EQ(f[0], static_cast<float>(want));
  EXPECT_EQ(static_cast<int8_t>(c[0]),
            requantize_model(static_cast<int32_t>(want), p.mult[0], -5, -128, 127));
}

// ------------------------------------------------------------------------------------------------
// Every ISA against the scalar reference
// ------------------------------------------------------------------------------------------------

class QgemmIsa : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    if (!isa_supported(GetParam())) {
      GTEST_SKIP() << isa_name(GetParam()) << " is not supported on this CPU";
    }
  }

  // Both epilogues (with and without ReLU, uint8 and int8 output ranges) against the reference.
  void check(const Problem& p, const std::string& what) {
    const Isa isa = GetParam();
    struct Range {
      int32_t zp, lo, hi;
    };
    const Range ranges[] = {
        {static_cast<int32_t>(p.M * 7 + p.N) % 256, 0, 255},  // uint8
        {static_cast<int32_t>(p.K % 256) - 128, -128, 127},   // int8
        {-static_cast<int32_t>(p.K % 129), -128, 127},        // int8, zp <= 0 (saturating narrow)
        {0, 0, 127},                                          // 7-bit
        {static_cast<int32_t>(p.N % 200), static_cast<int32_t>(p.N % 200), 255},  // uint8 ReLU
        {0, kI32Min, kI32Max},  // no clamp (low byte)
    };
    for (const Range& r : ranges) {
      const auto ep = requant_epilogue(p, r.zp, r.lo, r.hi);
      const auto got = run_requant(isa, p, ep);
      const auto want = run_requant(Isa::kScalar, p, ep);
      const std::string diff = first_difference(got, want, p.N + 3);
      ASSERT_EQ(diff, "") << isa_name(isa) << " requant " << what << " M=" << p.M << " N=" << p.N
                          << " K=" << p.K << " zp=" << r.zp << " [" << r.lo << ", " << r.hi
                          << "] bias=" << p.with_bias;
    }
    for (bool relu : {false, true}) {
      const auto ep = float_epilogue(p, relu);
      const auto got = run_float(isa, p, ep);
      const auto want = run_float(Isa::kScalar, p, ep);
      const std::string diff = first_difference(got, want, p.N + 5);
      ASSERT_EQ(diff, "") << isa_name(isa) << " float " << what << " M=" << p.M << " N=" << p.N
                          << " K=" << p.K << " relu=" << relu << " bias=" << p.with_bias;
    }
  }
};

TEST_P(QgemmIsa, RandomShapesBitIdentical) {
  std::mt19937 rng(1234);
  for (int64_t M : {1, 2, 3, 7, 8, 9, 17, 33}) {
    for (int64_t N : {1, 15, 16, 17, 33, 48, 50, 97}) {
      for (int64_t K : {1, 3, 4, 63, 64, 65, 130, 1000}) {
        if (M * N * K > 2'000'000) continue;
        check(make_problem(M, N, K, rng), "random");
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST_P(QgemmIsa, LargerShapesBitIdentical) {
  std::mt19937 rng(99);
  const int64_t shapes[][3] = {{64, 130, 515}, {100, 64, 256}, {37, 260, 77}, {130, 33, 1031}};
  for (const auto& s : shapes) {
    check(make_problem(s[0], s[1], s[2], rng), "larger");
    if (HasFatalFailure()) return;
  }
}

TEST_P(QgemmIsa, ExtremeValuesBitIdentical) {
  std::mt19937 rng(4321);
  for (Fill af : {Fill::kMin, Fill::kMax, Fill::kRandom}) {
    for (Fill wf : {Fill::kMin, Fill::kMax, Fill::kRandom}) {
      for (int32_t azp : {0, 255, 128}) {
        for (int64_t K : {1, 65, 1000}) {
          Problem p = make_problem(9, 33, K, rng, af, wf);
          p.a_zero_point = azp;
          check(p, "extreme");
          if (HasFatalFailure()) return;
        }
      }
    }
  }
}

TEST_P(QgemmIsa, ExponentsAndBiasSweep) {
  // Every exponent from -31 to +10 across the columns, with tiny and huge multipliers, bias on /
  // off, and accumulators large enough to saturate the left shift.
  std::mt19937 rng(77);
  for (bool bias : {false, true}) {
    Problem p = make_problem(11, 42, 700, rng);
    p.with_bias = bias;
    for (int64_t n = 0; n < p.N; ++n) {
      p.mult[n] = {n % 3 == 0   ? (1 << 30)
                   : n % 3 == 1 ? kI32Max
                                : 1518500250,
                   static_cast<int32_t>(n) - 31};
      p.bias[n] = n % 2 ? kI32Max / 4 : kI32Min / 4;
    }
    check(p, "exponent sweep");
    if (HasFatalFailure()) return;
  }
}

TEST_P(QgemmIsa, TypicalExponentsBitIdentical) {
  // Exponents in [-21, -1], the range where the AVX-512 epilogue stores two column blocks together
  // (PairPath in epilogue_avx512.h), and its edges: a panel with one exponent just outside (0 or
  // -22) falls back to block-by-block stores. Tiny and huge multipliers and extreme levels push
  // the requantized values past the int16 / byte saturation of the packs.
  std::mt19937 rng(2024);
  std::uniform_int_distribution<int32_t> expo(-21, -1);
  int case_index = 0;
  for (int64_t N : {32, 33, 47, 64, 96, 130}) {
    for (int64_t M : {1, 2, 3, 8, 17, 33}) {
      const Fill fill = case_index % 3 == 0 ? Fill::kMax : Fill::kRandom;
      Problem p = make_problem(M, N, case_index % 2 ? 300 : 64, rng, fill, fill);
      for (int64_t n = 0; n < N; ++n) {
        p.mult[n].exponent = n % 7 == 0 ? -21 : n % 7 == 1 ? -1 : expo(rng);
        if (n % 5 == 0) p.mult[n].multiplier = n % 2 ? kI32Max : 1 << 30;
      }
      if (case_index % 4 == 3) p.mult[N - 1].exponent = N % 2 ? 0 : -22;  // last panel: fallback
      check(p, "typical exponents");
      if (HasFatalFailure()) return;
      ++case_index;
    }
  }
}

TEST_P(QgemmIsa, FloatEpilogueSpecialScales) {
  // -0.0 (a zero sum times a negative scale), NaN and infinite scales: ReLU must give +0.0 exactly
  // like the reference, the rest bit-identical.
  std::mt19937 rng(8);
  Problem p = make_problem(5, 20, 67, rng);
  p.with_bias = false;
  for (int64_t k = 0; k < p.K; ++k) p.a[k] = static_cast<uint8_t>(p.a_zero_point);  // row 0: 0
  const float special[] = {-1.0f,
                           std::numeric_limits<float>::quiet_NaN(),
                           std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(),
                           -0.0f,
                           0.0f};
  for (int64_t n = 0; n < p.N; ++n) p.scale[n] = special[n % 6];
  check(p, "special scales");
  const auto relu = run_float(GetParam(), p, float_epilogue(p, true));
  for (int64_t n = 0; n < p.N; ++n) {
    EXPECT_FALSE(std::signbit(relu[n])) << n;  // row 0: acc = 0
    EXPECT_EQ(relu[n], 0.0f) << n;
  }
}

TEST_P(QgemmIsa, WrapAroundPastExactRangeMatchesReference) {
  // Beyond max_exact_k the sums wrap modulo 2^32 identically in every path.
  std::mt19937 rng(21);
  const int64_t K = max_exact_k(0) + 3001;
  Problem p = make_problem(3, 17, K, rng, Fill::kMax, Fill::kMax);
  p.a_zero_point = 0;
  check(p, "wrap-around");
}

TEST_P(QgemmIsa, ColumnOffsetIntoPackedWeight) {
  // Columns [n0, n0 + n) via packed_block_offset and offset epilogue arrays equal those columns of
  // the full product.
  std::mt19937 rng(31);
  const Problem p = make_problem(13, 70, 150, rng);
  const auto ep = requant_epilogue(p, 5, 0, 255);
  const auto full = run_requant(Isa::kScalar, p, ep);
  const int64_t n0 = 32, n = 30;
  RequantEpilogue sub = ep;
  sub.row_sums += n0;
  sub.multiplier += n0;
  if (sub.bias != nullptr) sub.bias += n0;
  std::vector<uint8_t> c(static_cast<size_t>(p.M * n));
  qgemm_u8s8(GetParam(), p.M, n, p.K, p.a.data(), p.lda,
             p.packed.data() + packed_block_offset(n0, p.K), sub, c.data(), n);
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t j = 0; j < n; ++j) ASSERT_EQ(c[m * n + j], full[m * (p.N + 3) + n0 + j]);
  }
}

TEST_P(QgemmIsa, EmptyProblemsWriteNothing) {
  std::mt19937 rng(2);
  const Problem p = make_problem(4, 20, 30, rng);
  const auto ep = requant_epilogue(p, 0, 0, 255);
  std::vector<uint8_t> c(100, kCanary);
  qgemm_u8s8(GetParam(), 0, p.N, p.K, p.a.data(), p.lda, p.packed.data(), ep, c.data(), p.N);
  qgemm_u8s8(GetParam(), p.M, 0, p.K, p.a.data(), p.lda, p.packed.data(), ep, c.data(), p.N);
  for (uint8_t v : c) EXPECT_EQ(v, kCanary);
  // K = 0: only bias and zero point remain.
  const Problem q = make_problem(3, 18, 0, rng);
  check(q, "K=0");
}

// 7-bit activations (levels 0..127, the int8_avx2 preset's reduce_range) take the AVX2 path's
// vpmaddubsw kernel; its int16 pair sums are exact there only because a <= 127.
void make_7bit(Problem& p, Fill fill, std::mt19937& rng) {
  for (auto& v : p.a) v = fill == Fill::kMax ? 127 : fill == Fill::kMin ? 0 : rng() % 128;
}

TEST_P(QgemmIsa, SevenBitActivationsBitIdentical) {
  // Random 7-bit A over the edge shapes: M = 1 and off the 4-row blocks, N off the 16-column
  // blocks, K off the 4-byte groups and the 64-byte packing.
  std::mt19937 rng(127);
  for (int64_t M : {1, 2, 3, 4, 5, 9, 33}) {
    for (int64_t N : {1, 15, 16, 17, 50}) {
      for (int64_t K : {1, 2, 3, 4, 5, 63, 64, 65, 130, 1001}) {
        Problem p = make_problem(M, N, K, rng);
        make_7bit(p, Fill::kRandom, rng);
        check(p, "7-bit random");
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST_P(QgemmIsa, SevenBitExtremesBitIdentical) {
  // a = 127 against w = -128 or 127 everywhere: every int16 pair sum at its largest magnitude,
  // 2 * 127 * -128 = -32512 and 2 * 127 * 127 = 32258, one step inside int16.
  std::mt19937 rng(128);
  for (Fill af : {Fill::kMax, Fill::kRandom}) {
    for (Fill wf : {Fill::kMin, Fill::kMax}) {
      for (int32_t azp : {0, 64, 127, 255}) {
        for (int64_t K : {1, 3, 67, 1000}) {
          for (int64_t M : {1, 6}) {
            Problem p = make_problem(M, 21, K, rng, Fill::kRandom, wf);
            make_7bit(p, af, rng);
            p.a_zero_point = azp;
            check(p, "7-bit extreme");
            if (HasFatalFailure()) return;
          }
        }
      }
    }
  }
}

TEST_P(QgemmIsa, OneHighActivationByteTakesExactPath) {
  // All of A at 127 but one byte of 128..255, against weights of -128 (or 127): the call must see
  // the byte wherever it is and take the exact path. vpmaddubsw would saturate the byte's pair
  // with the 127 beside it (255 * -128 + 127 * -128 = -48896; from 130 up), so a wrong path shows
  // in the float outputs. Places: first / last row and a row past the 4-row blocks; first, middle
  // and last k, the last one paired with a 127 (not with the zero padding of a partial group) and
  // with K mod 32 != 0 in the scalar tail of the scan.
  std::mt19937 rng(255);
  for (Fill wf : {Fill::kMin, Fill::kMax}) {
    for (int64_t K : {2, 38, 64, 518}) {
      const int64_t M = 7;
      for (int64_t m : {int64_t{0}, int64_t{4}, M - 1}) {
        for (int64_t k : {int64_t{0}, K / 2 | 1, K - 1}) {
          for (int high : {128, 131, 255}) {
            Problem p = make_problem(M, 19, K, rng, Fill::kRandom, wf);
            make_7bit(p, Fill::kMax, rng);
            p.a[m * p.lda + k] = static_cast<uint8_t>(high);
            check(p, "one high byte " + std::to_string(high) + " at m=" + std::to_string(m) +
                         " k=" + std::to_string(k));
            if (HasFatalFailure()) return;
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, QgemmIsa,
                         ::testing::Values(Isa::kAvx2, Isa::kAvx512Vnni, Isa::kAmx),
                         [](const ::testing::TestParamInfo<Isa>& info) {
                           return std::string(isa_name(info.param));
                         });

// ------------------------------------------------------------------------------------------------
// The AVX-512 epilogue on raw sums (shared with the AMX path)
// ------------------------------------------------------------------------------------------------

// A raw product sum of column n plus the epilogue's correction, modulo 2^32 (qgemm.h).
int32_t corrected_sum(const Problem& p, int32_t acc, int64_t n) {
  const uint32_t corr =
      (p.with_bias ? static_cast<uint32_t>(p.bias[n]) : 0u) -
      static_cast<uint32_t>(p.a_zero_point) * static_cast<uint32_t>(p.row_sums[n]);
  return static_cast<int32_t>(static_cast<uint32_t>(acc) + corr);
}

TEST(QgemmEpilogueAvx512, MatchesReferenceOnRawSums) {
  if (!isa_supported(Isa::kAvx512Vnni)) GTEST_SKIP() << "no AVX-512 VNNI";
  std::mt19937 rng(17);
  std::uniform_int_distribution<int32_t> any(kI32Min, kI32Max);
  for (int64_t N : {1, 16, 21, 40}) {
    const int64_t M = 6, ld = N + 4;
    Problem p = make_problem(1, N, 8, rng);
    std::vector<int32_t> acc(static_cast<size_t>(M * ld));
    for (auto& v : acc) v = rng() % 3 ? any(rng) >> (rng() % 24) : any(rng);
    const auto ep = requant_epilogue(p, -3, -128, 127);
    const auto fep = float_epilogue(p, true);
    std::vector<uint8_t> c(static_cast<size_t>(M * N));
    std::vector<float> f(static_cast<size_t>(M * N));
    detail::epilogue_block_avx512(acc.data(), ld, M, N, ep, c.data(), N);
    detail::epilogue_block_avx512(acc.data(), ld, M, N, fep, f.data(), N);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        const int32_t x = corrected_sum(p, acc[m * ld + n], n);
        ASSERT_EQ(static_cast<int8_t>(c[m * N + n]), requantize_model(x, p.mult[n], -3, -128, 127))
            << "N=" << N << " m=" << m << " n=" << n;
        float want = static_cast<float>(x) * p.scale[n];
        want = want > 0.0f ? want : 0.0f;
        ASSERT_EQ(std::memcmp(&f[m * N + n], &want, 4), 0) << "N=" << N << " m=" << m;
      }
    }
  }
}

TEST(QgemmEpilogueAvx512, PairedBlocksMatchReferenceOnRawSums) {
  // The two-block stores (PairPath) on raw int32 sums over the whole int32 range, against the
  // 128-bit model: uint8 and int8 ranges with and without clamps, zero points at the fold limit
  // (+-256) and past it (fallback), odd and even row counts, 32 .. 64 columns.
  if (!isa_supported(Isa::kAvx512Vnni)) GTEST_SKIP() << "no AVX-512 VNNI";
  std::mt19937 rng(23);
  std::uniform_int_distribution<int32_t> any(kI32Min, kI32Max);
  std::uniform_int_distribution<int32_t> expo(-21, -1);
  struct Range {
    int32_t zp, lo, hi;
  };
  const Range ranges[] = {{128, 0, 255},  {0, 0, 255},      {200, 200, 255},   {-256, 0, 255},
                          {256, 0, 255},  {257, 0, 255},    {3, 10, 100},      {0, -128, 127},
                          {-5, -5, 127},  {100, -128, 127}, {-256, -128, 127}, {7, 0, 127},
                          {-10, -100, 50}};
  for (int64_t N : {32, 40, 64}) {
    for (int64_t M : {1, 5, 6}) {
      const int64_t ld = N + 4;
      Problem p = make_problem(1, N, 8, rng);
      for (int64_t n = 0; n < N; ++n) {
        p.mult[n].exponent = n == 0 ? -1 : n == 1 ? -21 : expo(rng);
        if (n % 3 == 0) p.mult[n].multiplier = kI32Max;
      }
      std::vector<int32_t> acc(static_cast<size_t>(M * ld));
      for (auto& v : acc) v = rng() % 3 ? any(rng) >> (rng() % 24) : any(rng);
      acc[0] = kI32Max;
      acc[1] = kI32Min;
      for (const Range& r : ranges) {
        const auto ep = requant_epilogue(p, r.zp, r.lo, r.hi);
        std::vector<uint8_t> c(static_cast<size_t>(M * N));
        detail::epilogue_block_avx512(acc.data(), ld, M, N, ep, c.data(), N);
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t n = 0; n < N; ++n) {
            const int32_t x = corrected_sum(p, acc[m * ld + n], n);
            const int32_t want = requantize_model(x, p.mult[n], r.zp, r.lo, r.hi);
            const int32_t got = r.lo < 0 ? static_cast<int8_t>(c[m * N + n]) : c[m * N + n];
            ASSERT_EQ(got, want) << "N=" << N << " M=" << M << " m=" << m << " n=" << n
                                 << " zp=" << r.zp << " [" << r.lo << ", " << r.hi << "]";
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Dispatch
// ------------------------------------------------------------------------------------------------

TEST(QgemmDispatch, IsaQueries) {
  EXPECT_TRUE(isa_supported(Isa::kScalar));
  EXPECT_TRUE(isa_supported(best_isa()));
  EXPECT_NE(best_isa(), Isa::kAmx);
  EXPECT_STREQ(isa_name(Isa::kScalar), "scalar");
  EXPECT_STREQ(isa_name(Isa::kAvx2), "avx2");
  EXPECT_STREQ(isa_name(Isa::kAvx512Vnni), "avx512_vnni");
  EXPECT_STREQ(isa_name(Isa::kAmx), "amx");
  if (isa_supported(Isa::kAvx512Vnni)) EXPECT_EQ(best_isa(), Isa::kAvx512Vnni);
  if (isa_supported(Isa::kAmx)) EXPECT_TRUE(isa_supported(Isa::kAvx512Vnni));
}

TEST(QgemmDispatch, RejectsInvalidArguments) {
  std::mt19937 rng(4);
  Problem p = make_problem(2, 17, 9, rng);
  std::vector<uint8_t> c(static_cast<size_t>(2 * 17));
  auto call = [&](const RequantEpilogue& ep, int64_t M = 2, int64_t N = 17, int64_t lda = -1) {
    qgemm_u8s8(Isa::kScalar, M, N, p.K, p.a.data(), lda < 0 ? p.lda : lda, p.packed.data(), ep,
               c.data(), 17);
  };
  const auto ok = requant_epilogue(p, 0, 0, 255);
  EXPECT_NO_THROW(call(ok));
  EXPECT_THROW(call(ok, -1), std::invalid_argument);
  EXPECT_THROW(call(ok, 2, 17, p.K - 1), std::invalid_argument);
  auto bad_range = ok;
  bad_range.out_min = 10, bad_range.out_max = 9;
  EXPECT_THROW(call(bad_range), std::invalid_argument);
  auto bad_zp = ok;
  bad_zp.out_zero_point = kI32Min, bad_zp.out_max = kI32Max;
  EXPECT_THROW(call(bad_zp), std::invalid_argument);
  p.mult[16] = {(1 << 30) - 1, 0};
  EXPECT_THROW(call(requant_epilogue(p, 0, 0, 255)), std::invalid_argument);
  p.mult[16] = {1 << 30, 31};
  EXPECT_THROW(call(requant_epilogue(p, 0, 0, 255)), std::invalid_argument);
  p.mult[16] = {1 << 30, 0};
  EXPECT_NO_THROW(call(requant_epilogue(p, 0, 0, 255)));
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512Vnni, Isa::kAmx}) {
    if (isa_supported(isa)) continue;
    EXPECT_THROW(qgemm_u8s8(isa, 2, 17, p.K, p.a.data(), p.lda, p.packed.data(), ok, c.data(), 17),
                 std::invalid_argument)
        << isa_name(isa);
  }
}

}  // namespace
}  // namespace qext::kernels
