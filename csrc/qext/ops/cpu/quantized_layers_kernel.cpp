// CPU kernels of the integer-only layer ops: quantized_linear / quantized_conv2d run the int8 GEMM
// (kernels/qgemm.h; im2col for convolutions, a direct kernel for depthwise ones) on tiles of the
// output in parallel; pack_quantized_weight packs once at convert time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "qext/kernels/qconv.h"
#include "qext/kernels/qelementwise.h"
#include "qext/kernels/qgemm.h"
#include "qext/ops/common/int8_args.h"
#include "qext/ops/cpu/derived_weights.h"

namespace qext::ops {
namespace {

using detail::Int8LayerParams;
namespace k = qext::kernels;

// Raw 8-bit levels of a quantized (or uint8 / int8) tensor.
const uint8_t* levels(const at::Tensor& t) { return static_cast<const uint8_t*>(t.data_ptr()); }
uint8_t* levels(at::Tensor& t) { return static_cast<uint8_t*>(t.data_ptr()); }

bool is_depthwise(int64_t groups, int64_t in_channels, int64_t out_channels) {
  return groups > 1 && groups == in_channels && groups == out_channels;
}

// One task of a tiled GEMM: rows [m0, m0 + rows), columns [n0, n0 + cols).
struct Tile {
  int64_t m0, rows, n0, cols;
};

// Output tiles for M x N: large enough to keep packed weights in cache across rows, and at least
// as many as there are threads.
std::vector<Tile> gemm_tiles(int64_t M, int64_t N) {
  int64_t mb = 128, nb = 256;
  const int64_t threads = at::get_num_threads();
  auto count = [&] { return ((M + mb - 1) / mb) * ((N + nb - 1) / nb); };
  while (count() < threads && (mb > 32 || nb > k::kPackN)) {
    if (mb > 32 && M > mb / 2) {
      mb /= 2;
    } else if (nb > k::kPackN) {
      nb /= 2;
    } else {
      break;
    }
  }
  std::vector<Tile> tiles;
  for (int64_t m0 = 0; m0 < M; m0 += mb) {
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
      tiles.push_back({m0, std::min(mb, M - m0), n0, std::min(nb, N - n0)});
    }
  }
  return tiles;
}

// C rows (M x N at c, row stride ldc) = epilogue(A x W^T) for the columns [n0, n0 + cols) of one
// weight whose packed data starts at packed and whose epilogue arrays start at channel `first`.
void gemm_tile(int64_t rows, int64_t cols, int64_t K, const uint8_t* a, int64_t lda,
               const int8_t* packed, const Int8LayerParams& p, const int32_t* row_sums,
               int64_t first, void* c, int64_t ldc) {
  const k::Isa isa = detail::int8_gemm_isa(rows);
  if (p.output.is_float) {
    k::qgemm_u8s8(isa, rows, cols, K, a, lda, packed, detail::float_epilogue(p, row_sums, first),
                  static_cast<float*>(c), ldc);
  } else {
    k::qgemm_u8s8(isa, rows, cols, K, a, lda, packed, detail::requant_epilogue(p, row_sums, first),
                  static_cast<uint8_t*>(c), ldc);
  }
}

// Byte pointer to element (row, col) of a row-major output of float32 or 8-bit levels.
void* output_at(at::Tensor& y, const Int8LayerParams& p, int64_t row, int64_t col, int64_t ld) {
  const int64_t elem = p.output.is_float ? 4 : 1;
  return static_cast<char*>(y.data_ptr()) + (row * ld + col) * elem;
}

// The bytes of a 4-d tensor from one memory format to the other (torch's own layout copy of a
// quantized tensor moves one byte at a time): each of x's images is a rows x cols byte matrix
// (NCHW: C x H*W; channels-last: H*W x C), transposed into out's, one image per task.
void transpose_images(const at::Tensor& x, int64_t rows, int64_t cols, at::Tensor& out) {
  const uint8_t* src = levels(x);
  uint8_t* dst = levels(out);
  const int64_t image = rows * cols;
  at::parallel_for(0, x.size(0), 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) k::transpose_u8(src + n * image, rows, cols, dst + n * image);
  });
}

