// Helpers shared by the AVX2 and AVX-512 look-up-table kernels; include only from translation
// units compiled with AVX2 or more. Everything here has internal linkage: each ISA's translation
// unit compiles its own copy with its own flags.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "qext/kernels/kmeans_lut.h"

namespace qext::kernels {
namespace {

// The last steps of the fixed reduction tree on t_j = s_j + s_(j+8):
// ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7)).
inline float reduce_halves(__m256 t) {
  __m256 p = _mm256_hadd_ps(t, t);  // t0+t1, t2+t3 | t4+t5, t6+t7 (each twice)
  p = _mm256_hadd_ps(p, p);         // (t0+t1)+(t2+t3) | (t4+t5)+(t6+t7)
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(p), _mm256_extractf128_ps(p, 1)));
}

// Rows [r0, r1) of w into out (row r at out + (r - r0) * ld): kGroup labels at a time by
// group(lut, e, dst, aligned) -- decode labels e .. e + kGroup - 1 with the row's RowLut and store
// their centroids at dst, reading at most 16 bytes from the group's first byte -- and label by
// label where a row ends or the stream does (the last 16 bytes). `aligned` is std::true_type when
// every group starts on a byte boundary (cols * bits a multiple of 8), else std::false_type.
template <int kGroup, int kBits, typename RowLut, typename Group>
void decode_rows_by_groups(const LutWeight& w, int64_t r0, int64_t r1, float* out, int64_t ld,
                           const Group& group) {
  const int64_t nbytes = packed_labels_bytes(w.rows * w.cols, kBits);
  const int64_t last_group =
      (nbytes - 16) * 8 / kBits;  // groups starting past it read past the end
  auto run = [&](auto aligned) {
    for (int64_t r = r0; r < r1; ++r) {
      const RowLut lut(w.codebook(r), w.k);
      const int64_t e0 = r * w.cols;
      const int64_t groups_end = std::min(w.cols - (kGroup - 1), last_group - e0 + 1);
      float* dst = out + (r - r0) * ld;
      int64_t j = 0;
      for (; j < groups_end; j += kGroup) group(lut, e0 + j, dst + j, aligned);
      for (; j < w.cols; ++j) dst[j] = lut.codebook[read_packed_label(w.labels, e0 + j, kBits)];
    }
  };
  if (w.cols * kBits % 8 == 0) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

}  // namespace
}  // namespace qext::kernels
