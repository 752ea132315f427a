// AMX-INT8 path of the integer GEMM (qgemm.h). Compiled with AVX-512 + -mamx-tile -mamx-int8 (see
// CMakeLists.txt); reached only when amx_enable() says the CPU and the OS allow tiles.
//
// Tiles as in amx_tiles.h (a 32 x 32 int32 block of C per pass, B read straight from packed_w). A
// is copied into tile order (zero-padded in k to packed_k(K) and in rows to a multiple of 32:
// nothing past A's rows is read), except for small N with K a multiple of 64, where full 32-row
// panels are read in place.
//
// Loop order: A is taken a chunk of up to 256 rows at a time (its packed panels stay in L2); for
// each 32-column stripe of the weight (which stays in L1) the chunk's 32-row panels go through the
// tile unit into an int32 scratch, and the shared AVX-512 epilogue then runs once per stripe over
// the whole chunk (its per-column setup is paid per call, so tall calls are cheaper). The core work
// (epilogue, packing the next chunk) is issued right after a block's tile instructions so that it
// overlaps with the tile unit at least while that block computes.
#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "qext/kernels/amx_tiles.h"
#include "qext/kernels/qgemm_isa.h"

namespace qext::kernels::detail {
namespace {

using namespace amx;  // NOLINT(google-build-using-namespace): the shared tile helpers

// CPUID / XCR0: AMX-TILE and AMX-INT8, the OS manages the tile state (XCR0 bits 17, 18), and
// palette 1 has at least eight 16 x 64-byte tiles.
bool cpu_has_amx_int8() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return false;  // OSXSAVE
  if (__get_cpuid_max(0, nullptr) < 0x1d) return false;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  if (!(edx & (1u << 24)) || !(edx & (1u << 25))) return false;  // AMX-TILE, AMX-INT8
  uint32_t xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & (3u << 17)) != (3u << 17)) return false;  // XTILECFG, XTILEDATA
  __cpuid_count(0x1d, 0, eax, ebx, ecx, edx);
  if (eax < 1) return false;  // no palette 1
  __cpuid_count(0x1d, 1, eax, ebx, ecx, edx);
  const unsigned bytes_per_row = ebx & 0xffff, max_names = ebx >> 16, max_rows = ecx & 0xffff;
  return bytes_per_row >= kTileRowBytes && max_names >= 8 && max_rows >= kTileRows;
}

// Copies rows [0, rows) (rows <= 32) of A into the panel buffer: k block kb of tile t (rows
// 16 t .. 16 t + 15) at out + (2 kb + t) * 1024, row r of the tile at + 64 r. Bytes past K and rows
// past `rows` are zero. Masked loads: nothing past a row's K bytes is read.
void pack_a_panel(const uint8_t* a, int64_t lda, int64_t rows, int64_t K, int64_t kblocks,
                  uint8_t* out) {
  const int64_t full = K / kTileRowBytes;
  const int64_t tail = K - full * kTileRowBytes;
  const __mmask64 tail_mask = tail ? (~0ull >> (64 - tail)) : 0;
  for (int64_t row = 0; row < kBlockM; ++row) {
    uint8_t* dst = out + (row / kTileRows) * kTileBytes + (row % kTileRows) * kTileRowBytes;
    constexpr int64_t kStep = 2 * kTileBytes;
    if (row >= rows) {
      for (int64_t kb = 0; kb < kblocks; ++kb) {
        _mm512_store_si512(dst + kb * kStep, _mm512_setzero_si512());
      }
      continue;
    }
    const uint8_t* src = a + row * lda;
    int64_t kb = 0;
    for (; kb < full; ++kb) {
      _mm512_store_si512(dst + kb * kStep, _mm512_loadu_si512(src + kb * kTileRowBytes));
    }
    if (tail) {
      _mm512_store_si512(dst + kb * kStep,
                         _mm512_maskz_loadu_epi8(tail_mask, src + kb * kTileRowBytes));
    }
  }
}

// Where the tile loads find a 32-row panel of A: tile t (rows 16 t .. 16 t + 15) of k block kb at
// base + kb * kstep + t * tile1, rows `stride` bytes apart. Packed panels: stride 64, kstep 2048,
// tile1 1024. Rows of A read in place: stride lda, kstep 64, tile1 16 lda.
struct PanelA {
  const uint8_t* base;
  int64_t stride, kstep, tile1;
};