// The levels of a 4-d input in channels-last order: the input itself, or for an NCHW one a
// transposed byte copy.
at::Tensor channels_last_levels(const at::Tensor& input) {
  if (input.is_contiguous(at::MemoryFormat::ChannelsLast)) return input;
  if (!input.is_contiguous()) return input.contiguous(at::MemoryFormat::ChannelsLast);
  auto out =
      at::empty(input.sizes(), input.options().dtype(at::kByte), at::MemoryFormat::ChannelsLast);
  transpose_images(input, input.size(1), input.size(2) * input.size(3), out);
  return out;
}

// An 8-bit copy of x's levels with the sign bit flipped (int8 levels -> uint8 levels).
at::Tensor flipped_levels(const at::Tensor& x) {
  auto out = at::empty(x.sizes(), x.options().dtype(at::kByte), x.suggest_memory_format());
  const uint8_t* src = levels(x);
  uint8_t* dst = levels(out);
  at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dst[i] = src[i] ^ 0x80;
  });
  return out;
}

// ------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> pack_quantized_weight_cpu(const at::Tensor& weight,
                                                             int64_t groups) {
  constexpr const char* op = "qext.pack_quantized_weight";
  TORCH_CHECK(weight.scalar_type() == at::kChar, op, ": weight must be int8 levels, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 || weight.dim() == 4, op,
              ": weight must be 2-D [out, in] (linear) or 4-D [out, in / groups, kh, kw] (conv), "
              "got shape ",
              weight.sizes());
  TORCH_CHECK(weight.numel() > 0, op, ": weight is empty (shape ", weight.sizes(), ")");
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  const int64_t out = weight.size(0);
  TORCH_CHECK(out % groups == 0, op, ": out channels (", out, ") not divisible by groups (", groups,
              ")");
  TORCH_CHECK(weight.dim() == 4 || groups == 1, op, ": a linear weight has groups = 1, got ",
              groups);
  const auto w = weight.contiguous();
  auto row_sums = at::empty({out}, w.options().dtype(at::kInt));
  int32_t* sums = row_sums.data_ptr<int32_t>();
  const int8_t* w_p = w.data_ptr<int8_t>();

  if (w.dim() == 2) {
    const int64_t K = w.size(1);
    auto packed = at::empty({static_cast<int64_t>(k::packed_weight_bytes(out, K))},
                            w.options().dtype(at::kChar));
    k::pack_weight(w_p, out, K, K, packed.data_ptr<int8_t>(), sums);
    return {packed, row_sums};
  }
  k::Conv2dGeometry g{};
  g.in_channels = w.size(1) * groups;
  g.out_channels = out;
  g.kernel_h = w.size(2);
  g.kernel_w = w.size(3);
  g.groups = groups;
  if (is_depthwise(groups, g.in_channels, out)) {
    auto packed = at::empty({w.numel()}, w.options().dtype(at::kChar));
    k::depthwise_weight_to_hwc(w_p, g, packed.data_ptr<int8_t>());
    const int64_t taps = g.kernel_h * g.kernel_w;
    for (int64_t c = 0; c < out; ++c) {
      int32_t s = 0;
      for (int64_t t = 0; t < taps; ++t) s += w_p[c * taps + t];
      sums[c] = s;
    }
    return {packed, row_sums};
  }
  const int64_t K = g.group_k(), out_g = out / groups;
  const auto group_bytes = static_cast<int64_t>(k::packed_weight_bytes(out_g, K));
  auto packed = at::empty({group_bytes * groups}, w.options().dtype(at::kChar));
  std::vector<int8_t> gemm_w(out_g * K);
  for (int64_t grp = 0; grp < groups; ++grp) {
    k::conv_weight_to_gemm(w_p, g, grp, gemm_w.data());
    k::pack_weight(gemm_w.data(), out_g, K, K, packed.data_ptr<int8_t>() + grp * group_bytes,
                   sums + grp * out_g);
  }
  return {packed, row_sums};
}

