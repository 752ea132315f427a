#include "qext/ops/common/kmeans_args.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "qext/ops/common/quant_params.h"

namespace qext::ops::detail {
namespace {

constexpr const char* kOp = "qext::kmeans";

kernels::KMeansInit parse_init(c10::string_view init) {
  if (init == "linear") return kernels::KMeansInit::kLinear;
  if (init == "density") return kernels::KMeansInit::kDensity;
  if (init == "kmeans++") return kernels::KMeansInit::kPlusPlus;
  TORCH_CHECK_VALUE(false, kOp, ": init must be \"linear\", \"density\" or \"kmeans++\", got \"",
                    std::string(init), "\"");
}

}  // namespace

KMeansArgs check_kmeans_args(const at::Tensor& weight, int64_t k, std::optional<int64_t> axis,
                             c10::string_view init, int64_t max_iters, int64_t seed) {
  TORCH_CHECK(weight.defined(), kOp, ": weight is an undefined tensor");
  const at::ScalarType dtype = weight.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      kOp,
      ": weight must be a floating-point tensor (float32, float64, float16 or "
      "bfloat16), got ",
      dtype);
  KMeansArgs args;
  args.axis = normalize_axis(weight, axis, kOp);
  TORCH_CHECK_VALUE(weight.numel() > 0, kOp, ": weight is empty (shape ", weight.sizes(),
                    "): there is nothing to cluster");
  TORCH_CHECK_VALUE(k >= 1 && k <= kernels::kKMeansMaxK, kOp, ": k must be in [1, ",
                    kernels::kKMeansMaxK, "] (labels are uint8), got ", k);
  args.rows = args.axis.has_value() ? weight.size(*args.axis) : 1;
  args.row_size = weight.numel() / args.rows;
  if (args.axis.has_value()) {
    TORCH_CHECK_VALUE(k <= args.row_size, kOp, ": k = ", k,
                      " is larger than the number of weights per codebook, ", args.row_size,
                      " (one codebook per index along axis ", *args.axis, " of shape ",
                      weight.sizes(), ")");
  } else {
    TORCH_CHECK_VALUE(k <= args.row_size, kOp, ": k = ", k,
                      " is larger than the number of weights, ", args.row_size);
  }
  args.k = k;
  args.init = parse_init(init);
  TORCH_CHECK_VALUE(max_iters >= 0, kOp, ": max_iters must be >= 0, got ", max_iters);
  args.max_iters = max_iters;
  args.seed = static_cast<uint64_t>(seed);
  return args;
}

at::Tensor kmeans_rows(const at::Tensor& weight, const KMeansArgs& args) {
  at::Tensor x = weight.to(weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  if (args.axis.has_value()) x = x.movedim(*args.axis, 0);
  return x.contiguous().view({args.rows, args.row_size});
}

Codebooks cluster_rows(const at::Tensor& rows, const KMeansArgs& args, at::ScalarType out_dtype) {
  const int64_t k = args.k, n = args.row_size;
  at::Tensor centroids = at::empty({args.rows, k}, rows.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "kmeans", [&] {
    const scalar_t* x = rows.const_data_ptr<scalar_t>();
    double* c = centroids.mutable_data_ptr<double>();
    std::vector<scalar_t> non_finite(args.rows);
    std::vector<char> finite(args.rows, 1);
    at::parallel_for(0, args.rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        finite[r] = kernels::kmeans1d(x + r * n, n, k, args.init, args.max_iters, args.seed,
                                      c + r * k, &non_finite[r]);
      }
    });
    for (int64_t r = 0; r < args.rows; ++r) {
      TORCH_CHECK_VALUE(finite[r], kOp, ": weight must be finite, found ", non_finite[r],
                        args.axis.has_value() ? " in codebook " + std::to_string(r) +
                                                    " along axis " + std::to_string(*args.axis)
                                              : std::string());
    }
  });
  at::Tensor out = centroids.to(out_dtype);
  // Labels go to the nearest of the centroids as returned, after rounding to out_dtype.
  const at::Tensor rounded = out.to(at::kDouble);
  at::Tensor trees = at::empty({args.rows, kernels::search_tree_size(k)}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "kmeans_trees", [&] {
    std::vector<scalar_t> bounds(k);
    for (int64_t r = 0; r < args.rows; ++r) {
      kernels::label_boundaries(rounded.const_data_ptr<double>() + r * k, k, bounds.data());
      kernels::build_search_tree(bounds.data(), k,
                                 trees.mutable_data_ptr<scalar_t>() + r * trees.size(1));
    }
  });
  return {args.axis.has_value() ? out : out.view({k}), trees};
}

at::Tensor labels_like(const at::Tensor& row_labels, const at::Tensor& weight,
                       const KMeansArgs& args) {
  if (!args.axis.has_value()) return row_labels.view(weight.sizes());
  std::vector<int64_t> moved(weight.sizes().begin(), weight.sizes().end());
  moved.erase(moved.begin() + *args.axis);
  moved.insert(moved.begin(), args.rows);
  return row_labels.view(moved).movedim(0, *args.axis).contiguous();
}

}  // namespace qext::ops::detail
