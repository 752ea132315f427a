#include "qext/kernels/kmeans1d.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace qext::kernels {
namespace {

// ------------------------------------------------------------------------------------------------
// Keys
// ------------------------------------------------------------------------------------------------

template <typename T>
struct Layout;
template <>
struct Layout<float> {
  static constexpr int kMantissaBits = 23;
  static constexpr int kExponentBits = 8;
  static constexpr int kBias = 127;
};
template <>
struct Layout<double> {
  static constexpr int kMantissaBits = 52;
  static constexpr int kExponentBits = 11;
  static constexpr int kBias = 1023;
};

template <typename T>
constexpr int kKeyBits = static_cast<int>(sizeof(SortKey<T>) * 8);

// The root splits the keys by sign, exponent and, for large n, leading mantissa bits: each child
// lies in one binade, so the values of a node are its mantissa fields times one power of two. About
// n / 16 children, up to kMaxTopBits (finer roots leave fewer values to split when queries come).
constexpr int kMaxTopBits = 14;
template <typename T>
int top_bits(int64_t n) {
  int log2n = 0;
  while ((int64_t{1} << (log2n + 1)) <= n) ++log2n;
  return std::clamp(log2n - 4, 1 + Layout<T>::kExponentBits, kMaxTopBits);
}
// Deeper nodes split by this many bits.
constexpr int kDigitBits = 8;
// Nodes with at most this many keys are scanned, not split.
constexpr int64_t kLeafKeys = 128;
// Above this many keys the root's scatter uses line buffers and streaming stores (its destinations
// are then spread over far more memory than the caches and TLB cover).
constexpr int64_t kStreamingKeys = int64_t{1} << 16;
constexpr int64_t kLineBytes = 64;

// Order-preserving key: a < b as numbers iff key(a) < key(b). Negative values have all bits
// flipped, non-negative ones the sign bit. -0 is first made +0, so equal numbers have equal keys.
template <typename T>
SortKey<T> to_key(T v) {
  using Key = SortKey<T>;
  constexpr int kTop = kKeyBits<T> - 1;
  v += T(0);
  Key bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const Key negative = Key(0) - (bits >> kTop);
  return bits ^ (negative | (Key(1) << kTop));
}

template <typename T>
SortKey<T> key_to_bits(SortKey<T> key) {
  using Key = SortKey<T>;
  constexpr int kTop = kKeyBits<T> - 1;
  const Key non_negative = Key(0) - (key >> kTop);
  return key ^ (~non_negative | (Key(1) << kTop));
}

template <typename T>
T from_key(SortKey<T> key) {
  const SortKey<T> bits = key_to_bits<T>(key);
  T v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// The mantissa field of the value of a key.
template <typename T>
SortKey<T> mantissa(SortKey<T> key) {
  return key_to_bits<T>(key) & ((SortKey<T>(1) << Layout<T>::kMantissaBits) - 1);
}

// The exact sum of the mantissa fields of [begin, end), after the keys have been grouped: a pass
// over contiguous keys that vectorizes, cheaper than a second scattered update per key while they
// are counted.
template <typename T>
typename RankIndex<T>::Acc mantissa_sum(const SortKey<T>* begin, const SortKey<T>* end) {
  typename RankIndex<T>::Acc sum = 0;
  for (const SortKey<T>* p = begin; p < end; ++p) sum += mantissa<T>(*p);
  return sum;
}

template <typename Key>
int64_t digit(Key key, int shift, int bits) {
  return static_cast<int64_t>((key >> shift) & ((Key(1) << bits) - 1));
}

// s + e = a + b exactly (Knuth's TwoSum).
void two_sum(double a, double b, double* s, double* e) {
  *s = a + b;
  const double t = *s - a;
  *e = (a - (*s - t)) + (b - t);
}

// ------------------------------------------------------------------------------------------------
// Streaming scatter
// ------------------------------------------------------------------------------------------------

template <typename Key>
void stream_line(const Key* line, Key* dst) {
#if defined(__SSE2__)
  const __m128i* src = reinterpret_cast<const __m128i*>(line);
  __m128i* out = reinterpret_cast<__m128i*>(dst);
  for (int64_t i = 0; i < kLineBytes / 16; ++i) _mm_stream_si128(out + i, _mm_load_si128(src + i));
#else
  std::memcpy(dst, line, kLineBytes);
#endif
}

// Stable scatter of load(i), i < n, to dst[next[d]++] with d = bucket(load(i)). Keys are collected
// per bucket in a line-sized buffer that leaves as one streaming store when it completes an aligned
// line of dst.
template <typename Key, typename Load, typename Bucket>
void scatter_streaming(int64_t n, Load load, Bucket bucket, std::vector<int64_t> next, Key* dst) {
  constexpr int64_t kLineKeys = kLineBytes / sizeof(Key);
  const int64_t buckets = static_cast<int64_t>(next.size());
  std::vector<Key> storage((buckets + 1) * kLineKeys);
  Key* lines = storage.data() +
               (kLineKeys - reinterpret_cast<uintptr_t>(storage.data()) / sizeof(Key) % kLineKeys) %
                   kLineKeys;
  const std::vector<int64_t> starts = next;
  // Position p of dst sits at slot(p) of its line.
  const auto base = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) / sizeof(Key));
  auto slot = [base](int64_t p) { return (base + p) & (kLineKeys - 1); };
  for (int64_t i = 0; i < n; ++i) {
    const Key key = load(i);
    const int64_t d = bucket(key);
    const int64_t p = next[d]++;
    Key* line = lines + d * kLineKeys;
    line[slot(p)] = key;
    if (slot(p) == kLineKeys - 1) {
      const int64_t first = p + 1 - kLineKeys;
      if (first >= starts[d]) {
        stream_line(line, dst + first);
      } else {  // the bucket's first line, shared with the bucket before
        for (int64_t q = starts[d]; q <= p; ++q) dst[q] = line[slot(q)];
      }
    }
  }
  for (int64_t d = 0; d < buckets; ++d) {  // the incomplete last lines
    const Key* line = lines + d * kLineKeys;
    for (int64_t q = std::max(next[d] - slot(next[d]), starts[d]); q < next[d]; ++q) {
      dst[q] = line[slot(q)];
    }
  }
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// ------------------------------------------------------------------------------------------------
// k-means
// ------------------------------------------------------------------------------------------------

double midpoint(double a, double b) { return 0.5 * a + 0.5 * b; }

// The largest T <= v.
template <typename T>
T round_down(double v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    T r = static_cast<T>(v);
    if (static_cast<double>(r) > v) r = std::nextafter(r, -std::numeric_limits<T>::infinity());
    return r;
  }
}