at::Tensor quantized_linear_cpu(const at::Tensor& input, const at::Tensor& packed_weight,
                                const at::Tensor& row_sums, at::IntArrayRef weight_shape,
                                const at::Tensor& weight_scale,
                                const std::optional<at::Tensor>& bias,
                                std::optional<double> output_scale, int64_t output_zero_point,
                                int64_t output_min, int64_t output_max, bool relu) {
  const auto call =
      detail::resolve_linear_call(input, packed_weight, row_sums, weight_shape, weight_scale, bias,
                                  output_scale, output_zero_point, output_min, output_max, relu);
  const auto& p = call.params;
  const auto& out = p.output;
  const int64_t M = call.shape.rows, N = call.shape.out_features, K = call.shape.in_features;
  auto sizes = input.sizes().vec();
  sizes.back() = N;
  auto y = detail::empty_int8_output(sizes, out, input.options());
  if (M == 0) return y;

  auto x = p.input.flip ? flipped_levels(input.contiguous()) : input.contiguous();
  const uint8_t* a = levels(x);
  const int8_t* packed = packed_weight.data_ptr<int8_t>();
  const int32_t* sums = row_sums.data_ptr<int32_t>();
  const auto tiles = gemm_tiles(M, N);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const Tile& tile = tiles[t];
      gemm_tile(tile.rows, tile.cols, K, a + tile.m0 * K, K,
                packed + k::packed_block_offset(tile.n0, K), p, sums, tile.n0,
                output_at(y, p, tile.m0, tile.n0, N), N);
    }
  });
  return y;
}

// Depthwise convolution: a direct kernel over channels-last rows.
void depthwise_cpu(const at::Tensor& input, const k::Conv2dGeometry& g, const int8_t* w_hwc,
                   const Int8LayerParams& p, const int32_t* sums, at::Tensor& y) {
  auto x = channels_last_levels(input);
  if (p.input.flip) x = flipped_levels(x);
  const uint8_t* x_p = levels(x);
  uint8_t* y_p = levels(y);
  const auto ep = detail::requant_epilogue(p, sums, 0);
  const k::Isa isa = detail::int8_gemm_isa(1);
  const int64_t rows = g.batch * g.out_h;
  at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e;) {
      const int64_t n = r / g.out_h, oh0 = r % g.out_h;
      const int64_t oh1 = std::min(g.out_h, oh0 + (e - r));
      k::depthwise_conv2d_u8s8(isa, x_p, g, w_hwc, ep, n, oh0, oh1, y_p);
      r += oh1 - oh0;
    }
  });
}

// Most groups a grouped convolution may have to run as the one-group one (quantized_conv2d_cpu):
// it does groups times the multiplies.
constexpr int64_t kMaxDenseGroups = 32;

// The weight of the implicit kernel for g from the groups' packed weights (pack_quantized_weight):
// itself when it is already in that layout, else the segments padded to 64 bytes (of each group,
// or of the block-diagonal one-group weight), derived once per packed weight (derived_weights.h).
at::Tensor implicit_weight(const at::Tensor& packed, const k::Conv2dGeometry& g,
                           bool block_diagonal) {
  k::Conv2dGeometry run = g;
  if (block_diagonal) run.groups = 1;
  if (!block_diagonal && k::conv_implicit_weight_is_packed(g)) return packed;
  // The packed weight fixes every other input of the layout (channels, kernel, groups).
  const int64_t kind = 2 * g.stride_w + (block_diagonal ? 1 : 0);
  return detail::derived_weight(packed, kind, [&] {
    const int8_t* source = packed.data_ptr<int8_t>();
    at::Tensor dense;
    if (block_diagonal) {
      dense =
          at::empty({static_cast<int64_t>(k::packed_weight_bytes(g.out_channels, run.group_k()))},
                    packed.options());
      k::pack_grouped_weight_dense(source, g, dense.data_ptr<int8_t>());
      if (k::conv_implicit_weight_is_packed(run)) return dense;
      source = dense.data_ptr<int8_t>();
    }
    const auto group_bytes = static_cast<int64_t>(
        k::packed_weight_bytes(run.out_channels / run.groups, k::conv_implicit_k(run)));
    at::Tensor out = at::empty({run.groups * group_bytes}, packed.options());
    k::pack_conv_weight_implicit(source, run, out.data_ptr<int8_t>());
    return out;
  });
}

