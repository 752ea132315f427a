#include "qext/kernels/packed_labels.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace qext::kernels {
namespace {

template <typename L>
int64_t first_label_outside(const L* labels, int64_t n, uint64_t limit) {
  for (int64_t i = 0; i < n; ++i) {
    if (label_as_unsigned(labels[i]) >= limit) return i;
  }
  return -1;
}

// One byte at a time with the width known to the compiler, which unrolls (and vectorizes) the
// inner loop; the range check is an OR of the bits above kBits, looked at once at the end.
template <int kBits, typename L>
int64_t pack_fixed(const L* labels, int64_t n, uint8_t* packed) {
  constexpr int64_t kPerByte = 8 / kBits;
  using U = std::make_unsigned_t<L>;
  U overflow = 0;
  auto pack_byte = [&overflow](const L* group, int64_t count) {
    unsigned byte = 0;
    for (int64_t j = 0; j < count; ++j) {
      const U v = label_as_unsigned(group[j]);
      overflow |= static_cast<U>(v >> kBits);
      byte |= static_cast<unsigned>(v) << (j * kBits);
    }
    return static_cast<uint8_t>(byte);
  };
  const int64_t full = n / kPerByte;
  for (int64_t b = 0; b < full; ++b) packed[b] = pack_byte(labels + b * kPerByte, kPerByte);
  if (full * kPerByte < n) packed[full] = pack_byte(labels + full * kPerByte, n - full * kPerByte);
  return overflow == 0 ? -1 : first_label_outside(labels, n, uint64_t{1} << kBits);
}

// The labels of every byte value: for 1 and 2 bits, unpacking copies a table row per packed byte
// (about 8x faster than the shifts, which the compiler does not vectorize for these widths).
template <int kBits>
struct UnpackTable {
  static constexpr int kPerByte = 8 / kBits;
  uint8_t labels[256][kPerByte] = {};
  constexpr UnpackTable() {
    for (int byte = 0; byte < 256; ++byte) {
      for (int j = 0; j < kPerByte; ++j) {
        labels[byte][j] = static_cast<uint8_t>((byte >> (j * kBits)) & ((1 << kBits) - 1));
      }
    }
  }
};

template <int kBits>
void unpack_fixed(const uint8_t* packed, int64_t n, uint8_t* labels) {
  constexpr int64_t kPerByte = 8 / kBits;
  constexpr unsigned kMask = (1u << kBits) - 1;
  const int64_t full = n / kPerByte;
  if constexpr (kBits <= 2) {
    static constexpr UnpackTable<kBits> kTable;
    for (int64_t b = 0; b < full; ++b) {
      std::memcpy(labels + b * kPerByte, kTable.labels[packed[b]], kPerByte);
    }
  } else {
    for (int64_t b = 0; b < full; ++b) {
      const unsigned byte = packed[b];
      for (int64_t j = 0; j < kPerByte; ++j) {
        labels[b * kPerByte + j] = static_cast<uint8_t>((byte >> (j * kBits)) & kMask);
      }
    }
  }
  for (int64_t i = full * kPerByte; i < n; ++i) {
    labels[i] = static_cast<uint8_t>((packed[full] >> ((i - full * kPerByte) * kBits)) & kMask);
  }
}

// Calls f with the width as a compile-time constant (std::integral_constant); bits is one of 1, 2,
// 4, 8 (is_label_bits).
template <typename F>
decltype(auto) visit_bits(int bits, F&& f) {
  switch (bits) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    default:
      return f(std::integral_constant<int, 8>{});
  }
}

}  // namespace

template <typename L>
int64_t pack_labels(const L* labels, int64_t n, int bits, uint8_t* packed) {
  return visit_bits(
      bits, [&](auto width) { return pack_fixed<decltype(width)::value>(labels, n, packed); });
}

template <typename L>
int64_t pack_labels_ref(const L* labels, int64_t n, int bits, uint8_t* packed) {
  const int64_t per_byte = 8 / bits;
  std::fill_n(packed, packed_labels_bytes(n, bits), uint8_t{0});
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t v = label_as_unsigned(labels[i]);
    if (v >= (uint64_t{1} << bits)) return i;
    packed[i / per_byte] |= static_cast<uint8_t>(v << (i % per_byte * bits));
  }
  return -1;
}

void unpack_labels(const uint8_t* packed, int64_t n, int bits, uint8_t* labels) {
  visit_bits(bits, [&](auto width) { unpack_fixed<decltype(width)::value>(packed, n, labels); });
}

void unpack_labels_ref(const uint8_t* packed, int64_t n, int bits, uint8_t* labels) {
  const int64_t per_byte = 8 / bits;
  const unsigned mask = (1u << bits) - 1;
  for (int64_t i = 0; i < n; ++i) {
    labels[i] = static_cast<uint8_t>((packed[i / per_byte] >> (i % per_byte * bits)) & mask);
  }
}

#define QEXT_INSTANTIATE_PACK(L)                                     \
  template int64_t pack_labels<L>(const L*, int64_t, int, uint8_t*); \
  template int64_t pack_labels_ref<L>(const L*, int64_t, int, uint8_t*);
QEXT_INSTANTIATE_PACK(uint8_t)
QEXT_INSTANTIATE_PACK(int32_t)
QEXT_INSTANTIATE_PACK(int64_t)
#undef QEXT_INSTANTIATE_PACK

}  // namespace qext::kernels
