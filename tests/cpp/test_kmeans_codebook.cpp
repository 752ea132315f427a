// K-means codebook kernels (kernels/packed_labels.h, kernels/codebook_grad.h) and ops
// (ops/kmeans_codebook.h). Kernels: the packed format against hand-computed bytes, the byte-wise
// packer / unpacker bit for bit against the label-by-label references, the gather against plain
// indexing, and the pieced centroid-gradient sum against a sequential sum written here (bit for
// bit with one piece, to double rounding with many, independent of how codebooks are grouped).
// Ops, from C++: forward against torch indexing, backward through torch::autograd against
// index_add in float64, and a pickle_save / pickle_load round trip of packed labels + codebook.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "qext/kernels/codebook_grad.h"
#include "qext/kernels/packed_labels.h"
#include "qext/ops/kmeans_codebook.h"
#include "qext/qext.h"

namespace {

using qext::kernels::CodebookLayout;
using qext::kernels::GradPieces;

template <typename L>
std::vector<L> random_labels(std::mt19937& rng, int64_t n, int64_t limit) {
  std::uniform_int_distribution<int64_t> dist(0, limit - 1);
  std::vector<L> labels(n);
  for (auto& l : labels) l = static_cast<L>(dist(rng));
  return labels;
}

template <typename G>
std::vector<G> random_grad(std::mt19937& rng, int64_t n) {
  std::normal_distribution<G> normal;
  std::vector<G> grad(n);
  for (auto& g : grad) g = normal(rng);
  return grad;
}

// ---------------------------------------------------------------------------------------------
// Packed labels
// ---------------------------------------------------------------------------------------------

std::vector<uint8_t> pack(const std::vector<uint8_t>& labels, int bits) {
  std::vector<uint8_t> packed(qext::kernels::packed_labels_bytes(labels.size(), bits), 0xAB);
  EXPECT_EQ(qext::kernels::pack_labels(labels.data(), labels.size(), bits, packed.data()), -1);
  return packed;
}

TEST(PackedLabels, HandComputedBytes) {
  // bits 2: 1 | 2 << 2 | 3 << 4 | 0 << 6 = 0x39, then 2 with zero padding.
  EXPECT_EQ(pack({1, 2, 3, 0, 2}, 2), (std::vector<uint8_t>{0x39, 0x02}));
  // bits 1: 1 + 4 + 8 + 128 = 0x8D, then 1.
  EXPECT_EQ(pack({1, 0, 1, 1, 0, 0, 0, 1, 1}, 1), (std::vector<uint8_t>{0x8D, 0x01}));
  EXPECT_EQ(pack({0xA, 0x3, 0xF}, 4), (std::vector<uint8_t>{0x3A, 0x0F}));
  EXPECT_EQ(pack({7, 200, 255}, 8), (std::vector<uint8_t>{7, 200, 255}));
  EXPECT_TRUE(pack({}, 4).empty());
  EXPECT_EQ(qext::kernels::packed_labels_bytes(13, 2), 4);
  EXPECT_EQ(qext::kernels::packed_labels_bytes(13, 1), 2);
}

template <typename L>
void check_pack_matches_reference(std::mt19937& rng) {
  std::vector<int64_t> lengths;
  for (int64_t n = 0; n <= 70; ++n) lengths.push_back(n);
  lengths.insert(lengths.end(), {1000, 4099});
  for (int bits : {1, 2, 4, 8}) {
    for (int64_t n : lengths) {
      const auto labels = random_labels<L>(rng, n, int64_t{1} << bits);
      const int64_t bytes = qext::kernels::packed_labels_bytes(n, bits);
      // Different fill bytes: every output byte must be written.
      std::vector<uint8_t> fast(bytes, 0xAB), ref(bytes, 0x54);
      ASSERT_EQ(qext::kernels::pack_labels(labels.data(), n, bits, fast.data()), -1);
      ASSERT_EQ(qext::kernels::pack_labels_ref(labels.data(), n, bits, ref.data()), -1);
      ASSERT_EQ(fast, ref) << "bits " << bits << " n " << n;

      std::vector<uint8_t> out(n, 0xCD), out_ref(n, 0x32);
      qext::kernels::unpack_labels(fast.data(), n, bits, out.data());
      qext::kernels::unpack_labels_ref(fast.data(), n, bits, out_ref.data());
      ASSERT_EQ(out, out_ref) << "bits " << bits << " n " << n;
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(out[i], static_cast<uint8_t>(labels[i]));
    }
  }
}

TEST(PackedLabels, FastMatchesReferenceAndRoundTrips) {
  std::mt19937 rng(3);
  check_pack_matches_reference<uint8_t>(rng);
  check_pack_matches_reference<int32_t>(rng);
  check_pack_matches_reference<int64_t>(rng);
}

TEST(PackedLabels, ReportsTheFirstLabelOutOfRange) {
  std::mt19937 rng(4);
  for (int bits : {1, 2, 4}) {
    for (int64_t bad_at : {0, 5, 63, 64, 99}) {
      auto labels = random_labels<int32_t>(rng, 100, int64_t{1} << bits);
      labels[bad_at] = 1 << bits;
      labels[99] = -1;  // a later bad label does not hide the first
      std::vector<uint8_t> packed(qext::kernels::packed_labels_bytes(100, bits));
      EXPECT_EQ(qext::kernels::pack_labels(labels.data(), 100, bits, packed.data()), bad_at);
      EXPECT_EQ(qext::kernels::pack_labels_ref(labels.data(), 100, bits, packed.data()), bad_at);
    }
  }
  const std::vector<int64_t> negative{3, -1};
  std::vector<uint8_t> packed(2);
  EXPECT_EQ(qext::kernels::pack_labels(negative.data(), 2, 8, packed.data()), 1);
}

// ---------------------------------------------------------------------------------------------
// Codebook kernels
// ---------------------------------------------------------------------------------------------

// Codebook row of the element at offset j.
int64_t codebook_of(const CodebookLayout& l, int64_t j) { return j / l.inner % l.codebooks; }

int64_t numel(const CodebookLayout& l) { return l.outer * l.codebooks * l.inner; }

const std::vector<CodebookLayout> kLayouts = {
    {1, 1, 1000, 16},  // one codebook
    {1, 6, 170, 4},    // codebooks outermost (axis 0)
    {90, 7, 1, 256},   // codebooks innermost (axis -1)
    {5, 3, 11, 2},     // in between
    {40, 1, 9, 1},     // k = 1
};

TEST(CodebookKernels, DequantizeMatchesIndexing) {
  std::mt19937 rng(5);
  for (const CodebookLayout& l : kLayouts) {
    const int64_t n = numel(l);
    std::vector<uint32_t> table(l.codebooks * l.k);
    for (auto& v : table) v = static_cast<uint32_t>(rng());
    const auto labels = random_labels<int64_t>(rng, n, l.k);
    std::vector<uint32_t> out(n, 0);
    // Arbitrary chunks: the result may not depend on where the caller cuts.
    for (int64_t begin = 0; begin < n;) {
      const int64_t end = std::min<int64_t>(n, begin + 1 + rng() % 97);
      ASSERT_EQ(
          qext::kernels::dequantize_labels(table.data(), labels.data(), l, begin, end, out.data()),
          -1);
      begin = end;
    }
    for (int64_t j = 0; j < n; ++j) {
      ASSERT_EQ(out[j], table[codebook_of(l, j) * l.k + labels[j]]) << "offset " << j;
    }
    auto bad = labels;
    bad[n / 2] = l.k;
    bad[n - 1] = -3;
    EXPECT_EQ(qext::kernels::dequantize_labels(table.data(), bad.data(), l, 0, n, out.data()),
              n / 2);
    EXPECT_EQ(
        qext::kernels::dequantize_labels(table.data(), bad.data(), l, n / 2 + 1, n, out.data()),
        n - 1);
  }
}

// The centroid gradient through the pieces, the way the CPU op runs it: every task's partial row,
// grouping `group` codebooks per accumulate call, then finish_centroid_grad.
template <typename G, typename L>
std::vector<double> pieced_grad(const std::vector<G>& grad, const std::vector<L>& labels,
                                const CodebookLayout& l, int64_t piece_elements, int64_t group,
                                bool mean) {
  const GradPieces pieces = qext::kernels::plan_grad_pieces(l, piece_elements);
  const int64_t tasks = pieces.per_codebook() * l.codebooks;
  std::vector<double> sums(tasks * l.k, 0.0);
  std::vector<int64_t> counts(tasks * l.k, 0);
  for (int64_t p = 0; p < pieces.per_codebook(); ++p) {
    for (int64_t c0 = 0; c0 < l.codebooks; c0 += group) {
      const int64_t c1 = std::min(l.codebooks, c0 + group);
      const int64_t row = (p * l.codebooks + c0) * l.k;
      EXPECT_EQ(qext::kernels::accumulate_grad_piece(grad.data(), labels.data(), l, pieces, p, c0,
                                                     c1, sums.data() + row,
                                                     mean ? counts.data() + row : nullptr),
                -1);
    }
  }
  std::vector<double> out(l.codebooks * l.k);
  qext::kernels::finish_centroid_grad(sums.data(), mean ? counts.data() : nullptr, l, pieces, 0,
                                      l.codebooks, out.data());
  return out;
}

// The same gradient as one sequential pass in memory order (double sums), for reference.
template <typename G, typename L>
std::vector<double> sequential_grad(const std::vector<G>& grad, const std::vector<L>& labels,
                                    const CodebookLayout& l, bool mean) {
  std::vector<double> sums(l.codebooks * l.k, 0.0), counts(l.codebooks * l.k, 0.0);
  for (int64_t j = 0; j < numel(l); ++j) {
    const int64_t bin = codebook_of(l, j) * l.k + labels[j];
    sums[bin] += grad[j];
    counts[bin] += 1;
  }
  if (mean) {
    for (size_t b = 0; b < sums.size(); ++b) sums[b] = counts[b] > 0 ? sums[b] / counts[b] : 0.0;
  }
  return sums;
}

TEST(CodebookKernels, OnePieceIsTheSequentialSumBitForBit) {
  std::mt19937 rng(6);
  for (const CodebookLayout& l : kLayouts) {
    const auto grad = random_grad<float>(rng, numel(l));
    const auto labels = random_labels<uint8_t>(rng, numel(l), l.k);
    for (bool mean : {false, true}) {
      const auto ref = sequential_grad(grad, labels, l, mean);
      EXPECT_EQ(pieced_grad(grad, labels, l, int64_t{1} << 40, 1, mean), ref);
      EXPECT_EQ(pieced_grad(grad, labels, l, int64_t{1} << 40, l.codebooks, mean), ref);
    }
  }
}

TEST(CodebookKernels, PiecesCoverEveryElementOnceAndNeverDependOnGrouping) {
  std::mt19937 rng(7);
  for (const CodebookLayout& l : kLayouts) {
    const auto grad = random_grad<double>(rng, numel(l));
    const auto labels = random_labels<int32_t>(rng, numel(l), l.k);
    const std::vector<double> ones(numel(l), 1.0);
    for (int64_t piece_elements : {1, 7, 64, 1000}) {
      for (bool mean : {false, true}) {
        const auto ref = sequential_grad(grad, labels, l, mean);
        const auto one_by_one = pieced_grad(grad, labels, l, piece_elements, 1, mean);
        EXPECT_EQ(pieced_grad(grad, labels, l, piece_elements, 3, mean), one_by_one);
        EXPECT_EQ(pieced_grad(grad, labels, l, piece_elements, l.codebooks, mean), one_by_one);
        for (size_t b = 0; b < ref.size(); ++b) {
          ASSERT_NEAR(one_by_one[b], ref[b], 1e-12 * (1 + std::abs(ref[b]))) << "bin " << b;
        }
      }
      // Sums of ones are the cluster sizes, exactly: each element counted once.
      const auto sizes = pieced_grad(ones, labels, l, piece_elements, 2, false);
      EXPECT_EQ(sizes, sequential_grad(ones, labels, l, false));
    }
  }
}

TEST(CodebookKernels, MeanOfAnEmptyClusterIsZeroAndBadLabelsAreReported) {
  const CodebookLayout l{1, 1, 4, 3};  // label 1 has no member
  const std::vector<float> grad{1.f, 2.f, 4.f, 8.f};
  const std::vector<int64_t> labels{0, 2, 0, 2};
  EXPECT_EQ(pieced_grad(grad, labels, l, 2, 1, true), (std::vector<double>{2.5, 0.0, 5.0}));
  EXPECT_EQ(pieced_grad(grad, labels, l, 2, 1, false), (std::vector<double>{5.0, 0.0, 10.0}));

  const std::vector<int64_t> bad{0, 2, 3, -1};
  const GradPieces pieces = qext::kernels::plan_grad_pieces(l);
  std::vector<double> sums(3, 0.0);
  EXPECT_EQ(qext::kernels::accumulate_grad_piece(grad.data(), bad.data(), l, pieces, 0, 0, 1,
                                                 sums.data(), nullptr),
            2);
}

// ---------------------------------------------------------------------------------------------
// Ops, from C++
// ---------------------------------------------------------------------------------------------

// centroids[labels] by torch indexing, one codebook or one per index along `axis`.
torch::Tensor index_reference(const torch::Tensor& centroids, const torch::Tensor& labels,
                              std::optional<int64_t> axis) {
  const auto idx = labels.to(torch::kLong);
  if (!axis) return centroids.index({idx});
  const int64_t a = *axis < 0 ? *axis + labels.dim() : *axis;
  std::vector<int64_t> view(labels.dim(), 1);
  view[a] = labels.size(a);
  const auto rows = torch::arange(labels.size(a)).view(view).expand(labels.sizes());
  return centroids.index({rows, idx});
}

// dL/dC by index_add in float64: sum (or mean) of upstream per (codebook, label).
torch::Tensor index_add_reference(const torch::Tensor& upstream, const torch::Tensor& labels,
                                  int64_t codebooks, int64_t k, std::optional<int64_t> axis,
                                  bool mean) {
  auto bins = labels.to(torch::kLong);
  if (axis) {
    const int64_t a = *axis < 0 ? *axis + labels.dim() : *axis;
    std::vector<int64_t> view(labels.dim(), 1);
    view[a] = labels.size(a);
    bins = bins + torch::arange(labels.size(a)).view(view) * k;
  }
  bins = bins.reshape(-1);
  auto sums = torch::zeros({codebooks * k}, torch::kDouble)
                  .index_add_(0, bins, upstream.reshape(-1).to(torch::kDouble));
  if (mean) {
    const auto sizes = torch::zeros({codebooks * k}, torch::kDouble)
                           .index_add_(0, bins, torch::ones({bins.numel()}, torch::kDouble));
    sums = torch::where(sizes > 0, sums / sizes, torch::zeros_like(sums));
  }
  return axis ? sums.view({codebooks, k}) : sums;
}

TEST(KMeansCodebookOps, ForwardAndBackwardFromCpp) {
  torch::manual_seed(0);
  const auto shape = std::vector<int64_t>{6, 5, 3};
  for (std::optional<int64_t> axis : {std::optional<int64_t>(), std::optional<int64_t>(0),
                                      std::optional<int64_t>(1), std::optional<int64_t>(-1)}) {
    const int64_t k = 4;
    const int64_t codebooks = axis ? shape[*axis < 0 ? *axis + 3 : *axis] : 1;
    const auto labels = torch::randint(0, k, shape, torch::kUInt8);
    const auto base = axis ? torch::randn({codebooks, k}) : torch::randn({k});
    const auto upstream = torch::randn(shape);
    for (bool mean : {false, true}) {
      auto centroids = base.clone().requires_grad_();
      const auto w = qext::ops::kmeans_dequantize(centroids, labels, axis, mean);
      EXPECT_TRUE(w.requires_grad());
      EXPECT_TRUE(torch::equal(w.detach(), index_reference(base, labels, axis)));
      w.backward(upstream);
      const auto ref = index_add_reference(upstream, labels, codebooks, k, axis, mean);
      EXPECT_TRUE(torch::allclose(centroids.grad().to(torch::kDouble), ref, 1e-6, 1e-6))
          << "axis " << (axis ? std::to_string(*axis) : "None") << " mean " << mean;
    }
  }
}

TEST(KMeansCodebookOps, PackedCodebookSurvivesPickleSaveAndLoadBitForBit) {
  torch::manual_seed(1);
  const auto weight_labels = torch::randint(0, 16, {7, 9, 3}, torch::kUInt8);
  // Centroids with bit patterns that a lossy path would change: subnormal, -0, NaN payload.
  auto centroids = torch::randn({16});
  centroids[3] = 1e-40f;
  centroids[4] = -0.0f;
  centroids[5] = std::nanf("0x123");
  const auto packed = qext::ops::pack_labels(weight_labels, 4);
  ASSERT_EQ(packed.numel(), (7 * 9 * 3 * 4 + 7) / 8);

  c10::Dict<std::string, torch::Tensor> state;
  state.insert("packed_labels", packed);
  state.insert("centroids", centroids);
  const std::vector<char> bytes = torch::pickle_save(state);
  const auto loaded = torch::pickle_load(bytes).toGenericDict();
  const auto packed2 = loaded.at("packed_labels").toTensor();
  const auto centroids2 = loaded.at("centroids").toTensor();

  ASSERT_EQ(packed2.scalar_type(), torch::kUInt8);
  ASSERT_EQ(centroids2.scalar_type(), torch::kFloat);
  EXPECT_EQ(std::memcmp(packed2.data_ptr(), packed.data_ptr(), packed.numel()), 0);
  ASSERT_EQ(centroids2.numel(), 16);
  EXPECT_EQ(std::memcmp(centroids2.data_ptr(), centroids.data_ptr(), 16 * sizeof(float)), 0);
  const auto labels2 = qext::ops::unpack_labels(packed2, 4, {7, 9, 3});
  EXPECT_TRUE(torch::equal(labels2, weight_labels));
  const auto w = qext::ops::kmeans_dequantize(centroids, weight_labels);
  const auto w2 = qext::ops::kmeans_dequantize(centroids2, labels2);
  EXPECT_EQ(std::memcmp(w.data_ptr(), w2.data_ptr(), w.numel() * sizeof(float)), 0);
}

TEST(KMeansCodebookOps, BadInputGetsClearErrors) {
  const auto centroids = torch::randn({4});
  auto labels = torch::zeros({2, 3}, torch::kInt);
  labels[1][2] = 7;
  const auto before = labels.clone();
  try {
    qext::ops::kmeans_dequantize(centroids, labels);
    ADD_FAILURE() << "no error for a label out of the codebook";
  } catch (const c10::IndexError& e) {
    const std::string what = e.what_without_backtrace();
    EXPECT_NE(what.find("qext::kmeans_dequantize: labels must be in [0, k)"), std::string::npos)
        << what;
    EXPECT_NE(what.find("k = 4"), std::string::npos) << what;
    EXPECT_NE(what.find("got 7 at index [1, 2]"), std::string::npos) << what;
  }
  EXPECT_TRUE(torch::equal(labels, before));

  EXPECT_THROW(qext::ops::pack_labels(labels, 3), c10::ValueError);
  try {
    qext::ops::unpack_labels(torch::zeros({3}, torch::kUInt8), 4, {7});
    ADD_FAILURE() << "no error for packed data of the wrong length";
  } catch (const c10::ValueError& e) {
    const std::string what = e.what_without_backtrace();
    EXPECT_NE(what.find("packed has 3 bytes"), std::string::npos) << what;
    EXPECT_NE(what.find("need 4 bytes"), std::string::npos) << what;
  }
}

}  // namespace
