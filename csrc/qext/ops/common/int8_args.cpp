#include "qext/ops/common/int8_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>

namespace qext::ops::detail {
namespace {

constexpr int32_t kInt32Max = 2147483647;

// Rows from which the AMX tiles (16 rows each) beat the AVX-512 VNNI kernel (measured on Sapphire
// Rapids: 8 rows 263 vs 193 G MAC/s, 4 rows about even, 1 row VNNI 1.5x faster).
constexpr int64_t kAmxMinRows = 8;

// -1: automatic; else the forced kernels::Isa.
std::atomic<int> forced_isa{-1};

}  // namespace

const std::vector<kernels::Isa>& all_int8_isas() {
  static const std::vector<kernels::Isa> isas = {kernels::Isa::kScalar, kernels::Isa::kAvx2,
                                                 kernels::Isa::kAvx512Vnni, kernels::Isa::kAmx};
  return isas;
}

Int8Input resolve_int8_input(const at::Tensor& input, const char* op, const char* name) {
  TORCH_CHECK(input.is_quantized(), op, ": ", name,
              " must be a per-tensor quantized tensor (torch.quint8 or torch.qint8), got a ",
              input.scalar_type(), " tensor; quantize it first (qext.nn.quantized.Quantize)");
  TORCH_CHECK(input.qscheme() == at::kPerTensorAffine, op, ": ", name,
              " must be quantized per tensor (affine), got qscheme ", toString(input.qscheme()));
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kQUInt8 || dtype == at::kQInt8, op, ": ", name,
              " must be torch.quint8 or torch.qint8, got ", dtype);
  Int8Input in;
  in.scale = input.q_scale();
  TORCH_CHECK(std::isfinite(in.scale) && in.scale > 0, op, ": ", name, " has scale ", in.scale,
              "; it must be finite and > 0");
  const int64_t zp = input.q_zero_point() + (dtype == at::kQInt8 ? 128 : 0);
  TORCH_CHECK(zp >= 0 && zp <= 255, op, ": ", name, " has zero point ", input.q_zero_point(),
              " outside the range of its dtype ", dtype);
  in.zero_point = static_cast<int32_t>(zp);
  in.flip = dtype == at::kQInt8 ? 0x80 : 0;
  return in;
}

Int8Output resolve_int8_output(std::optional<double> scale, int64_t zero_point, int64_t min,
                               int64_t max, bool relu, const char* op) {
  Int8Output out;
  out.relu = relu;
  if (!scale.has_value()) {
    out.is_float = true;
    return out;
  }
  TORCH_CHECK(std::isfinite(*scale) && *scale > 0, op,
              ": output_scale must be finite and > 0, got ", *scale);
  TORCH_CHECK(min < max, op, ": output_min (", min, ") must be < output_max (", max, ")");
  if (min >= 0 && max <= 255) {
    out.dtype = at::kQUInt8;
  } else {
    TORCH_CHECK(min >= -128 && max <= 127, op, ": the output range [", min, ", ", max,
                "] fits neither uint8 nor int8");
    out.dtype = at::kQInt8;
  }
  TORCH_CHECK(zero_point >= min && zero_point <= max, op, ": output_zero_point ", zero_point,
              " is outside [output_min, output_max] = [", min, ", ", max, "]");
  out.scale = *scale;
  out.zero_point = static_cast<int32_t>(zero_point);
  out.min = static_cast<int32_t>(relu ? std::max(min, zero_point) : min);
  out.max = static_cast<int32_t>(max);
  return out;
}

at::Tensor empty_int8_output(at::IntArrayRef sizes, const Int8Output& out,
                             const at::TensorOptions& device_options,
                             at::MemoryFormat memory_format) {
  if (out.is_float) {
    return at::empty(sizes, device_options.dtype(at::kFloat).memory_format(memory_format));
  }
  return at::_empty_affine_quantized(sizes, device_options.dtype(out.dtype), out.scale,
                                     out.zero_point, memory_format);
}

