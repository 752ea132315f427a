// Compiled with -mavx2 -mfma (see CMakeLists.txt); reached only through cpu_has_avx2() checks.
// The tree descent of tree_label on 8 floats per register. The first four levels (at most 8 nodes
// each) are looked up in registers with vpermps; deeper levels are gathered from memory. Four
// registers are in flight at a time to hide the latency of the dependent lookups.
#include <immintrin.h>

#include <algorithm>
#include <limits>

#include "qext/kernels/kmeans1d.h"

namespace qext::kernels {
namespace {

constexpr int kRegisterLevels = 4;
constexpr int kVectors = 4;

// node = 2 * node + (x > t), with the comparison's all-ones mask as -1.
inline __m256i descend(__m256i node, __m256 x, __m256 t) {
  const __m256i greater = _mm256_castps_si256(_mm256_cmp_ps(x, t, _CMP_GT_OQ));
  return _mm256_sub_epi32(_mm256_add_epi32(node, node), greater);
}

}  // namespace

void assign_labels_avx2(const float* x, int64_t n, const float* tree, int levels, uint8_t* labels) {
  const int register_levels = std::min(levels, kRegisterLevels);
  __m256 level_nodes[kRegisterLevels];
  for (int l = 0; l < register_levels; ++l) {
    float nodes[8];
    std::fill(nodes, nodes + 8, std::numeric_limits<float>::infinity());
    std::copy(tree + (1 << l) - 1, tree + (2 << l) - 1, nodes);
    level_nodes[l] = _mm256_loadu_ps(nodes);
  }
  // The 32-bit groups of the packed bytes hold labels 0-3 of registers 0..3, then labels 4-7.
  const __m256i unpack_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t i = 0;
  for (; i + 8 * kVectors <= n; i += 8 * kVectors) {
    __m256 v[kVectors];
    __m256i node[kVectors];
    for (int u = 0; u < kVectors; ++u) {
      v[u] = _mm256_loadu_ps(x + i + 8 * u);
      node[u] = _mm256_setzero_si256();
    }
    for (int l = 0; l < register_levels; ++l) {
      for (int u = 0; u < kVectors; ++u) {
        node[u] = descend(node[u], v[u], _mm256_permutevar8x32_ps(level_nodes[l], node[u]));
      }
    }
    for (int l = register_levels; l < levels; ++l) {
      const float* level = tree + (1 << l) - 1;
      for (int u = 0; u < kVectors; ++u) {
        node[u] = descend(node[u], v[u], _mm256_i32gather_ps(level, node[u], 4));
      }
    }
    const __m256i words = _mm256_packus_epi16(_mm256_packus_epi32(node[0], node[1]),
                                              _mm256_packus_epi32(node[2], node[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(labels + i),
                        _mm256_permutevar8x32_epi32(words, unpack_order));
  }
  assign_labels(x + i, n - i, tree, levels, labels + i);
}

}  // namespace qext::kernels
