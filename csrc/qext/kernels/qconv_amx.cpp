// AMX path of the implicit-GEMM convolution (qconv.h: conv2d_implicit_u8s8). Compiled with the
// AVX-512 and AMX flags (CMakeLists.txt); reached only when isa_supported(Isa::kAmx).
//
// One call: copy the padded input rows into the per-thread buffer (and, unless they can be read in
// place, gather each virtual pixel's row of A: see Rows), then for each 32-column stripe
// of the weight (kept in L1) run the 32-row blocks of virtual pixels through the tile unit
// (amx_tiles.h), each block's sums stored to one of two scratch blocks; the AVX-512 epilogue
// (epilogue_avx512.h, set up once per stripe) of a block runs in slices between the next block's
// tile instructions, and writes only the pixels with ow < out_w.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qext/kernels/amx_tiles.h"
#include "qext/kernels/epilogue_avx512.h"
#include "qext/kernels/qconv_isa.h"

namespace qext::kernels::detail {
namespace {

using namespace amx;  // NOLINT(google-build-using-namespace): the shared tile helpers

// How the A tiles find the rows of virtual pixels (one row per pixel, `stride` bytes apart).
enum class Rows {
  kPadded,   // straight from the padded input (stride C, C a multiple of 64)
  kSpans,    // each pixel's kernel-row span copied to a 64-byte aligned slot (stride span):
             // with C % 64 != 0 most rows read in place would straddle cache lines (slow loads)
  kPatches,  // each pixel's whole (kh, kw, c) patch gathered (stride packed_k(group_k)): fewer k
             // blocks than padded kernel rows (small kernel_w * C)
};

template <typename Panel, typename Epilogue, typename Out>
void conv2d_implicit_impl(const uint8_t* x, const Conv2dGeometry& g, const int8_t* weight,
                          const Epilogue& ep, int64_t n, int64_t oh0, int64_t oh1,
                          uint8_t pad_value, uint8_t flip, Out* y) {
  const int64_t C = g.in_channels, OC = g.out_channels;
  const int64_t Wp = g.in_w + 2 * g.pad_w;
  const int64_t halo = (g.kernel_h - 1) * g.dilation_h;  // extra input rows below the outputs
  const int64_t in_rows = (oh1 - oh0) + halo;
  const int64_t row_taps = g.kernel_w * C;  // bytes of one kernel row of a patch
  const int64_t span = conv_span_bytes(g), span_blocks = span / kTileRowBytes;
  const int64_t K = conv_implicit_k(g), kblocks = K / kTileRowBytes;
  const Rows mode = conv_implicit_gathers_patches(g) ? Rows::kPatches
                    : C % kTileRowBytes == 0         ? Rows::kPadded
                                                     : Rows::kSpans;
  const int64_t stride = mode == Rows::kPadded ? C : mode == Rows::kSpans ? span : K;
  // Virtual pixels v in [0, rows): the last one is the last real output pixel.
  const int64_t rows = (oh1 - oh0 - 1) * Wp + g.out_w;
  const int64_t blocks = (rows + kBlockM - 1) / kBlockM;
  // Pixels whose spans can be read: blocks * 32 virtual pixels and the kernel rows below them.
  const int64_t pixels = blocks * kBlockM + halo * Wp;
  const int64_t data_bytes = in_rows * Wp * C;
  // The padded input is read up to the last span of those pixels (zeroed past the data).
  const int64_t padded_bytes = std::max(data_bytes, (pixels - 1) * C + span);
  // Gathered rows; a patch's last 64-byte copy may run up to span bytes past its slot.
  const int64_t gathered_bytes = mode == Rows::kSpans     ? pixels * span
                                 : mode == Rows::kPatches ? blocks * kBlockM * K + span
                                                          : 0;
  const int64_t scratch_bytes = 2 * kBlockM * kBlockN * static_cast<int64_t>(sizeof(int32_t));

  uint8_t* const work =
      work_buffer(static_cast<size_t>(scratch_bytes + gathered_bytes + padded_bytes));
  int32_t* const scratch[2] = {reinterpret_cast<int32_t*>(work),
                               reinterpret_cast<int32_t*>(work) + kBlockM * kBlockN};
  uint8_t* const gathered = work + scratch_bytes;  // 64-byte aligned: scratch_bytes is 8 KiB
  uint8_t* const xp = gathered + gathered_bytes;

  // Padded rows: padded row r is input row oh0 + r - pad_h (pad_value outside the image); bytes
  // past the rows only ever meet zero weights or dropped pixels (zeroed: no stale data read).
  const uint8_t pad = pad_value ^ flip;
  const int64_t row_bytes = g.in_w * C, side = g.pad_w * C;
  for (int64_t r = 0; r < in_rows; ++r) {
    uint8_t* dst = xp + r * Wp * C;
    const int64_t ih = oh0 + r - g.pad_h;
    if (ih < 0 || ih >= g.in_h) {
      std::memset(dst, pad, static_cast<size_t>(Wp * C));
      continue;
    }
    std::memset(dst, pad, static_cast<size_t>(side));
    copy_flip(dst + side, x + (n * g.in_h + ih) * row_bytes, row_bytes, flip);
    std::memset(dst + side + row_bytes, pad, static_cast<size_t>(side));
  }
  std::memset(xp + data_bytes, 0, static_cast<size_t>(padded_bytes - data_bytes));
  // Copies the kernel row of the pixel at src to dst: its row_taps bytes rounded up to 16 (at most
  // span; the bytes past row_taps meet zero weights or are overwritten by the next kernel row of a
  // patch). Not the whole span: a first layer's 3-byte rows would cost a 64-byte copy each.
  const int64_t copy_bytes = (row_taps + 15) / 16 * 16;
  auto copy_span = [copy_bytes](uint8_t* dst, const uint8_t* src) {
    int64_t b = 0;
    for (; b + 64 <= copy_bytes; b += 64) {
      _mm512_storeu_si512(dst + b, _mm512_loadu_si512(src + b));
    }
    if (b + 32 <= copy_bytes) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + b),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + b)));
      b += 32;
    }
    if (b < copy_bytes) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + b),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + b)));
    }
  };
  if (mode == Rows::kSpans) {
    for (int64_t p = 0; p < pixels; ++p) copy_span(gathered + p * span, xp + p * C);
  } else if (mode == Rows::kPatches) {
    // Locals: the byte stores could alias g, which would reload it in the loop.
    const int64_t kernel_h = g.kernel_h, row_step = g.dilation_h * Wp * C;
    auto gather = [&](auto copy) {
      for (int64_t v = 0; v < blocks * kBlockM; ++v) {
        const uint8_t* src = xp + v * C;
        uint8_t* dst = gathered + v * K;
        for (int64_t kh = 0; kh < kernel_h; ++kh) copy(dst + kh * row_taps, src + kh * row_step);
      }
    };
    if (copy_bytes == 16) {  // first layers (C <= 5 for 3x3): one branch-free copy per kernel row
      gather([](uint8_t* dst, const uint8_t* src) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      });
    } else {
      gather(copy_span);
    }
  }
  const uint8_t* const a = mode == Rows::kPadded ? xp : gathered;

  // Offset of k block kb from a pixel's row: kernel row kh = kb / span_blocks, 64-byte piece j of
  // its span (kPadded, kSpans), or simply the kb-th piece of the patch.
  std::vector<int64_t> k_offsets(static_cast<size_t>(kblocks));
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    k_offsets[kb] = mode == Rows::kPatches ? kb * kTileRowBytes
                                           : (kb / span_blocks) * g.dilation_h * Wp * stride +
                                                 (kb % span_blocks) * kTileRowBytes;
  }
  const int64_t* const koff = k_offsets.data();
  const int64_t b_block_bytes = static_cast<int64_t>(packed_block_offset(kPackN, K));

  // Epilogue of the virtual pixels [from, to) of the block at v0 whose sums are in acc, through the
  // stripe's panel (columns [n0, n0 + 32) of output pixel q at y + q * OC): one run per output row.
  auto finish = [&](const Panel& panel, int nb, const int32_t* acc, int64_t v0, int64_t from,
                    int64_t to) {
    for (int64_t v = from; v < to;) {
      const int64_t r = v / Wp, ow = v % Wp;
      if (ow >= g.out_w) {
        v = (r + 1) * Wp;
        continue;
      }
      const int64_t run = std::min(to, r * Wp + g.out_w) - v;
      const int64_t pixel = (n * g.out_h + oh0 + r) * g.out_w + ow;
      for (int j = 0; j < nb; ++j) {
        panel.store_rows(j, pixel, run, acc + (v - v0) * kBlockN + j * kPackN, kBlockN);
      }
      v += run;
    }
  };

  configure_tiles();
  // Rows of the previous block's epilogue done per k block: interleaved with the tile
  // instructions in program order, so that the core's work overlaps the tile unit's.
  const int64_t rows_per_step = (kBlockM + kblocks - 1) / kblocks;
  for (int64_t n0 = 0; n0 < OC; n0 += kBlockN) {
    const int64_t cols = std::min(kBlockN, OC - n0);
    const bool two_cols = cols > kPackN;
    const int nb = two_cols ? 2 : 1;
    const Panel panel(ep, n0, OC, nb, y + n0, OC);
    const int8_t* b0 = weight + packed_block_offset(n0, K);
    for (int64_t i = 0; i < blocks; ++i) {
      const int64_t v0 = i * kBlockM, count = std::min(kBlockM, rows - v0);
      const bool two_rows = count > kTileRows;
      const int32_t* prev = scratch[(i - 1) & 1];
      const int64_t prev_v0 = v0 - kBlockM;
      int64_t done = i > 0 ? prev_v0 : v0;  // the previous block's pixels finished so far
      compute_block(
          two_rows, two_cols, a + v0 * stride, stride, kTileRows * stride,
          [koff](int64_t kb) { return koff[kb]; }, b0, b_block_bytes, kblocks,
          [&] {
            if (done >= v0) return;
            const int64_t to = std::min(v0, done + rows_per_step);
            finish(panel, nb, prev, prev_v0, done, to);
            done = to;
          });
      if (done < v0) finish(panel, nb, prev, prev_v0, done, v0);
      store_block(two_rows, two_cols, scratch[i & 1]);
    }
    const int64_t last = blocks - 1;
    finish(panel, nb, scratch[last & 1], last * kBlockM, last * kBlockM, rows);
  }
  _tile_release();
}

}  // namespace

void conv2d_implicit_amx(const uint8_t* x, const Conv2dGeometry& g, const int8_t* weight,
                         const RequantEpilogue& ep, int64_t n, int64_t oh0, int64_t oh1,
                         uint8_t pad_value, uint8_t flip, uint8_t* y) {
  conv2d_implicit_impl<avx512::RequantPanel>(x, g, weight, ep, n, oh0, oh1, pad_value, flip, y);
}

void conv2d_implicit_amx(const uint8_t* x, const Conv2dGeometry& g, const int8_t* weight,
                         const FloatEpilogue& ep, int64_t n, int64_t oh0, int64_t oh1,
                         uint8_t pad_value, uint8_t flip, float* y) {
  conv2d_implicit_impl<avx512::FloatPanel>(x, g, weight, ep, n, oh0, oh1, pad_value, flip, y);
}

}  // namespace qext::kernels::detail
