// K-means codebook kernels: dequantization (a gather through the codebook) and the centroid
// gradient (a segmented sum of the weight gradient by label). Framework-free: raw pointers in and
// out, no threads; the caller cuts the work (see GradPieces) and runs the pieces in parallel.
#pragma once

#include <cstdint>

namespace qext::kernels {

// A dense row-major labels tensor viewed as [outer, codebooks, inner]: the element at offset
// (o * codebooks + c) * inner + i uses codebook row c, the k centroids at c * k. One codebook for
// the whole tensor: codebooks = 1 (outer = 1, inner = numel).
struct CodebookLayout {
  int64_t outer = 1;
  int64_t codebooks = 1;
  int64_t inner = 1;
  int64_t k = 1;
};

// out[j] = centroids[c(j) * k + labels[j]] for the offsets j in [begin, end). V is the centroids'
// storage type of their width (uint16_t, uint32_t or uint64_t): a gather copies bits, so one
// instantiation serves every floating dtype of that width. L: uint8_t, int32_t or int64_t.
// Returns the first offset whose label is outside [0, k), or -1; after a bad label `out` is
// written only in part.
template <typename V, typename L>
int64_t dequantize_labels(const V* centroids, const L* labels, const CodebookLayout& layout,
                          int64_t begin, int64_t end, V* out);

// ---------------------------------------------------------------------------------------------
// Centroid gradient: dC[c][b] = sum of grad[j] over the elements j of codebook c with label b.
// The sum is cut into pieces of fixed size, so that it depends on the shape alone, never on how
// many threads run it: each codebook's elements, in (o, i) order, are cut into consecutive
// pieces, each a rectangle of `rows` outer by `cols` inner indices (cols = min(inner, piece
// size), rows = min(outer, max(1, piece size / cols))). Piece p of codebook c is summed in (o, i)
// order into its own partial row; the partial rows are then added in piece order
// (finish_centroid_grad). Sums are in double, float32 gradients included: a float32 sum of the ~n/k
// terms of a bin loses up to log2(n/k) bits, a double sum rounded once is within half a float32 ulp
// (2048 x 2048 weight, k = 16: torch's float32 index_add_ is off by 9e-3, the double sum by 3e-5;
// see benchmarks/bench_kmeans_codebook.py). The scalar loop is bound by its load-add-store chain
// through the bin, not by the width of the add, so double costs no time.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kGradPieceElements = int64_t{1} << 15;

struct GradPieces {
  int64_t rows = 1;                                                 // outer indices per piece
  int64_t cols = 1;                                                 // inner indices per piece
  int64_t row_pieces = 0;                                           // ceil(outer / rows)
  int64_t col_pieces = 0;                                           // ceil(inner / cols)
  int64_t per_codebook() const { return row_pieces * col_pieces; }  // 0 for an empty tensor
};

GradPieces plan_grad_pieces(const CodebookLayout& layout,
                            int64_t piece_elements = kGradPieceElements);

// Adds piece `piece` of the codebooks [c0, c1) into their rows of `sums` (k doubles per codebook,
// row c at (c - c0) * k): sums[b] += grad[j] for every element j of the piece with label b, and
// counts[b] += 1 when counts is not null (same layout, for the mean). Elements are visited in
// (o, c, i) order, so every codebook's row is summed in its (o, i) order whichever codebooks share
// the call. G: float or double; L: uint8_t, int32_t or int64_t. Returns the first offset (in the
// order visited) whose label is outside [0, k), or -1.
template <typename G, typename L>
int64_t accumulate_grad_piece(const G* grad, const L* labels, const CodebookLayout& layout,
                              const GradPieces& pieces, int64_t piece, int64_t c0, int64_t c1,
                              double* sums, int64_t* counts);

// out[c * k + b] for the codebooks c in [c0, c1): the sum over the pieces p, in order, of
// partial_sums[(p * codebooks + c) * k + b]; with partial_counts (same layout), that sum divided by
// the cluster's size (0 for an empty cluster).
void finish_centroid_grad(const double* partial_sums, const int64_t* partial_counts,
                          const CodebookLayout& layout, const GradPieces& pieces, int64_t c0,
                          int64_t c1, double* out);

}  // namespace qext::kernels
