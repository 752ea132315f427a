// Packing, fixed-point requantization, CPU feature detection and the public dispatchers of the
// integer GEMM (qgemm.h). The ISA kernels live in qgemm_ref.cpp (the scalar reference),
// qgemm_avx2.cpp, qgemm_avx512vnni.cpp and qgemm_amx.cpp.
#include "qext/kernels/qgemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "qext/kernels/qgemm_isa.h"

namespace qext::kernels {

int64_t packed_k(int64_t K) { return (K + kPackK - 1) / kPackK * kPackK; }

size_t packed_weight_bytes(int64_t N, int64_t K) {
  const int64_t blocks = (N + kPackN - 1) / kPackN;
  return static_cast<size_t>(blocks * kPackN * packed_k(K));
}

size_t packed_block_offset(int64_t n0, int64_t K) {
  return static_cast<size_t>(n0 / kPackN * kPackN * packed_k(K));
}

void pack_weight(const int8_t* w, int64_t N, int64_t K, int64_t ldw, int8_t* packed,
                 int32_t* row_sums) {
  const int64_t kp = packed_k(K);
  const int64_t blocks = (N + kPackN - 1) / kPackN;
  std::memset(packed, 0, packed_weight_bytes(N, K));
  for (int64_t b = 0; b < blocks; ++b) {
    int8_t* block = packed + b * kPackN * kp;
    const int64_t rows = std::min<int64_t>(kPackN, N - b * kPackN);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = b * kPackN + r;
      const int8_t* src = w + n * ldw;
      // Sum modulo 2^32, like every accumulator of the GEMM (exact for K < 2^24).
      uint32_t sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        block[(k / 4) * 64 + 4 * r + (k % 4)] = src[k];
        sum += static_cast<uint32_t>(static_cast<int32_t>(src[k]));
      }
      row_sums[n] = static_cast<int32_t>(sum);
    }
  }
}

bool quantize_multiplier(double m, FixedPointMultiplier* out) {
  // Negated comparisons reject NaN as well.
  if (!std::isfinite(m) || !(m >= 0x1p-32) || !(m < 0x1p30)) return false;
  int e = 0;
  const double f = std::frexp(m, &e);  // m = f * 2^e, f in [0.5, 1)
  // f * 2^31 is exact in double; llround picks the nearest integer in [2^30, 2^31].
  int64_t q = std::llround(std::ldexp(f, 31));
  if (q == (int64_t{1} << 31)) {
    q = int64_t{1} << 30;
    ++e;
  }
  if (e < -31 || e > 30) return false;
  out->multiplier = static_cast<int32_t>(q);
  out->exponent = e;
  return true;
}

bool is_valid_multiplier(FixedPointMultiplier m) {
  return m.multiplier >= (int32_t{1} << 30) && m.exponent >= -31 && m.exponent <= 30;
}

int32_t requantize(int32_t acc, FixedPointMultiplier m, int32_t out_zero_point, int32_t out_min,
                   int32_t out_max) {
  constexpr int64_t kMin = std::numeric_limits<int32_t>::min();
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  int64_t x = acc;
  if (m.exponent > 0) {
    // acc * 2^e saturated to int32; any e >= 31 saturates every nonzero acc, so capping e at 31
    // changes no result and keeps the int64 product in range.
    const int e = std::min<int32_t>(m.exponent, 31);
    x = std::clamp<int64_t>(x * (int64_t{1} << e), kMin, kMax);
  }
  // One rounding: floor((x * M + 2^(n-1)) / 2^n), n = 31 + r in [31, 62]; |x * M| < 2^62 keeps the
  // sum in int64. Right shifts of negative int64 are arithmetic (floor) with GCC and Clang (and by
  // definition in C++20).
  const int n = 31 + std::min(std::max(-m.exponent, 0), 31);
  x = (x * m.multiplier + (int64_t{1} << (n - 1)) + m.offset) >> n;
  const int64_t v = std::min<int64_t>(std::max<int64_t>(x + out_zero_point, out_min), out_max);
  return static_cast<int32_t>(v);
}

int64_t max_exact_k(int64_t max_abs_bias) {
  // |sum_k (A - a_zero_point) * W| <= K * 255 * 128, plus |bias|, must be <= 2^31 - 1.
  const uint64_t bias = max_abs_bias < 0 ? 0 - static_cast<uint64_t>(max_abs_bias)
                                         : static_cast<uint64_t>(max_abs_bias);
  constexpr uint64_t kLimit = (uint64_t{1} << 31) - 1;
  if (bias > kLimit) return 0;
  return static_cast<int64_t>((kLimit - bias) / (255 * 128));
}

// ------------------------------------------------------------------------------------------------
// CPU features
// ------------------------------------------------------------------------------------------------
namespace {

bool cpu_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

// libgcc's feature bits include the OS check (XCR0 saves the zmm / opmask state).
bool cpu_avx512_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni") && cpu_avx2();
}

bool cpu_amx() {
  // qgemm_amx.cpp and qconv_amx.cpp are compiled with the AVX-512 flags (and VBMI, which every
  // AMX CPU has) and use the AVX-512 epilogue.
  return cpu_avx512_vnni() && __builtin_cpu_supports("avx512vbmi") &&
         __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") &&
         detail::amx_enable();
}

[[noreturn]] void invalid(const char* caller, const std::string& what) {
  throw std::invalid_argument(std::string("qext::kernels::") + caller + ": " + what);
}
[[noreturn]] void invalid(const std::string& what) { invalid("qgemm_u8s8", what); }

