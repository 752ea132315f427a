// Compiled with -mavx2 -mfma (see CMakeLists.txt); reached only through cpu_has_avx2() checks.
#include "qext/kernels/observe_avx2.h"

#include <immintrin.h>

#include <limits>

#include "qext/kernels/observe_ref.h"

namespace qext::kernels {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Lanes of v that are finite (|v| < inf is false for NaN and +-inf).
inline __m256 finite_lanes(__m256 v) {
  const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
  return _mm256_cmp_ps(magnitude, _mm256_set1_ps(kInf), _CMP_LT_OQ);
}

inline float reduce_min(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float reduce_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

}  // namespace

void minmax_finite_avx2(const float* x, int64_t n, float* min_val, float* max_val) {
  const __m256 pos_inf = _mm256_set1_ps(kInf), neg_inf = _mm256_set1_ps(-kInf);
  // Two accumulator pairs to hide the latency of min/max.
  __m256 lo0 = pos_inf, lo1 = pos_inf, hi0 = neg_inf, hi1 = neg_inf;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    const __m256 fa = finite_lanes(a), fb = finite_lanes(b);
    lo0 = _mm256_min_ps(lo0, _mm256_blendv_ps(pos_inf, a, fa));
    hi0 = _mm256_max_ps(hi0, _mm256_blendv_ps(neg_inf, a, fa));
    lo1 = _mm256_min_ps(lo1, _mm256_blendv_ps(pos_inf, b, fb));
    hi1 = _mm256_max_ps(hi1, _mm256_blendv_ps(neg_inf, b, fb));
  }
  float lo = std::min(*min_val, reduce_min(_mm256_min_ps(lo0, lo1)));
  float hi = std::max(*max_val, reduce_max(_mm256_max_ps(hi0, hi1)));
  minmax_finite_ref(x + i, n - i, &lo, &hi);
  *min_val = lo;
  *max_val = hi;
}

void minmax_finite_per_element_avx2(const float* x, int64_t n, float* min_vals, float* max_vals) {
  const __m256 pos_inf = _mm256_set1_ps(kInf), neg_inf = _mm256_set1_ps(-kInf);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 finite = finite_lanes(v);
    _mm256_storeu_ps(min_vals + i, _mm256_min_ps(_mm256_loadu_ps(min_vals + i),
                                                 _mm256_blendv_ps(pos_inf, v, finite)));
    _mm256_storeu_ps(max_vals + i, _mm256_max_ps(_mm256_loadu_ps(max_vals + i),
                                                 _mm256_blendv_ps(neg_inf, v, finite)));
  }
  minmax_finite_per_element_ref(x + i, n - i, min_vals + i, max_vals + i);
}

}  // namespace qext::kernels
