// Framework-free pieces of the converted (int8) 2-d convolution. A general convolution is lowered
// to the integer GEMM of qgemm.h: im2col_u8 gathers the input patches of some output positions into
// GEMM rows, conv_weight_to_gemm lays the weight out as the matching GEMM weight (then
// pack_weight). Depthwise convolution has too little reduction per output (kernel_h * kernel_w
// taps) for a GEMM to pay off, so it has its own direct kernel with the same numerics as the
// lowered form.
//
// With AMX, a stride-1 convolution skips im2col altogether (conv2d_implicit_u8s8 below).
//
// Raw pointers in and out, no threads: the caller splits the work (rows, images, output rows) and
// runs the pieces in parallel.
#pragma once

#include <cstdint>
#include <vector>

#include "qext/kernels/qgemm.h"

namespace qext::kernels {

// Shape of one convolution: input [batch][in_channels][in_h][in_w], weight
// [out_channels][in_channels / groups][kernel_h][kernel_w], output
// [batch][out_channels][out_h][out_w]. out_h / out_w are given (the caller computes them the torch
// way) so that every kernel agrees on them.
struct Conv2dGeometry {
  int64_t batch, in_channels, in_h, in_w, out_channels, kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups, out_h, out_w;
  int64_t group_k() const;  // kernel_h * kernel_w * (in_channels / groups): the GEMM's K per group
};

// im2col rows [p0, p0 + rows) for group `group`, p = (n * out_h + oh) * out_w + ow; row r of `out`
// (stride ldo >= group_k()) holds the taps in (kh, kw, c) order (c within the group); a tap outside
// the image is pad_value; every byte is XORed with `flip` (0x80 turns int8 levels into uint8 ones).
// pad_value is given in x's own encoding (the bit pattern of x's zero point), so it is flipped like
// every other byte and the padding stays the real value 0 after the flip.
// (kh, kw, c) order rather than torch's (c, kh, kw): with channels-last input every tap is one
// contiguous run of channels, copied with one memcpy.
// x element (n, c, h, w) is at x[n * s[0] + c * s[1] + h * s[2] + w * s[3]] (NCHW or NHWC alike);
// fast path when s[1] == 1 (channels last: contiguous channel runs, memcpy/xor per tap; whole rows
// of taps at once when the runs of neighbouring kw touch).
void im2col_u8(const uint8_t* x, const int64_t s[4], const Conv2dGeometry& g, int64_t group,
               int64_t p0, int64_t rows, uint8_t pad_value, uint8_t flip, uint8_t* out,
               int64_t ldo);

// Weight [out_channels][in_channels/groups][kernel_h][kernel_w] (int8) -> group `group`'s GEMM
// weight [out_channels/groups][group_k()] in the (kh, kw, c) order of im2col_u8 (row n is the
// output channel group * out_channels / groups + n), ready for pack_weight.
void conv_weight_to_gemm(const int8_t* w, const Conv2dGeometry& g, int64_t group, int8_t* out);

// ---------------------------------------------------------------------------------------------
// Implicit-GEMM convolution (AMX): the GEMM of im2col_u8 + qgemm_u8s8 without the im2col copy.
// The input rows that output rows [oh0, oh1) of image n need are copied once, zero-padded (pad =
// the zero point) and flipped, into a per-thread buffer, padded rows Wp = in_w + 2 pad_w wide.
// At stride 1 the kernel_w taps of kernel row kh of output pixel (oh, ow) are there kernel_w * C
// contiguous bytes at ((v + kh * dilation_h * Wp) * C), v = (oh - oh0) * Wp + ow: a fixed offset
// from the "virtual pixel" v, so A tiles (16 consecutive v) load from the buffer without an
// im2col. The v with ow >= out_w are computed and dropped (out_w / Wp of the tile work is used).
// A strided convolution splits the padded rows into stride_h x stride_w phase planes (rows i with
// i % stride_h = ph, of them the columns q with q % stride_w = pw), ceil(Wp / stride_w) columns
// wide: the taps kw = pw, pw + stride_w, ... of kernel row kh of consecutive output pixels are
// then again contiguous, at a fixed offset from the virtual pixel in plane ((kh * dilation_h) %
// stride_h, pw). Each such run of taps (a segment, below) is padded in the weight to a multiple of
// 64 bytes, so that no 64-byte k block straddles two of them; the A bytes facing the zero weights
// of that padding are real (neighbouring) input levels and contribute nothing. When whole patches
// need at most half as many k blocks (conv_implicit_gathers_patches: small kernel_w * C, e.g. a
// first layer on 1 or 3 channels, or the 7x7 stride-2 stem), each output pixel's (kh, kw, c) patch
// is gathered instead (no dropped pixels) and the weight is the packed GEMM weight itself.
// A grouped convolution (never gathering patches) gives each group its own planes of its
// in_channels / groups channels and runs each group's GEMM on them (everything below is then per
// group: C = in_channels / groups).
// ---------------------------------------------------------------------------------------------

// Whether conv2d_implicit_u8s8 handles g: dilation_w 1 (any stride, dilation_h, padding, groups).
bool conv_implicit_supported(const Conv2dGeometry& g);

// A run of the implicit weight's k axis (without patches): kernel row kh's taps kw = phase, phase
// + stride_w, ... (`taps` of them, C bytes each, in (kw, c) order), then zeros up to
// `bytes`, a multiple of 64. The weight holds the segments of kernel row 0 (phase 0, 1, ..,
// min(stride_w, kernel_w) - 1), then row 1, ...; at stride_w 1 a segment is a whole kernel row.
struct ConvSegment {
  int64_t kh, phase, taps;
  int64_t k0;     // first k of the segment
  int64_t bytes;  // packed_k(taps * C)
};
std::vector<ConvSegment> conv_implicit_segments(const Conv2dGeometry& g);

// Whether whole patches take at most half the k blocks of the segments (one group only). The
// gather costs about as
// much as a few k blocks of tile work per pixel (measured on 3x3 convolutions: with C = 8 .. 96
// channels, 2 .. 14 patch k blocks against 3 .. 15, reading the rows in place was 5-15% faster;
// with C = 1 or 3, 1 against 3, gathering was 25-30% faster).
bool conv_implicit_gathers_patches(const Conv2dGeometry& g);

// The GEMM K of conv2d_implicit_u8s8's weight: packed_k(group_k()) when it gathers patches, else
// the segments' total bytes.
int64_t conv_implicit_k(const Conv2dGeometry& g);

// Virtual pixels per output row (the GEMM rows a piece of output rows takes): out_w when it
// gathers patches, else the planes' width ceil((in_w + 2 pad_w) / stride_w).
int64_t conv_implicit_row_pixels(const Conv2dGeometry& g);

// True when that weight is byte for byte the packed GEMM weight of conv_weight_to_gemm +
// pack_weight (patches, or one segment per kernel row already a multiple of 64 bytes): no
// repacking needed.
bool conv_implicit_weight_is_packed(const Conv2dGeometry& g);

// conv2d_implicit_u8s8's weight from the groups' packed GEMM weights (K = group_k(), one after
// the other, packed_weight_bytes(out_channels / groups, group_k()) bytes apart): each group's taps
// rearranged into the zero-padded segments, or a copy when conv_implicit_weight_is_packed(g). out
// holds groups x packed_weight_bytes(out_channels / groups, conv_implicit_k(g)), group after group.
void pack_conv_weight_implicit(const int8_t* packed, const Conv2dGeometry& g, int8_t* out);

// The tile loads of conv2d_implicit_u8s8 per 32 virtual pixels: on AMX both the implicit
// convolution and its competitors are bound by them (4 per 4 tdpbusd for 32 columns, 3 per 2 for
// 16). Compares a grouped convolution run per group with the block-diagonal dense one.
int64_t conv_implicit_tile_loads(const Conv2dGeometry& g);

// The packed GEMM weight of the one-group convolution equal to the grouped convolution g: output
// channel o (group o / (out_channels / groups)) keeps its weights on its group's input channels and
// is zero on the others (block diagonal), in the (kh, kw, c) order over all in_channels. `grouped`
// holds the groups' packed weights (K = g.group_k()) one after the other,
// packed_weight_bytes(out_channels / groups, g.group_k()) bytes apart; out holds
// packed_weight_bytes(out_channels, kernel_h * kernel_w * in_channels) bytes. The row sums stay
// the groups' ones. With few groups the dense convolution on the implicit path costs less than a
// per-group im2col + GEMM, although it does groups times the multiplies.
void pack_grouped_weight_dense(const int8_t* grouped, const Conv2dGeometry& g, int8_t* out);

// Output rows [row_begin, row_end) of the batch (row r: image r / out_h, output row r % out_h),
// written channels-last y[((n * out_h + oh) * out_w + ow) * out_channels + o], bit-identical to
// im2col_u8 (same pad_value / flip) + qgemm_u8s8 on the packed GEMM weight with the same epilogue.
// x is channels-last: x[((n * in_h + h) * in_w + w) * in_channels + c]. The rows run in pieces of
// at most piece_rows rows within one image, from row_begin on: each piece's padded input rows (and
// patches) are copied once into a per-thread buffer, which piece_rows bounds; the per-column
// epilogue set-up is done once per call. Needs conv_implicit_supported(g) and
// isa_supported(Isa::kAmx) (throws std::invalid_argument otherwise); weight from
// pack_conv_weight_implicit.
void conv2d_implicit_u8s8(const uint8_t* x, const Conv2dGeometry& g, const int8_t* weight,
                          const RequantEpilogue& ep, int64_t row_begin, int64_t row_end,
                          int64_t piece_rows, uint8_t pad_value, uint8_t flip, uint8_t* y);
void conv2d_implicit_u8s8(const uint8_t* x, const Conv2dGeometry& g, const int8_t* weight,
                          const FloatEpilogue& ep, int64_t row_begin, int64_t row_end,
                          int64_t piece_rows, uint8_t pad_value, uint8_t flip, float* y);

// Depthwise convolution (groups == in_channels == out_channels), channels-last uint8 input
// x[((n * in_h + h) * in_w + w) * C + c] (levels already uint8: flip applied by caller if needed),
// weight w_hwc[(kh * kernel_w + kw) * C + c] (int8), output rows [oh0, oh1) of image n written
// channels-last y[((n * out_h + oh) * out_w + ow) * C + c] as requantize(sum over in-image taps of
// (x - ep.a_zero_point) * w + bias[c]) (ep.row_sums is not used; padding contributes 0, i.e.
// exactly what im2col with pad_value = a_zero_point + GEMM gives). isa kScalar = reference; kAvx2
// vectorized over channels; kAvx512Vnni / kAmx vpdpbusd over 4 taps x 64 bytes (64 channels, or 2
// or 4 pixels of layers of at most 32 or 16 channels; padded input rows, the GEMM's AVX-512
// epilogue); all bit-identical. The stored
// byte is the low 8 bits of the requantized level, as in the GEMM's RequantEpilogue (so
// ep.out_zero_point / out_min / out_max are in the output's own uint8 or int8 range).
// The int32 accumulation is exact when kernel_h * kernel_w * 255 * 128 + max |bias| < 2^31 (the
// caller checks it, e.g. with max_exact_k(max |bias|) >= kernel_h * kernel_w).
void depthwise_conv2d_u8s8(Isa isa, const uint8_t* x, const Conv2dGeometry& g, const int8_t* w_hwc,
                           const RequantEpilogue& ep, int64_t n, int64_t oh0, int64_t oh1,
                           uint8_t* y);

// Depthwise weight [C][1][kernel_h][kernel_w] -> the tap-major w_hwc of depthwise_conv2d_u8s8, in
// which one tap's weights for consecutive channels are contiguous (one vector load per tap and
// channel block).
void depthwise_weight_to_hwc(const int8_t* w /*[C][1][kh][kw]*/, const Conv2dGeometry& g,
                             int8_t* w_hwc);

}  // namespace qext::kernels
