// Scalar reference of the look-up-table kernels (kmeans_lut.h): the plain loops that define the
// results every faster path reproduces bit for bit.
#include <algorithm>
#include <cmath>
#include <vector>

#include "qext/kernels/kmeans_lut.h"
#include "qext/kernels/kmeans_lut_isa.h"

namespace qext::kernels {

bool lut_cpu_has_avx512() {
  static const bool supported = __builtin_cpu_supports("avx512f") &&
                                __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}

int max_label_ref(const uint8_t* packed, int64_t begin, int64_t end, int bits) {
  int best = 0;
  for (int64_t i = begin; i < end; ++i) best = std::max(best, read_packed_label(packed, i, bits));
  return best;
}

int64_t find_label_at_least(const uint8_t* packed, int64_t begin, int64_t end, int bits,
                            int64_t k) {
  for (int64_t i = begin; i < end; ++i) {
    if (read_packed_label(packed, i, bits) >= k) return i;
  }
  return -1;
}

void lut_decode_rows_ref(const LutWeight& w, int64_t r0, int64_t r1, float* out, int64_t ld) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* codebook = w.codebook(r);
    float* dst = out + (r - r0) * ld;
    for (int64_t j = 0; j < w.cols; ++j) {
      dst[j] = codebook[read_packed_label(w.labels, r * w.cols + j, w.bits)];
    }
  }
}

void linear_ref(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const float* w,
                int64_t ldw, const float* bias, float* y, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      float s[kLutLanes] = {};
      for (int64_t k = 0; k < K; ++k) {
        float& lane = s[k % kLutLanes];
        lane = std::fma(x[m * ldx + k], w[n * ldw + k], lane);
      }
      float t[kLutLanes / 2];
      for (int j = 0; j < kLutLanes / 2; ++j) t[j] = s[j] + s[j + kLutLanes / 2];
      const float r = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
      y[m * ldy + n] = bias != nullptr ? r + bias[n] : r;
    }
  }
}

void lut_linear_ref(const LutWeight& w, int64_t M, const float* x, int64_t ldx, const float* bias,
                    int64_t n0, int64_t n1, float* y, int64_t ldy) {
  constexpr int64_t kBlockRows = 16;
  if (n1 <= n0) return;
  std::vector<float> rows(static_cast<size_t>(std::min(kBlockRows, n1 - n0) * w.cols));
  for (int64_t nb = n0; nb < n1; nb += kBlockRows) {
    const int64_t count = std::min(kBlockRows, n1 - nb);
    lut_decode_rows_ref(w, nb, nb + count, rows.data(), w.cols);
    linear_ref(M, count, w.cols, x, ldx, rows.data(), w.cols, bias != nullptr ? bias + nb : nullptr,
               y + nb, ldy);
  }
}

namespace detail {

void lut_linear_blocked(const LutIsaKernels& isa, const LutWeight& w, int64_t M, const float* x,
                        int64_t ldx, const float* bias, int64_t n0, int64_t n1, float* y,
                        int64_t ldy) {
  // Floats of decoded rows per block: with a few rows of x, they stay in L1 (48 KiB) / L2.
  constexpr int64_t kBufferFloats = 8192;
  if (n1 <= n0 || M <= 0) return;
  const int64_t K = w.cols;
  const int64_t ld = (K + kLutLanes - 1) / kLutLanes * kLutLanes;
  const int64_t fit = std::max<int64_t>(kBufferFloats / ld / isa.max_nr, 1) * isa.max_nr;
  const int64_t block = std::min(fit, n1 - n0);
  std::vector<float> rows(static_cast<size_t>(block * ld), 0.0f);  // the padding stays 0
  for (int64_t nb = n0; nb < n1; nb += block) {
    const int64_t count = std::min(block, n1 - nb);
    isa.decode(w, nb, nb + count, rows.data(), ld);
    for (int64_t m = 0; m < M; m += isa.max_mr) {
      const int64_t mr = std::min<int64_t>(isa.max_mr, M - m);
      for (int64_t j = 0; j < count; j += isa.max_nr) {
        const int64_t nr = std::min<int64_t>(isa.max_nr, count - j);
        isa.micro[(mr - 1) * isa.max_nr + (nr - 1)](K, x + m * ldx, ldx, rows.data() + j * ld, ld,
                                                    bias != nullptr ? bias + nb + j : nullptr,
                                                    y + m * ldy + nb + j, ldy);
      }
    }
  }
}

}  // namespace detail
}  // namespace qext::kernels