LinearShape linear_shape(const at::Tensor& input, at::IntArrayRef weight_shape, const char* op) {
  TORCH_CHECK(weight_shape.size() == 2 && weight_shape[0] > 0 && weight_shape[1] > 0, op,
              ": weight_shape must be [out_features, in_features] > 0, got ", weight_shape);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == weight_shape[1], op, ": input of shape ",
              input.sizes(), " does not end in the weight's ", weight_shape[1], " in_features");
  LinearShape s;
  s.out_features = weight_shape[0];
  s.in_features = weight_shape[1];
  s.rows = input.numel() / s.in_features;
  s.packed_bytes =
      static_cast<int64_t>(kernels::packed_weight_bytes(s.out_features, s.in_features));
  return s;
}

Conv2dShape conv2d_shape(const at::Tensor& input, at::IntArrayRef weight_shape,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         int64_t groups, const char* op) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D [N, C, H, W], got shape ", input.sizes());
  TORCH_CHECK(weight_shape.size() == 4 && weight_shape[0] > 0 && weight_shape[1] > 0 &&
                  weight_shape[2] > 0 && weight_shape[3] > 0,
              op, ": weight_shape must be [out_channels, in_channels / groups, kh, kw] > 0, got ",
              weight_shape);
  auto two = [&](at::IntArrayRef v, const char* name, int64_t lo) {
    TORCH_CHECK(v.size() == 2 && v[0] >= lo && v[1] >= lo, op, ": ", name,
                " must be two values >= ", lo, ", got ", v);
  };
  two(stride, "stride", 1);
  two(padding, "padding", 0);
  two(dilation, "dilation", 1);
  const int64_t out_channels = weight_shape[0];
  TORCH_CHECK(groups >= 1 && out_channels % groups == 0, op, ": groups = ", groups,
              " must divide the output channels (", out_channels, ")");
  TORCH_CHECK(input.size(1) == weight_shape[1] * groups, op, ": input has ", input.size(1),
              " channels where the weight (", weight_shape, ") with groups = ", groups, " takes ",
              weight_shape[1] * groups);
  Conv2dShape s;
  auto& g = s.geometry;
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.in_h = input.size(2);
  g.in_w = input.size(3);
  g.out_channels = out_channels;
  g.kernel_h = weight_shape[2];
  g.kernel_w = weight_shape[3];
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
  g.groups = groups;
  g.out_h = (g.in_h + 2 * g.pad_h - g.dilation_h * (g.kernel_h - 1) - 1) / g.stride_h + 1;
  g.out_w = (g.in_w + 2 * g.pad_w - g.dilation_w * (g.kernel_w - 1) - 1) / g.stride_w + 1;
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, op, ": input of shape ", input.sizes(),
              " is too small for the kernel ", weight_shape[2], "x", weight_shape[3],
              " with padding ", padding, " and dilation ", dilation);
  s.depthwise = groups > 1 && groups == g.in_channels && groups == out_channels;
  s.group_bytes =
      static_cast<int64_t>(kernels::packed_weight_bytes(out_channels / groups, g.group_k()));
  s.packed_bytes = s.depthwise ? g.kernel_h * g.kernel_w * out_channels : s.group_bytes * groups;
  return s;
}

namespace {

// The values of a small float32 tensor (weight scales, bias) as doubles, without a temporary
// tensor when they already are dense on the CPU.
std::vector<double> host_values(const at::Tensor& t) {
  if (t.device().is_cpu() && t.is_contiguous()) {
    const float* p = t.const_data_ptr<float>();
    return std::vector<double>(p, p + t.numel());
  }
  const auto d = t.detach().to(at::kCPU, at::kDouble).contiguous();
  return std::vector<double>(d.const_data_ptr<double>(), d.const_data_ptr<double>() + d.numel());
}

}  // namespace

