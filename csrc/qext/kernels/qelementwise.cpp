// Quantized residual add, average and max pooling (qelementwise.h): parameter set-up, the pooling
// loops and the scalar references; the AVX2 add is in qconv_avx2.cpp.
#include "qext/kernels/qelementwise.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

// ---------------------------------------------------------------------------------------------
// Max pooling
// ---------------------------------------------------------------------------------------------

namespace {

// torch's pooling takes int32 sizes too; the bound keeps the window arithmetic far from overflow.
constexpr int64_t kMaxPoolArg = int64_t{1} << 31;

bool both_in(int64_t a, int64_t b, int64_t lo) {
  return a >= lo && b >= lo && a < kMaxPoolArg && b < kMaxPoolArg;
}

// The in-image taps start + j * dilation of each output's window, j < kernel: the first one and
// how many there are.
void max_pool_taps(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t pad,
                   int64_t dilation, std::vector<int64_t>* first, std::vector<int64_t>* count) {
  first->resize(out);
  count->resize(out);
  for (int64_t i = 0; i < out; ++i) {
    const int64_t start = i * stride - pad;
    const int64_t j0 = start < 0 ? (-start + dilation - 1) / dilation : 0;
    const int64_t j1 = start < in ? std::min(kernel, (in - start + dilation - 1) / dilation) : 0;
    (*first)[i] = start + j0 * dilation;
    (*count)[i] = std::max<int64_t>(0, j1 - j0);
  }
}

// The loops below are what GCC vectorizes with baseline SSE2 (pxor, pmaxub): long runs of bytes
// with a compile-time flip (none for uint8 levels), compared in the flipped (unsigned) order.
template <uint8_t kFlip>
void copy_flipped(uint8_t* __restrict out, const uint8_t* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(x[i] ^ kFlip);
}

template <uint8_t kFlip>
void max2_flipped(uint8_t* __restrict out, const uint8_t* __restrict a, const uint8_t* __restrict b,
                  int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = std::max(static_cast<uint8_t>(a[i] ^ kFlip), static_cast<uint8_t>(b[i] ^ kFlip));
  }
}

template <uint8_t kFlip>
void max_into(uint8_t* __restrict out, const uint8_t* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = std::max(out[i], static_cast<uint8_t>(x[i] ^ kFlip));
}

// out = the max of the runs x, x + step, ..., x + (taps - 1) step of n bytes each (taps >= 1),
// two taps in the first pass.
template <uint8_t kFlip>
void taps_max(uint8_t* out, const uint8_t* x, int64_t taps, int64_t step, int64_t n) {
  if (taps == 1) {
    copy_flipped<kFlip>(out, x, n);
    return;
  }
  max2_flipped<kFlip>(out, x, x + step, n);
  for (int64_t t = 2; t < taps; ++t) max_into<kFlip>(out, x + t * step, n);
}

// The max of four runs of n bytes, flipped back: a full 2x2 window's channel vectors in one pass.
template <uint8_t kFlip>
void max4(uint8_t* __restrict out, const uint8_t* __restrict a, const uint8_t* __restrict b,
          const uint8_t* __restrict c, const uint8_t* __restrict d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t ab =
        std::max(static_cast<uint8_t>(a[i] ^ kFlip), static_cast<uint8_t>(b[i] ^ kFlip));
    const uint8_t cd =
        std::max(static_cast<uint8_t>(c[i] ^ kFlip), static_cast<uint8_t>(d[i] ^ kFlip));
    out[i] = static_cast<uint8_t>(std::max(ab, cd) ^ kFlip);
  }
}

// Max is separable: per output row, first the max over its window's input rows (vectorized
// along whole rows: in_w bytes of a plane, in_w * C channels-last), then each output the max over
// its window's columns of that. Windows without taps get the lowest level: flipped 0.
template <uint8_t kFlip>
void max_pool_nchw(const MaxPool2dPlan& plan, const uint8_t* x, int64_t planes, uint8_t* y) {
  const int64_t in_h = plan.in_h, in_w = plan.in_w, out_h = plan.out_h, out_w = plan.out_w;
  const int64_t down = plan.dilation_h * in_w, right = plan.dilation_w;
  // Locals: the uint8_t stores below may alias anything, the plan's fields included.
  const int64_t *h_first = plan.h_first.data(), *h_taps = plan.h_taps.data();
  const int64_t *w_first = plan.w_first.data(), *w_taps = plan.w_taps.data();
  std::vector<uint8_t> row_max(static_cast<size_t>(in_w));
  uint8_t* rm = row_max.data();
  for (int64_t pl = 0; pl < planes; ++pl) {
    const uint8_t* xp = x + pl * in_h * in_w;
    uint8_t* yp = y + pl * out_h * out_w;
    for (int64_t oh = 0; oh < out_h; ++oh) {
      uint8_t* yr = yp + oh * out_w;
      if (h_taps[oh] == 0) {
        std::fill(yr, yr + out_w, kFlip);
        continue;
      }
      taps_max<kFlip>(rm, xp + h_first[oh] * in_w, h_taps[oh], down, in_w);
      for (int64_t ow = 0; ow < out_w; ++ow) {
        const uint8_t* col = rm + w_first[ow];
        uint8_t m = 0;
        for (int64_t t = 0; t < w_taps[ow]; ++t) m = std::max(m, col[t * right]);
        yr[ow] = static_cast<uint8_t>(m ^ kFlip);
      }
    }
  }
}

