// Splitting a dense tensor's memory into rows of one kernels::QuantizerRow, shared by the CPU
// kernels of the elementwise quantization ops.
#pragma once

#include <algorithm>
#include <cstdint>

#include "qext/kernels/fake_quantize_ref.h"
#include "qext/ops/common/quant_params.h"

namespace qext::ops::detail {

// Calls f(offset, length, row) for the runs of [begin, end) (memory offsets of a dense tensor)
// that use one quantizer row: a run of one channel, or, when channels are innermost in memory, a
// run over consecutive channels with one quantizer per element.
template <typename F>
void for_each_row(const QuantParams& p, int64_t begin, int64_t end, F&& f) {
  const ChannelLayout& l = p.layout;
  auto row_at = [&](int64_t channel, int64_t step) {
    return kernels::QuantizerRow{p.scale.data() + channel,        p.inv_scale.data() + channel,
                                 p.zero_point.data() + channel,   step,
                                 static_cast<float>(p.quant_min), static_cast<float>(p.quant_max)};
  };
  if (l.channels == 1) {
    f(begin, end - begin, row_at(0, 0));
    return;
  }
  for (int64_t pos = begin; pos < end;) {
    int64_t len;
    if (l.inner == 1) {
      const int64_t channel = pos % l.channels;
      len = std::min(end - pos, l.channels - channel);
      f(pos, len, row_at(channel, 1));
    } else {
      const int64_t channel = (pos / l.inner) % l.channels;
      len = std::min(end - pos, l.inner - pos % l.inner);
      f(pos, len, row_at(channel, 0));
    }
    pos += len;
  }
}

}  // namespace qext::ops::detail
