// AMX-INT8 tile helpers shared by the GEMM (qgemm_amx.cpp) and the implicit-GEMM convolution
// (qconv_amx.cpp). Include only from translation units compiled with -mamx-tile -mamx-int8.
//
// Eight 16 x 64-byte tile registers: tmm0..3 hold a 2 x 2 grid of int32 C tiles (a 32 x 32 block),
// tmm4/5 two A tiles (16 rows x 64 k each), tmm6/7 two B tiles. One B tile is 16 groups of the
// packed weight (qgemm.h: 16 columns x 64 k, stride 64 bytes), so B is read straight from it.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

#include "qext/kernels/qgemm.h"

namespace qext::kernels::detail::amx {

constexpr int kTileRows = 16;      // rows of every tile used here
constexpr int kTileRowBytes = 64;  // bytes per tile row
constexpr int64_t kTileBytes = kTileRows * kTileRowBytes;
constexpr int64_t kBlockM = 2 * kTileRows;  // rows of C per block (two A tiles)
constexpr int64_t kBlockN = 2 * kPackN;     // columns of C per block (two B tiles)

// Palette-1 tile configuration (the 64-byte memory operand of ldtilecfg).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

// All eight tiles are 16 rows x 64 bytes (C tiles: 16 x 16 int32).
inline void configure_tiles() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = kTileRowBytes;
    cfg.rows[t] = kTileRows;
  }
  _tile_loadconfig(&cfg);
}

// The per-thread work buffer of the AMX paths (packed or gathered A, int32 scratch, aligned weight
// copies), 64-byte aligned; grows as needed and is kept for the thread's next call.
inline uint8_t* work_buffer(size_t bytes) {
  struct Buffer {
    std::unique_ptr<uint8_t, decltype(&std::free)> data{nullptr, &std::free};
    size_t size = 0;
  };
  thread_local Buffer buffer;
  bytes = (bytes + 63) / 64 * 64;  // aligned_alloc wants a multiple of the alignment
  if (buffer.size < bytes) {
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) throw std::bad_alloc();
    buffer.data.reset(static_cast<uint8_t*>(p));
    buffer.size = bytes;
  }
  return buffer.data.get();
}

// Software prefetch of rows [row, end) (K bytes each, lda apart) into L1, spread over `steps` calls
// of step(): the rows the next tile work reads are brought in while the tile unit computes (the
// GEMM's next A panel read in place, the convolution's next piece of input rows).
class RowPrefetcher {
 public:
  RowPrefetcher(const uint8_t* a, int64_t lda, int64_t K) : a_(a), lda_(lda), K_(K) {}
  void start(int64_t row, int64_t end, int64_t steps) {
    row_ = row, end_ = end, offset_ = 0;
    const int64_t lines = std::max<int64_t>(end - row, 0) * ((K_ + 63) / 64);
    per_step_ = steps > 0 ? (lines + steps - 1) / steps : 0;
  }
  void step() {
    for (int64_t n = 0; n < per_step_ && row_ < end_; ++n) {
      _mm_prefetch(reinterpret_cast<const char*>(a_ + row_ * lda_ + offset_), _MM_HINT_T0);
      offset_ += kTileRowBytes;
      if (offset_ >= K_) offset_ = 0, ++row_;
    }
  }
  void stop() { per_step_ = 0; }

 private:
  const uint8_t* a_;
  int64_t lda_, K_, row_ = 0, end_ = 0, offset_ = 0, per_step_ = 0;
};

