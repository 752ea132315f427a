// AVX-512 VNNI integer GEMM and the AVX-512 epilogue shared with the AMX path; bit-identical to the
// scalar reference (qgemm_ref.cpp).
//
// Exactness: vpdpbusd multiplies u8 x s8 pairs into int32 (no int16 intermediate: each 4-term sum
// is at most 4 * 255 * 128 in magnitude) and adds them to the int32 accumulator with wrap-around
// (the saturating form is vpdpbusds, not used), i.e. modulo 2^32 like the reference's uint32 sums.
// The epilogue (epilogue_avx512.h) is the reference's requantize() in 64-bit lanes; the tests
// compare every path bit for bit.
//
// Blocking: a micro-kernel computes kMr rows x kNb column blocks (16 columns each) over all of K in
// kMr * kNb zmm accumulators: per packed group (4 k) it loads one zmm of weights per column block
// (64 bytes = 16 columns x 4 k), broadcasts 4 bytes of each A row and issues kMr * kNb vpdpbusd
// (2 per cycle on Sapphire Rapids; 24 independent accumulators hide its 5-cycle latency). The sums
// go to a small stack tile and the epilogue (epilogue_avx512.h) writes C with masked stores
// (column tails). Column
// panels of kNb blocks are the outer loop (the panel of the packed weight stays in L1/L2 across the
// row blocks), row blocks the inner one; M and N tails use the smaller instantiations. A is read in
// place: the last, partial group of K (K % 4 != 0) goes through a zero-padded copy of the 1..3
// valid bytes, so no byte past a row's end is read.
#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "qext/kernels/epilogue_avx512.h"
#include "qext/kernels/qgemm_isa.h"

namespace qext::kernels::detail {
namespace {

using avx512::FloatPanel;
using avx512::RequantPanel;

constexpr int kMr = 8;                     // rows per micro-kernel
constexpr int kNb = avx512::kPanelBlocks;  // 16-column blocks per micro-kernel

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// acc[r][j] += A[r][4 g .. 4 g + 3] . W[16 j + n][4 g .. 4 g + 3] for one packed group g: wg is the
// group in column block 0 (block j at wg + j * bstride), row r's 4 bytes at ag + r * ld.
template <int MR, int NB>
__attribute__((always_inline)) inline void dp_group(__m512i (&acc)[MR][NB], const int8_t* wg,
                                                    int64_t bstride, const uint8_t* ag,
                                                    int64_t ld) {
  __m512i wv[NB];
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_si512(wg + j * bstride);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const __m512i av = _mm512_set1_epi32(static_cast<int32_t>(load_u32(ag + r * ld)));
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, wv[j]);
  }
}

// out[r][16 j + n] = sum_k A[r][k] W[16 j + n][k] for MR rows (A at a, row stride lda) and NB
// column blocks (block j at w + j * bstride), accumulated over all of K in MR * NB zmm registers.
// The groups run in one loop; at the last, partial group (K % 4 != 0) the A pointer switches to a
// zero-padded copy of the rows' 1..3 remaining bytes. Keep this shape, and the epilogue out of this
// function: a separate tail step after the loop, or the epilogue on the registers, makes GCC 12
// keep memory copies of the accumulators inside the loop (about half the speed).
// With fewer than 8 accumulators the vpdpbusd latency (5 cycles, 2 per cycle) would stall, so small
// tiles keep a second accumulator set for the odd groups and add it at the end (exact: both wrap
// modulo 2^32).
template <int MR, int NB>
__attribute__((noinline)) void dot_tile(int64_t K, const uint8_t* a, int64_t lda, const int8_t* w,
                                        int64_t bstride, int32_t* out) {
  constexpr bool kSplit = MR * NB < 8;
  __m512i acc[MR][NB], acc1[MR][NB];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[r][j] = acc1[r][j] = _mm512_setzero_si512();
  }
  const int64_t full = K / 4, rem = K % 4, groups = (K + 3) / 4;
  alignas(64) uint8_t tail[4 * MR] = {};
  if (rem != 0) {
    for (int r = 0; r < MR; ++r) {
      std::memcpy(tail + 4 * r, a + r * lda + 4 * full, static_cast<size_t>(rem));
    }
  }
  const uint8_t* ag = a;
  int64_t ld = lda;
  int64_t g = 0;
  if constexpr (kSplit) {
    for (; g + 2 <= full; g += 2) {
      dp_group<MR, NB>(acc, w + 64 * g, bstride, ag, ld);
      dp_group<MR, NB>(acc1, w + 64 * (g + 1), bstride, ag + 4, ld);
      ag += 8;
    }
  }
  for (; g < groups; ++g) {
    if (g == full) {
      ag = tail;
      ld = 4;
    }
    dp_group<MR, NB>(acc, w + 64 * g, bstride, ag, ld);
    ag += 4;
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      const __m512i v = kSplit ? _mm512_add_epi32(acc[r][j], acc1[r][j]) : acc[r][j];
      _mm512_store_si512(out + (r * NB + j) * 16, v);
    }
  }
}