template <uint8_t kFlip>
void max_pool_nhwc(const MaxPool2dPlan& plan, const uint8_t* x, int64_t C, int64_t row_begin,
                   int64_t row_end, uint8_t* y) {
  const int64_t out_h = plan.out_h, out_w = plan.out_w;
  const int64_t in_row = plan.in_w * C, image = plan.in_h * in_row;  // bytes
  const int64_t down = plan.dilation_h * in_row, right = plan.dilation_w * C;
  const int64_t *h_first = plan.h_first.data(), *h_taps = plan.h_taps.data();
  const int64_t *w_first = plan.w_first.data(), *w_taps = plan.w_taps.data();
  std::vector<uint8_t> row_max(static_cast<size_t>(in_row));
  uint8_t* rm = row_max.data();
  // Rows whose windows all have 2x2 taps (every row of MaxPool2d(2) but ceil_mode's partial ones)
  // skip the row max: one pass over each output's four taps beats two passes.
  const bool pairs = std::all_of(w_taps, w_taps + out_w, [](int64_t t) { return t == 2; });
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t oh = r % out_h;
    uint8_t* yr = y + r * out_w * C;
    if (h_taps[oh] == 0) {
      std::fill(yr, yr + out_w * C, kFlip);
      continue;
    }
    const uint8_t* x_row = x + (r / out_h) * image + h_first[oh] * in_row;
    if (pairs && h_taps[oh] == 2) {
      for (int64_t ow = 0; ow < out_w; ++ow) {
        const uint8_t* tap = x_row + w_first[ow] * C;
        max4<kFlip>(yr + ow * C, tap, tap + right, tap + down, tap + down + right, C);
      }
      continue;
    }
    taps_max<kFlip>(rm, x_row, h_taps[oh], down, in_row);
    for (int64_t ow = 0; ow < out_w; ++ow) {
      uint8_t* out = yr + ow * C;
      if (w_taps[ow] == 0) {
        std::fill(out, out + C, uint8_t{0});
      } else {
        taps_max<0>(out, rm + w_first[ow] * C, w_taps[ow], right, C);
      }
    }
    if (kFlip != 0) {
      for (int64_t i = 0; i < out_w * C; ++i) yr[i] = static_cast<uint8_t>(yr[i] ^ kFlip);
    }
  }
}

}  // namespace

bool make_max_pool2d_plan(int64_t in_h, int64_t in_w, const MaxPool2dOptions& o,
                          MaxPool2dPlan* plan, const char** why) {
  if (in_h < 1 || in_w < 1) {
    set_why(why, "max_pool2d: the input planes are empty");
    return false;
  }
  if (!both_in(o.kernel_h, o.kernel_w, 1)) {
    set_why(why, "max_pool2d: kernel_size must be in [1, 2^31)");
    return false;
  }
  if (!both_in(o.stride_h, o.stride_w, 1)) {
    set_why(why, "max_pool2d: stride must be in [1, 2^31)");
    return false;
  }
  if (!both_in(o.dilation_h, o.dilation_w, 1)) {
    set_why(why, "max_pool2d: dilation must be in [1, 2^31)");
    return false;
  }
  if (o.pad_h < 0 || o.pad_w < 0 || o.pad_h > o.kernel_h / 2 || o.pad_w > o.kernel_w / 2) {
    set_why(why, "max_pool2d: padding must be >= 0 and at most half the kernel_size");
    return false;
  }
  MaxPool2dPlan p;
  p.in_h = in_h;
  p.in_w = in_w;
  p.dilation_h = o.dilation_h;
  p.dilation_w = o.dilation_w;
  p.out_h =
      pool_output_size(in_h, o.dilation_h * (o.kernel_h - 1) + 1, o.stride_h, o.pad_h, o.ceil_mode);
  p.out_w =
      pool_output_size(in_w, o.dilation_w * (o.kernel_w - 1) + 1, o.stride_w, o.pad_w, o.ceil_mode);
  if (p.out_h < 1 || p.out_w < 1) {
    set_why(why, "max_pool2d: the output would be empty (input smaller than the dilated kernel)");
    return false;
  }
  max_pool_taps(in_h, p.out_h, o.kernel_h, o.stride_h, o.pad_h, o.dilation_h, &p.h_first,
                &p.h_taps);
  max_pool_taps(in_w, p.out_w, o.kernel_w, o.stride_w, o.pad_w, o.dilation_w, &p.w_first,
                &p.w_taps);
  *plan = std::move(p);
  return true;
}

