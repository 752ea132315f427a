// AMX path of the implicit-GEMM convolution (qconv.h: conv2d_implicit_u8s8). Compiled with the
// AVX-512 and AMX flags (CMakeLists.txt); reached only when isa_supported(Isa::kAmx).
//
// One call sets up the epilogue panels (one per 32-column stripe of the weight), the k-block
// offsets and the tiles once, then runs its output rows in pieces (ImplicitConv::run_piece): copy
// the piece's padded input rows into the per-thread buffer (and, for small kernel_w * C, gather
// each virtual pixel's whole patch: see Rows), then for each stripe (kept in L1) run the 32-row
// blocks of virtual pixels through the tile unit (amx_tiles.h), each block's sums stored to one of
// two scratch blocks; the AVX-512 epilogue (epilogue_avx512.h) of a block runs in slices between
// the next block's tile instructions, and writes only the pixels with ow < out_w. Between the
// tile instructions the next piece's input rows are prefetched too.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "qext/kernels/amx_tiles.h"
#include "qext/kernels/epilogue_avx512.h"
#include "qext/kernels/qconv_isa.h"

namespace qext::kernels::detail {
namespace {

using namespace amx;  // NOLINT(google-build-using-namespace): the shared tile helpers

// How the A tiles find the rows of virtual pixels (one row per pixel, `stride` bytes apart).
enum class Rows {
  kInPlace,  // straight from the padded rows, in x itself or the copy (stride C). With C % 64 != 0
             // many rows straddle cache lines; aligned copies of them were measured slower.
  kPatches,  // each pixel's whole (kh, kw, c) patch gathered (stride packed_k(group_k)): at most
             // half the k blocks of padded kernel rows (small kernel_w * C)
};

// Sizes of the per-thread buffer regions for a piece of `out_rows` output rows.
struct PieceLayout {
  int64_t rows;        // virtual pixels v in [0, rows): the last one is the last real output pixel
  int64_t blocks;      // 32-pixel blocks covering them
  int64_t in_rows;     // padded input rows the piece reads
  int64_t data_bytes;  // bytes of those rows
  int64_t padded_bytes;  // bytes read from the padded rows (a copy is zeroed past the data)
  int64_t gathered_bytes;

  PieceLayout(const Conv2dGeometry& g, Rows mode, int64_t K, int64_t out_rows) {
    const int64_t Wp = g.in_w + 2 * g.pad_w, C = g.in_channels;
    const int64_t halo = (g.kernel_h - 1) * g.dilation_h;  // extra input rows below the outputs
    rows = (out_rows - 1) * Wp + g.out_w;
    blocks = (rows + kBlockM - 1) / kBlockM;
    in_rows = out_rows + halo;
    data_bytes = in_rows * Wp * C;
    // Pixels whose spans can be read: blocks * 32 virtual pixels and the kernel rows below them;
    // the padded input is read up to the last span of those pixels.
    const int64_t pixels = blocks * kBlockM + halo * Wp;
    padded_bytes = std::max(data_bytes, (pixels - 1) * C + conv_span_bytes(g));
    // Gathered patches; a patch's last copy may run up to span bytes past its slot.
    gathered_bytes = mode == Rows::kPatches ? blocks * kBlockM * K + conv_span_bytes(g) : 0;
  }
};

// One call: the per-column epilogue panels, the k-block offsets and the tile configuration are set
// up once, then each piece of output rows runs through run_piece.
template <typename Panel, typename Epilogue, typename Out>
class ImplicitConv {
 public:
  ImplicitConv(const uint8_t* x, const Conv2dGeometry& g, const int8_t* weight, const Epilogue& ep,
               int64_t piece_rows, uint8_t pad_value, uint8_t flip, Out* y)
      : x_(x),
        g_(g),
        weight_(weight),
        flip_(flip),
        pad_(pad_value ^ flip),
        Wp_(g.in_w + 2 * g.pad_w),
        K_(conv_implicit_k(g)),
        kblocks_(K_ / kTileRowBytes),
        mode_(conv_implicit_gathers_patches(g) ? Rows::kPatches : Rows::kInPlace),
        stride_(mode_ == Rows::kInPlace ? g.in_channels : K_),
        largest_(g, mode_, K_, piece_rows),
        next_input_(x, g.in_w * g.in_channels, g.in_w * g.in_channels) {
    const int64_t OC = g.out_channels;
    for (int64_t n0 = 0; n0 < OC; n0 += kBlockN) {
      panels_.emplace_back(ep, n0, OC, OC - n0 > kPackN ? 2 : 1, y + n0, OC);
    }
    // Offset of k block kb from a pixel's row: kernel row kh = kb / span_blocks, 64-byte piece j
    // of its span (kInPlace), or simply the kb-th piece of the patch.
    const int64_t span_blocks = conv_span_bytes(g) / kTileRowBytes;
    k_offsets_.resize(static_cast<size_t>(kblocks_));
    for (int64_t kb = 0; kb < kblocks_; ++kb) {
      k_offsets_[kb] = mode_ == Rows::kPatches ? kb * kTileRowBytes
                                               : (kb / span_blocks) * g.dilation_h * Wp_ * stride_ +
                                                     (kb % span_blocks) * kTileRowBytes;
    }
    uint8_t* const work = work_buffer(
        static_cast<size_t>(kScratchBytes + largest_.gathered_bytes + largest_.padded_bytes));
    scratch_[0] = reinterpret_cast<int32_t*>(work);
    scratch_[1] = scratch_[0] + kBlockM * kBlockN;
    gathered_ = work + kScratchBytes;  // 64-byte aligned: kScratchBytes is 8 KiB
    xp_ = gathered_ + largest_.gathered_bytes;
    configure_tiles();
  }
  ~ImplicitConv() { _tile_release(); }
  ImplicitConv(const ImplicitConv&) = delete;
  ImplicitConv& operator=(const ImplicitConv&) = delete;