// MR rows x NB column blocks of C: the products (dot_tile), then the panel's epilogue for rows
// row0 .. row0 + MR - 1.
template <int MR, int NB, class Panel>
void micro_kernel(int64_t K, const uint8_t* a, int64_t lda, const int8_t* w, int64_t bstride,
                  const Panel& panel, int64_t row0) {
  alignas(64) int32_t tile[MR * NB * 16];
  dot_tile<MR, NB>(K, a, lda, w, bstride, tile);
  panel.store_rows(row0, MR, tile, 16 * NB);
}

template <class Panel>
using KernelFn = void (*)(int64_t, const uint8_t*, int64_t, const int8_t*, int64_t, const Panel&,
                          int64_t);

template <class Panel, int MR, int... J>
constexpr std::array<KernelFn<Panel>, sizeof...(J)> kernel_row(std::integer_sequence<int, J...>) {
  return {&micro_kernel<MR, J + 1, Panel>...};
}

// table[mr - 1][nb - 1] = micro_kernel<mr, nb>.
template <class Panel, int... R>
constexpr std::array<std::array<KernelFn<Panel>, kNb>, sizeof...(R)> kernel_table(
    std::integer_sequence<int, R...>) {
  return {kernel_row<Panel, R + 1>(std::make_integer_sequence<int, kNb>{})...};
}

template <class Panel, class Ep, class Out>
void run(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda, const int8_t* packed_w,
         const Ep& ep, Out* c, int64_t ldc) {
  static constexpr auto table = kernel_table<Panel>(std::make_integer_sequence<int, kMr>{});
  const int64_t bstride = kPackN * packed_k(K);
  for (int64_t n0 = 0; n0 < N; n0 += kNb * kPackN) {
    const int nb = static_cast<int>(std::min<int64_t>(kNb, (N - n0 + kPackN - 1) / kPackN));
    const Panel panel(ep, n0, N, nb, c + n0, ldc);
    const int8_t* w = packed_w + packed_block_offset(n0, K);
    for (int64_t m0 = 0; m0 < M; m0 += kMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMr, M - m0));
      table[mr - 1][nb - 1](K, a + m0 * lda, lda, w, bstride, panel, m0);
    }
  }
}

template <class Panel, class Ep, class Out>
void epilogue_block(const int32_t* acc, int64_t ld_acc, int64_t M, int64_t N, const Ep& ep, Out* c,
                    int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += kNb * kPackN) {
    const int nb = static_cast<int>(std::min<int64_t>(kNb, (N - n0 + kPackN - 1) / kPackN));
    const Panel panel(ep, n0, N, nb, c + n0, ldc);
    panel.store_rows(0, M, acc + n0, ld_acc);
  }
}

}  // namespace

void qgemm_avx512vnni(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                      const int8_t* packed_w, const RequantEpilogue& ep, uint8_t* c, int64_t ldc) {
  run<RequantPanel>(M, N, K, a, lda, packed_w, ep, c, ldc);
}

void qgemm_avx512vnni(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                      const int8_t* packed_w, const FloatEpilogue& ep, float* c, int64_t ldc) {
  run<FloatPanel>(M, N, K, a, lda, packed_w, ep, c, ldc);
}

void epilogue_block_avx512(const int32_t* acc, int64_t ld_acc, int64_t M, int64_t N,
                           const RequantEpilogue& ep, uint8_t* c, int64_t ldc) {
  epilogue_block<RequantPanel>(acc, ld_acc, M, N, ep, c, ldc);
}

void epilogue_block_avx512(const int32_t* acc, int64_t ld_acc, int64_t M, int64_t N,
                           const FloatEpilogue& ep, float* c, int64_t ldc) {
  epilogue_block<FloatPanel>(acc, ld_acc, M, N, ep, c, ldc);
}

}  // namespace qext::kernels::detail
