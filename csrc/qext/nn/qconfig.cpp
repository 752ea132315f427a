#include "qext/nn/qconfig.h"

#include <c10/util/Exception.h>

namespace qext::nn {

int64_t QuantSpec::quant_min() const {
  const int64_t b = bits - (reduce_range ? 1 : 0);
  return is_signed ? -(int64_t{1} << (b - 1)) : 0;
}

int64_t QuantSpec::quant_max() const {
  const int64_t b = bits - (reduce_range ? 1 : 0);
  return is_signed ? (int64_t{1} << (b - 1)) - 1 : (int64_t{1} << b) - 1;
}

void QuantSpec::validate() const {
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 16, "QuantSpec: bits must be in [1, 16], got ", bits);
  TORCH_CHECK_VALUE(bits - (reduce_range ? 1 : 0) >= (is_signed ? 2 : 1), "QuantSpec: bits=", bits,
                    is_signed ? " signed" : " unsigned", reduce_range ? " with reduce_range" : "",
                    " leaves fewer than two levels");
  TORCH_CHECK_VALUE(averaging_constant > 0.0 && averaging_constant <= 1.0,
                    "QuantSpec: averaging_constant must be in (0, 1], got ", averaging_constant);
}

QConfig get_qconfig(const std::string& name) {
  QuantSpec weight;  // int8 symmetric, per output channel, min/max
  weight.axis = 0;
  QuantSpec activation;  // uint8 affine, per-tensor, EMA
  activation.is_signed = false;
  activation.symmetric = false;
  activation.observer = ObserverKind::kMovingAverage;
  if (name == "int8") return {activation, weight};
  if (name == "int8_per_tensor") {
    weight.axis.reset();
    return {activation, weight};
  }
  if (name == "int8_avx2") {
    activation.reduce_range = true;
    return {activation, weight};
  }
  if (name == "int4_lsq") {
    QuantSpec w4;  // LSQ: symmetric int4 per output channel
    w4.bits = 4;
    w4.axis = 0;
    w4.learnable = true;
    QuantSpec a4;  // LSQ+: affine uint4, initialised from the first batch's min/max
    a4.bits = 4;
    a4.is_signed = false;
    a4.symmetric = false;
    a4.learnable = true;
    return {a4, w4};
  }
  TORCH_CHECK_VALUE(false, "get_qconfig: unknown preset '", name,
                    "' (C++ has int8, int8_per_tensor, int8_avx2, int4_lsq)");
}

}  // namespace qext::nn
