#include "ksdk/cpu_features.h"

#include <atomic>
#include <stdexcept>
#include <string>

namespace ksdk {

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures c;
#if defined(__x86_64__) || defined(__i386__)
    // libgcc's checks include the OS's XSAVE state (XCR0), so a true here is safe to execute.
    __builtin_cpu_init();
    c.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    c.avx512vnni = c.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    c.amx_int8 = __builtin_cpu_supports("amx-int8");
#endif
    return c;
  }();
  return f;
}

const RowDotTable& select_row_dot(const std::string& isa) {
  const CpuFeatures& f = cpu_features();
  if (isa == "auto") {
    if (f.avx512vnni) return row_dot_avx512vnni();
    if (f.avx2) return row_dot_avx2();
    return row_dot_scalar();
  }
  if (isa == "scalar") return row_dot_scalar();
  if (isa == "avx2" && f.avx2) return row_dot_avx2();
  if (isa == "avx512vnni" && f.avx512vnni) return row_dot_avx512vnni();
  if (isa == "avx2" || isa == "avx512vnni")
    throw std::invalid_argument("isa='" + isa + "' is not supported by this CPU");
  throw std::invalid_argument("isa='" + isa + "' is unknown; allowed: auto, scalar, avx2, avx512vnni");
}

}  // namespace ksdk

namespace ksdk {
namespace {
// 2 KB ahead into L1, no L2 row-ahead stream: the most consistent of the settings swept on the lent
// 16-core Xeon host (see native/README.md); settable because the best depends on memory latency and
// on how many cores share the bandwidth.
std::atomic<int> g_prefetch_distance{2048};
std::atomic<bool> g_prefetch_next_row{false};
}  // namespace

int prefetch_distance() { return g_prefetch_distance.load(std::memory_order_relaxed); }
bool prefetch_next_row() { return g_prefetch_next_row.load(std::memory_order_relaxed); }
void set_prefetch_next_row(bool on) { g_prefetch_next_row.store(on, std::memory_order_relaxed); }

void set_prefetch_distance(int num_bytes) {
  if (num_bytes < 0 || num_bytes > kMaxPrefetchDistance)
    throw std::invalid_argument("prefetch distance " + std::to_string(num_bytes) +
                                " bytes is out of range; allowed: 0.." + std::to_string(kMaxPrefetchDistance) +
                                " (0: no L1 prefetch stream)");
  g_prefetch_distance.store(num_bytes, std::memory_order_relaxed);
}
}  // namespace ksdk