// Convolution on AMX without im2col (qconv.h): tasks of whole output rows of one image, each about
// kTargetPixels GEMM rows (virtual pixels) so that its padded input rows stay in L2.
// w: the weight in the implicit kernel's layout (implicit_weight).
void implicit_conv_cpu(const at::Tensor& input, const k::Conv2dGeometry& g, const int8_t* w,
                       const Int8LayerParams& p, const int32_t* sums, at::Tensor& y) {
  const auto x = channels_last_levels(input);
  const uint8_t* x_p = levels(x);
  constexpr int64_t kTargetPixels = 512;
  const int64_t row_pixels = k::conv_implicit_row_pixels(g);
  int64_t rows_per_task =
      std::clamp<int64_t>((kTargetPixels + row_pixels - 1) / row_pixels, 1, g.out_h);
  const int64_t threads = at::get_num_threads();
  auto tasks_per_image = [&] { return (g.out_h + rows_per_task - 1) / rows_per_task; };
  while (rows_per_task > 1 && g.batch * tasks_per_image() < threads) {
    rows_per_task = (rows_per_task + 1) / 2;
  }
  // Even tasks: a short last one would still fill whole 32-pixel blocks (24 rows as 20 + 4 run 21
  // blocks on 26-wide rows, as 12 + 12 run 20). Never more tasks than before, none empty.
  rows_per_task = (g.out_h + tasks_per_image() - 1) / tasks_per_image();
  const int64_t per_image = tasks_per_image();
  const auto pad_value = static_cast<uint8_t>(p.input.zero_point ^ p.input.flip);
  // Task t's first output row of the batch; a thread's tasks [b, e) are rows [row(b), row(e)).
  auto row = [&](int64_t t) {
    return t / per_image * g.out_h + std::min(g.out_h, t % per_image * rows_per_task);
  };
  at::parallel_for(0, g.batch * per_image, 1, [&](int64_t b, int64_t e) {
    if (p.output.is_float) {
      k::conv2d_implicit_u8s8(x_p, g, w, detail::float_epilogue(p, sums, 0), row(b), row(e),
                              rows_per_task, pad_value, p.input.flip, y.data_ptr<float>());
    } else {
      k::conv2d_implicit_u8s8(x_p, g, w, detail::requant_epilogue(p, sums, 0), row(b), row(e),
                              rows_per_task, pad_value, p.input.flip, levels(y));
    }
  });
}

// im2col + GEMM: tasks of kRowsPerTask output pixels of one group; packed holds the groups' packed
// weights group_bytes apart.
void im2col_conv_cpu(const at::Tensor& input, const k::Conv2dGeometry& g, const int8_t* packed,
                     int64_t group_bytes, const Int8LayerParams& p, const int32_t* sums,
                     at::Tensor& y) {
  const int64_t groups = g.groups, OC = g.out_channels, K = g.group_k(), OCg = OC / groups;
  const int64_t P = g.batch * g.out_h * g.out_w;  // GEMM rows: output pixels
  // im2col copies runs of channels from a channels-last input (an NCHW one would be gathered byte
  // by byte: one layout copy first is much cheaper).
  const auto x = channels_last_levels(input);
  // A 1x1, stride-1, unpadded convolution of a channels-last uint8 input is a GEMM on the input.
  const bool direct = groups == 1 && g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 &&
                      g.stride_w == 1 && g.pad_h == 0 && g.pad_w == 0 && p.input.flip == 0;
  const uint8_t* x_p = levels(x);
  const int64_t strides[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  constexpr int64_t kRowsPerTask = 128;
  const int64_t chunks = (P + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, chunks * groups, 1, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> cols;
    for (int64_t t = b; t < e; ++t) {
      const int64_t grp = t % groups, p0 = (t / groups) * kRowsPerTask;
      const int64_t rows = std::min(kRowsPerTask, P - p0);
      const uint8_t* a = x_p + p0 * K;
      if (!direct) {
        cols.resize(static_cast<size_t>(rows * K));
        // The pad value is the zero point in x's own encoding (im2col flips it with the rest).
        k::im2col_u8(x_p, strides, g, grp, p0, rows,
                     static_cast<uint8_t>(p.input.zero_point ^ p.input.flip), p.input.flip,
                     cols.data(), K);
        a = cols.data();
      }
      gemm_tile(rows, OCg, K, a, K, packed + grp * group_bytes, p, sums, grp * OCg,
                output_at(y, p, p0, grp * OCg, OC), OC);
    }
  });
}