// SplitMix64 (Steele, Lea, Flood 2014): a tiny generator whose output is fixed by its definition.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)

 private:
  uint64_t state_;
};

// k-means++ on the quantile summary: the first centroid uniformly, each next one with probability
// proportional to the squared distance to the nearest centroid chosen so far. When every summary
// point is already a centroid (fewer distinct values than k), the remaining ones repeat the last.
template <typename T>
void plus_plus_init(RankIndex<T>& data, int64_t k, uint64_t seed, double* c) {
  const int64_t n = data.size();
  const int64_t m = std::min(n, kPlusPlusPoints);
  std::vector<double> points(m), d2(m);
  for (int64_t i = 0; i < m; ++i) {
    points[i] = static_cast<double>(data.at_rank((2 * i + 1) * n / (2 * m)));
  }
  SplitMix64 rng(seed);
  c[0] = points[rng.next() % static_cast<uint64_t>(m)];
  for (int64_t i = 0; i < m; ++i) d2[i] = (points[i] - c[0]) * (points[i] - c[0]);
  for (int64_t j = 1; j < k; ++j) {
    double total = 0.0;
    for (int64_t i = 0; i < m; ++i) total += d2[i];
    if (!(total > 0.0)) {
      c[j] = c[j - 1];
      continue;
    }
    const double target = rng.uniform() * total;
    // The first point where the running sum passes the target; the last point with mass if
    // rounding leaves the target at the very end.
    int64_t pick = -1;
    double acc = 0.0;
    for (int64_t i = 0; i < m; ++i) {
      if (d2[i] <= 0.0) continue;
      pick = i;
      acc += d2[i];
      if (acc > target) break;
    }
    c[j] = points[pick];
    for (int64_t i = 0; i < m; ++i) {
      d2[i] = std::min(d2[i], (points[i] - c[j]) * (points[i] - c[j]));
    }
  }
  std::sort(c, c + k);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// RankIndex
// ------------------------------------------------------------------------------------------------

template <typename T>
typename RankIndex<T>::KeyArray RankIndex<T>::allocate(int64_t n) {
  constexpr size_t kHugePage = size_t{2} << 20;
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(Key);
  if (bytes < 2 * kHugePage) {
    return KeyArray(static_cast<Key*>(std::malloc(bytes)));
  }
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* p = std::aligned_alloc(kHugePage, rounded);
#if defined(MADV_HUGEPAGE)
  if (p != nullptr) madvise(p, rounded, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
  return KeyArray(static_cast<Key*>(p));
}

template <typename T>
RankIndex<T>::RankIndex(const T* x, int64_t n)
    : n_(n), top_bits_(top_bits<T>(n)), keys_(allocate(n)) {
  if (keys_ == nullptr) throw std::bad_alloc();
  const int shift = kKeyBits<T> - top_bits_;
  const int64_t tops = int64_t{1} << top_bits_;
  std::vector<int64_t> counts(tops, 0);
  for (int64_t i = 0; i < n; ++i) ++counts[to_key(x[i]) >> shift];
  top_begin_.assign(tops + 1, 0);
  for (int64_t d = 0; d < tops; ++d) top_begin_[d + 1] = top_begin_[d] + counts[d];
  auto load = [x](int64_t i) { return to_key(x[i]); };
  auto bucket = [shift](Key key) { return static_cast<int64_t>(key >> shift); };
  std::vector<int64_t> next(top_begin_.begin(), top_begin_.end() - 1);
  if (n > kStreamingKeys) {
    scatter_streaming(n, load, bucket, std::move(next), keys_.get());
  } else {
    for (int64_t i = 0; i < n; ++i) keys_[next[bucket(load(i))]++] = load(i);
  }
  top_hi_.assign(tops + 1, 0.0);
  top_lo_.assign(tops + 1, 0.0);
  top_split_.assign(tops, -1);
  for (int64_t d = 0; d < tops; ++d) {
    const Acc raw = mantissa_sum<T>(keys_.get() + top_begin_[d], keys_.get() + top_begin_[d + 1]);
    double err;
    two_sum(top_hi_[d], top_value(d, counts[d], raw), &top_hi_[d + 1], &err);
    top_lo_[d + 1] = top_lo_[d] + err;
  }
}

template <typename T>
double RankIndex<T>::top_value(int64_t top, int64_t count, Acc raw) const {
  using L = Layout<T>;
  const Key bits = key_to_bits<T>(static_cast<Key>(top) << (kKeyBits<T> - top_bits_));
  const int exponent =
      static_cast<int>((bits >> L::kMantissaBits) & ((Key(1) << L::kExponentBits) - 1));
  const Acc implicit = exponent > 0 ? Acc(1) << L::kMantissaBits : Acc(0);
  const double v = std::ldexp(static_cast<double>(raw + static_cast<Acc>(count) * implicit),
                              std::max(exponent, 1) - L::kBias - L::kMantissaBits);
  return bits >> (kKeyBits<T> - 1) ? -v : v;
}

template <typename T>
int32_t RankIndex<T>::split(const Node& node) {
  const int64_t size = node.end - node.begin;
  if (size > spare_size_) {
    spare_ = allocate(size);
    if (spare_ == nullptr) throw std::bad_alloc();
    spare_size_ = size;
  }
  Key* keys = keys_.get() + node.begin;
  Key* src = spare_.get();
  Split s;
  s.begin = node.begin;
  s.bits = std::min(kDigitBits, node.bits);
  s.shift = node.bits - s.bits;
  const int64_t digits = int64_t{1} << s.bits;
  s.count_before.assign(digits + 1, 0);
  s.raw_before.assign(digits + 1, 0);
  s.child_split.assign(digits, -1);
  const int shift = s.shift, bits = s.bits;
  auto bucket = [shift, bits](Key key) { return digit(key, shift, bits); };
  for (int64_t i = 0; i < size; ++i) {  // the children's sizes, and the copy to scatter
    src[i] = keys[i];
    ++s.count_before[bucket(src[i]) + 1];
  }
  for (int64_t d = 0; d < digits; ++d) s.count_before[d + 1] += s.count_before[d];
  std::vector<int64_t> next(s.count_before.begin(), s.count_before.end() - 1);
  if (size > kStreamingKeys) {
    scatter_streaming(
        size, [src](int64_t i) { return src[i]; }, bucket, std::move(next), keys);
  } else {
    for (int64_t i = 0; i < size; ++i) keys[next[bucket(src[i])]++] = src[i];
  }
  for (int64_t d = 0; d < digits; ++d) {
    s.raw_before[d + 1] =
        s.raw_before[d] + mantissa_sum<T>(keys + s.count_before[d], keys + s.count_before[d + 1]);
  }
  splits_.push_back(std::move(s));
  return static_cast<int32_t>(splits_.size() - 1);
}

template <typename T>
template <typename Choose>
typename RankIndex<T>::Node RankIndex<T>::descend(int64_t top, Choose choose, int64_t* count,
                                                  Acc* raw) {
  Node node{top_begin_[top], top_begin_[top + 1], kKeyBits<T> - top_bits_};
  int32_t parent = -1;  // the split holding the node's slot; -1: the root
  int64_t slot = top;
  while (node.end - node.begin > kLeafKeys && node.bits > 0) {
    int32_t index = parent < 0 ? top_split_[slot] : splits_[parent].child_split[slot];
    if (index < 0) {
      index = split(node);
      (parent < 0 ? top_split_[slot] : splits_[parent].child_split[slot]) = index;
    }
    const Split& s = splits_[index];
    const int64_t d = choose(s);
    *count += s.count_before[d];
    *raw += s.raw_before[d];
    node = {s.begin + s.count_before[d], s.begin + s.count_before[d + 1], s.shift};
    parent = index;
    slot = d;
  }
  return node;
}

template <typename T>
typename RankIndex<T>::Prefix RankIndex<T>::below(double t) {
  const Key key = to_key(round_down<T>(t));
  const int64_t top = static_cast<int64_t>(key >> (kKeyBits<T> - top_bits_));
  int64_t count = 0;
  Acc raw = 0;
  const Node leaf = descend(
      top, [key](const Split& s) { return digit(key, s.shift, s.bits); }, &count, &raw);
  const Key* keys = keys_.get();
  if (leaf.bits == 0) {  // all keys of the leaf are equal
    if (leaf.end > leaf.begin && keys[leaf.begin] <= key) {
      count += leaf.end - leaf.begin;
      raw += static_cast<Acc>(leaf.end - leaf.begin) * mantissa<T>(keys[leaf.begin]);
    }
  } else {
    for (int64_t i = leaf.begin; i < leaf.end; ++i) {
      if (keys[i] <= key) {
        ++count;
        raw += mantissa<T>(keys[i]);
      }
    }
  }
  Prefix p;
  p.count = top_begin_[top] + count;
  double err;
  two_sum(top_hi_[top], top_value(top, count, raw), &p.hi, &err);
  p.lo = top_lo_[top] + err;
  return p;
}

template <typename T>
T RankIndex<T>::at_rank(int64_t r) {
  const int64_t top =
      std::upper_bound(top_begin_.begin() + 1, top_begin_.end(), r) - (top_begin_.begin() + 1);
  int64_t rest = r - top_begin_[top];
  auto choose = [&rest](const Split& s) {
    const int64_t d = std::upper_bound(s.count_before.begin() + 1, s.count_before.end(), rest) -
                      (s.count_before.begin() + 1);
    rest -= s.count_before[d];
    return d;
  };
  int64_t count = 0;
  Acc raw = 0;
  const Node leaf = descend(top, choose, &count, &raw);
  const Key* keys = keys_.get();
  if (leaf.bits == 0) return from_key<T>(keys[leaf.begin]);
  std::vector<Key> values(keys + leaf.begin, keys + leaf.end);
  std::nth_element(values.begin(), values.begin() + rest, values.end());
  return from_key<T>(values[rest]);
}

// ------------------------------------------------------------------------------------------------
// k-means
// ------------------------------------------------------------------------------------------------

template <typename T>
void init_centroids(RankIndex<T>& data, int64_t k, KMeansInit init, uint64_t seed,
                    double* centroids) {
  const int64_t n = data.size();
  switch (init) {
    case KMeansInit::kLinear: {
      const double lo = data.at_rank(0), hi = data.at_rank(n - 1);
      if (k == 1) {
        centroids[0] = midpoint(lo, hi);
        return;
      }
      for (int64_t j = 0; j < k; ++j) {
        centroids[j] = lo + (hi - lo) * static_cast<double>(j) / static_cast<double>(k - 1);
      }
      return;
    }
    case KMeansInit::kDensity:
      for (int64_t j = 0; j < k; ++j) centroids[j] = data.at_rank((2 * j + 1) * n / (2 * k));
      return;
    case KMeansInit::kPlusPlus:
      plus_plus_init(data, k, seed, centroids);
      return;
  }
}

template <typename T>
int64_t lloyd(RankIndex<T>& data, int64_t k, int64_t max_iters, double* centroids) {
  using Prefix = typename RankIndex<T>::Prefix;
  std::vector<double> next(k);
  const Prefix all = data.below(std::numeric_limits<double>::infinity());
  for (int64_t iter = 0; iter < max_iters; ++iter) {
    Prefix before;
    for (int64_t j = 0; j < k; ++j) {
      const Prefix upto = j + 1 < k ? data.below(midpoint(centroids[j], centroids[j + 1])) : all;
      const int64_t count = upto.count - before.count;
      next[j] = count == 0
                    ? centroids[j]
                    : ((upto.hi - before.hi) + (upto.lo - before.lo)) / static_cast<double>(count);
      if (j > 0) next[j] = std::max(next[j], next[j - 1]);
      before = upto;
    }
    if (std::equal(next.begin(), next.end(), centroids)) return iter;
    std::copy(next.begin(), next.end(), centroids);
  }
  return max_iters;
}

template <typename T>
bool kmeans1d(const T* x, int64_t n, int64_t k, KMeansInit init, int64_t max_iters, uint64_t seed,
              double* centroids, T* non_finite) {
  RankIndex<T> data(x, n);
  // NaNs and infinities are ordered before and after all finite values.
  for (const int64_t r : {int64_t{0}, n - 1}) {
    const T v = data.at_rank(r);
    if (!std::isfinite(v)) {
      *non_finite = v;
      return false;
    }
  }
  init_centroids(data, k, init, seed, centroids);
  lloyd(data, k, max_iters, centroids);
  return true;
}

template <typename T>
void label_boundaries(const double* centroids, int64_t k, T* bounds) {
  for (int64_t j = 0; j + 1 < k; ++j) {
    bounds[j] = round_down<T>(midpoint(centroids[j], centroids[j + 1]));
  }
}

template <typename T>
void build_search_tree(const T* bounds, int64_t k, T* tree) {
  const int levels = search_levels(k);
  for (int l = 0; l < levels; ++l) {
    // Node m of level l splits at sorted position (2m + 1) * stride - 1.
    const int64_t stride = int64_t{1} << (levels - 1 - l);
    for (int64_t m = 0; m < (int64_t{1} << l); ++m) {
      const int64_t j = (2 * m + 1) * stride - 1;
      tree[(int64_t{1} << l) - 1 + m] = j + 1 < k ? bounds[j] : std::numeric_limits<T>::infinity();
    }
  }
}

template <typename T>
void assign_labels(const T* x, int64_t n, const T* tree, int levels, uint8_t* labels) {
  for (int64_t i = 0; i < n; ++i) labels[i] = static_cast<uint8_t>(tree_label(x[i], tree, levels));
}

#define QEXT_KMEANS1D_INSTANTIATE(T)                                                            \
  template class RankIndex<T>;                                                                  \
  template void init_centroids<T>(RankIndex<T>&, int64_t, KMeansInit, uint64_t, double*);       \
  template int64_t lloyd<T>(RankIndex<T>&, int64_t, int64_t, double*);                          \
  template bool kmeans1d<T>(const T*, int64_t, int64_t, KMeansInit, int64_t, uint64_t, double*, \
                            T*);                                                                \
  template void label_boundaries<T>(const double*, int64_t, T*);                                \
  template void build_search_tree<T>(const T*, int64_t, T*);                                    \
  template void assign_labels<T>(const T*, int64_t, const T*, int, uint8_t*);
QEXT_KMEANS1D_INSTANTIATE(float)
QEXT_KMEANS1D_INSTANTIATE(double)
#undef QEXT_KMEANS1D_INSTANTIATE

}  // namespace qext::kernels