void max_pool2d_u8(const MaxPool2dPlan& plan, const uint8_t* x, int64_t planes, uint8_t flip,
                   uint8_t* y) {
  if (flip == 0) {
    max_pool_nchw<0>(plan, x, planes, y);
  } else {
    max_pool_nchw<0x80>(plan, x, planes, y);
  }
}

void max_pool2d_nhwc_u8(const MaxPool2dPlan& plan, const uint8_t* x, int64_t channels,
                        int64_t row_begin, int64_t row_end, uint8_t flip, uint8_t* y) {
  if (flip == 0) {
    max_pool_nhwc<0>(plan, x, channels, row_begin, row_end, y);
  } else {
    max_pool_nhwc<0x80>(plan, x, channels, row_begin, row_end, y);
  }
}

void max_pool2d_reference(const MaxPool2dOptions& o, int64_t batch, int64_t channels, int64_t in_h,
                          int64_t in_w, int64_t out_h, int64_t out_w, bool channels_last,
                          bool is_signed, const uint8_t* x, uint8_t* y) {
  auto index = [&](int64_t n, int64_t c, int64_t h, int64_t w, int64_t height, int64_t width) {
    return channels_last ? ((n * height + h) * width + w) * channels + c
                         : ((n * channels + c) * height + h) * width + w;
  };
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t oh = 0; oh < out_h; ++oh) {
        for (int64_t ow = 0; ow < out_w; ++ow) {
          int best = is_signed ? -128 : 0;
          for (int64_t i = 0; i < o.kernel_h; ++i) {
            const int64_t h = oh * o.stride_h - o.pad_h + i * o.dilation_h;
            if (h < 0 || h >= in_h) continue;
            for (int64_t j = 0; j < o.kernel_w; ++j) {
              const int64_t w = ow * o.stride_w - o.pad_w + j * o.dilation_w;
              if (w < 0 || w >= in_w) continue;
              const uint8_t b = x[index(n, c, h, w, in_h, in_w)];
              best = std::max(best, is_signed ? static_cast<int>(static_cast<int8_t>(b)) : b);
            }
          }
          y[index(n, c, oh, ow, out_h, out_w)] = static_cast<uint8_t>(best);
        }
      }
    }
  }
}

namespace {

#if defined(__SSE2__)
// The 16 x 16 block at src (row stride ld_src) transposed to dst (row stride ld_dst): four rounds
// of unpacks at 1, 2, 4 and 8 bytes leave column c in register bit_reversed(c).
void transpose_block16(const uint8_t* src, int64_t ld_src, uint8_t* dst, int64_t ld_dst) {
  __m128i x[16], y[16];
  for (int i = 0; i < 16; ++i) {
    x[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * ld_src));
  }
  for (int j = 0; j < 8; ++j) {
    y[j] = _mm_unpacklo_epi8(x[2 * j], x[2 * j + 1]);
    y[j + 8] = _mm_unpackhi_epi8(x[2 * j], x[2 * j + 1]);
  }
  for (int j = 0; j < 8; ++j) {
    x[j] = _mm_unpacklo_epi16(y[2 * j], y[2 * j + 1]);
    x[j + 8] = _mm_unpackhi_epi16(y[2 * j], y[2 * j + 1]);
  }
  for (int j = 0; j < 8; ++j) {
    y[j] = _mm_unpacklo_epi32(x[2 * j], x[2 * j + 1]);
    y[j + 8] = _mm_unpackhi_epi32(x[2 * j], x[2 * j + 1]);
  }
  for (int j = 0; j < 8; ++j) {
    x[j] = _mm_unpacklo_epi64(y[2 * j], y[2 * j + 1]);
    x[j + 8] = _mm_unpackhi_epi64(y[2 * j], y[2 * j + 1]);
  }
  constexpr int kBitReversed[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  for (int i = 0; i < 16; ++i) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + kBitReversed[i] * ld_dst), x[i]);
  }
}
#endif

}  // namespace

void transpose_u8(const uint8_t* src, int64_t rows, int64_t cols, uint8_t* dst) {
#if defined(__SSE2__)
  if (rows >= 16 && cols >= 16) {
    // Whole blocks only: the last block of a ragged row or column overlaps the one before it (and
    // writes the same bytes twice).
    for (int64_t r = 0; r < rows; r += 16) {
      const int64_t r0 = std::min(r, rows - 16);
      for (int64_t c = 0; c < cols; c += 16) {
        const int64_t c0 = std::min(c, cols - 16);
        transpose_block16(src + r0 * cols + c0, cols, dst + c0 * rows + r0, rows);
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
  }
}

}  // namespace qext::kernels