at::Tensor quantized_conv2d_cpu(const at::Tensor& input, const at::Tensor& packed_weight,
                                const at::Tensor& row_sums, at::IntArrayRef weight_shape,
                                const at::Tensor& weight_scale,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                std::optional<double> output_scale, int64_t output_zero_point,
                                int64_t output_min, int64_t output_max, bool relu) {
  const auto call = detail::resolve_conv2d_call(
      input, packed_weight, row_sums, weight_shape, weight_scale, bias, stride, padding, dilation,
      groups, output_scale, output_zero_point, output_min, output_max, relu);
  const auto& p = call.params;
  const auto& g = call.shape.geometry;
  const int64_t OC = g.out_channels;
  auto y = detail::empty_int8_output({g.batch, OC, g.out_h, g.out_w}, p.output, input.options(),
                                     at::MemoryFormat::ChannelsLast);
  if (g.batch == 0) return y;
  const int8_t* packed = packed_weight.data_ptr<int8_t>();
  const int32_t* sums = row_sums.data_ptr<int32_t>();
  if (call.shape.depthwise) {
    depthwise_cpu(input, g, packed, p, sums, y);
    return y;
  }
  const bool amx = detail::int8_gemm_isa(g.batch * g.out_h * g.out_w) == k::Isa::kAmx;
  // On AMX the implicit GEMM where it applies (dilation_w 1). A grouped convolution runs on it
  // group by group (each group's channels in planes of their own) when that takes fewer tile loads
  // than the one-group convolution with the block-diagonal weight (groups times the multiplies,
  // but whole pixels' channels per A row); on a tie the block-diagonal one, whose epilogue and
  // copies are not per group (8 x 128 x 28 x 28, 32 groups of 4: 0.9 ms against 2.2 ms). Beyond
  // kMaxDenseGroups groups im2col + GEMM per group (against which the block-diagonal weight took
  // 8 x 64 x 56 x 56 -> 64, 3x3 with 16 groups from 34 ms to 2.4-2.8 ms), as everything else.
  k::Conv2dGeometry dense = g;
  dense.groups = 1;
  const bool as_is =
      amx && k::conv_implicit_supported(g) &&
      (groups == 1 || k::conv_implicit_tile_loads(g) < k::conv_implicit_tile_loads(dense));
  const bool block_diagonal =
      amx && groups > 1 && groups <= kMaxDenseGroups && k::conv_implicit_supported(dense);
  if (!as_is && !block_diagonal) {
    im2col_conv_cpu(input, g, packed, call.shape.group_bytes, p, sums, y);
    return y;
  }
  const k::Conv2dGeometry& run = as_is ? g : dense;
  const at::Tensor w = implicit_weight(packed_weight, g, !as_is);
  implicit_conv_cpu(input, run, w.data_ptr<int8_t>(), p, sums, y);
  return y;
}

// The output parameters of add / pooling in the uint8 domain of qelementwise.h (int8 levels + 128)
// and the flip that stores them in the output's own encoding.
struct Uint8Domain {
  int32_t zero_point, min, max;
  uint8_t flip;
};
Uint8Domain uint8_domain(const detail::Int8Output& out) {
  const int32_t shift = out.dtype == at::kQInt8 ? 128 : 0;
  return {out.zero_point + shift, out.min + shift, out.max + shift,
          static_cast<uint8_t>(out.dtype == at::kQInt8 ? 0x80 : 0)};
}

