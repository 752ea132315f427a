// AVX2 float32 versions of the min/max kernels in observe_ref.h; results are equal (min and
// max do not depend on the order; only the sign of a zero result may differ). Call only when
// cpu_has_avx2() is true.
#pragma once

#include <cstdint>

namespace qext::kernels {

void minmax_finite_avx2(const float* x, int64_t n, float* min_val, float* max_val);

void minmax_finite_per_element_avx2(const float* x, int64_t n, float* min_vals, float* max_vals);

}  // namespace qext::kernels
