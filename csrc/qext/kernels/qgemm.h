// Integer GEMM for converted (int8) layers: C = epilogue(sum_k (A[m][k] - a_zero_point) * W[n][k]),
// A uint8 activations (row-major, M x K), W int8 weights pre-packed once (pack_weight), int32
// accumulation, and a fused epilogue (int32 bias, fixed-point requantization, zero point, clamp /
// ReLU) writing 8-bit levels or float32. Framework-free: raw pointers in and out, no threads (the
// caller splits M and N and runs the pieces in parallel), testable with gtest alone.
//
// Every ISA path gives results bit-identical to the scalar reference (qgemm_u8s8 with
// Isa::kScalar). int8 activations (torch.qint8) are fed as uint8 by flipping the sign bit (q + 128)
// and adding 128 to a_zero_point: the products (q_x - z_x) are unchanged.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qext::kernels {

// ---------------------------------------------------------------------------------------------
// Packed weight layout (ISA independent; every path, scalar included, reads this one layout, so a
// packed weight saved on one machine runs on any other):
// N is cut into blocks of kPackN = 16 output channels (the last block zero-padded), K is
// zero-padded to packed_k(K), a multiple of kPackK = 64. Block b holds packed_k(K) / 4 groups of 64
// bytes; group g holds, for n = 0..15 and j = 0..3, W[16 b + n][4 g + j] at byte 4 n + j. (One
// group is one zmm / two ymm for vpdpbusd, and 16 groups are one AMX B tile.) Columns [n0, n0 + n)
// of the product with n0 a multiple of 16 use packed_w + packed_block_offset(n0, K).
// ---------------------------------------------------------------------------------------------
constexpr int64_t kPackN = 16;
constexpr int64_t kPackK = 64;

int64_t packed_k(int64_t K);                        // K rounded up to a multiple of kPackK
size_t packed_weight_bytes(int64_t N, int64_t K);   // bytes of the packed weight
size_t packed_block_offset(int64_t n0, int64_t K);  // byte offset of column block n0 (n0 % 16 == 0)

// Packs W (N x K int8, row n at w + n * ldw) into `packed` (packed_weight_bytes(N, K) bytes) and
// writes row_sums[n] = sum_k W[n][k] (the epilogue's zero-point correction).
void pack_weight(const int8_t* w, int64_t N, int64_t K, int64_t ldw, int8_t* packed,
                 int32_t* row_sums);

// ---------------------------------------------------------------------------------------------
// Fixed-point requantization (Jacob et al. 2018): a real multiplier m > 0 is
// multiplier * 2^(exponent - 31) with multiplier in [2^30, 2^31) and exponent in [-31, 30]. For an
// int32 accumulator acc:
//   x = saturate_int32(acc * 2^max(exponent, 0))
//   x = floor((int64(x) * multiplier + 2^(n - 1) + offset) / 2^n),  n = 31 + max(-exponent, 0)
//   q = clamp(int64(x) + out_zero_point, out_min, out_max)
// One rounding (half up) of the exact product: gemmlowp / TFLite round twice (a doubling high
// multiply, then a rounding shift), which misrounds up to 2^-(r+1) of a step around every .5, e.g.
// 1/64 of a step for m ~ 0.02 -- some 3% of the outputs of a typical layer one step away from the
// fake-quant model's single rounding. Here only outputs within ~2^-31 (relative) of a tie can
// differ.
// ---------------------------------------------------------------------------------------------
struct FixedPointMultiplier {
  int32_t multiplier;
  int32_t exponent;
  // Added to the rounding term 2^(n-1) (|offset| <= 2^30): the part of a layer's bias below one
  // accumulator unit, round(fraction * multiplier), so that the bias is exact to 2^-n of an output
  // step rather than rounded to the int32 accumulator (see quantized_layers.h). 0 for plain use.
  int32_t offset = 0;
};

// Nearest fixed-point form of m: multiplier = round(m * 2^(31 - exponent)), so that
// |m - multiplier * 2^(exponent - 31)| <= 2^(exponent - 32). Accepts m in [2^-32, 2^30 - 2^-2) (the
// upper end is where the nearest form would need exponent 31); returns false (and leaves *out
// untouched) outside that range, for 0, negative, NaN and infinite m.
bool quantize_multiplier(double m, FixedPointMultiplier* out);

