// The attainable AVX2 u8 x s8 multiply-accumulate rate of this core, for the "% of AVX2 peak"
// column of bench_int8_cpu.py (which runs this program). The nominal peak is 32 MAC / cycle
// at 3 GHz; a virtual machine may run at another clock, so the nominal figure alone can mislead.
//
// Peak loop: the AVX2 int8 inner step (vpmaddubsw, vpmaddwd by ones, vpaddd: 32 MACs, two of the
// three instructions on the two vector multiply ports) on registers only, six independent
// accumulators and inputs (16 ymm registers), so nothing but port throughput limits it.
// Clock: a chain of dependent register adds (1 cycle each; not adds of an immediate, which recent
// cores can fold away at rename), whose rate is the core's clock.
// Prints one JSON object; the best of several repetitions (the machine is shared).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>

namespace {

constexpr int kAccumulators = 6;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One accumulation step: acc += pairs of a * b summed to int32 (32 MACs).
inline __m256i step(__m256i acc, __m256i a, __m256i b, __m256i ones) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
}

// MACs per second of the register-only peak loop (named variables: arrays would live in memory).
double peak_macs_per_second(int64_t iterations) {
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  __m256i a0 = _mm256_set1_epi8(1), a1 = _mm256_set1_epi8(2), a2 = _mm256_set1_epi8(3);
  __m256i a3 = _mm256_set1_epi8(4), a4 = _mm256_set1_epi8(5), a5 = _mm256_set1_epi8(6);
  __m256i b = _mm256_set1_epi8(-2);
  const __m256i ones = _mm256_set1_epi16(1);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iterations; ++i) {
    // Opaque to the compiler: otherwise it hoists the loop-invariant products.
    asm volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(b));
    c0 = step(c0, a0, b, ones);
    c1 = step(c1, a1, b, ones);
    c2 = step(c2, a2, b, ones);
    c3 = step(c3, a3, b, ones);
    c4 = step(c4, a4, b, ones);
    c5 = step(c5, a5, b, ones);
  }
  const double t = seconds_since(t0);
  const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c0, c1), c2),
                                       _mm256_add_epi32(_mm256_add_epi32(c3, c4), c5));
  if (_mm256_extract_epi32(sum, 0) == 42) std::puts("");  // keeps the sums alive
  return static_cast<double>(iterations) * kAccumulators * 32 / t;
}

// Dependent adds per second (= cycles per second).
double clock_hz(int64_t iterations) {
  uint64_t x = 0, one = 1;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iterations; ++i) {
    asm volatile(
        "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\t"
        "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0"
        : "+r"(x)
        : "r"(one));
  }
  const double t = seconds_since(t0);
  return static_cast<double>(x) / t;
}

}  // namespace

int main() {
  double macs = 0, hz = 0;
  for (int rep = 0; rep < 7; ++rep) {
    macs = std::max(macs, peak_macs_per_second(20'000'000));
    hz = std::max(hz, clock_hz(50'000'000));
  }
  std::printf("{\"avx2_u8s8_peak_gmacs\": %.2f, \"clock_ghz\": %.3f, \"macs_per_cycle\": %.2f}\n",
              macs / 1e9, hz / 1e9, macs / hz);
  return 0;
}
