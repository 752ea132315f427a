// The scalar reference of the integer GEMM (qgemm.h): plain loops over the packed weight layout.
// Every other path is tested bit for bit against this one. Accumulation is modulo 2^32 (uint32
// arithmetic, no signed overflow), which is what the SIMD paths' int32 adds do.
#include <cstdint>

#include "qext/kernels/qgemm_isa.h"

namespace qext::kernels::detail {
namespace {

// W[n][k] read from the packed layout (block n / 16, group k / 4, byte 4 (n % 16) + k % 4).
inline int32_t packed_at(const int8_t* packed_w, int64_t kp, int64_t n, int64_t k) {
  const int8_t* block = packed_w + (n / kPackN) * kPackN * kp;
  return block[(k / 4) * 64 + 4 * (n % kPackN) + (k % 4)];
}

// acc[m][n] of the epilogue comment in qgemm.h, modulo 2^32.
inline int32_t accumulate(int64_t K, int64_t kp, const uint8_t* a_row, const int8_t* packed_w,
                          int64_t n, const int32_t* row_sums, int32_t a_zero_point,
                          const int32_t* bias) {
  uint32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    sum += static_cast<uint32_t>(int32_t{a_row[k]} * packed_at(packed_w, kp, n, k));
  }
  sum -= static_cast<uint32_t>(a_zero_point) * static_cast<uint32_t>(row_sums[n]);
  if (bias != nullptr) sum += static_cast<uint32_t>(bias[n]);
  return static_cast<int32_t>(sum);  // modulo 2^32 (defined since C++20, GCC / Clang always)
}

}  // namespace

void qgemm_scalar(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                  const int8_t* packed_w, const RequantEpilogue& ep, uint8_t* c, int64_t ldc) {
  const int64_t kp = packed_k(K);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      const int32_t acc =
          accumulate(K, kp, a + m * lda, packed_w, n, ep.row_sums, ep.a_zero_point, ep.bias);
      const int32_t q =
          requantize(acc, ep.multiplier[n], ep.out_zero_point, ep.out_min, ep.out_max);
      c[m * ldc + n] = static_cast<uint8_t>(static_cast<uint32_t>(q) & 0xFF);  // low 8 bits
    }
  }
}

void qgemm_scalar(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                  const int8_t* packed_w, const FloatEpilogue& ep, float* c, int64_t ldc) {
  const int64_t kp = packed_k(K);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      const int32_t acc =
          accumulate(K, kp, a + m * lda, packed_w, n, ep.row_sums, ep.a_zero_point, ep.bias);
      float v = static_cast<float>(acc) * ep.scale[n];
      if (ep.relu) v = v > 0.0f ? v : 0.0f;
      c[m * ldc + n] = v;
    }
  }
}

}  // namespace qext::kernels::detail