// Checks shared by both epilogues; true when there is anything to compute.
bool check_common(Isa isa, int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                  const int8_t* packed_w, const void* c, int64_t ldc, const int32_t* row_sums) {
  if (!isa_supported(isa)) invalid(std::string("ISA ") + isa_name(isa) + " is not supported here");
  if (M < 0 || N < 0 || K < 0) {
    invalid("negative size M=" + std::to_string(M) + " N=" + std::to_string(N) +
            " K=" + std::to_string(K));
  }
  if (M == 0 || N == 0) return false;
  if (M > 1 && lda < K) invalid("lda=" + std::to_string(lda) + " < K=" + std::to_string(K));
  if (M > 1 && ldc < N) invalid("ldc=" + std::to_string(ldc) + " < N=" + std::to_string(N));
  if ((K > 0 && (a == nullptr || packed_w == nullptr)) || c == nullptr || row_sums == nullptr) {
    invalid("null a, packed_w, c or row_sums");
  }
  return true;
}

// Runs the ISA's kernel (the detail:: overload for the epilogue type).
template <typename Epilogue, typename Out>
void dispatch(Isa isa, int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
              const int8_t* packed_w, const Epilogue& ep, Out* c, int64_t ldc) {
  switch (isa) {
    case Isa::kScalar:
      return detail::qgemm_scalar(M, N, K, a, lda, packed_w, ep, c, ldc);
    case Isa::kAvx2:
      return detail::qgemm_avx2(M, N, K, a, lda, packed_w, ep, c, ldc);
    case Isa::kAvx512Vnni:
      return detail::qgemm_avx512vnni(M, N, K, a, lda, packed_w, ep, c, ldc);
    case Isa::kAmx:
      return detail::qgemm_amx(M, N, K, a, lda, packed_w, ep, c, ldc);
  }
}

}  // namespace

Isa best_isa() {
  static const Isa best = cpu_avx512_vnni() ? Isa::kAvx512Vnni
                          : cpu_avx2()      ? Isa::kAvx2
                                            : Isa::kScalar;
  return best;
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2: {
      static const bool ok = cpu_avx2();
      return ok;
    }
    case Isa::kAvx512Vnni: {
      static const bool ok = cpu_avx512_vnni();
      return ok;
    }
    case Isa::kAmx: {
      static const bool ok = cpu_amx();
      return ok;
    }
  }
  return false;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512Vnni:
      return "avx512_vnni";
    case Isa::kAmx:
      return "amx";
  }
  return "unknown";
}

namespace detail {

void check_epilogue(const RequantEpilogue& ep, int64_t N, const char* caller) {
  if (ep.row_sums == nullptr) invalid(caller, "null row_sums");
  if (ep.multiplier == nullptr) invalid(caller, "null multiplier");
  // A branch-free scan first (it runs on every call, M = 1 ones included), then the culprit.
  bool all_valid = true;
  for (int64_t n = 0; n < N; ++n) {
    const FixedPointMultiplier m = ep.multiplier[n];
    all_valid &= (m.multiplier >= (int32_t{1} << 30)) & (m.exponent >= -31) & (m.exponent <= 30);
  }
  for (int64_t n = 0; !all_valid && n < N; ++n) {
    if (!is_valid_multiplier(ep.multiplier[n])) {
      invalid(caller, "multiplier[" + std::to_string(n) + "] = {" +
                          std::to_string(ep.multiplier[n].multiplier) + ", " +
                          std::to_string(ep.multiplier[n].exponent) +
                          "} is not in [2^30, 2^31) x 2^([-31, 30] - 31)");
    }
  }
  if (ep.out_min > ep.out_max) {
    invalid(caller,
            "out_min=" + std::to_string(ep.out_min) + " > out_max=" + std::to_string(ep.out_max));
  }
  const int64_t lo = int64_t{ep.out_min} - ep.out_zero_point;
  const int64_t hi = int64_t{ep.out_max} - ep.out_zero_point;
  if (lo < std::numeric_limits<int32_t>::min() || hi > std::numeric_limits<int32_t>::max()) {
    invalid(caller, "out_min / out_max minus out_zero_point=" + std::to_string(ep.out_zero_point) +
                        " overflow int32");
  }
}

void check_epilogue(const FloatEpilogue& ep, int64_t /*N*/, const char* caller) {
  if (ep.row_sums == nullptr) invalid(caller, "null row_sums");
  if (ep.scale == nullptr) invalid(caller, "null scale");
}

}  // namespace detail

void qgemm_u8s8(Isa isa, int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                const int8_t* packed_w, const RequantEpilogue& ep, uint8_t* c, int64_t ldc) {
  if (!check_common(isa, M, N, K, a, lda, packed_w, c, ldc, ep.row_sums)) return;
  detail::check_epilogue(ep, N, "qgemm_u8s8");
  dispatch(isa, M, N, K, a, lda, packed_w, ep, c, ldc);
}

void qgemm_u8s8(Isa isa, int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                const int8_t* packed_w, const FloatEpilogue& ep, float* c, int64_t ldc) {
  if (!check_common(isa, M, N, K, a, lda, packed_w, c, ldc, ep.row_sums)) return;
  detail::check_epilogue(ep, N, "qgemm_u8s8");
  dispatch(isa, M, N, K, a, lda, packed_w, ep, c, ldc);
}

}  // namespace qext::kernels
