// Quantization configuration of the C++ QAT modules: the same fields and presets as Python's
// qext.QuantSpec / qext.QConfig (straight-through quantizers with min/max or EMA observers, and
// learnable LSQ / LSQ+ quantizers).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace qext::nn {

enum class ObserverKind { kMinMax, kMovingAverage };

struct QuantSpec {
  int64_t bits = 8;
  bool is_signed = true;
  bool symmetric = true;
  std::optional<int64_t> axis;  // per-channel axis; empty = per-tensor
  ObserverKind observer = ObserverKind::kMinMax;
  double averaging_constant = 0.01;
  bool reduce_range = false;  // one bit less (7-bit activations for the AVX2 int8 kernels)
  // LSQ (symmetric) / LSQ+ (affine): the scale, and the zero point when affine, are trainable
  // parameters initialised from the first batch (see FakeQuantize); the observer then only serves
  // the LSQ+ initialisation.
  bool learnable = false;

  int64_t quant_min() const;
  int64_t quant_max() const;
  // Throws c10::ValueError naming the field and value for impossible settings.
  void validate() const;
};

struct QConfig {
  std::optional<QuantSpec> activation;
  std::optional<QuantSpec> weight;
};

// Presets of Python's qext.get_qconfig: "int8" (per-channel symmetric int8 weights, EMA affine
// uint8 activations), "int8_per_tensor", "int8_avx2" (7-bit activations), "int4_lsq" (learnable
// per-channel symmetric int4 weights, learnable affine uint4 activations with a min/max init).
QConfig get_qconfig(const std::string& name);

}  // namespace qext::nn
