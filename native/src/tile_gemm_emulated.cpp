// TileGemm emulated on AVX512-VNNI: what TDPBUSD computes, one vpdpbusd per (A row, 4 values of K): the
// row's 4 u8 broadcast to every lane, times B's row of 16 tokens x 4 s8. Integer sums, so identical to AMX.
#include <cstring>
#include <stdexcept>

#include "ksdk/cpu_features.h"
#include "ksdk/tile_gemm.h"

// Library headers first, the target only for the kernels (see tile_gemm_amx.cpp: GCC 13).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#include <immintrin.h>

namespace ksdk {
namespace {

void no_thread_state() {}

inline int32_t load4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// c = a * b for one plane and one token tile; four A rows share each load of B's rows.
void plane_times_tokens(const uint8_t* a, const int8_t* b, int32_t* c) {
  for (int m = 0; m < kTileRows; m += 4) {
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                      _mm512_setzero_si512()};
    for (int kk = 0; kk < 64; ++kk) {
      const __m512i bk = _mm512_loadu_si512(b + 64 * kk);
      for (int i = 0; i < 4; ++i)
        acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_set1_epi32(load4(a + 256 * (m + i) + 4 * kk)), bk);
    }
    for (int i = 0; i < 4; ++i) _mm512_storeu_si512(c + 16 * (m + i), acc[i]);
  }
}

void superblock(const uint8_t* a_lo, const uint8_t* a_hi, const int8_t* const* b, int n_b, int32_t* c) {
  for (int t = 0; t < n_b; ++t) {
    plane_times_tokens(a_lo, b[t], c + 512 * t);
    plane_times_tokens(a_hi, b[t], c + 512 * t + 256);
  }
}

}  // namespace
}  // namespace ksdk
#pragma GCC pop_options

namespace ksdk {

const TileGemm& tile_gemm_emulated() {
  if (!cpu_features().avx512vnni)
    throw std::runtime_error("amx-emulated: this CPU lacks AVX512-VNNI (with AVX512F/BW/VL)");
  static const TileGemm gemm{"amx-emulated", no_thread_state, no_thread_state, superblock};
  return gemm;
}

}  // namespace ksdk
