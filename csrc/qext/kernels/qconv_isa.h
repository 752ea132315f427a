// Per-ISA entry points behind the convolution and elementwise kernels (qconv.h, qelementwise.h).
// The AVX2 ones live in qconv_avx2.cpp, compiled with -mavx2 -mfma, the AMX one in qconv_amx.cpp
// (CMakeLists.txt); each is called only when isa_supported() says its ISA runs here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "qext/kernels/qconv.h"
#include "qext/kernels/qelementwise.h"

namespace qext::kernels::detail {

// The taps k in [0, kernel) whose input coordinate start + k * dilation lies in [0, size) form one
// range [*lo, *hi) (empty: *lo == *hi).
inline void valid_taps(int64_t start, int64_t dilation, int64_t kernel, int64_t size, int64_t* lo,
                       int64_t* hi) {
  auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };  // a >= 0, b > 0
  int64_t l = start >= 0 ? 0 : ceil_div(-start, dilation);
  int64_t h = start >= size ? 0 : ceil_div(size - start, dilation);
  l = std::min(l, kernel);
  h = std::max(std::min(h, kernel), l);
  *lo = l;
  *hi = h;
}

// Copies n bytes with every byte XORed with flip (a plain copy when flip is 0). Short runs (the
// taps of a grouped convolution's few channels, a first layer's kernel rows) are copied inline in
// fixed-size pieces, the last one overlapping: a memcpy call per 16-byte run cost more than the
// GEMM it feeds.
inline void copy_flip(uint8_t* dst, const uint8_t* src, int64_t n, uint8_t flip) {
  if (flip != 0) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] ^ flip;
  } else if (n > 64) {
    std::memcpy(dst, src, static_cast<size_t>(n));
  } else if (n >= 16) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) std::memcpy(dst + i, src + i, 16);
    if (i < n) std::memcpy(dst + n - 16, src + n - 16, 16);
  } else if (n >= 8) {
    std::memcpy(dst, src, 8);
    std::memcpy(dst + n - 8, src + n - 8, 8);
  } else if (n >= 4) {
    std::memcpy(dst, src, 4);
    std::memcpy(dst + n - 4, src + n - 4, 4);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  }
}

// memset for the short pad runs of im2col (often none).
inline void fill_bytes(uint8_t* dst, uint8_t value, int64_t n) {
  if (n > 0) std::memset(dst, value, static_cast<size_t>(n));
}

// The scalar references (qconv.cpp, qelementwise.cpp).
void depthwise_conv2d_scalar(const uint8_t* x, const Conv2dGeometry& g, const int8_t* w_hwc,
                             const RequantEpilogue& ep, int64_t n, int64_t oh0, int64_t oh1,
                             uint8_t* y);
void add_u8_scalar(const uint8_t* a, const uint8_t* b, int64_t n, const AddParams& p, uint8_t* out,
                   uint8_t a_flip, uint8_t b_flip, uint8_t out_flip);

// AVX2 (qconv_avx2.cpp); bit-identical to the references, which they call for the cases their
// vector arithmetic does not cover (documented there).
void depthwise_conv2d_avx2(const uint8_t* x, const Conv2dGeometry& g, const int8_t* w_hwc,
                           const RequantEpilogue& ep, int64_t n, int64_t oh0, int64_t oh1,
                           uint8_t* y);
void add_u8_avx2(const uint8_t* a, const uint8_t* b, int64_t n, const AddParams& p, uint8_t* out,
                 uint8_t a_flip, uint8_t b_flip, uint8_t out_flip);

// AVX-512 VNNI (qconv_avx512.cpp); bit-identical to the reference, which it calls for an input zero
// point outside [0, 255].
void depthwise_conv2d_avx512(const uint8_t* x, const Conv2dGeometry& g, const int8_t* w_hwc,
                             const RequantEpilogue& ep, int64_t n, int64_t oh0, int64_t oh1,
                             uint8_t* y);

// AMX (qconv_amx.cpp), behind conv2d_implicit_u8s8.
void conv2d_implicit_amx(const uint8_t* x, const Conv2dGeometry& g, const int8_t* weight,
                         const RequantEpilogue& ep, int64_t row_begin, int64_t row_end,
                         int64_t piece_rows, uint8_t pad_value, uint8_t flip, uint8_t* y);
void conv2d_implicit_amx(const uint8_t* x, const Conv2dGeometry& g, const int8_t* weight,
                         const FloatEpilogue& ep, int64_t row_begin, int64_t row_end,
                         int64_t piece_rows, uint8_t pad_value, uint8_t flip, float* y);

}  // namespace qext::kernels::detail