  // Output rows [oh0, oh1) of image n (at most piece_rows of them); rows [prefetch_begin,
  // prefetch_end) of x (n * in_h + ih) are prefetched meanwhile, for the next piece: its copy or
  // its tile loads then find them in cache (in-process A/B on 8 x 64 x 56 x 56 -> 64, 3x3: 7-9%
  // faster).
  void run_piece(int64_t n, int64_t oh0, int64_t oh1, int64_t prefetch_begin,
                 int64_t prefetch_end) {
    const PieceLayout piece(g_, mode_, K_, oh1 - oh0);
    const uint8_t* const padded = padded_rows(n, oh0, piece);
    if (mode_ == Rows::kPatches) gather_patches(padded, piece);
    const uint8_t* const a = mode_ == Rows::kInPlace ? padded : gathered_;
    const int64_t* const koff = k_offsets_.data();
    const int64_t K = K_, kblocks = kblocks_, stride = stride_, rows = piece.rows;
    const int64_t b_block_bytes = static_cast<int64_t>(packed_block_offset(kPackN, K));

    // Epilogue of the virtual pixels [from, to) of the block at v0 whose sums are in acc, through
    // the stripe's panel (columns [n0, n0 + 32) of output pixel q at y + q * OC): one run per
    // output row.
    auto finish = [&](const Panel& panel, const int32_t* acc, int64_t v0, int64_t from,
                      int64_t to) {
      for (int64_t v = from; v < to;) {
        const int64_t r = v / Wp_, ow = v % Wp_;
        if (ow >= g_.out_w) {
          v = (r + 1) * Wp_;
          continue;
        }
        const int64_t run = std::min(to, r * Wp_ + g_.out_w) - v;
        const int64_t pixel = (n * g_.out_h + oh0 + r) * g_.out_w + ow;
        panel.store_rows(pixel, run, acc + (v - v0) * kBlockN, kBlockN);
        v += run;
      }
    };

    // Rows of the previous block's epilogue done per k block: interleaved with the tile
    // instructions in program order, so that the core's work overlaps the tile unit's. Even, for
    // the panels' two-row stores.
    const int64_t rows_per_step = (kBlockM + 2 * kblocks - 1) / (2 * kblocks) * 2;
    next_input_.start(prefetch_begin, prefetch_end,
                      piece.blocks * kblocks * static_cast<int64_t>(panels_.size()));
    for (size_t stripe = 0; stripe < panels_.size(); ++stripe) {
      const int64_t n0 = static_cast<int64_t>(stripe) * kBlockN;
      const bool two_cols = g_.out_channels - n0 > kPackN;
      const Panel& panel = panels_[stripe];
      const int8_t* b0 = weight_ + packed_block_offset(n0, K);
      for (int64_t i = 0; i < piece.blocks; ++i) {
        const int64_t v0 = i * kBlockM, count = std::min(kBlockM, rows - v0);
        const bool two_rows = count > kTileRows;
        const int32_t* prev = scratch_[(i - 1) & 1];
        const int64_t prev_v0 = v0 - kBlockM;
        int64_t done = i > 0 ? prev_v0 : v0;  // the previous block's pixels finished so far
        compute_block(
            two_rows, two_cols, a + v0 * stride, stride, kTileRows * stride,
            [koff](int64_t kb) { return koff[kb]; }, b0, b_block_bytes, kblocks,
            [&] {
              next_input_.step();
              if (done >= v0) return;
              const int64_t to = std::min(v0, done + rows_per_step);
              finish(panel, prev, prev_v0, done, to);
              done = to;
            });
        if (done < v0) finish(panel, prev, prev_v0, done, v0);
        store_block(two_rows, two_cols, scratch_[i & 1]);
      }
      const int64_t last = piece.blocks - 1;
      finish(panel, scratch_[last & 1], last * kBlockM, last * kBlockM, rows);
    }
  }

