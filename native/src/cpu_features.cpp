#include "ksdk/cpu_features.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <atomic>
#include <stdexcept>
#include <string>

namespace ksdk {
namespace {

// AMX-TILE and AMX-INT8 in CPUID, and the OS saving tile state: XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA).
bool amx_int8_usable() {
#if defined(__x86_64__)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // no OSXSAVE: no xgetbv
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), int8 = d & (1u << 25);
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const unsigned tile_state = (1u << 17) | (1u << 18);
  return tile && int8 && (xcr0_lo & tile_state) == tile_state;
#else
  return false;
#endif
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures c;
#if defined(__x86_64__) || defined(__i386__)
    // libgcc's checks include the OS's XSAVE state (XCR0), so a true here is safe to execute.
    __builtin_cpu_init();
    c.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    c.avx512vnni = c.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    c.amx_int8 = c.avx512vnni && amx_int8_usable();  // the tile path's decode needs AVX-512 too
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

const TileGemm* select_tile_gemm(const std::string& name) {
  if (name == "off") return nullptr;
  if (name == "auto") {
    if (!cpu_features().amx_int8) return nullptr;
    try {
      return &tile_gemm_amx();
    } catch (const std::runtime_error&) {  // Linux refused the tile permission: the row kernels it is
      return nullptr;
    }
  }
  try {
    if (name == "amx") return &tile_gemm_amx();
    if (name == "amx-emulated") return &tile_gemm_emulated();
  } catch (const std::runtime_error& e) {
    throw std::invalid_argument("tile_isa='" + name + "': " + e.what());
  }
  throw std::invalid_argument("tile_isa='" + name + "' is unknown; allowed: auto, amx, amx-emulated, off");
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
