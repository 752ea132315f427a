// The AMX-INT8 integer GEMM (qgemm_amx.cpp) against the scalar reference, bit for bit: both
// epilogues, row / column / K tails, extreme levels, several threads at once. Skipped where the CPU
// or the OS does not offer AMX-INT8.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "qext/kernels/qgemm.h"

namespace qext::kernels {
namespace {

enum class Fill {
  kRandom,   // uniform levels
  kExtreme,  // A in {0, 255}, W in {-128, 127}
  kLargest,  // A = 255, W = -128 everywhere: the largest |sum| for the given K
};

struct Problem {
  int64_t M = 0, N = 0, K = 0, lda = 0, ldc = 0;
  std::vector<uint8_t> a;  // (M - 1) * lda + K bytes: nothing after the last row
  std::vector<int8_t> packed_storage;
  int8_t* packed = nullptr;  // into packed_storage: 64-byte aligned, or 16 bytes past that
  std::vector<int32_t> row_sums, bias;
  std::vector<FixedPointMultiplier> multiplier;
  std::vector<float> scale;

  Problem() = default;
  Problem(Problem&&) = default;  // moving the storage keeps `packed` valid; copying would not
  Problem& operator=(Problem&&) = default;
};

Problem make_problem(int64_t M, int64_t N, int64_t K, Fill fill, std::mt19937& rng,
                     bool aligned_weight = true) {
  Problem p;
  p.M = M, p.N = N, p.K = K;
  p.lda = K + static_cast<int64_t>(rng() % 3) * 7;
  p.ldc = N + static_cast<int64_t>(rng() % 3) * 5;
  p.a.resize(static_cast<size_t>((M - 1) * p.lda + K));
  std::vector<int8_t> w(static_cast<size_t>(N * K));
  for (auto& v : p.a) {
    v = fill == Fill::kRandom    ? static_cast<uint8_t>(rng())
        : fill == Fill::kExtreme ? (rng() % 2 ? 255 : 0)
                                 : 255;
  }
  for (auto& v : w) {
    v = fill == Fill::kRandom    ? static_cast<int8_t>(rng())
        : fill == Fill::kExtreme ? static_cast<int8_t>(rng() % 2 ? 127 : -128)
                                 : static_cast<int8_t>(-128);
  }
  p.packed_storage.resize(packed_weight_bytes(N, K) + 128);
  const uintptr_t address = reinterpret_cast<uintptr_t>(p.packed_storage.data());
  p.packed = p.packed_storage.data() + ((64 - address % 64) % 64) + (aligned_weight ? 0 : 16);
  p.row_sums.resize(static_cast<size_t>(N));
  pack_weight(w.data(), N, K, K, p.packed, p.row_sums.data());

  std::uniform_int_distribution<int32_t> bias_dist(-50000, 50000);
  std::uniform_real_distribution<double> log2_dist(-4.0, 2.0);
  // Real multipliers around 1 / (128 sqrt(K)) so that the outputs spread over the 8-bit range, some
  // columns 64x larger (saturating), and for small K some above 1 (the saturating left shift).
  const double base = 1.0 / (128.0 * std::sqrt(static_cast<double>(std::max<int64_t>(K, 1))));
  for (int64_t n = 0; n < N; ++n) {
    p.bias.push_back(bias_dist(rng));
    double m = base * std::exp2(log2_dist(rng));
    if (n % 7 == 3) m *= 64.0;
    if (n % 11 == 5 && K < 64) m = 1.0 + 7.0 * (rng() % 1000) / 1000.0;
    FixedPointMultiplier fm{};
    EXPECT_TRUE(quantize_multiplier(m, &fm)) << m;
    // The sub-accumulator part of a bias, on every other column (|offset| <= 2^30).
    if (n % 2 == 1) fm.offset = static_cast<int32_t>(rng() % (1u << 31)) - (1 << 30);
    p.multiplier.push_back(fm);
    p.scale.push_back(static_cast<float>(m * 3.1));
  }
  return p;
}

// The requantized and the float output of `isa` for columns [n0, N) (n0 a multiple of 16; C is
// written from column n0 on), with a sentinel everywhere else in C.
struct Outputs {
  std::vector<uint8_t> q;
  std::vector<float> f;
};

struct Options {
  int32_t a_zero_point = 0;
  bool bias = true;
  bool relu = false;
  bool int8_out = false;
  int32_t out_zero_point = 0;
};

Outputs run(Isa isa, const Problem& p, const Options& o, int64_t n0 = 0) {
  const int64_t n = p.N - n0;
  RequantEpilogue rq{};
  rq.row_sums = p.row_sums.data() + n0;
  rq.a_zero_point = o.a_zero_point;
  rq.bias = o.bias ? p.bias.data() + n0 : nullptr;
  rq.multiplier = p.multiplier.data() + n0;
  rq.out_zero_point = o.out_zero_point;
  rq.out_min = o.int8_out ? -128 : 0;
  rq.out_max = o.int8_out ? 127 : 255;
  if (o.relu) rq.out_min = std::max(rq.out_min, o.out_zero_point);
  FloatEpilogue fe{};
  fe.row_sums = rq.row_sums;
  fe.a_zero_point = o.a_zero_point;
  fe.bias = rq.bias;
  fe.scale = p.scale.data() + n0;
  fe.relu = o.relu;

  const int8_t* w = p.packed + packed_block_offset(n0, p.K);
  Outputs out;
  out.q.assign(static_cast<size_t>(p.M * p.ldc), 0xA5);
  out.f.assign(static_cast<size_t>(p.M * p.ldc), -7.25f);
  qgemm_u8s8(isa, p.M, n, p.K, p.a.data(), p.lda, w, rq, out.q.data() + n0, p.ldc);
  qgemm_u8s8(isa, p.M, n, p.K, p.a.data(), p.lda, w, fe, out.f.data() + n0, p.ldc);
  return out;
}

// Index and values of the first difference, for the failure message.
template <typename T>
std::string first_difference(const std::vector<T>& got, const std::vector<T>& want, int64_t ldc) {
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      return "row " + std::to_string(i / ldc) + " column " + std::to_string(i % ldc) + ": " +
             std::to_string(+got[i]) + " vs reference " + std::to_string(+want[i]);
    }
  }
  return "none";
}

