// TileGemm on AMX-INT8: the tile registers hold C (4 tiles), A (lo, hi planes) and B (two token tiles).
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

#include "ksdk/cpu_features.h"
#include "ksdk/tile_gemm.h"

// Only the kernels get the AMX target, and every library header comes before it: GCC 13 refuses to
// inline libstdc++'s always_inline members declared under a different target ("target specific option
// mismatch").
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f")
#include <immintrin.h>

namespace ksdk {
namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an XSAVE feature's state (Linux >= 5.16)
constexpr long kXfeatureXtiledata = 18;

// ldtilecfg's 64-byte operand: palette 1, every tile 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg layout");

const TileConfig& tile_config() {
  static const TileConfig config = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = 64;
      c.rows[t] = 16;
    }
    return c;
  }();
  return config;
}

void begin_thread() { _tile_loadconfig(&tile_config()); }
void end_thread() { _tile_release(); }

// Tiles: 0-3 C (token tile 0 lo, hi; token tile 1 lo, hi), 4-5 A (lo, hi), 6-7 B (token tiles 0, 1).
// Each K=64 step loads A once for both token tiles.
void superblock(const uint8_t* a_lo, const uint8_t* a_hi, const int8_t* const* b, int n_b, int32_t* c) {
  _tile_zero(0);
  _tile_zero(1);
  if (n_b == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int k = 0; k < 4; ++k) {
    _tile_loadd(4, a_lo + 64 * k, 256);
    _tile_loadd(5, a_hi + 64 * k, 256);
    _tile_loadd(6, b[0] + 1024 * k, 64);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 5, 6);
    if (n_b == 2) {
      _tile_loadd(7, b[1] + 1024 * k, 64);
      _tile_dpbusd(2, 4, 7);
      _tile_dpbusd(3, 5, 7);
    }
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  if (n_b == 2) {
    _tile_stored(2, c + 512, 64);
    _tile_stored(3, c + 768, 64);
  }
}

}  // namespace
}  // namespace ksdk
#pragma GCC pop_options

namespace ksdk {
namespace {

// Linux keeps AMX's 8 KB tile state off until a process asks; the answer holds for all its threads.
void request_tile_permission() {
  static const int error = [] {
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0 ? 0 : errno;
  }();
  if (error != 0)
    throw std::runtime_error("AMX: Linux refused the tile-data permission (arch_prctl(ARCH_REQ_XCOMP_PERM, "
                             "XFEATURE_XTILEDATA): " + std::string(std::strerror(error)) +
                             "); Linux >= 5.16 is needed");
}

}  // namespace

const TileGemm& tile_gemm_amx() {
  if (!cpu_features().amx_int8)
    throw std::runtime_error("AMX: this CPU (or its OS, per XCR0 bits 17-18) does not offer AMX-INT8");
  request_tile_permission();
  static const TileGemm gemm{"amx", begin_thread, end_thread, superblock};
  return gemm;
}

}  // namespace ksdk
