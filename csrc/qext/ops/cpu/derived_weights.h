// Weight layouts derived at call time from a packed weight (pack_quantized_weight's output): the
// implicit convolution's segment layout, the block-diagonal weight of a grouped convolution. They
// depend on the call's geometry and on the ISA the call runs, so the op derives them rather than
// convert(); this cache makes that happen once per packed weight, as if done at convert time.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

namespace qext::ops::detail {

// The layout `kind` of `packed`: make() on the first call for (packed, kind), and again after
// packed changed in place (its version counter moved) or was resized; the cached tensor otherwise.
// An entry holds only a weak reference to packed and is dropped once packed is freed. Inference
// tensors (no version counter) are not cached: make() every call.
at::Tensor derived_weight(const at::Tensor& packed, int64_t kind,
                          const std::function<at::Tensor()>& make);

// Entries held (live, or of freed weights not yet pruned); for the tests.
int64_t derived_weight_entries();

}  // namespace qext::ops::detail