at::Tensor quantized_add_cpu(const at::Tensor& a, const at::Tensor& b, double output_scale,
                             int64_t output_zero_point, int64_t output_min, int64_t output_max,
                             bool relu) {
  constexpr const char* op = "qext.quantized_add";
  const auto in_a = detail::resolve_int8_input(a, op, "a");
  const auto in_b = detail::resolve_int8_input(b, op, "b");
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": a and b must have one shape, got ", a.sizes(), " and ",
              b.sizes());
  const auto out = detail::resolve_int8_output(output_scale, output_zero_point, output_min,
                                               output_max, relu, op);
  const auto dom = uint8_domain(out);
  k::AddParams params{};
  TORCH_CHECK(k::make_add_params(in_a.scale, in_b.scale, out.scale, in_a.zero_point,
                                 in_b.zero_point, dom.zero_point, dom.min, dom.max,
                                 /*relu=*/false, &params),
              op, ": the scale ratios a_scale / output_scale = ", in_a.scale / out.scale,
              " and b_scale / output_scale = ", in_b.scale / out.scale,
              " must lie in [2^-32, 2^30]");
  const auto format = a.suggest_memory_format();
  const auto a_d = a.contiguous(format), b_d = b.contiguous(format);
  auto y = detail::empty_int8_output(a.sizes(), out, a.options(), format);
  const uint8_t* a_p = levels(a_d);
  const uint8_t* b_p = levels(b_d);
  uint8_t* y_p = levels(y);
  at::parallel_for(0, a.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    k::add_u8(a_p + begin, b_p + begin, end - begin, params, y_p + begin, in_a.flip, in_b.flip,
              dom.flip);
  });
  return y;
}

// Runs a pooling plan over every (n, c) plane of a quantized NCHW (or 3-D CHW) input.
at::Tensor run_pool_plan(const at::Tensor& input, const k::AvgPool2dPlan& plan, uint8_t flip,
                         const detail::Int8Output& out) {
  auto sizes = input.sizes().vec();
  sizes[sizes.size() - 2] = plan.out_h;
  sizes[sizes.size() - 1] = plan.out_w;
  auto y = detail::empty_int8_output(sizes, out, input.options());
  const auto x = input.contiguous();
  const int64_t planes = x.numel() / (plan.in_h * plan.in_w);
  const uint8_t* x_p = levels(x);
  uint8_t* y_p = levels(y);
  at::parallel_for(0, planes, 1, [&](int64_t b, int64_t e) {
    k::avg_pool2d_u8(plan, x_p + b * plan.in_h * plan.in_w, e - b, flip,
                     y_p + b * plan.out_h * plan.out_w);
  });
  return y;
}

std::pair<detail::Int8Input, detail::Int8Output> pool_io(const at::Tensor& input,
                                                         double output_scale,
                                                         int64_t output_zero_point,
                                                         int64_t output_min, int64_t output_max,
                                                         k::PoolQuant* quant, const char* op) {
  const auto in = detail::resolve_int8_input(input, op);
  TORCH_CHECK((input.dim() == 3 || input.dim() == 4) && input.size(-1) > 0 && input.size(-2) > 0,
              op, ": input must be 3-D or 4-D with non-empty planes, got shape ", input.sizes());
  const auto out = detail::resolve_int8_output(output_scale, output_zero_point, output_min,
                                               output_max, /*relu=*/false, op);
  const auto dom = uint8_domain(out);
  // The pooling kernel flips bytes on the way in and out alike: in and out share one encoding.
  TORCH_CHECK(in.flip == dom.flip, op, ": input ", input.scalar_type(), " and output ", out.dtype,
              " must be both unsigned or both signed");
  *quant = {in.scale, in.zero_point, out.scale, dom.zero_point, dom.min, dom.max};
  return {in, out};
}

