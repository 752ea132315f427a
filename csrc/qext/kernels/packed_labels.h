// Packed k-means labels: the storage (and on-disk) format of converted k-means layers.
// Framework-free: raw pointers in and out, no threads (callers cut the labels at multiples of 8,
// which are whole bytes for every width), testable with gtest alone.
//
// Format, for n labels l_0 .. l_{n-1} in row-major (C-contiguous) order, each in [0, 2^bits),
// bits in {1, 2, 4, 8}:
//   - the packed data is ceil(n * bits / 8) bytes;
//   - label i lives in byte i / (8 / bits), at bit offset (i % (8 / bits)) * bits, i.e. the first
//     label of a byte takes its lowest bits (little-endian within the byte);
//   - the padding bits of the last byte are zero.
// Example, bits = 2, labels {1, 2, 3, 0, 2}: byte 0 = 1 | 2 << 2 | 3 << 4 | 0 << 6 = 0x39,
// byte 1 = 2 (padding zero), so the packed data is {0x39, 0x02}.
#pragma once

#include <cstdint>
#include <type_traits>

namespace qext::kernels {

// A label as an unsigned value of its width: negative labels become huge, so one unsigned
// comparison checks both ends of a range [0, limit).
template <typename L>
constexpr std::make_unsigned_t<L> label_as_unsigned(L v) {
  return static_cast<std::make_unsigned_t<L>>(v);
}

// True for the supported label widths 1, 2, 4 and 8.
constexpr bool is_label_bits(int64_t bits) {
  return bits == 1 || bits == 2 || bits == 4 || bits == 8;
}

// Bytes of n packed labels of `bits` bits: ceil(n * bits / 8).
constexpr int64_t packed_labels_bytes(int64_t n, int64_t bits) { return (n * bits + 7) / 8; }

// Packs labels[0, n) into packed[0, packed_labels_bytes(n, bits)) (every byte written, padding
// bits zero). Returns the index of the first label outside [0, 2^bits) (negative ones included),
// or -1 when every label fits; after a bad label the packed bytes are unspecified. L: uint8_t,
// int32_t or int64_t. pack_labels handles one byte's labels at a time with the width fixed at
// compile time; pack_labels_ref goes label by label; their results are identical.
template <typename L>
int64_t pack_labels(const L* labels, int64_t n, int bits, uint8_t* packed);
template <typename L>
int64_t pack_labels_ref(const L* labels, int64_t n, int bits, uint8_t* packed);

// labels[i] = label i of `packed` for i in [0, n); reads packed_labels_bytes(n, bits) bytes.
void unpack_labels(const uint8_t* packed, int64_t n, int bits, uint8_t* labels);
void unpack_labels_ref(const uint8_t* packed, int64_t n, int bits, uint8_t* labels);

}  // namespace qext::kernels
