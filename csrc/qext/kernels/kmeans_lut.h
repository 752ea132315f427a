// Look-up-table inference on packed k-means labels: a weight W stored as labels of `bits` bits
// plus a float32 codebook, decoded on the fly (never materialised whole) and multiplied in a fixed
// float32 order. Framework-free: raw pointers in and out, no threads (the caller splits the output
// channels and runs the pieces in parallel), testable with gtest alone.
//
// Packed label format (the one qext's k-means conversion writes): the labels of W (row-major,
// numel elements) in a byte stream of ceil(numel * bits / 8) bytes, label i in byte i / (8 / bits)
// at bit offset (i % (8 / bits)) * bits (little-endian within the byte), bits in {1, 2, 4, 8}.
// The bits past the last label are ignored. The codebook holds k <= 2^bits float32 centroids, one
// for the tensor ([k]) or one per row = output channel ([rows][k]); W[n][j] = codebook(n)[label].
//
// Accumulation order (the contract every path meets bit for bit: scalar, AVX2, AVX-512, CUDA):
//   y[m][n] = reduce(s) (+ bias[n]),  s_j = fma chain over k = j, j + 16, j + 32, ... < K in order:
//             s_j <- fma(x[m][k], W[n][k], s_j), starting from s_j = +0.0f (j = 0..15);
//   reduce(s) = ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7)) with t_j = s_j + s_{j+8},
// all in float32 with round-to-nearest-even. 16 lanes are one zmm, two ymm, or 16 CUDA threads
// (the tree is xor-shuffles by 8, 1, 2, 4); the result depends on neither the vector width nor the
// thread split. torch.nn.functional.linear (MKL / oneDNN / cuBLAS) sums in its own blocked order,
// so it agrees with this to float rounding (~K * 2^-24 relative to sum |x * w|), not bit for bit:
// no fixed order can match every BLAS build. Bit-identity holds for finite inputs; a NaN result is
// NaN everywhere but its payload is not specified.
#pragma once

#include <cstdint>

#include "qext/kernels/packed_labels.h"

namespace qext::kernels {

constexpr int64_t kLutLanes = 16;

// Label i of a packed stream (the format of packed_labels.h).
inline int read_packed_label(const uint8_t* packed, int64_t i, int bits) {
  const int64_t per_byte = 8 / bits;
  const int shift = static_cast<int>(i % per_byte) * bits;
  return (packed[i / per_byte] >> shift) & ((1 << bits) - 1);
}

// The largest label among elements [begin, end) (0 for an empty range).
int max_label_ref(const uint8_t* packed, int64_t begin, int64_t end, int bits);
int max_label_avx2(const uint8_t* packed, int64_t begin, int64_t end, int bits);

// The index of the first label >= k among elements [begin, end), or -1 (scalar; for messages).
int64_t find_label_at_least(const uint8_t* packed, int64_t begin, int64_t end, int bits, int64_t k);

// A weight of `rows` x `cols` (row-major; a conv weight has cols = in / groups * kh * kw) given as
// packed labels and a codebook. Every label must be < k (check with max_label_* first): the
// kernels index the codebook with the labels as they are.
struct LutWeight {
  const uint8_t* labels;   // packed_labels_bytes(rows * cols, bits) bytes
  int bits;                // 1, 2, 4 or 8
  const float* centroids;  // [k], or [rows][k] when per_channel
  int64_t k;               // 1 <= k <= 2^bits
  bool per_channel;
  int64_t rows, cols;

  const float* codebook(int64_t row) const { return per_channel ? centroids + row * k : centroids; }
};

// The SIMD paths: _avx2 needs AVX2 + FMA (cpu_has_avx2() in fake_quantize_avx2.h), _avx512 needs
// AVX-512F as well (lut_cpu_has_avx512()); call each only where its check says so.
bool lut_cpu_has_avx512();

// Rows [r0, r1) of W, dense: out[(r - r0) * ld + j] = W[r][j] for j < cols.
void lut_decode_rows_ref(const LutWeight& w, int64_t r0, int64_t r1, float* out, int64_t ld);
void lut_decode_rows_avx2(const LutWeight& w, int64_t r0, int64_t r1, float* out, int64_t ld);
void lut_decode_rows_avx512(const LutWeight& w, int64_t r0, int64_t r1, float* out, int64_t ld);

// The reference of the order above on a dense weight: for m < M and n < N,
// y[m * ldy + n] = x[m] . w[n] (+ bias[n]); x row m at x + m * ldx, w row n at w + n * ldw, K
// terms each; bias may be null.
void linear_ref(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const float* w,
                int64_t ldw, const float* bias, float* y, int64_t ldy);

// The same product with W given by w (N = w.rows, K = w.cols), for the output columns [n0, n1):
// y[m * ldy + n] for m < M, n0 <= n < n1, with the bits of linear_ref on the decoded weight. The
// _ref path decodes rows with lut_decode_rows_ref and runs linear_ref on them; the SIMD paths
// decode blocks of rows into a small buffer that stays in cache and run register-blocked
// micro-kernels on it (the decoding is shared by all M rows of x).
void lut_linear_ref(const LutWeight& w, int64_t M, const float* x, int64_t ldx, const float* bias,
                    int64_t n0, int64_t n1, float* y, int64_t ldy);
void lut_linear_avx2(const LutWeight& w, int64_t M, const float* x, int64_t ldx, const float* bias,
                     int64_t n0, int64_t n1, float* y, int64_t ldy);
void lut_linear_avx512(const LutWeight& w, int64_t M, const float* x, int64_t ldx,
                       const float* bias, int64_t n0, int64_t n1, float* y, int64_t ldy);

}  // namespace qext::kernels
