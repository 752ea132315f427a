// Autograd for kmeans_dequantize. The centroid gradient is the op _kmeans_centroid_grad (one
// deterministic pass over grad and the labels, on CPU and CUDA); only the labels are saved. That
// op is linear in grad and differentiable in turn (its derivative is a gather through the labels,
// i.e. kmeans_dequantize again), so gradients of any order work.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "qext/ops/kmeans_codebook.h"

namespace qext::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

at::Tensor kmeans_centroid_grad(const at::Tensor& grad, const at::Tensor& labels, int64_t k,
                                std::optional<int64_t> axis, bool mean) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::_kmeans_centroid_grad", "")
                       .typed<decltype(kmeans_centroid_grad)>();
  return op.call(grad, labels, k, axis, mean);
}

// What both functions keep for their backward: the labels (saved) and the op's arguments.
void save_codebook(AutogradContext* ctx, const at::Tensor& labels, int64_t k,
                   std::optional<int64_t> axis, bool mean) {
  ctx->save_for_backward({labels});
  ctx->saved_data["k"] = k;
  ctx->saved_data["axis"] = axis;
  ctx->saved_data["mean"] = mean;
}

struct SavedCodebook {
  at::Tensor labels;
  int64_t k;
  std::optional<int64_t> axis;
  bool mean;
};

SavedCodebook saved_codebook(AutogradContext* ctx) {
  return {ctx->get_saved_variables()[0], ctx->saved_data["k"].toInt(),
          ctx->saved_data["axis"].toOptional<int64_t>(), ctx->saved_data["mean"].toBool()};
}

class KMeansDequantizeFunction : public torch::autograd::Function<KMeansDequantizeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& centroids,
                               const Variable& labels, std::optional<int64_t> axis, bool mean) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = kmeans_dequantize(centroids, labels, axis, mean);
    save_codebook(ctx, labels, centroids.size(-1), axis, mean);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const SavedCodebook s = saved_codebook(ctx);
    return {kmeans_centroid_grad(grad_outputs[0], s.labels, s.k, s.axis, s.mean), Variable(),
            Variable(), Variable()};
  }
};

// d(centroid grad)/d(grad): sum -> gather of the upstream rows through the labels; mean -> the
// same after dividing each row entry by its cluster's size (0 for an empty cluster).
class KMeansCentroidGradFunction : public torch::autograd::Function<KMeansCentroidGradFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& grad, const Variable& labels,
                               int64_t k, std::optional<int64_t> axis, bool mean) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = kmeans_centroid_grad(grad, labels, k, axis, mean);
    save_codebook(ctx, labels, k, axis, mean);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const SavedCodebook s = saved_codebook(ctx);
    at::Tensor upstream = grad_outputs[0];
    if (s.mean) {
      // Cluster sizes are constants: the sum of ones per label.
      const at::Tensor sizes = kmeans_centroid_grad(at::ones(s.labels.sizes(), upstream.options()),
                                                    s.labels, s.k, s.axis, false);
      const at::Tensor inverse =
          at::where(at::gt(sizes, 0), at::reciprocal(sizes), at::zeros_like(sizes));
      upstream = at::mul(upstream, inverse);
    }
    return {kmeans_dequantize(upstream, s.labels, s.axis, false), Variable(), Variable(),
            Variable(), Variable()};
  }
};

at::Tensor kmeans_dequantize_autograd(const at::Tensor& centroids, const at::Tensor& labels,
                                      std::optional<int64_t> axis, bool mean) {
  if (!(at::GradMode::is_enabled() && centroids.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return kmeans_dequantize(centroids, labels, axis, mean);
  }
  return KMeansDequantizeFunction::apply(centroids, labels, axis, mean)[0];
}

at::Tensor kmeans_centroid_grad_autograd(const at::Tensor& grad, const at::Tensor& labels,
                                         int64_t k, std::optional<int64_t> axis, bool mean) {
  if (!(at::GradMode::is_enabled() && grad.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return kmeans_centroid_grad(grad, labels, k, axis, mean);
  }
  return KMeansCentroidGradFunction::apply(grad, labels, k, axis, mean)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, Autograd, m) {
  m.impl("kmeans_dequantize", kmeans_dequantize_autograd);
  m.impl("_kmeans_centroid_grad", kmeans_centroid_grad_autograd);
}

}  // namespace qext::ops