at::Tensor quantized_avg_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                                    bool count_include_pad, std::optional<int64_t> divisor_override,
                                    double output_scale, int64_t output_zero_point,
                                    int64_t output_min, int64_t output_max) {
  constexpr const char* op = "qext.quantized_avg_pool2d";
  k::PoolQuant quant{};
  const auto [in, out] =
      pool_io(input, output_scale, output_zero_point, output_min, output_max, &quant, op);
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": kernel_size, stride and padding must have two values each, got ", kernel_size,
              ", ", stride, ", ", padding);
  TORCH_CHECK(!divisor_override.has_value() || *divisor_override > 0, op,
              ": divisor_override must be > 0, got ", divisor_override.value_or(0));
  const k::AvgPool2dOptions options{
      kernel_size[0], kernel_size[1],    stride[0],
      stride[1],      padding[0],        padding[1],
      ceil_mode,      count_include_pad, divisor_override.value_or(0)};
  k::AvgPool2dPlan plan;
  const char* why = "";
  TORCH_CHECK(k::make_avg_pool2d_plan(input.size(-2), input.size(-1), options, quant, &plan, &why),
              op, ": ", why, " (input ", input.sizes(), ", kernel_size ", kernel_size, ", stride ",
              stride, ", padding ", padding, ")");
  return run_pool_plan(input, plan, in.flip, out);
}

at::Tensor quantized_adaptive_avg_pool2d_cpu(const at::Tensor& input, at::IntArrayRef output_size,
                                             double output_scale, int64_t output_zero_point,
                                             int64_t output_min, int64_t output_max) {
  constexpr const char* op = "qext.quantized_adaptive_avg_pool2d";
  k::PoolQuant quant{};
  const auto [in, out] =
      pool_io(input, output_scale, output_zero_point, output_min, output_max, &quant, op);
  TORCH_CHECK(output_size.size() == 2 && output_size[0] > 0 && output_size[1] > 0, op,
              ": output_size must be two values > 0, got ", output_size);
  k::AvgPool2dPlan plan;
  const char* why = "";
  TORCH_CHECK(k::make_adaptive_avg_pool2d_plan(input.size(-2), input.size(-1), output_size[0],
                                               output_size[1], quant, &plan, &why),
              op, ": ", why);
  return run_pool_plan(input, plan, in.flip, out);
}

// Output bytes per parallel task (at least): pooling is cheap per byte, small tasks cost more to
// hand out than to run.
constexpr int64_t kPoolTaskBytes = 1 << 14;

at::Tensor quantized_max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* op = "qext.quantized_max_pool2d";
  const auto in = detail::resolve_int8_input(input, op);
  TORCH_CHECK(input.dim() == 3 || input.dim() == 4, op,
              ": input must be 3-D [C, H, W] or 4-D [N, C, H, W], got shape ", input.sizes());
  auto two = [&](at::IntArrayRef v, const char* name) {
    TORCH_CHECK(v.size() == 2, op, ": ", name, " must have two values, got ", v);
  };
  two(kernel_size, "kernel_size");
  two(padding, "padding");
  two(dilation, "dilation");
  TORCH_CHECK(stride.empty() || stride.size() == 2, op,
              ": stride must have two values (or none: the kernel_size), got ", stride);
  const at::IntArrayRef step = stride.empty() ? kernel_size : stride;
  const k::MaxPool2dOptions options{kernel_size[0], kernel_size[1], step[0],
                                    step[1],        padding[0],     padding[1],
                                    dilation[0],    dilation[1],    ceil_mode};
  k::MaxPool2dPlan plan;
  const char* why = "";
  TORCH_CHECK(k::make_max_pool2d_plan(input.size(-2), input.size(-1), options, &plan, &why), op,
              ": ", why, "; got kernel_size ", kernel_size, ", stride ", step, ", padding ",
              padding, ", dilation ", dilation, " for an input of shape ", input.sizes());
  auto sizes = input.sizes().vec();
  sizes[sizes.size() - 2] = plan.out_h;
  sizes[sizes.size() - 1] = plan.out_w;
  // Like torch, the output keeps the input's memory format; channels-last (what the converted
  // convolutions write) runs the kernel that maxes whole channel vectors.
  const bool channels_last =
      input.dim() == 4 && input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto x = input.contiguous(format);
  auto y = at::_empty_affine_quantized(sizes, input.options(), input.q_scale(),
                                       input.q_zero_point(), format);
  const uint8_t* x_p = levels(x);
  uint8_t* y_p = levels(y);
  if (channels_last) {
    const int64_t channels = input.size(1);
    const int64_t grain =
        std::max<int64_t>(1, kPoolTaskBytes / std::max<int64_t>(1, plan.out_w * channels));
    at::parallel_for(0, input.size(0) * plan.out_h, grain, [&](int64_t b, int64_t e) {
      k::max_pool2d_nhwc_u8(plan, x_p, channels, b, e, in.flip, y_p);
    });
  } else {
    const int64_t in_plane = plan.in_h * plan.in_w, out_plane = plan.out_h * plan.out_w;
    const int64_t grain = std::max<int64_t>(1, kPoolTaskBytes / out_plane);
    at::parallel_for(0, x.numel() / in_plane, grain, [&](int64_t b, int64_t e) {
      k::max_pool2d_u8(plan, x_p + b * in_plane, e - b, in.flip, y_p + b * out_plane);
    });
  }
  return y;
}

