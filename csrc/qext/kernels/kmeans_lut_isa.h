// Per-ISA pieces behind the look-up-table kernels (kmeans_lut.h). Each SIMD translation unit
// (compiled with its ISA's flags, CMakeLists.txt) provides a row decoder and register-blocked
// micro-kernels; lut_linear_blocked (kmeans_lut_ref.cpp, no ISA flags) runs them over blocks of
// decoded rows, so every ISA shares one blocking scheme.
#pragma once

#include <cstdint>

#include "qext/kernels/kmeans_lut.h"

namespace qext::kernels::detail {

// Rows [r0, r1) of w, dense, row r at out + (r - r0) * ld (as lut_decode_rows_ref).
using LutDecodeFn = void (*)(const LutWeight& w, int64_t r0, int64_t r1, float* out, int64_t ld);

// y[i * ldy + j] = x[i] . w[j] (+ bias[j]) in the fixed order for a register block of rows i of x
// and rows j of a decoded weight (rows of ldw floats, zero past K up to a multiple of 16).
using LutMicroFn = void (*)(int64_t K, const float* x, int64_t ldx, const float* w, int64_t ldw,
                            const float* bias, float* y, int64_t ldy);

struct LutIsaKernels {
  LutDecodeFn decode;
  const LutMicroFn* micro;  // micro[(mr - 1) * max_nr + (nr - 1)], mr <= max_mr, nr <= max_nr
  int max_mr, max_nr;
};

// lut_linear_* (kmeans_lut.h) with the given ISA's kernels: decodes blocks of rows into a buffer
// that stays in cache, then runs the micro-kernels on every register block of it.
void lut_linear_blocked(const LutIsaKernels& isa, const LutWeight& w, int64_t M, const float* x,
                        int64_t ldx, const float* bias, int64_t n0, int64_t n1, float* y,
                        int64_t ldy);

}  // namespace qext::kernels::detail
