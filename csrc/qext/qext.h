// Public C++ API of qext (the operators, qext::ops): include this and link Qext::qext. The C++
// modules (QAT, converted integer modules, convert) are in qext/nn.h.
#pragma once

#include <string>

#include "qext/ops/fake_quantize.h"
#include "qext/ops/fake_quantize_learnable.h"
#include "qext/ops/fake_quantize_observe.h"
#include "qext/ops/kmeans.h"
#include "qext/ops/kmeans_codebook.h"
#include "qext/ops/kmeans_lut.h"
#include "qext/ops/observe.h"
#include "qext/ops/quantize.h"
#include "qext/ops/quantized_layers.h"

namespace qext {

// "0.1.0".
std::string version();

// True when libqext was built with its CUDA kernels.
bool with_cuda();

namespace detail {
// Referenced from every program that includes this header, so the linker keeps libqext (and
// its operator registrations) even when the program calls nothing else from it directly.
int link_anchor();
[[maybe_unused]] static const int kLinkAnchor = link_anchor();
}  // namespace detail

}  // namespace qext
