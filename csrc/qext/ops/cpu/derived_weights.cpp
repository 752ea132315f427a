// The cache of derived_weights.h: a short list of (weak packed weight, kind, version) entries,
// pruned of dead weights on every lookup.
#include "qext/ops/cpu/derived_weights.h"

#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <mutex>
#include <vector>

namespace qext::ops::detail {
namespace {

struct Entry {
  c10::weak_intrusive_ptr<c10::TensorImpl> source;
  const void* data;  // the source's data and version when derived was made
  uint32_t version;
  int64_t kind;
  at::Tensor derived;
};

std::mutex cache_mutex;
std::vector<Entry> cache;  // guarded by cache_mutex

}  // namespace

at::Tensor derived_weight(const at::Tensor& packed, int64_t kind,
                          const std::function<at::Tensor()>& make) {
  if (packed.is_inference()) return make();
  const uint32_t version = packed.unsafeGetTensorImpl()->version_counter().current_version();
  const void* data = packed.data_ptr();
  // Held while make() runs: two threads running the same layer for the first time derive it once.
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache.erase(
      std::remove_if(cache.begin(), cache.end(), [](const Entry& e) { return e.source.expired(); }),
      cache.end());
  for (Entry& e : cache) {
    if (e.source._unsafe_get_target() != packed.unsafeGetTensorImpl() || e.kind != kind) continue;
    if (e.version != version || e.data != data) {
      e.derived = make();
      e.version = version;
      e.data = data;
    }
    return e.derived;
  }
  cache.push_back({c10::weak_intrusive_ptr<c10::TensorImpl>(packed.getIntrusivePtr()), data,
                   version, kind, make()});
  return cache.back().derived;
}

int64_t derived_weight_entries() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return static_cast<int64_t>(cache.size());
}

}  // namespace qext::ops::detail