// Whether dimensions [start, end] of t merge into one without a copy: each non-trivial one's
// stride is the next one's stride times its size.
bool mergeable(const at::Tensor& t, int64_t start, int64_t end) {
  int64_t inner_stride = -1, inner_size = 1;
  for (int64_t d = end; d >= start; --d) {
    if (t.size(d) == 1) continue;
    if (inner_stride >= 0 && t.stride(d) != inner_stride * inner_size) return false;
    inner_stride = t.stride(d), inner_size = t.size(d);
  }
  return true;
}

at::Tensor quantized_flatten_cpu(const at::Tensor& input, int64_t start_dim, int64_t end_dim) {
  TORCH_CHECK(input.is_quantized(),
              "qext.quantized_flatten: input must be a quantized tensor, got a ",
              input.scalar_type(), " tensor");
  if (input.dim() == 0) return input.flatten(start_dim, end_dim);
  const int64_t start = at::maybe_wrap_dim(start_dim, input.dim());
  const int64_t end = at::maybe_wrap_dim(end_dim, input.dim());
  const auto dtype = input.scalar_type();
  if (start > end || input.dim() != 4 || input.numel() == 0 || mergeable(input, start, end) ||
      !input.is_contiguous(at::MemoryFormat::ChannelsLast) ||
      input.qscheme() != at::kPerTensorAffine || (dtype != at::kQUInt8 && dtype != at::kQInt8)) {
    return input.flatten(start_dim, end_dim);
  }
  auto y = at::empty_like(input, at::MemoryFormat::Contiguous);  // shares the input's quantizer
  transpose_images(input, input.size(2) * input.size(3), input.size(1), y);
  return y.flatten(start, end);
}

// The layer ops dispatch on their quantized input (QuantizedCPU); registered at CPU too so that a
// float (or integer) tensor given by mistake gets the op's own message rather than the
// dispatcher's.
void register_layers(torch::Library& m) {
  m.impl("quantized_linear", quantized_linear_cpu);
  m.impl("quantized_conv2d", quantized_conv2d_cpu);
  m.impl("quantized_add", quantized_add_cpu);
  m.impl("quantized_avg_pool2d", quantized_avg_pool2d_cpu);
  m.impl("quantized_adaptive_avg_pool2d", quantized_adaptive_avg_pool2d_cpu);
  m.impl("quantized_max_pool2d", quantized_max_pool2d_cpu);
  m.impl("quantized_flatten", quantized_flatten_cpu);
}

TORCH_LIBRARY_IMPL(qext, QuantizedCPU, m) { register_layers(m); }

TORCH_LIBRARY_IMPL(qext, CPU, m) {
  register_layers(m);
  m.impl("pack_quantized_weight", pack_quantized_weight_cpu);
}

}  // namespace
}  // namespace qext::ops