void expect_identical(const Problem& p, const Options& o, const std::string& what, int64_t n0 = 0) {
  const Outputs amx = run(Isa::kAmx, p, o, n0);
  const Outputs ref = run(Isa::kScalar, p, o, n0);
  const std::string shape = what + " M=" + std::to_string(p.M) + " N=" + std::to_string(p.N) +
                            " K=" + std::to_string(p.K) + " lda=" + std::to_string(p.lda) +
                            " ldc=" + std::to_string(p.ldc) + " n0=" + std::to_string(n0);
  EXPECT_EQ(std::memcmp(amx.q.data(), ref.q.data(), amx.q.size()), 0)
      << shape << " requant, first difference at " << first_difference(amx.q, ref.q, p.ldc);
  EXPECT_EQ(std::memcmp(amx.f.data(), ref.f.data(), amx.f.size() * sizeof(float)), 0)
      << shape << " float, first difference at " << first_difference(amx.f, ref.f, p.ldc);
}

class QgemmAmx : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!isa_supported(Isa::kAmx)) GTEST_SKIP() << "AMX-INT8 is not available on this CPU / OS";
  }
};

TEST_F(QgemmAmx, MatchesScalarOnTails) {
  std::mt19937 rng(20240611);
  int index = 0;
  for (int64_t M : {1, 15, 16, 17, 31, 33, 57, 100}) {
    for (int64_t K : {0, 1, 63, 64, 65, 200, 1024}) {
      for (int64_t N : {1, 15, 16, 17, 40}) {
        const Problem p = make_problem(M, N, K, Fill::kRandom, rng, index % 2 == 0);
        Options o;
        o.a_zero_point = static_cast<int32_t>(rng() % 256);
        o.bias = index % 3 != 0;
        o.relu = index % 2 == 1;
        o.int8_out = index % 4 == 2;
        o.out_zero_point = o.int8_out ? static_cast<int32_t>(rng() % 256) - 128
                                      : static_cast<int32_t>(rng() % 256);
        expect_identical(p, o, "random");
        ++index;
      }
    }
  }
}