// Tiles 0..3 = a 32-row panel of A x two 16-column blocks of the packed weight (b0 and
// b0 + b_block_bytes), raw int32 sums: tile 0 rows 0..15 x columns 0..15, tile 1 columns 16..31,
// tiles 2 / 3 rows 16..31. k block kb of A tile t is at a + k_offset(kb) + t * tile1, its rows
// `stride` bytes apart; on_step() runs once per k block (software prefetching). kTwoRows /
// kTwoCols: whether the second A tile / B tile holds anything (else tiles 2, 3 / 1, 3 are left
// alone). Only issues the tile instructions: the tile unit works through them while the core goes
// on with other work.
template <bool kTwoRows, bool kTwoCols, typename KOffset, typename OnStep>
inline void compute_block(const uint8_t* a, int64_t stride, int64_t tile1, KOffset k_offset,
                          const int8_t* b0, int64_t b_block_bytes, int64_t kblocks,
                          OnStep on_step) {
  const int8_t* b1 = b0 + b_block_bytes;
  _tile_zero(0);
  if (kTwoCols) _tile_zero(1);
  if (kTwoRows) _tile_zero(2);
  if (kTwoRows && kTwoCols) _tile_zero(3);
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const uint8_t* ak = a + k_offset(kb);
    on_step();
    _tile_loadd(4, ak, stride);
    _tile_loadd(6, b0 + kb * kTileBytes, kTileRowBytes);
    _tile_dpbusd(0, 4, 6);
    if (kTwoCols) {
      _tile_loadd(7, b1 + kb * kTileBytes, kTileRowBytes);
      _tile_dpbusd(1, 4, 7);
    }
    if (kTwoRows) {
      _tile_loadd(5, ak + tile1, stride);
      _tile_dpbusd(2, 5, 6);
      if (kTwoCols) _tile_dpbusd(3, 5, 7);
    }
  }
}

// acc (32 x 32 int32, row stride 32) = the tiles written by compute_block<kTwoRows, kTwoCols>.
template <bool kTwoRows, bool kTwoCols>
inline void store_block(int32_t* acc) {
  constexpr int kLdAccBytes = kBlockN * sizeof(int32_t);
  _tile_stored(0, acc, kLdAccBytes);
  if (kTwoCols) _tile_stored(1, acc + kPackN, kLdAccBytes);
  if (kTwoRows) _tile_stored(2, acc + kTileRows * kBlockN, kLdAccBytes);
  if (kTwoRows && kTwoCols) _tile_stored(3, acc + kTileRows * kBlockN + kPackN, kLdAccBytes);
}

// compute_block + store_block with the 2 x 2 grid trimmed at run time to the rows / columns that
// hold anything (two_rows: more than 16 rows; two_cols: more than 16 columns).
template <typename KOffset, typename OnStep>
inline void compute_block(bool two_rows, bool two_cols, const uint8_t* a, int64_t stride,
                          int64_t tile1, KOffset k_offset, const int8_t* b0, int64_t b_block_bytes,
                          int64_t kblocks, OnStep on_step) {
  if (two_rows && two_cols) {
    compute_block<true, true>(a, stride, tile1, k_offset, b0, b_block_bytes, kblocks, on_step);
  } else if (two_rows) {
    compute_block<true, false>(a, stride, tile1, k_offset, b0, b_block_bytes, kblocks, on_step);
  } else if (two_cols) {
    compute_block<false, true>(a, stride, tile1, k_offset, b0, b_block_bytes, kblocks, on_step);
  } else {
    compute_block<false, false>(a, stride, tile1, k_offset, b0, b_block_bytes, kblocks, on_step);
  }
}
inline void store_block(bool two_rows, bool two_cols, int32_t* acc) {
  if (two_rows && two_cols) {
    store_block<true, true>(acc);
  } else if (two_rows) {
    store_block<true, false>(acc);
  } else if (two_cols) {
    store_block<false, true>(acc);
  } else {
    store_block<false, false>(acc);
  }
}

// The epilogue for columns [n0, ...): every per-column array offset by n0.
static_assert(sizeof(RequantEpilogue) == 48 && sizeof(FloatEpilogue) == 40,
              "the epilogue structs changed: shift_columns must offset any new per-column array");
inline RequantEpilogue shift_columns(const RequantEpilogue& ep, int64_t n0) {
  RequantEpilogue out = ep;
  out.row_sums += n0;
  if (out.bias) out.bias += n0;
  out.multiplier += n0;
  return out;
}
inline FloatEpilogue shift_columns(const FloatEpilogue& ep, int64_t n0) {
  FloatEpilogue out = ep;
  out.row_sums += n0;
  if (out.bias) out.bias += n0;
  out.scale += n0;
  return out;
}

}  // namespace qext::kernels::detail::amx
