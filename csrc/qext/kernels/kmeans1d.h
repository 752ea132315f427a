// Exact 1-D k-means (Lloyd's algorithm) without sorting the data. Framework-free: raw pointers in
// and out.
//
// Lloyd's steps only need, at each midpoint t between two centroids, the number of values <= t and
// their sum. RankIndex answers these queries from a radix tree over the order-preserving integer
// keys of the values that is built lazily: one pass over the data splits it by the top bits of the
// key (sign, exponent and the leading mantissa bits); a node is split further only when a query
// descends into it. Each node keeps the exact integer sum of its values' mantissas (all values of a
// node share one binade), so every answer is a function of the multiset of values alone: it does
// not depend on the order of the data, on threads, or on the device the data came from.
//
// Assignment rule (Lloyd's steps and the final labels alike): with centroids c_0 <= ... <= c_{k-1}
// and midpoints m_j = 0.5 * c_j + 0.5 * c_{j+1} in double, x goes to cluster #{j : x > m_j}: the
// nearest centroid, ties to the lower index.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

// tree_label is also called from CUDA kernels.
#ifndef QEXT_HOST_DEVICE
#if defined(__CUDACC__)
#define QEXT_HOST_DEVICE __host__ __device__
#else
#define QEXT_HOST_DEVICE
#endif
#endif

namespace qext::kernels {

// Labels are uint8.
constexpr int64_t kKMeansMaxK = 256;

enum class KMeansInit {
  // Evenly spaced between the minimum and the maximum.
  kLinear,
  // The values of rank floor((2j + 1) n / 2k): evenly spaced quantiles (Deep Compression).
  kDensity,
  // k-means++ (D^2 sampling) on the M = min(n, kPlusPlusPoints) values of rank
  // floor((2i + 1) n / 2M), i < M: a deterministic summary of the data.
  kPlusPlus
};

// k-means++ samples from at most this many quantiles of the data.
constexpr int64_t kPlusPlusPoints = 4096;

// The integer keys of the radix tree: uint32 for float, uint64 for double.
template <typename T>
using SortKey = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

// Order statistics of n values (T: float or double), built lazily. x is read by the constructor
// only. Not thread-safe: queries refine the tree.
template <typename T>
class RankIndex {
 public:
  using Key = SortKey<T>;
  // Exact sums of mantissas: 64 bits hold 2^40 float mantissas; double needs 128.
  using Acc = std::conditional_t<sizeof(T) == 4, uint64_t, unsigned __int128>;

  // Number of values <= t and their sum, as an unevaluated sum hi + lo of doubles.
  struct Prefix {
    int64_t count = 0;
    double hi = 0.0;
    double lo = 0.0;
  };

  RankIndex(const T* x, int64_t n);

  int64_t size() const { return n_; }

  // Values <= t (-0 and +0 are equal; every value <= +inf, NaNs aside).
  Prefix below(double t);

  // The value of rank r (0 <= r < n) in ascending order; negative NaNs first, positive NaNs last,
  // as in the order of the keys. -0 is returned as +0.
  T at_rank(int64_t r);

 private:
  struct Node {
    int64_t begin, end;  // the node's keys are keys_[begin, end)
    int bits;            // low key bits not yet fixed by the path to the node
  };
  // A split node: where each child starts and the exact mantissa sums before it, per digit value.
  struct Split {
    int64_t begin;
    int shift, bits;                    // digit = (key >> shift) & (2^bits - 1)
    std::vector<int64_t> count_before;  // 2^bits + 1 entries, offsets from begin
    std::vector<Acc> raw_before;        // sums of the mantissa fields, 2^bits + 1 entries
    std::vector<int32_t> child_split;   // index in splits_, -1 while the child is unsplit
  };

  // Descends from the root's child `top` to a leaf, taking at each split the child choose(split)
  // (the digit of a key, or the child holding a rank) and splitting nodes on the way; adds the
  // counts and mantissa sums of the siblings passed on the left to *count and *raw.
  template <typename Choose>
  Node descend(int64_t top, Choose choose, int64_t* count, Acc* raw);
  int32_t split(const Node& node);
  // The value of `count` values of the root's child `top` whose mantissa fields sum to raw.
  double top_value(int64_t top, int64_t count, Acc raw) const;

