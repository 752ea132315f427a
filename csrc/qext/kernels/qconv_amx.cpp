// AMX path of the implicit-GEMM convolution (qconv.h: conv2d_implicit_u8s8). Compiled with the
// AVX-512 and AMX flags (CMakeLists.txt); reached only when isa_supported(Isa::kAmx).
//
// One call sets up the epilogue panels (one per 32-column stripe of the weight), the k-block
// offsets and the tiles once, then runs its output rows in pieces (ImplicitConv::run_piece): copy
// the piece's padded input rows into the per-thread buffer (split into phase planes when strided;
// for small kernel_w * C, each output pixel's whole patch gathered from them: see Rows), then for
// each stripe (kept in L1) run the 32-row blocks of virtual pixels through the tile unit
// (amx_tiles.h), each block's sums stored to one of two scratch blocks; the AVX-512 epilogue
// (epilogue_avx512.h) of a block runs in slices between the next block's tile instructions, and
// writes only the pixels with ow < out_w. Between the tile instructions the next piece's input rows
// are prefetched too.
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
  kPlanes,   // straight from the padded input rows, split by stride into phase planes (stride C):
             // plane (ph, pw) holds the padded rows i = ph (mod stride_h) and, of each, the
             // columns q = pw (mod stride_w), so that the taps of one segment (qconv.h) of
             // consecutive output pixels lie at a fixed offset, C bytes apart. At stride 1 the one
             // plane is the padded rows themselves (read in x itself when nothing pads them). With
             // C % 64 != 0 many rows straddle cache lines; aligned copies of them were measured
             // slower.
  kPatches,  // each pixel's whole (kh, kw, c) patch gathered (stride packed_k(group_k)): at most
             // half the k blocks of the segments (small kernel_w * C, e.g. a first layer); the
             // virtual pixels are the output pixels themselves (row_pixels = out_w)
};