TEST_F(QgemmAmx, MatchesScalarOnExtremeLevels) {
  std::mt19937 rng(7);
  for (Fill fill : {Fill::kExtreme, Fill::kLargest}) {
    for (int64_t M : {1, 17, 33}) {
      for (int64_t K : {1, 65, 1024}) {
        for (int64_t N : {15, 40}) {
          const Problem p = make_problem(M, N, K, fill, rng);
          for (bool relu : {false, true}) {
            Options o;
            o.relu = relu;
            o.a_zero_point = relu ? 255 : 0;
            o.out_zero_point = 128;
            expect_identical(p, o, fill == Fill::kExtreme ? "extreme" : "largest");
          }
        }
      }
    }
  }
}

// The largest K whose sums stay exact in int32, every product at its extreme.
TEST_F(QgemmAmx, MatchesScalarAtMaxExactK) {
  std::mt19937 rng(11);
  const int64_t K = max_exact_k(50000);
  const Problem p = make_problem(17, 17, K, Fill::kLargest, rng);
  expect_identical(p, Options{}, "max exact K");
}

// Several chunks of 32-row panels and 32-column stripes, an aligned and a misaligned packed weight
// (copied stripe by stripe), and the column blocks from n0 = 16 / 32 / 96 on (the packed weight and
// the epilogue arrays offset, as the callers split N).
TEST_F(QgemmAmx, MatchesScalarOnLargerShapesAndColumnOffsets) {
  std::mt19937 rng(3);
  Options o;
  o.a_zero_point = 77;
  o.out_zero_point = 9;
  for (bool aligned : {true, false}) {
    const std::string what = aligned ? "aligned weight" : "misaligned weight";
    const Problem p = make_problem(600, 100, 300, Fill::kRandom, rng, aligned);
    for (int64_t n0 : {0, 16, 32, 96}) expect_identical(p, o, what, n0);
    const Problem q = make_problem(129, 64, 576, Fill::kRandom, rng, aligned);
    expect_identical(q, o, what);
  }
  const Problem r = make_problem(64, 1024, 1024, Fill::kRandom, rng);
  expect_identical(r, o, "64x1024x1024");
}

// The tile configuration is per thread: several threads running AMX GEMMs at once.
TEST_F(QgemmAmx, ConcurrentThreadsMatchScalar) {
  std::mt19937 rng(5);
  std::vector<Problem> problems;
  std::vector<Outputs> want;
  const Options o{12, true, false, false, 3};
  for (int t = 0; t < 4; ++t) {
    problems.push_back(make_problem(40 + 17 * t, 24 + 9 * t, 100 + 61 * t, Fill::kRandom, rng));
    want.push_back(run(Isa::kScalar, problems.back(), o));
  }
  std::vector<int> mismatches(problems.size(), 0);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < problems.size(); ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < 20; ++r) {
        const Outputs got = run(Isa::kAmx, problems[t], o);
        mismatches[t] += got.q != want[t].q || std::memcmp(got.f.data(), want[t].f.data(),
                                                           got.f.size() * sizeof(float)) != 0;
      }
    });
  }
  for (auto& th : threads) th.join();
  for (size_t t = 0; t < problems.size(); ++t) EXPECT_EQ(mismatches[t], 0) << "thread " << t;
}

}  // namespace
}  // namespace qext::kernels