Int8LayerParams resolve_int8_layer(const at::Tensor& input, const at::Tensor& packed_weight,
                                   int64_t packed_bytes, const at::Tensor& row_sums,
                                   int64_t out_channels, const at::Tensor& weight_scale,
                                   const std::optional<at::Tensor>& bias, int64_t reduction,
                                   const Int8Output& output, const char* op) {
  Int8LayerParams p;
  p.input = resolve_int8_input(input, op);
  p.output = output;
  TORCH_CHECK(
      row_sums.scalar_type() == at::kInt && row_sums.dim() == 1 && row_sums.numel() == out_channels,
      op, ": row_sums must be int32 of shape [", out_channels, "], got ", row_sums.scalar_type(),
      " of shape ", row_sums.sizes());
  const int64_t n = out_channels;
  p.out_channels = n;
  TORCH_CHECK(packed_weight.scalar_type() == at::kChar && packed_weight.dim() == 1, op,
              ": packed_weight must be a 1-D int8 tensor (from pack_quantized_weight), got ",
              packed_weight.scalar_type(), " of shape ", packed_weight.sizes());
  TORCH_CHECK(packed_weight.numel() == packed_bytes, op, ": packed_weight has ",
              packed_weight.numel(), " bytes where ", n, " output channels over ", reduction,
              " inputs need ", packed_bytes, " (truncated, or packed for another shape)");
  for (const auto* t : {&packed_weight, &row_sums}) {
    TORCH_CHECK(t->device() == input.device(), op, ": the weights are on ", t->device(),
                " and the input on ", input.device());
  }
  TORCH_CHECK(weight_scale.scalar_type() == at::kFloat &&
                  (weight_scale.numel() == 1 || weight_scale.numel() == n),
              op, ": weight_scale must be float32 with 1 or ", n,
              " (output channels) entries, got ", weight_scale.scalar_type(), " of shape ",
              weight_scale.sizes());
  const auto ws = host_values(weight_scale);
  std::vector<double> acc_scale(n);
  for (int64_t c = 0; c < n; ++c) {
    const double s = ws[ws.size() == 1 ? 0 : c];
    TORCH_CHECK(std::isfinite(s) && s > 0, op, ": weight_scale[", c, "] = ", s,
                "; scales must be finite and > 0");
    acc_scale[c] = p.input.scale * s;
  }

  int64_t max_abs_bias = 0;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->numel() == n, op,
                ": bias must be float32 of shape [", n, "], got ", bias->scalar_type(),
                " of shape ", bias->sizes());
    const auto b_p = host_values(*bias);
    p.bias.resize(n);
    p.bias_fraction.resize(n);
    for (int64_t c = 0; c < n; ++c) {
      TORCH_CHECK(std::isfinite(b_p[c]), op, ": bias[", c, "] = ", b_p[c], " is not finite");
      const double b = b_p[c] / acc_scale[c];
      const double q = std::nearbyint(b);
      p.bias_fraction[c] = b - q;
      TORCH_CHECK(std::abs(q) <= kInt32Max, op, ": bias[", c, "] = ", b_p[c],
                  " is beyond int32 at the accumulator scale ", acc_scale[c]);
      p.bias[c] = static_cast<int32_t>(q);
      max_abs_bias = std::max<int64_t>(max_abs_bias, std::abs(static_cast<int64_t>(p.bias[c])));
    }
  }
  const int64_t max_k = kernels::max_exact_k(max_abs_bias);
  TORCH_CHECK(reduction <= max_k, op, ": ", reduction,
              " terms per output overflow the exact int32 accumulation (at most ", max_k,
              " with this bias); split the layer");

  if (output.is_float) {
    p.float_scale.resize(n);
    for (int64_t c = 0; c < n; ++c) p.float_scale[c] = static_cast<float>(acc_scale[c]);
  } else {
    p.multiplier.resize(n);
    for (int64_t c = 0; c < n; ++c) {
      const double m = acc_scale[c] / output.scale;
      TORCH_CHECK(kernels::quantize_multiplier(m, &p.multiplier[c]), op,
                  ": the requantization multiplier input_scale * weight_scale[", c,
                  "] / output_scale = ", m, " has no fixed-point form (needs 2^-32 <= m <= 2^30)");
      // The bias below one accumulator unit, at the multiplier's resolution (|.| <= 2^30); with
      // m >= 1 (exponent > 0) one unit is at least an output step and the int32 bias is kept as is.
      if (!p.bias_fraction.empty() && p.multiplier[c].exponent <= 0) {
        p.multiplier[c].offset =
            static_cast<int32_t>(std::llround(p.bias_fraction[c] * p.multiplier[c].multiplier));
      }
    }
  }
  return p;
}

