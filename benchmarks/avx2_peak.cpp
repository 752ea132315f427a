// The attainable AVX2 u8 x s8 multiply-accumulate rate of this core, for the "% of measured AVX2
// peak" column of bench_int8_cpu.py, which loads this library with ctypes and times these loops in
// the same round-robin as the kernels (this machine's speed drifts by up to 2x, so a peak measured
// at another moment would not compare). The nominal peak is 32 MAC / cycle at 3 GHz; a
// virtual machine may run at another clock, so the nominal figure alone can mislead.
//
// Peak loop: the AVX2 int8 inner step (vpmaddubsw, vpmaddwd by ones, vpaddd: 32 MACs, two of the
// three instructions on the two vector multiply ports) on registers only, four independent
// accumulators and inputs (more would not fit the 16 ymm registers: spilled accumulators make a
// store-forwarding chain that bounds the loop instead), so nothing but port throughput limits it.
// Clock loop: a chain of dependent register adds (1 cycle each; not adds of an immediate, which
// recent cores can fold away at rename), whose rate is the core's clock.
#include <immintrin.h>

#include <cstdint>

namespace {

// One accumulation step: acc += pairs of a * b summed to int32 (32 MACs).
inline __m256i step(__m256i acc, __m256i a, __m256i b, __m256i ones) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
}

}  // namespace

// `iterations` of the peak loop, 128 MACs each (named variables: arrays would live in memory).
// Returns a checksum, which keeps the sums alive.
extern "C" int32_t qext_avx2_peak_loop(int64_t iterations) {
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
  __m256i a0 = _mm256_set1_epi8(1), a1 = _mm256_set1_epi8(2), a2 = _mm256_set1_epi8(3);
  __m256i a3 = _mm256_set1_epi8(4), b = _mm256_set1_epi8(-2);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t i = 0; i < iterations; ++i) {
    // Opaque to the compiler: otherwise it hoists the loop-invariant products.
    asm volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(b));
    c0 = step(c0, a0, b, ones);
    c1 = step(c1, a1, b, ones);
    c2 = step(c2, a2, b, ones);
    c3 = step(c3, a3, b, ones);
  }
  const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3));
  return _mm256_extract_epi32(sum, 0);
}

// `iterations` x 8 dependent register adds, one cycle each; returns their count.
extern "C" uint64_t qext_clock_loop(int64_t iterations) {
  uint64_t x = 0;
  const uint64_t one = 1;
  for (int64_t i = 0; i < iterations; ++i) {
    asm volatile(
        "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\t"
        "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0"
        : "+r"(x)
        : "r"(one));
  }
  return x;
}