// Packed A per chunk (bytes): a chunk of 32-row panels fills about this much of L2.
constexpr int64_t kChunkBytes = int64_t{512} << 10;
constexpr int64_t kMaxChunkPanels = 8;
// With at most this many 32-column stripes (N <= 128) and K a multiple of 64, the full 32-row
// panels of A are read in place (strided tile loads, prefetched one panel ahead): copying A would
// cost more than the few passes over it. Otherwise A is packed.
constexpr int64_t kMaxStripesInPlace = 4;

template <typename Epilogue, typename Out>
void qgemm_amx_impl(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
                    const int8_t* packed_w, const Epilogue& ep, Out* c, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  const int64_t kblocks = packed_k(K) / kPackK;
  const int64_t b_block_bytes = static_cast<int64_t>(packed_block_offset(kPackN, K));
  const int64_t panel_bytes = std::max<int64_t>(kblocks, 1) * 2 * kTileBytes;
  const int64_t chunk_panels =
      std::min(std::clamp(kChunkBytes / panel_bytes, int64_t{1}, kMaxChunkPanels),
               (M + kBlockM - 1) / kBlockM);
  const int64_t chunk_rows = chunk_panels * kBlockM;
  const int64_t stripes = (N + kBlockN - 1) / kBlockN;
  const bool in_place = K > 0 && K % kPackK == 0 && stripes <= kMaxStripesInPlace;
  // Tile loads of rows that straddle cache lines are much slower: a weight that is not 64-byte
  // aligned (the tensors' storage always is) is copied a stripe at a time into aligned buffers,
  // when the chunk has enough panels to repay the copy.
  const bool copy_b = reinterpret_cast<uintptr_t>(packed_w) % 64 != 0 && chunk_panels >= 4;

  // Work buffer: two packed chunks, the int32 scratch of one stripe (chunk_rows x 32), two aligned
  // weight stripes.
  const int64_t chunk_bytes = chunk_panels * panel_bytes;
  const int64_t scratch_bytes = chunk_rows * kBlockN * static_cast<int64_t>(sizeof(int32_t));
  const int64_t stripe_bytes = copy_b ? 2 * b_block_bytes : 0;
  uint8_t* const buffer = work_buffer(static_cast<size_t>(
      std::max<int64_t>(2 * chunk_bytes + scratch_bytes + 2 * stripe_bytes, kTileBytes)));
  uint8_t* const apack[2] = {buffer, buffer + chunk_bytes};
  int32_t* const scratch = reinterpret_cast<int32_t*>(buffer + 2 * chunk_bytes);
  int8_t* const bcopy[2] = {
      reinterpret_cast<int8_t*>(buffer + 2 * chunk_bytes + scratch_bytes),
      reinterpret_cast<int8_t*>(buffer + 2 * chunk_bytes + scratch_bytes + stripe_bytes)};

  auto weight_stripe = [&](int64_t n0) { return packed_w + packed_block_offset(n0, K); };
  auto copy_stripe = [&](int64_t n0, int8_t* dst) {
    const int64_t blocks = std::min(kBlockN, N - n0) > kPackN ? 2 : 1;
    std::memcpy(dst, weight_stripe(n0), static_cast<size_t>(blocks * b_block_bytes));
  };
  // Packs panel j of the chunk at row m0 (rows rows) into dst, unless it is read in place (or
  // K = 0: nothing to pack, and A may be null).
  auto pack_panel = [&](int64_t m0, int64_t rows, int64_t j, uint8_t* dst) {
    const int64_t r0 = j * kBlockM;
    const int64_t panel_rows = std::min(kBlockM, rows - r0);
    if (kblocks == 0 || (in_place && panel_rows == kBlockM)) return;
    pack_a_panel(a + (m0 + r0) * lda, lda, panel_rows, K, kblocks, dst + j * panel_bytes);
  };
  auto panel_a = [&](int64_t m0, int64_t rows, int64_t i, const uint8_t* chunk_a) -> PanelA {
    const int64_t r0 = i * kBlockM;
    if (in_place && rows - r0 >= kBlockM) {
      return {a + (m0 + r0) * lda, lda, kTileRowBytes, kTileRows * lda};
    }
    return {chunk_a + i * panel_bytes, kTileRowBytes, 2 * kTileBytes, kTileBytes};
  };

  // The stripe whose sums wait in the scratch for the epilogue (rows x cols at (m0, n0)).
  struct Pending {
    int64_t m0 = 0, n0 = 0, rows = 0, cols = 0;
  } pending;
  auto finish_pending = [&] {
    epilogue_block_avx512(scratch, kBlockN, pending.rows, pending.cols,
                          shift_columns(ep, pending.n0), c + pending.m0 * ldc + pending.n0, ldc);
    pending.rows = 0;
  };

  RowPrefetcher prefetcher(a, lda, K);
  configure_tiles();
  const int64_t rows0 = std::min(chunk_rows, M);
  for (int64_t j = 0; j * kBlockM < rows0; ++j) pack_panel(0, rows0, j, apack[0]);
  if (copy_b) copy_stripe(0, bcopy[0]);

  int64_t step = 0;  // stripes started
  for (int64_t m0 = 0, chunk = 0; m0 < M; m0 += chunk_rows, ++chunk) {
    const int64_t rows = std::min(chunk_rows, M - m0);
    const int64_t panels = (rows + kBlockM - 1) / kBlockM;
    const int64_t next_rows = std::max<int64_t>(std::min(chunk_rows, M - m0 - chunk_rows), 0);
    const int64_t next_panels = (next_rows + kBlockM - 1) / kBlockM;
    const uint8_t* chunk_a = apack[chunk & 1];
    for (int64_t n0 = 0; n0 < N; n0 += kBlockN, ++step) {
      const int64_t cols = std::min(kBlockN, N - n0);
      const bool two_cols = cols > kPackN;
      const int8_t* b0 = copy_b ? bcopy[step & 1] : weight_stripe(n0);
      const bool last_stripe = n0 + kBlockN >= N;
      for (int64_t i = 0; i < panels; ++i) {
        const PanelA pa = panel_a(m0, rows, i, chunk_a);
        const bool two_rows = rows - i * kBlockM > kTileRows;
        // A read in place: the first pass over a panel brings the next one into L1.
        if (in_place && n0 == 0) {
          const int64_t next = m0 + (i + 1) * kBlockM;
          prefetcher.start(next, std::min(next + kBlockM, M), kblocks);
        }
        compute_block(
            two_rows, two_cols, pa.base, pa.stride, pa.tile1,
            [&pa](int64_t kb) { return kb * pa.kstep; }, b0, b_block_bytes, kblocks,
            [&prefetcher] { prefetcher.step(); });
        prefetcher.stop();
        // Core work while the tile unit computes this block: the previous stripe's epilogue
        // (before this stripe's first tile store overwrites the scratch), the next weight stripe's
        // copy, the next chunk's packing.
        if (i == 0) {
          if (pending.rows > 0) finish_pending();
          if (copy_b && (!last_stripe || m0 + chunk_rows < M)) {
            copy_stripe(last_stripe ? 0 : n0 + kBlockN, bcopy[(step + 1) & 1]);
          }
        }
        if (last_stripe) {
          for (int64_t j = i * next_panels / panels; j < (i + 1) * next_panels / panels; ++j) {
            pack_panel(m0 + chunk_rows, next_rows, j, apack[(chunk + 1) & 1]);
          }
        }
        store_block(two_rows, two_cols, scratch + i * kBlockM * kBlockN);
      }
      pending = {m0, n0, rows, cols};
    }
  }
  _tile_release();
  finish_pending();
}

}  // namespace

bool amx_enable() {
  static const bool enabled = [] {
    if (!cpu_has_amx_int8()) return false;
#if defined(__linux__)
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return enabled;
}

void qgemm_amx(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
               const int8_t* packed_w, const RequantEpilogue& ep, uint8_t* c, int64_t ldc) {
  qgemm_amx_impl(M, N, K, a, lda, packed_w, ep, c, ldc);
}

void qgemm_amx(int64_t M, int64_t N, int64_t K, const uint8_t* a, int64_t lda,
               const int8_t* packed_w, const FloatEpilogue& ep, float* c, int64_t ldc) {
  qgemm_amx_impl(M, N, K, a, lda, packed_w, ep, c, ldc);
}

}  // namespace qext::kernels::detail