// Sizes of a piece of `out_rows` output rows in the per-thread buffer.
struct PieceLayout {
  int64_t rows;            // virtual pixels v in [0, rows): the last one is the last real pixel
  int64_t blocks;          // 32-pixel blocks covering them
  int64_t in_rows;         // padded input rows the piece reads
  int64_t plane_rows;      // rows of each phase plane
  int64_t data_bytes;      // bytes the input copy writes (up to the last plane's last row)
  int64_t read_bytes;      // bytes the tile loads / the gather read from there (zeroed past data)
  int64_t gathered_bytes;  // kPatches: the gathered patches
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
        groups_(g.groups),
        C_(g.in_channels / g.groups),
        Wp_(g.in_w + 2 * g.pad_w),
        halo_((g.kernel_h - 1) * g.dilation_h),
        K_(conv_implicit_k(g)),
        kblocks_(K_ / kTileRowBytes),
        mode_(conv_implicit_gathers_patches(g) ? Rows::kPatches : Rows::kPlanes),
        phases_h_(mode_ == Rows::kPlanes ? g.stride_h : 1),
        phases_w_(mode_ == Rows::kPlanes ? g.stride_w : 1),
        plane_w_((Wp_ + phases_w_ - 1) / phases_w_),
        row_pixels_(conv_implicit_row_pixels(g)),
        stride_(mode_ == Rows::kPlanes ? C_ : K_),
        next_input_(x, g.in_w * g.in_channels, g.in_w * g.in_channels) {
    const int64_t og = g.out_channels / groups_;
    for (int64_t group = 0; group < groups_; ++group) {
      const int64_t end = (group + 1) * og;
      for (int64_t n0 = group * og; n0 < end; n0 += kBlockN) {
        panels_.emplace_back(ep, n0, end, end - n0 > kPackN ? 2 : 1, y + n0, g.out_channels);
        stripes_.push_back({group, n0 - group * og, end - n0 > kPackN});
      }
    }
    // The planes in use (those of the segments' row and column phases) are numbered in order and
    // lie plane_bytes_ apart, sized for the largest piece, so that the k-block offsets hold for
    // every piece: segment (kh, pw) starts in plane ((kh * dilation_h) % stride_h, pw) at its row
    // (kh * dilation_h) / stride_h; patches simply hold the k blocks in order.
    const int64_t largest_in_rows = (piece_rows - 1) * g.stride_h + halo_ + 1;
    plane_bytes_ = (largest_in_rows + phases_h_ - 1) / phases_h_ * plane_w_ * C_;
    plane_of_.assign(static_cast<size_t>(phases_h_ * phases_w_), -1);
    if (mode_ == Rows::kPatches) {
      plane_of_[0] = planes_++;
      for (int64_t kb = 0; kb < kblocks_; ++kb) k_offsets_.push_back(kb * kTileRowBytes);
    } else {
      const std::vector<ConvSegment> segments = conv_implicit_segments(g);
      auto phase_of = [&](const ConvSegment& s) {
        return (s.kh * g.dilation_h) % phases_h_ * phases_w_ + s.phase;
      };
      for (const ConvSegment& s : segments) plane_of_[phase_of(s)] = 0;
      for (int64_t& plane : plane_of_) plane = plane == 0 ? planes_++ : -1;
      for (const ConvSegment& s : segments) {
        const int64_t base =
            plane_of_[phase_of(s)] * plane_bytes_ + s.kh * g.dilation_h / phases_h_ * plane_w_ * C_;
        for (int64_t b = 0; b < s.bytes; b += kTileRowBytes) k_offsets_.push_back(base + b);
      }
    }
    max_k_offset_ = *std::max_element(k_offsets_.begin(), k_offsets_.end());
    const PieceLayout largest = layout(piece_rows);
    uint8_t* const work = work_buffer(
        static_cast<size_t>(kScratchBytes + largest.gathered_bytes + largest.read_bytes));
    scratch_[0] = reinterpret_cast<int32_t*>(work);
    scratch_[1] = scratch_[0] + kBlockM * kBlockN;
    gathered_ = work + kScratchBytes;  // 64-byte aligned: kScratchBytes is 8 KiB
    xp_ = gathered_ + largest.gathered_bytes;
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
    const PieceLayout piece = layout(oh1 - oh0);
    const uint8_t* const padded = input_planes(n, oh0, piece);
    if (mode_ == Rows::kPatches) gather_patches(padded, oh1 - oh0, piece);
    const uint8_t* const a = mode_ == Rows::kPlanes ? padded : gathered_;
    const int64_t* const koff = k_offsets_.data();
    const int64_t K = K_, kblocks = kblocks_, stride = stride_, rows = piece.rows;
    const int64_t b_block_bytes = static_cast<int64_t>(packed_block_offset(kPackN, K));

    // Epilogue of the virtual pixels [from, to) of the block at v0 whose sums are in acc, through
    // the stripe's panel (columns [n0, n0 + 32) of output pixel q at y + q * OC): one run per
    // output row.
    auto finish = [&](const Panel& panel, const int32_t* acc, int64_t v0, int64_t from,
                      int64_t to) {
      for (int64_t v = from; v < to;) {
        const int64_t r = v / row_pixels_, ow = v % row_pixels_;
        if (ow >= g_.out_w) {
          v = (r + 1) * row_pixels_;
          continue;
        }
        const int64_t run = std::min(to, r * row_pixels_ + g_.out_w) - v;
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
    const auto group_weight_bytes =
        static_cast<int64_t>(packed_weight_bytes(g_.out_channels / groups_, K));
    for (size_t stripe = 0; stripe < panels_.size(); ++stripe) {
      const Panel& panel = panels_[stripe];
      const auto [group, n0, two_cols] = stripes_[stripe];
      const uint8_t* const a_group = a + group * planes_ * plane_bytes_;
      const int8_t* b0 = weight_ + group * group_weight_bytes + packed_block_offset(n0, K);
      for (int64_t i = 0; i < piece.blocks; ++i) {
        const int64_t v0 = i * kBlockM, count = std::min(kBlockM, rows - v0);
        const bool two_rows = count > kTileRows;
        const int32_t* prev = scratch_[(i - 1) & 1];
        const int64_t prev_v0 = v0 - kBlockM;
        int64_t done = i > 0 ? prev_v0 : v0;  // the previous block's pixels finished so far
        compute_block(
            two_rows, two_cols, a_group + v0 * stride, stride, kTileRows * stride,
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

  PieceLayout layout(int64_t out_rows) const {
    PieceLayout p{};
    p.rows = (out_rows - 1) * row_pixels_ + g_.out_w;
    p.blocks = (p.rows + kBlockM - 1) / kBlockM;
    p.in_rows = (out_rows - 1) * g_.stride_h + halo_ + 1;
    p.plane_rows = (p.in_rows + phases_h_ - 1) / phases_h_;
    p.data_bytes = (groups_ * planes_ - 1) * plane_bytes_ + p.plane_rows * plane_w_ * C_;
    if (mode_ == Rows::kPlanes) {
      // The last k block of the last virtual pixel.
      p.read_bytes =
          std::max(p.data_bytes, max_k_offset_ + (p.blocks * kBlockM - 1) * C_ + kTileRowBytes);
    } else {
      // A kernel row's copy reads up to 15 bytes past it, the one-channel gather up to 3 pixels
      // (3 * stride_w <= 12 bytes) past a row's last pixel too.
      p.read_bytes = p.data_bytes + kTileRowBytes;
      // The one-channel gather writes up to 3 patches past the last pixel, a patch's last copy up
      // to 15 bytes past its slot.
      p.gathered_bytes = (p.blocks * kBlockM + 3) * K_ + kTileRowBytes;
    }
    return p;
  }

  // The piece's input: padded row i (input row oh0 * stride_h - pad_h + i, pad_value outside the
  // image; pad_value columns either side) goes to row i / stride_h of the planes (i % stride_h, pw)
  // in use (kPlanes; one plane at stride 1 and for kPatches), each group's channels to its own
  // planes. Read in x itself when nothing pads or flips the rows, they need no splitting and the
  // reads stay inside x (bytes past the rows: later rows of x); else copied to the buffer, and the
  // bytes read past the data zeroed (no stale or uninitialised bytes read: they only ever meet
  // zero weights or dropped pixels).
  const uint8_t* input_planes(int64_t n, int64_t oh0, const PieceLayout& piece) {
    const int64_t row_bytes = g_.in_w * g_.in_channels, first = oh0 * g_.stride_h - g_.pad_h;
    const int64_t start = (n * g_.in_h + first) * row_bytes;
    const bool one_plane = phases_h_ * phases_w_ * groups_ == 1;
    if (g_.pad_h == 0 && g_.pad_w == 0 && flip_ == 0 && one_plane &&
        start + piece.read_bytes <= g_.batch * g_.in_h * row_bytes) {
      return x_ + start;
    }
    const int64_t plane_row_bytes = plane_w_ * C_;
    for (int64_t i = 0; i < piece.in_rows; ++i) {
      const int64_t ih = first + i;
      const uint8_t* src = ih >= 0 && ih < g_.in_h ? x_ + (n * g_.in_h + ih) * row_bytes : nullptr;
      for (int64_t pw = 0; pw < phases_w_; ++pw) {
        const int64_t plane = plane_of_[i % phases_h_ * phases_w_ + pw];
        if (plane < 0) continue;
        uint8_t* dst = xp_ + plane * plane_bytes_ + i / phases_h_ * plane_row_bytes;
        if (src == nullptr) {
          for (int64_t group = 0; group < groups_; ++group) {
            std::memset(dst + group * planes_ * plane_bytes_, pad_,
                        static_cast<size_t>(plane_row_bytes));
          }
        } else if (one_plane) {
          const int64_t side = g_.pad_w * C_;
          std::memset(dst, pad_, static_cast<size_t>(side));
          copy_flip(dst + side, src, row_bytes, flip_);
          std::memset(dst + side + row_bytes, pad_, static_cast<size_t>(side));
        } else {
          copy_plane_rows(dst, src, pw);
        }
      }
    }
    // A short piece leaves a gap after each plane's rows; the bytes past the last one are read too.
    const int64_t plane_data = piece.plane_rows * plane_row_bytes;
    for (int64_t plane = 0; plane + 1 < groups_ * planes_; ++plane) {
      fill_bytes(xp_ + plane * plane_bytes_ + plane_data, 0, plane_bytes_ - plane_data);
    }
    fill_bytes(xp_ + piece.data_bytes, 0, piece.read_bytes - piece.data_bytes);
    return xp_;
  }

  // The plane rows of column phase pw of every group (group 0's at dst, the others planes_ planes
  // apart) from input row src: plane column j is padded column j * stride_w + pw, i.e. input
  // column j * stride_w + pw - pad_w (pad_ outside the row), the group's C_ channels of it. Whole
  // vectors and one masked tail per group and pixel (a copy_flip call per 16-byte group cost as
  // much as the tile work of a 4-group convolution); groups of 16 or 32 channels in 64-byte
  // pixels go 4 or 2 pixels at a time, the 16- or 32-byte lanes transposed so that each store is
  // one group's 64 bytes (8 x 64 x 56 x 56 -> 64 with 4 groups: the per-pixel copies took 22% of
  // the kernel's time; with the transposes 1.17x oneDNN against 1.09x).
  void copy_plane_rows(uint8_t* dst, const uint8_t* src, int64_t pw) const {
    const int64_t C = C_, sw = g_.stride_w, pixel_step = sw * g_.in_channels;
    const int64_t group_step = planes_ * plane_bytes_;
    auto first_at_or_after = [&](int64_t q) {  // first column j with j * sw + pw - pad_w >= q
      return std::clamp<int64_t>((q + g_.pad_w - pw + sw - 1) / sw, 0, plane_w_);
    };
    const int64_t lo = first_at_or_after(0), hi = std::max(lo, first_at_or_after(g_.in_w));
    const int64_t whole = C / kTileRowBytes * kTileRowBytes;
    const __mmask64 tail =
        C % kTileRowBytes == 0 ? 0 : ~__mmask64{0} >> (kTileRowBytes - C % kTileRowBytes);
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(flip_));
    const int64_t lanes = (C == 16 || C == 32) && g_.in_channels % kTileRowBytes == 0
                              ? kTileRowBytes / C
                              : 0;  // pixels per transposed step
    const int64_t transposed_end = lanes == 0 ? lo : lo + (hi - lo) / lanes * lanes;
    for (int64_t j = lo; j < transposed_end; j += lanes) {
      const uint8_t* s = src + (j * sw + pw - g_.pad_w) * g_.in_channels;
      for (int64_t chunk = 0; chunk < g_.in_channels; chunk += kTileRowBytes) {
        auto load = [&](int64_t p) {
          return _mm512_xor_si512(_mm512_loadu_si512(s + p * pixel_step + chunk), flip);
        };
        // out[q]: group chunk / C + q's channels of the `lanes` pixels
        __m512i out[4];
        if (lanes == 2) {
          const __m512i v0 = load(0), v1 = load(1);
          out[0] = _mm512_shuffle_i64x2(v0, v1, 0x44);
          out[1] = _mm512_shuffle_i64x2(v0, v1, 0xEE);
        } else {
          const __m512i v0 = load(0), v1 = load(1), v2 = load(2), v3 = load(3);
          const __m512i t0 = _mm512_shuffle_i64x2(v0, v1, 0x44),
                        t1 = _mm512_shuffle_i64x2(v0, v1, 0xEE);
          const __m512i t2 = _mm512_shuffle_i64x2(v2, v3, 0x44),
                        t3 = _mm512_shuffle_i64x2(v2, v3, 0xEE);
          out[0] = _mm512_shuffle_i64x2(t0, t2, 0x88);
          out[1] = _mm512_shuffle_i64x2(t0, t2, 0xDD);
          out[2] = _mm512_shuffle_i64x2(t1, t3, 0x88);
          out[3] = _mm512_shuffle_i64x2(t1, t3, 0xDD);
        }
        for (int64_t q = 0; q < kTileRowBytes / C; ++q) {
          _mm512_storeu_si512(dst + (chunk / C + q) * group_step + j * C, out[q]);
        }
      }
    }
    for (int64_t group = 0; group < groups_; ++group) {
      uint8_t* d = dst + group * group_step;
      fill_bytes(d, pad_, lo * C);
      const uint8_t* s = src + (transposed_end * sw + pw - g_.pad_w) * g_.in_channels + group * C;
      for (int64_t j = transposed_end; j < hi; ++j, s += pixel_step) {
        uint8_t* p = d + j * C;
        for (int64_t b = 0; b < whole; b += kTileRowBytes) {
          _mm512_storeu_si512(p + b, _mm512_xor_si512(_mm512_loadu_si512(s + b), flip));
        }
        if (tail != 0) {
          _mm512_mask_storeu_epi8(p + whole, tail,
                                  _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, s + whole), flip));
        }
      }
      fill_bytes(d + hi * C, pad_, (plane_w_ - hi) * C);
    }
  }

  // Patch of output pixel v = r * out_w + ow: kernel row kh at padded row r * stride_h + kh *
  // dilation_h, column ow * stride_w (kernel_w * C contiguous bytes). The patches of the pixels
  // past the last, up to the block end, are zeroed.
  void gather_patches(const uint8_t* padded, int64_t out_rows, const PieceLayout& piece) {
    // Each kernel row copies its row_taps bytes rounded up to 16 (the bytes past row_taps are
    // overwritten by the next kernel row or the next patch, or meet zero weights), not more: a
    // first layer's 3-byte rows would cost a 64-byte copy each.
    const int64_t row_taps = g_.kernel_w * C_;
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
    const int64_t C = C_, K = K_, kernel_h = g_.kernel_h, out_w = g_.out_w;
    const int64_t row_step = g_.dilation_h * Wp_ * C, pixel_step = g_.stride_w * C;
    const int64_t out_row_step = g_.stride_h * Wp_ * C;
    uint8_t* const gathered = gathered_;
    auto gather = [&](auto copy) {
      for (int64_t r = 0; r < out_rows; ++r) {
        const uint8_t* src = padded + r * out_row_step;
        uint8_t* dst = gathered + r * out_w * K;
        for (int64_t ow = 0; ow < out_w; ++ow, src += pixel_step, dst += K) {
          for (int64_t kh = 0; kh < kernel_h; ++kh) copy(dst + kh * row_taps, src + kh * row_step);
        }
      }
    };
    if (C == 1 && kernel_h <= 4 && kernel_h * row_taps <= 16 && 3 * g_.stride_w + row_taps <= 16) {
      gather_one_channel(padded, out_rows, row_taps, row_step, out_row_step);
    } else if (copy_bytes == 16) {  // first layers (C <= 5 for 3x3): one branch-free copy per row
      gather([](uint8_t* dst, const uint8_t* src) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      });
    } else {
      gather(copy_row);
    }
    std::memset(gathered + piece.rows * K, 0,
                static_cast<size_t>((piece.blocks * kBlockM - piece.rows) * K));
  }

  // gather_patches for one input channel and patches of at most 16 bytes (a grayscale first layer,
  // 3x3: 9 bytes), 4 pixels per step: 16-byte lane kh of `rows` holds kernel row kh from pixel ow
  // on (3 * stride_w + row_taps <= 16 bytes needed), and one byte permute puts pixel ow + p's patch
  // in lane p: one store per pixel instead of one 16-byte copy per kernel row (the Fashion-MNIST
  // CNN's conv1 was 8-11% faster in an in-process A/B). A row's last step may write up to 3
  // patches past it: the next row's (rewritten next) or past the last pixel.
  void gather_one_channel(const uint8_t* padded, int64_t out_rows, int64_t row_taps,
                          int64_t row_step, int64_t out_row_step) {
    const int64_t K = K_, kernel_h = g_.kernel_h, out_w = g_.out_w, sw = g_.stride_w;
    alignas(64) uint8_t index[64];
    for (int p = 0; p < 4; ++p) {
      for (int b = 0; b < 16; ++b) {
        const auto kh = b / row_taps, j = b % row_taps;  // bytes past the patch: don't care
        index[p * 16 + b] = static_cast<uint8_t>(kh < kernel_h ? kh * 16 + p * sw + j : 0);
      }
    }
    const __m512i permute = _mm512_load_si512(index);
    uint8_t* const gathered = gathered_;
    for (int64_t r = 0; r < out_rows; ++r) {
      for (int64_t ow = 0; ow < out_w; ow += 4) {
        const uint8_t* src = padded + r * out_row_step + ow * sw;
        __m512i rows =
            _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
        for (int64_t kh = 1; kh < kernel_h; ++kh) {
          rows = _mm512_mask_broadcast_i32x4(
              rows, static_cast<__mmask16>(0xF << (4 * kh)),
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + kh * row_step)));
        }
        const __m512i patches = _mm512_permutexvar_epi8(permute, rows);
        uint8_t* dst = gathered + (r * out_w + ow) * K;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_castsi512_si128(patches));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + K),
                         _mm512_extracti32x4_epi32(patches, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * K),
                         _mm512_extracti32x4_epi32(patches, 2));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 3 * K),
                         _mm512_extracti32x4_epi32(patches, 3));
      }
    }
  }

  const uint8_t* x_;
  const Conv2dGeometry& g_;
  const int8_t* weight_;
  uint8_t flip_, pad_;
  int64_t groups_;
  int64_t C_;  // channels of a plane pixel: in_channels / groups
  int64_t Wp_, halo_, K_, kblocks_;
  Rows mode_;
  int64_t phases_h_, phases_w_;  // stride_h, stride_w for kPlanes; 1, 1 for kPatches
  int64_t plane_w_;              // columns of a plane row: ceil(Wp / phases_w)
  int64_t row_pixels_;           // virtual pixels per output row
  int64_t stride_;               // bytes between the A rows of consecutive virtual pixels
  int64_t plane_bytes_ = 0;      // bytes between consecutive planes
  int64_t max_k_offset_ = 0;
  // Plane of phases (ph, pw) at ph * phases_w + pw (-1: unused) within a group's planes_ planes;
  // group gi's planes follow group gi - 1's.
  std::vector<int64_t> plane_of_;
  int64_t planes_ = 0;
  struct Stripe {
    int64_t group, n0;  // n0: first column within the group's og
    bool two_cols;
  };
  std::vector<Panel> panels_;  // one per stripe of up to 32 columns within a group
  std::vector<Stripe> stripes_;
  std::vector<int64_t> k_offsets_;
  RowPrefetcher next_input_;  // rows of x, in_w * C bytes each
  int32_t* scratch_[2];       // the int32 sums of two blocks
  uint8_t* gathered_;
  uint8_t* xp_;  // the input planes
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
    const int64_t lo = std::clamp<int64_t>(p.oh0 * g.stride_h - g.pad_h, 0, g.in_h);
    const int64_t hi =
        std::clamp<int64_t>((p.oh1 - 1) * g.stride_h + halo + 1 - g.pad_h, lo, g.in_h);
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