// True when m is in the documented form (multiplier in [2^30, 2^31), exponent in [-31, 30]).
bool is_valid_multiplier(FixedPointMultiplier m);

// The requantization above for one accumulator (the scalar reference every path matches), with
// clamp(v, lo, hi) = min(max(v, lo), hi) in int64. Defined for every input (no undefined
// behaviour), but the GEMM paths accept only valid multipliers and out_min <= out_max (see
// qgemm_u8s8).
int32_t requantize(int32_t acc, FixedPointMultiplier m, int32_t out_zero_point, int32_t out_min,
                   int32_t out_max);

// ---------------------------------------------------------------------------------------------
// Epilogues.
//   acc[m][n] = sum_k A[m][k] * W[n][k] - a_zero_point * row_sums[n] + (bias ? bias[n] : 0)
// computed modulo 2^32 (int32 wrap-around; every path, the scalar reference included, gives the
// same int32 even past the exact range). It equals the true integer when a_zero_point is in
// [0, 255] and K * 255 * 128 + |bias| < 2^31 (see max_exact_k), which the caller guarantees.
// ---------------------------------------------------------------------------------------------
struct RequantEpilogue {
  const int32_t* row_sums;                 // [N], from pack_weight
  int32_t a_zero_point;                    // zero point of A (uint8 levels)
  const int32_t* bias;                     // [N] or nullptr
  const FixedPointMultiplier* multiplier;  // [N]: input_scale * weight_scale[n] / output_scale
  int32_t out_zero_point;
  int32_t out_min, out_max;  // clamp range; ReLU is out_min = max(out_min, out_zero_point)
};
// C[m][n] = requantize(acc[m][n], ...) stored as one byte (the low 8 bits: uint8 or int8 levels).

struct FloatEpilogue {
  const int32_t* row_sums;
  int32_t a_zero_point;
  const int32_t* bias;  // [N] or nullptr
  const float* scale;   // [N]: input_scale * weight_scale[n]
  bool relu;
};
// C[m][n] = float(acc[m][n]) * scale[n] (int32 -> float rounded to nearest even, then one float32
// multiply), then with relu v > 0 ? v : +0.0f (NaN and -0.0 become +0.0, as vmaxps(v, 0) does).

// Largest K for which the int32 accumulation above is exact with |bias| <= max_abs_bias.
int64_t max_exact_k(int64_t max_abs_bias);

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------
enum class Isa {
  kScalar,      // plain C++ reference
  kAvx2,        // AVX2 without VNNI (exact: operands widened to int16, vpmaddwd)
  kAvx512Vnni,  // AVX-512 VNNI vpdpbusd (u8 x s8 -> int32, no intermediate saturation)
  kAmx,         // AMX-INT8 tiles (tdpbusd); large M only, the caller falls back for small M
};

// The fastest ISA this CPU supports for every shape, AMX excluded: kAvx512Vnni, else kAvx2, else
// kScalar. AMX pays off only for large M, so the caller asks isa_supported(Isa::kAmx) (CPU has
// amx-tile and amx-int8, and the OS granted the tile-data permission, requested once) and picks
// kAmx itself where the shape is large enough.
Isa best_isa();
bool isa_supported(Isa isa);
const char* isa_name(Isa isa);  // "scalar", "avx2", "avx512_vnni", "amx"

// C (M x N, row m at c + m * ldc) = epilogue(A (M x K, row m at a + m * lda) x packed W^T).
// N is the number of columns computed (packed_w / epilogue arrays already offset to the first one).
// A is read only inside its M rows of K bytes. Throws std::invalid_argument when isa is not
// supported here, a size is negative, lda < K or ldc < N (with M > 1), a needed pointer is null,
// or (requantizing) a multiplier[n] is not valid, out_min > out_max, or out_min - out_zero_point /
// out_max - out_zero_point do not fit int32. M == 0 or N == 0 does nothing.
void qgemm_u8s8(Isa isa, int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                const int8_t* packed_w, const RequantEpilogue& ep, uint8_t* c, int64_t ldc);
void qgemm_u8s8(Isa isa, int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                const int8_t* packed_w, const FloatEpilogue& ep, float* c, int64_t ldc);

}  // namespace qext::kernels
