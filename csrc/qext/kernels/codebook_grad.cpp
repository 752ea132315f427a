#include "qext/kernels/codebook_grad.h"

#include <algorithm>

#include "qext/kernels/packed_labels.h"

namespace qext::kernels {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// out[j] = table[j * step + labels[j]] for j in [0, n); returns the first j with a bad label or -1.
template <typename V, typename L>
int64_t gather_run(const V* table, int64_t step, const L* labels, int64_t n, uint64_t k, V* out) {
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t label = label_as_unsigned(labels[j]);
    if (label >= k) return j;
    out[j] = table[j * step + label];
  }
  return -1;
}

// sums[j * step + labels[j]] += grad[j] (and counts likewise) for j in [0, n); returns the first j
// with a bad label or -1.
template <bool kCount, typename G, typename L>
int64_t accumulate_run(const G* grad, const L* labels, int64_t n, uint64_t k, int64_t step,
                       double* sums, int64_t* counts) {
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t label = label_as_unsigned(labels[j]);
    if (label >= k) return j;
    sums[j * step + label] += static_cast<double>(grad[j]);
    if constexpr (kCount) ++counts[j * step + label];
  }
  return -1;
}

template <typename G, typename L>
int64_t accumulate_run(const G* grad, const L* labels, int64_t n, uint64_t k, int64_t step,
                       double* sums, int64_t* counts) {
  return counts != nullptr ? accumulate_run<true>(grad, labels, n, k, step, sums, counts)
                           : accumulate_run<false>(grad, labels, n, k, step, sums, counts);
}

}  // namespace

template <typename V, typename L>
int64_t dequantize_labels(const V* centroids, const L* labels, const CodebookLayout& layout,
                          int64_t begin, int64_t end, V* out) {
  const uint64_t k = static_cast<uint64_t>(layout.k);
  const int64_t codebooks = layout.codebooks, inner = layout.inner;
  // Runs whose codebook rows follow at a fixed step: one codebook (step 0), or, when inner == 1,
  // consecutive codebooks (step k).
  for (int64_t pos = begin; pos < end;) {
    int64_t len = end - pos, codebook = 0, step = 0;
    if (codebooks > 1 && inner == 1) {
      codebook = pos % codebooks;
      len = std::min(len, codebooks - codebook);
      step = layout.k;
    } else if (codebooks > 1) {
      codebook = pos / inner % codebooks;
      len = std::min(len, inner - pos % inner);
    }
    const int64_t bad =
        gather_run(centroids + codebook * layout.k, step, labels + pos, len, k, out + pos);
    if (bad >= 0) return pos + bad;
    pos += len;
  }
  return -1;
}

GradPieces plan_grad_pieces(const CodebookLayout& layout, int64_t piece_elements) {
  GradPieces p;
  p.cols = std::max<int64_t>(1, std::min(layout.inner, piece_elements));
  p.rows = std::max<int64_t>(1, std::min(layout.outer, piece_elements / p.cols));
  p.row_pieces = ceil_div(layout.outer, p.rows);
  p.col_pieces = ceil_div(layout.inner, p.cols);
  return p;
}

template <typename G, typename L>
int64_t accumulate_grad_piece(const G* grad, const L* labels, const CodebookLayout& layout,
                              const GradPieces& pieces, int64_t piece, int64_t c0, int64_t c1,
                              double* sums, int64_t* counts) {
  const int64_t o0 = piece / pieces.col_pieces * pieces.rows;
  const int64_t o1 = std::min(layout.outer, o0 + pieces.rows);
  const int64_t i0 = piece % pieces.col_pieces * pieces.cols;
  const int64_t len = std::min(layout.inner, i0 + pieces.cols) - i0;
  const uint64_t k = static_cast<uint64_t>(layout.k);
  for (int64_t o = o0; o < o1; ++o) {
    if (layout.inner == 1) {
      // Codebooks interleaved: one run over [c0, c1), the rows following at a step of k.
      const int64_t base = o * layout.codebooks + c0;
      const int64_t bad =
          accumulate_run(grad + base, labels + base, c1 - c0, k, layout.k, sums, counts);
      if (bad >= 0) return base + bad;
      continue;
    }
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t base = (o * layout.codebooks + c) * layout.inner + i0;
      const int64_t row = (c - c0) * layout.k;
      const int64_t bad = accumulate_run(grad + base, labels + base, len, k, 0, sums + row,
                                         counts != nullptr ? counts + row : nullptr);
      if (bad >= 0) return base + bad;
    }
  }
  return -1;
}

void finish_centroid_grad(const double* partial_sums, const int64_t* partial_counts,
                          const CodebookLayout& layout, const GradPieces& pieces, int64_t c0,
                          int64_t c1, double* out) {
  const int64_t k = layout.k, row_stride = layout.codebooks * k;
  for (int64_t e = c0 * k; e < c1 * k; ++e) {
    double sum = 0.0;
    int64_t count = 0;
    for (int64_t p = 0; p < pieces.per_codebook(); ++p) {
      sum += partial_sums[p * row_stride + e];
      if (partial_counts != nullptr) count += partial_counts[p * row_stride + e];
    }
    if (partial_counts != nullptr) sum = count > 0 ? sum / static_cast<double>(count) : 0.0;
    out[e] = sum;
  }
}

#define QEXT_INSTANTIATE_DEQUANTIZE(V, L)                                                      \
  template int64_t dequantize_labels<V, L>(const V*, const L*, const CodebookLayout&, int64_t, \
                                           int64_t, V*);
#define QEXT_INSTANTIATE_GRAD(G, L)                                                          \
  template int64_t accumulate_grad_piece<G, L>(const G*, const L*, const CodebookLayout&,    \
                                               const GradPieces&, int64_t, int64_t, int64_t, \
                                               double*, int64_t*);
#define QEXT_INSTANTIATE_FOR_LABEL(L)      \
  QEXT_INSTANTIATE_DEQUANTIZE(uint16_t, L) \
  QEXT_INSTANTIATE_DEQUANTIZE(uint32_t, L) \
  QEXT_INSTANTIATE_DEQUANTIZE(uint64_t, L) \
  QEXT_INSTANTIATE_GRAD(float, L)          \
  QEXT_INSTANTIATE_GRAD(double, L)
QEXT_INSTANTIATE_FOR_LABEL(uint8_t)
QEXT_INSTANTIATE_FOR_LABEL(int32_t)
QEXT_INSTANTIATE_FOR_LABEL(int64_t)
#undef QEXT_INSTANTIATE_FOR_LABEL
#undef QEXT_INSTANTIATE_GRAD
#undef QEXT_INSTANTIATE_DEQUANTIZE

}  // namespace qext::kernels