LinearCall resolve_linear_call(const at::Tensor& input, const at::Tensor& packed_weight,
                               const at::Tensor& row_sums, at::IntArrayRef weight_shape,
                               const at::Tensor& weight_scale,
                               const std::optional<at::Tensor>& bias,
                               std::optional<double> output_scale, int64_t output_zero_point,
                               int64_t output_min, int64_t output_max, bool relu) {
  constexpr const char* op = "qext.quantized_linear";
  const auto out =
      resolve_int8_output(output_scale, output_zero_point, output_min, output_max, relu, op);
  LinearCall call;
  call.shape = linear_shape(input, weight_shape, op);
  call.params = resolve_int8_layer(input, packed_weight, call.shape.packed_bytes, row_sums,
                                   call.shape.out_features, weight_scale, bias,
                                   call.shape.in_features, out, op);
  return call;
}

Conv2dCall resolve_conv2d_call(const at::Tensor& input, const at::Tensor& packed_weight,
                               const at::Tensor& row_sums, at::IntArrayRef weight_shape,
                               const at::Tensor& weight_scale,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               std::optional<double> output_scale, int64_t output_zero_point,
                               int64_t output_min, int64_t output_max, bool relu) {
  constexpr const char* op = "qext.quantized_conv2d";
  const auto out =
      resolve_int8_output(output_scale, output_zero_point, output_min, output_max, relu, op);
  Conv2dCall call;
  call.shape = conv2d_shape(input, weight_shape, stride, padding, dilation, groups, op);
  const auto& g = call.shape.geometry;
  call.params = resolve_int8_layer(input, packed_weight, call.shape.packed_bytes, row_sums,
                                   g.out_channels, weight_scale, bias, g.group_k(), out, op);
  TORCH_CHECK(!(call.shape.depthwise && out.is_float), op,
              ": depthwise convolutions write quantized outputs; give an output_scale");
  return call;
}

kernels::RequantEpilogue requant_epilogue(const Int8LayerParams& p, const int32_t* row_sums,
                                          int64_t first) {
  kernels::RequantEpilogue ep{};
  ep.row_sums = row_sums + first;
  ep.a_zero_point = p.input.zero_point;
  ep.bias = p.bias.empty() ? nullptr : p.bias.data() + first;
  ep.multiplier = p.multiplier.data() + first;
  ep.out_zero_point = p.output.zero_point;
  ep.out_min = p.output.min;
  ep.out_max = p.output.max;
  return ep;
}

kernels::FloatEpilogue float_epilogue(const Int8LayerParams& p, const int32_t* row_sums,
                                      int64_t first) {
  kernels::FloatEpilogue ep{};
  ep.row_sums = row_sums + first;
  ep.a_zero_point = p.input.zero_point;
  ep.bias = p.bias.empty() ? nullptr : p.bias.data() + first;
  ep.scale = p.float_scale.data() + first;
  ep.relu = p.output.relu;
  return ep;
}

kernels::Isa int8_gemm_isa(int64_t rows) {
  const int forced = forced_isa.load();
  if (forced >= 0) return static_cast<kernels::Isa>(forced);
  if (rows >= kAmxMinRows && kernels::isa_supported(kernels::Isa::kAmx)) return kernels::Isa::kAmx;
  return kernels::best_isa();
}

void set_int8_isa(const std::string& name) {
  if (name == "auto") {
    forced_isa = -1;
    return;
  }
  std::string known;
  for (const auto isa : all_int8_isas()) {
    if (name == kernels::isa_name(isa)) {
      TORCH_CHECK(kernels::isa_supported(isa), "set_int8_isa: this CPU cannot run '", name, "'");
      forced_isa = static_cast<int>(isa);
      return;
    }
    known += std::string(" '") + kernels::isa_name(isa) + "'";
  }
  TORCH_CHECK(false, "set_int8_isa: unknown ISA '", name, "'; expected 'auto' or one of", known);
}

std::string int8_isa_name() {
  const int forced = forced_isa.load();
  return forced < 0 ? "auto" : kernels::isa_name(static_cast<kernels::Isa>(forced));
}

}  // namespace qext::ops::detail