  // Key arrays of millions of entries: fresh memory whose page faults would cost more than the
  // passes over it, so it asks for transparent huge pages where the OS has them.
  struct FreeMemory {
    void operator()(Key* p) const { std::free(p); }
  };
  using KeyArray = std::unique_ptr<Key[], FreeMemory>;
  static KeyArray allocate(int64_t n);

  int64_t n_;
  int top_bits_;    // the root splits by this many leading key bits
  KeyArray keys_;   // partitioned: every node is a contiguous range
  KeyArray spare_;  // the keys of the node being split, spare_size_ of them at most
  int64_t spare_size_ = 0;
  // The root's children: start offsets, and double-double sums before each.
  std::vector<int64_t> top_begin_;
  std::vector<double> top_hi_, top_lo_;
  std::vector<int32_t> top_split_;
  std::vector<Split> splits_;
};

// Initial centroids (k of them, ascending), 1 <= k <= n. The seed is used by kPlusPlus only.
template <typename T>
void init_centroids(RankIndex<T>& data, int64_t k, KMeansInit init, uint64_t seed,
                    double* centroids);

// Lloyd iterations from the ascending centroids[0, k), in place, until no centroid changes or
// max_iters. A cluster that gets no value keeps its centroid. Returns the number of iterations that
// moved a centroid (less than max_iters means converged). The centroids stay ascending (a no-op in
// exact arithmetic; it guards the order against rounding in the last bit).
template <typename T>
int64_t lloyd(RankIndex<T>& data, int64_t k, int64_t max_iters, double* centroids);

// init_centroids, then lloyd, on x[0, n). Returns false, with one of the offending values in
// *non_finite and the centroids untouched, when x holds a NaN or an infinity.
template <typename T>
bool kmeans1d(const T* x, int64_t n, int64_t k, KMeansInit init, int64_t max_iters, uint64_t seed,
              double* centroids, T* non_finite);

// The label boundaries of ascending centroids: bounds[j] = the largest T <= m_j, j < k - 1, so
// that for any T x, x > bounds[j] exactly when x > m_j.
template <typename T>
void label_boundaries(const double* centroids, int64_t k, T* bounds);

// Levels of the search tree over k - 1 boundaries: ceil(log2(k)).
inline int search_levels(int64_t k) {
  int levels = 0;
  while ((int64_t{1} << levels) < k) ++levels;
  return levels;
}

// Number of entries of the search tree for k clusters.
inline int64_t search_tree_size(int64_t k) { return (int64_t{1} << search_levels(k)) - 1; }

// The implicit binary search tree of bounds[0, k - 1) padded with +inf to 2^levels - 1 entries,
// level by level: level l holds its 2^l nodes at [2^l - 1, 2^(l+1) - 1).
template <typename T>
void build_search_tree(const T* bounds, int64_t k, T* tree);

// #{j : x > bounds[j]} by a branch-free descent of the tree (x finite).
template <typename T>
QEXT_HOST_DEVICE inline int tree_label(T x, const T* tree, int levels) {
  int node = 0;
  for (int l = 0; l < levels; ++l) node = 2 * node + (x > tree[(1 << l) - 1 + node] ? 1 : 0);
  return node;
}

// labels[i] = tree_label(x[i], tree, levels).
template <typename T>
void assign_labels(const T* x, int64_t n, const T* tree, int levels, uint8_t* labels);

// The same labels with AVX2 (kmeans1d_avx2.cpp); call only when cpu_has_avx2() is true.
void assign_labels_avx2(const float* x, int64_t n, const float* tree, int levels, uint8_t* labels);

// Reference: labels[i] = #{j : x[i] > bounds[j]} by a plain count over the k - 1 boundaries.
template <typename T>
void assign_labels_ref(const T* x, int64_t n, const T* bounds, int64_t k, uint8_t* labels) {
  for (int64_t i = 0; i < n; ++i) {
    int label = 0;
    for (int64_t j = 0; j + 1 < k; ++j) label += x[i] > bounds[j] ? 1 : 0;
    labels[i] = static_cast<uint8_t>(label);
  }
}

}  // namespace qext::kernels
