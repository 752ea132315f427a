// Per-ISA entry points behind qgemm_u8s8 (qgemm.h). Each lives in its own translation unit compiled
// with that ISA's flags (CMakeLists.txt) and is called only when isa_supported() says so.
#pragma once

#include "qext/kernels/qgemm.h"

namespace qext::kernels::detail {

// Throws std::invalid_argument ("qext::kernels::<caller>: ...") unless ep can run N columns: arrays
// present, multipliers valid, out_min <= out_max, clamp bounds minus the zero point in int32.
void check_epilogue(const RequantEpilogue& ep, int64_t N, const char* caller);
void check_epilogue(const FloatEpilogue& ep, int64_t N, const char* caller);

// out[i] = bias[n0 + i] - a_zero_point * row_sums[n0 + i] modulo 2^32 for i < nv, 0 for the
// columns past nv (up to 16): the epilogue's per-column correction, for the vector epilogues.
inline void correction_block(const int32_t* row_sums, int32_t a_zero_point, const int32_t* bias,
                             int64_t n0, int nv, int32_t* out) {
  for (int i = 0; i < 16; ++i) {
    uint32_t v = 0;
    if (i < nv) {
      v = 0u - static_cast<uint32_t>(a_zero_point) * static_cast<uint32_t>(row_sums[n0 + i]);
      if (bias != nullptr) v += static_cast<uint32_t>(bias[n0 + i]);
    }
    out[i] = static_cast<int32_t>(v);
  }
}

// The scalar reference (qgemm_ref.cpp).
void qgemm_scalar(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                  const int8_t* packed_w, const RequantEpilogue& ep, uint8_t* c, int64_t ldc);
void qgemm_scalar(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                  const int8_t* packed_w, const FloatEpilogue& ep, float* c, int64_t ldc);

// AVX2 without VNNI (qgemm_avx2.cpp).
void qgemm_avx2(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                const int8_t* packed_w, const RequantEpilogue& ep, uint8_t* c, int64_t ldc);
void qgemm_avx2(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                const int8_t* packed_w, const FloatEpilogue& ep, float* c, int64_t ldc);

// AVX-512 VNNI (qgemm_avx512vnni.cpp).
void qgemm_avx512vnni(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                      const int8_t* packed_w, const RequantEpilogue& ep, uint8_t* c, int64_t ldc);
void qgemm_avx512vnni(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                      const int8_t* packed_w, const FloatEpilogue& ep, float* c, int64_t ldc);

// The epilogue applied to a block of raw int32 products acc[m][n] = sum_k A[m][k] * W[n][k]
// (row m at acc + m * ld_acc; columns 0..N-1 are epilogue columns 0..N-1), with AVX-512; shared by
// the VNNI and AMX paths (qgemm_avx512vnni.cpp).
void epilogue_block_avx512(const int32_t* acc, int64_t ld_acc, int64_t M, int64_t N,
                           const RequantEpilogue& ep, uint8_t* c, int64_t ldc);
void epilogue_block_avx512(const int32_t* acc, int64_t ld_acc, int64_t M, int64_t N,
                           const FloatEpilogue& ep, float* c, int64_t ldc);

// AMX-INT8 (qgemm_amx.cpp). amx_enable() asks the OS for the tile-data permission (once per
// process) and reports whether AMX can be used.
bool amx_enable();
void qgemm_amx(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
               const int8_t* packed_w, const RequantEpilogue& ep, uint8_t* c, int64_t ldc);
void qgemm_amx(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
               const int8_t* packed_w, const FloatEpilogue& ep, float* c, int64_t ldc);

}  // namespace qext::kernels::detail
