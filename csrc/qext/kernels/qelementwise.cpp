// Quantized residual add and average pooling (qelementwise.h): parameter set-up and the scalar
// references; the AVX2 add is in qconv_avx2.cpp.
#include "qext/kernels/qelementwise.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "qext/kernels/qconv_isa.h"

namespace qext::kernels {

namespace {

bool positive_finite(double v) { return std::isfinite(v) && v > 0.0; }
bool is_level(int32_t v) { return v >= 0 && v <= 255; }

// floor(v / 2^shift), 0 <= shift <= 62, without relying on >> of negative values.
inline int64_t floor_shift(int64_t v, int shift) {
  return v >= 0 ? v >> shift : -((-(v + 1)) >> shift) - 1;
}

inline int32_t clamp32(int64_t v, int32_t lo, int32_t hi) {
  return static_cast<int32_t>(v < lo ? lo : (v > hi ? hi : v));
}

void set_why(const char** why, const char* message) {
  if (why != nullptr) *why = message;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Add
// ---------------------------------------------------------------------------------------------

bool make_add_params(double sa, double sb, double so, int32_t za, int32_t zb, int32_t zo,
                     int32_t lo, int32_t hi, bool relu, AddParams* out) {
  if (!positive_finite(sa) || !positive_finite(sb) || !positive_finite(so)) return false;
  const double ra = sa / so, rb = sb / so;
  for (const double r : {ra, rb}) {
    if (!(r >= std::ldexp(1.0, -32) && r <= std::ldexp(1.0, 29))) return false;
  }
  if (!is_level(za) || !is_level(zb) || !is_level(zo) || !is_level(lo) || !is_level(hi) ||
      lo > hi) {
    return false;
  }
  // ratio * 2^shift is exact in double (a power-of-two scaling), so the rounding is the only error.
  // The bound is tested in double first: llround of a value beyond int64 is unspecified.
  const double bound = 0x1p31 - 0.5;  // llround(v) < 2^31 exactly when v < 2^31 - 1/2
  int shift = 62;
  for (; shift >= 1; --shift) {
    if (std::ldexp(ra, shift) < bound && std::ldexp(rb, shift) < bound) break;
  }
  if (shift < 1) return false;  // unreachable for ratios <= 2^29; kept as a guard
  AddParams p{};
  p.za = za;
  p.zb = zb;
  p.zo = zo;
  p.lo = relu ? std::min(std::max(lo, zo), hi) : lo;
  p.hi = hi;
  p.a_mult = std::llround(std::ldexp(ra, shift));
  p.b_mult = std::llround(std::ldexp(rb, shift));
  p.shift = shift;
  *out = p;
  return true;
}

int32_t add_level(int32_t qa, int32_t qb, const AddParams& p) {
  const int64_t v = static_cast<int64_t>(qa - p.za) * p.a_mult +
                    static_cast<int64_t>(qb - p.zb) * p.b_mult + (int64_t{1} << (p.shift - 1));
  return clamp32(floor_shift(v, p.shift) + p.zo, p.lo, p.hi);
}

namespace detail {

void add_u8_scalar(const uint8_t* a, const uint8_t* b, int64_t n, const AddParams& p, uint8_t* out,
                   uint8_t a_flip, uint8_t b_flip, uint8_t out_flip) {
  for (int64_t i = 0; i < n; ++i) {
    const int32_t q = add_level(a[i] ^ a_flip, b[i] ^ b_flip, p);
    out[i] = static_cast<uint8_t>(q) ^ out_flip;
  }
}

}  // namespace detail

void add_u8(Isa isa, const uint8_t* a, const uint8_t* b, int64_t n, const AddParams& p,
            uint8_t* out, uint8_t a_flip, uint8_t b_flip, uint8_t out_flip) {
  if (isa == Isa::kScalar) {
    detail::add_u8_scalar(a, b, n, p, out, a_flip, b_flip, out_flip);
  } else {
    detail::add_u8_avx2(a, b, n, p, out, a_flip, b_flip, out_flip);
  }
}

void add_u8(const uint8_t* a, const uint8_t* b, int64_t n, const AddParams& p, uint8_t* out,
            uint8_t a_flip, uint8_t b_flip, uint8_t out_flip) {
  add_u8(best_isa(), a, b, n, p, out, a_flip, b_flip, out_flip);
}

// ---------------------------------------------------------------------------------------------
// Wide multiplier
// ---------------------------------------------------------------------------------------------

bool make_wide_multiplier(double m, int64_t max_abs_acc, WideMultiplier* out) {
  if (!std::isfinite(m) || !(m >= std::ldexp(1.0, -32)) || max_abs_acc < 1) return false;
  if (!(m * static_cast<double>(max_abs_acc) < std::ldexp(1.0, 30))) return false;
  // The largest shift with max_abs_acc * mult < 2^62 (so acc * mult + 2^(shift - 1) < 2^63).
  // m * max_abs_acc < 2^30 makes shift = 31 always fit, so the loop ends with shift >= 31.
  const int64_t limit = (int64_t{1} << 62) / max_abs_acc;
  for (int shift = 62; shift >= 1; --shift) {
    const double v = std::ldexp(m, shift);  // exact; compared before llround, which needs v < 2^63
    if (v < static_cast<double>(limit) - 1.0) {
      *out = WideMultiplier{std::llround(v), shift};
      return true;
    }
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Average pooling
// ---------------------------------------------------------------------------------------------

int64_t pool_output_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad, bool ceil_mode) {
  const int64_t num = in + 2 * pad - kernel + (ceil_mode ? stride - 1 : 0);
  // Floor division (num may be negative for inputs smaller than the kernel).
  int64_t out = (num >= 0 ? num / stride : -((-num + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

namespace {

// Index of v in classes, appended when new.
int32_t class_of(std::vector<int64_t>* classes, int64_t v) {
  const auto it = std::find(classes->begin(), classes->end(), v);
  if (it != classes->end()) return static_cast<int32_t>(it - classes->begin());
  classes->push_back(v);
  return static_cast<int32_t>(classes->size() - 1);
}

bool check_quant(const PoolQuant& q, const char** why) {
  if (!positive_finite(q.in_scale) || !positive_finite(q.out_scale)) {
    set_why(why, "avg_pool2d: the input and output scales must be finite and > 0");
    return false;
  }
  if (!is_level(q.in_zero_point) || !is_level(q.out_zero_point) || !is_level(q.out_min) ||
      !is_level(q.out_max) || q.out_min > q.out_max) {
    set_why(
        why,
        "avg_pool2d: zero points and 0 <= out_min <= out_max must lie in [0, 255] (uint8 levels)");
    return false;
  }
  return true;
}

// The multiplier table of a plan whose window bounds and per-dimension divisors are filled in.
bool finish_plan(const std::vector<int64_t>& h_div, const std::vector<int64_t>& w_div,
                 int64_t divisor_override, AvgPool2dPlan* plan, const char** why) {
  int64_t max_rows = 0, max_cols = 0;
  for (int64_t i = 0; i < plan->out_h; ++i) {
    max_rows = std::max(max_rows, plan->h_end[i] - plan->h_begin[i]);
  }
  for (int64_t j = 0; j < plan->out_w; ++j) {
    max_cols = std::max(max_cols, plan->w_end[j] - plan->w_begin[j]);
  }
  const int64_t max_abs_acc = std::max<int64_t>(1, 255 * max_rows * max_cols);
  plan->w_classes = static_cast<int64_t>(w_div.size());
  plan->multiplier.resize(h_div.size() * w_div.size());
  for (size_t i = 0; i < h_div.size(); ++i) {
    for (size_t j = 0; j < w_div.size(); ++j) {
      const int64_t d = divisor_override > 0 ? divisor_override : h_div[i] * w_div[j];
      if (d <= 0) {
        set_why(why, "avg_pool2d: a pooling window has no element to average");
        return false;
      }
      const double m = plan->quant.in_scale / (plan->quant.out_scale * static_cast<double>(d));
      if (!make_wide_multiplier(m, max_abs_acc, &plan->multiplier[i * w_div.size() + j])) {
        set_why(why,
                "avg_pool2d: in_scale / (out_scale * divisor) has no fixed-point form (needs "
                ">= 2^-32, and * 255 * window size < 2^30)");
        return false;
      }
    }
  }
  return true;
}

}  // namespace

bool make_avg_pool2d_plan(int64_t in_h, int64_t in_w, const AvgPool2dOptions& o,
                          const PoolQuant& quant, AvgPool2dPlan* plan, const char** why) {
  if (in_h < 1 || in_w < 1) {
    set_why(why, "avg_pool2d: the input planes are empty");
    return false;
  }
  if (o.kernel_h < 1 || o.kernel_w < 1 || o.stride_h < 1 || o.stride_w < 1) {
    set_why(why, "avg_pool2d: kernel size and stride must be positive");
    return false;
  }
  if (o.pad_h < 0 || o.pad_w < 0 || o.pad_h > o.kernel_h / 2 || o.pad_w > o.kernel_w / 2) {
    set_why(why, "avg_pool2d: padding must be >= 0 and at most half the kernel size");
    return false;
  }
  if (o.divisor_override < 0) {
    set_why(why, "avg_pool2d: divisor_override must be positive");
    return false;
  }
  if (!check_quant(quant, why)) return false;
  AvgPool2dPlan p;
  p.in_h = in_h;
  p.in_w = in_w;
  p.out_h = pool_output_size(in_h, o.kernel_h, o.stride_h, o.pad_h, o.ceil_mode);
  p.out_w = pool_output_size(in_w, o.kernel_w, o.stride_w, o.pad_w, o.ceil_mode);
  if (p.out_h < 1 || p.out_w < 1) {
    set_why(why, "avg_pool2d: the output would be empty (input smaller than the kernel)");
    return false;
  }
  p.quant = quant;
  // One dimension: window [start, min(start + kernel, in + pad)) clipped to [0, in); its divisor
  // factor is the unclipped size with count_include_pad, the clipped one otherwise.
  auto windows = [&](int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t pad,
                     std::vector<int64_t>* begin, std::vector<int64_t>* end,
                     std::vector<int32_t>* cls, std::vector<int64_t>* divs) {
    begin->resize(out);
    end->resize(out);
    cls->resize(out);
    for (int64_t i = 0; i < out; ++i) {
      const int64_t start = i * stride - pad;
      const int64_t stop = std::min(start + kernel, in + pad);
      (*begin)[i] = std::max<int64_t>(start, 0);
      (*end)[i] = std::max((*begin)[i], std::min(stop, in));
      const int64_t div = o.count_include_pad ? stop - start : (*end)[i] - (*begin)[i];
      (*cls)[i] = class_of(divs, div);
    }
  };
  std::vector<int64_t> h_div, w_div;
  windows(in_h, p.out_h, o.kernel_h, o.stride_h, o.pad_h, &p.h_begin, &p.h_end, &p.h_class, &h_div);
  windows(in_w, p.out_w, o.kernel_w, o.stride_w, o.pad_w, &p.w_begin, &p.w_end, &p.w_class, &w_div);
  if (!finish_plan(h_div, w_div, o.divisor_override, &p, why)) return false;
  *plan = std::move(p);
  return true;
}

bool make_adaptive_avg_pool2d_plan(int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
                                   const PoolQuant& quant, AvgPool2dPlan* plan, const char** why) {
  if (in_h < 1 || in_w < 1 || out_h < 1 || out_w < 1) {
    set_why(why, "adaptive_avg_pool2d: input and output sizes must be positive");
    return false;
  }
  if (!check_quant(quant, why)) return false;
  AvgPool2dPlan p;
  p.in_h = in_h;
  p.in_w = in_w;
  p.out_h = out_h;
  p.out_w = out_w;
  p.quant = quant;
  auto windows = [](int64_t in, int64_t out, std::vector<int64_t>* begin, std::vector<int64_t>* end,
                    std::vector<int32_t>* cls, std::vector<int64_t>* divs) {
    begin->resize(out);
    end->resize(out);
    cls->resize(out);
    for (int64_t i = 0; i < out; ++i) {
      (*begin)[i] = i * in / out;                  // floor(i * in / out)
      (*end)[i] = ((i + 1) * in + out - 1) / out;  // ceil((i + 1) * in / out)
      (*cls)[i] = class_of(divs, (*end)[i] - (*begin)[i]);
    }
  };
  std::vector<int64_t> h_div, w_div;
  windows(in_h, out_h, &p.h_begin, &p.h_end, &p.h_class, &h_div);
  windows(in_w, out_w, &p.w_begin, &p.w_end, &p.w_class, &w_div);
  if (!finish_plan(h_div, w_div, 0, &p, why)) return false;
  *plan = std::move(p);
  return true;
}

void avg_pool2d_u8(const AvgPool2dPlan& plan, const uint8_t* x, int64_t planes, uint8_t flip,
                   uint8_t* y) {
  const PoolQuant& q = plan.quant;
  std::vector<int32_t> column_sum(static_cast<size_t>(plan.in_w));
  int32_t* cs = column_sum.data();
  for (int64_t pl = 0; pl < planes; ++pl) {
    const uint8_t* xp = x + pl * plan.in_h * plan.in_w;
    uint8_t* yp = y + pl * plan.out_h * plan.out_w;
    for (int64_t oh = 0; oh < plan.out_h; ++oh) {
      // Column sums of the window's rows (one pass over them, vectorized by the compiler), then
      // each output of this row sums its columns.
      const int64_t h0 = plan.h_begin[oh], h1 = plan.h_end[oh];
      std::fill(column_sum.begin(), column_sum.end(), 0);
      for (int64_t h = h0; h < h1; ++h) {
        const uint8_t* row = xp + h * plan.in_w;
        for (int64_t w = 0; w < plan.in_w; ++w) cs[w] += row[w] ^ flip;
      }
      const WideMultiplier* mult = plan.multiplier.data() + plan.h_class[oh] * plan.w_classes;
      for (int64_t ow = 0; ow < plan.out_w; ++ow) {
        const int64_t w0 = plan.w_begin[ow], w1 = plan.w_end[ow];
        int64_t sum = 0;
        for (int64_t w = w0; w < w1; ++w) sum += cs[w];
        const int64_t acc = sum - static_cast<int64_t>(q.in_zero_point) * (h1 - h0) * (w1 - w0);
        const int32_t level =
            requantize_wide(acc, mult[plan.w_class[ow]], q.out_zero_point, q.out_min, q.out_max);
        yp[oh * plan.out_w + ow] = static_cast<uint8_t>(level) ^ flip;
      }
    }
  }
}

}  // namespace qext::kernels