 private:
  static constexpr int64_t kScratchBytes = 2 * kBlockM * kBlockN * sizeof(int32_t);

  // The piece's padded rows: padded row r is input row oh0 + r - pad_h (pad_value outside the
  // image); the bytes past the rows only ever meet zero weights or dropped pixels. Read in x itself
  // when nothing pads or flips them and the reads stay inside x (bytes past the rows: later rows of
  // x); else copied to the buffer (bytes past the rows zeroed: no stale data read).
  const uint8_t* padded_rows(int64_t n, int64_t oh0, const PieceLayout& piece) {
    const int64_t C = g_.in_channels, row_bytes = g_.in_w * C, side = g_.pad_w * C;
    const int64_t start = (n * g_.in_h + oh0) * row_bytes;
    if (g_.pad_h == 0 && g_.pad_w == 0 && flip_ == 0 &&
        start + piece.padded_bytes <= g_.batch * g_.in_h * row_bytes) {
      return x_ + start;
    }
    for (int64_t r = 0; r < piece.in_rows; ++r) {
      uint8_t* dst = xp_ + r * Wp_ * C;
      const int64_t ih = oh0 + r - g_.pad_h;
      if (ih < 0 || ih >= g_.in_h) {
        std::memset(dst, pad_, static_cast<size_t>(Wp_ * C));
        continue;
      }
      std::memset(dst, pad_, static_cast<size_t>(side));
      copy_flip(dst + side, x_ + (n * g_.in_h + ih) * row_bytes, row_bytes, flip_);
      std::memset(dst + side + row_bytes, pad_, static_cast<size_t>(side));
    }
    std::memset(xp_ + piece.data_bytes, 0,
                static_cast<size_t>(piece.padded_bytes - piece.data_bytes));
    return xp_;
  }

  void gather_patches(const uint8_t* padded, const PieceLayout& piece) {
    // Each kernel row copies its row_taps bytes rounded up to 16 (at most span: the bytes past
    // row_taps are overwritten by the next kernel row or meet zero weights), not the whole span: a
    // first layer's 3-byte rows would cost a 64-byte copy each.
    const int64_t row_taps = g_.kernel_w * g_.in_channels;
    const int64_t copy_bytes = (row_taps + 15) / 16 * 16;
    auto copy_row = [copy_bytes](uint8_t* dst, const uint8_t* src) {
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
    // Locals: the byte stores could alias the members, which would reload them in the loop.
    const int64_t C = g_.in_channels, K = K_, kernel_h = g_.kernel_h;
    const int64_t row_step = g_.dilation_h * Wp_ * C, pixels = piece.blocks * kBlockM;
    uint8_t* const gathered = gathered_;
    auto gather = [&](auto copy) {
      for (int64_t v = 0; v < pixels; ++v) {
        const uint8_t* src = padded + v * C;
        uint8_t* dst = gathered + v * K;
        for (int64_t kh = 0; kh < kernel_h; ++kh) copy(dst + kh * row_taps, src + kh * row_step);
      }
    };
    if (C == 1 && kernel_h <= 4 && kernel_h * row_taps <= 16 && row_taps <= 13) {
      gather_one_channel(padded, row_taps, row_step, pixels);
    } else if (copy_bytes == 16) {  // first layers (C <= 5 for 3x3): one branch-free copy per row
      gather([](uint8_t* dst, const uint8_t* src) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      });
    } else {
      gather(copy_row);
    }
  }

  // gather_patches for one input channel and patches of at most 16 bytes (a grayscale first layer,
  // 3x3: 9 bytes), 4 pixels per step: 16-byte lane kh of `rows` holds kernel row kh from pixel v
  // on (row_taps + 3 <= 16 bytes needed), and one byte permute puts pixel v + p's patch in lane p:
  // one store per pixel instead of one 16-byte copy per kernel row (the Fashion-MNIST CNN's conv1
  // was 8-11% faster in an in-process A/B).
  void gather_one_channel(const uint8_t* padded, int64_t row_taps, int64_t row_step,
                          int64_t pixels) {
    const int64_t K = K_, kernel_h = g_.kernel_h;
    alignas(64) uint8_t index[64];
    for (int p = 0; p < 4; ++p) {
      for (int b = 0; b < 16; ++b) {
        const auto kh = b / row_taps, j = b % row_taps;  // bytes past the patch: don't care
        index[p * 16 + b] = static_cast<uint8_t>(kh < kernel_h ? kh * 16 + p + j : 0);
      }
    }
    const __m512i permute = _mm512_load_si512(index);
    uint8_t* const gathered = gathered_;
    for (int64_t v = 0; v < pixels; v += 4) {  // pixels: a multiple of 32
      const uint8_t* src = padded + v;
      __m512i rows = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      for (int64_t kh = 1; kh < kernel_h; ++kh) {
        rows = _mm512_mask_broadcast_i32x4(
            rows, static_cast<__mmask16>(0xF << (4 * kh)),
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + kh * row_step)));
      }
      const __m512i patches = _mm512_permutexvar_epi8(permute, rows);
      uint8_t* dst = gathered + v * K;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_castsi512_si128(patches));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + K), _mm512_extracti32x4_epi32(patches, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * K),
                       _mm512_extracti32x4_epi32(patches, 2));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 3 * K),
                       _mm512_extracti32x4_epi32(patches, 3));
    }
  }

  const uint8_t* x_;
  const Conv2dGeometry& g_;
  const int8_t* weight_;
  uint8_t flip_, pad_;
  int64_t Wp_, K_, kblocks_;
  Rows mode_;
  int64_t stride_;  // bytes between the A rows of consecutive virtual pixels
  PieceLayout largest_;
  std::vector<Panel> panels_;  // one per 32-column stripe
  std::vector<int64_t> k_offsets_;
  RowPrefetcher next_input_;  // rows of x, in_w * C bytes each
  int32_t* scratch_[2];       // the int32 sums of two blocks
  uint8_t* gathered_;
  uint8_t* xp_;  // the padded input rows
};

template <typename Panel, typename Epilogue, typename Out>
void conv2d_implicit_impl(const uint8_t* x, const Conv2dGeometry& g, const int8_t* weight,
                          const Epilogue& ep, int64_t row_begin, int64_t row_end,
                          int64_t piece_rows, uint8_t pad_value, uint8_t flip, Out* y) {
  piece_rows = std::min(piece_rows, g.out_h);
  ImplicitConv<Panel, Epilogue, Out> conv(x, g, weight, ep, piece_rows, pad_value, flip, y);
  struct Piece {
    int64_t n, oh0, oh1;
  };
  auto piece_at = [&](int64_t r) {
    const int64_t n = r / g.out_h, oh0 = r % g.out_h;
    return Piece{n, oh0, std::min({g.out_h, oh0 + piece_rows, oh0 + (row_end - r)})};
  };
  // Rows of x (n * in_h + ih) that a piece reads, [first, second).
  const int64_t halo = (g.kernel_h - 1) * g.dilation_h;
  auto input_rows = [&](const Piece& p) {
    const int64_t lo = std::clamp<int64_t>(p.oh0 - g.pad_h, 0, g.in_h);
    const int64_t hi = std::clamp<int64_t>(p.oh1 + halo - g.pad_h, lo, g.in_h);
    return std::pair<int64_t, int64_t>{p.n * g.in_h + lo, p.n * g.in_h + hi};
  };
  for (int64_t r = row_begin; r < row_end;) {
    const Piece piece = piece_at(r);
    r += piece.oh1 - piece.oh0;
    // The next piece's input rows that this one does not read are prefetched during its tile work.
    std::pair<int64_t, int64_t> next{0, 0};
    if (r < row_end) {
      next = input_rows(piece_at(r));
      next.first = std::max(next.first, input_rows(piece).second);
    }
    conv.run_piece(piece.n, piece.oh0, piece.oh1, next.first, next.second);
  }
}

}  // namespace

void conv2d_implicit_amx(const uint8_t* x, const Conv2dGeometry& g, const int8_t* weight,
                         const RequantEpilogue& ep, int64_t row_begin, int64_t row_end,
                         int64_t piece_rows, uint8_t pad_value, uint8_t flip, uint8_t* y) {
  conv2d_implicit_impl<avx512::RequantPanel>(x, g, weight, ep, row_begin, row_end, piece_rows,
                                             pad_value, flip, y);
}

void conv2d_implicit_amx(const uint8_t* x, const Conv2dGeometry& g, const int8_t* weight,
                         const FloatEpilogue& ep, int64_t row_begin, int64_t row_end,
                         int64_t piece_rows, uint8_t pad_value, uint8_t flip, float* y) {
  conv2d_implicit_impl<avx512::FloatPanel>(x, g, weight, ep, row_begin, row_end, piece_rows,
                                           pad_value, flip, y);
}

}  // namespace qext::kernels::detail
