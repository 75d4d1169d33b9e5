// Activation quantization: symmetric int8 per block, scale = max|x| / 127.
#include <algorithm>
#include <cmath>

#include "ksdk/row_dot.h"

namespace ksdk {
namespace {

// Round half to even for |v| < 2^22 (ours are within +-127): adding and subtracting 1.5 * 2^23 leaves
// the rounding to the FPU. Same result as std::nearbyint, but it vectorizes at baseline x86-64.
inline int8_t round_to_int8(float v) {
  constexpr float kMagic = 12582912.f;
  return int8_t((v + kMagic) - kMagic);
}

inline float max_abs(const float* x, int n) {
  float amax = 0.f;
  for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  return amax;
}

}  // namespace

void quantize_row_q8k(const float* x, int n, BlockQ8K* y) {
  for (int b = 0; b < n / kSuperBlock; ++b, x += kSuperBlock) {
    const float amax = max_abs(x, kSuperBlock);
    BlockQ8K& blk = y[b];
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    blk.d = amax / 127.f;
    for (int i = 0; i < kSuperBlock; ++i) blk.qs[i] = round_to_int8(x[i] * inv);
    for (int g = 0; g < 16; ++g) {
      int s = 0;
      for (int i = 0; i < 16; ++i) s += blk.qs[g * 16 + i];
      blk.bsums[g] = int16_t(s);
      blk.fsums[g] = blk.d * float(s);
    }
  }
}

void quantize_row_q8a(const float* x, int n, BlockQ8A* y) {
  for (int b = 0; b < n / kQ8Block; ++b, x += kQ8Block) {
    const float amax = max_abs(x, kQ8Block);
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    y[b].d = amax / 127.f;
    for (int i = 0; i < kQ8Block; ++i) y[b].qs[i] = round_to_int8(x[i] * inv);
  }
}

void quantize_activation(QType t, const float* x, int n, uint8_t* dst) {
  switch (act_format(t)) {
    case ActFormat::Q8K: quantize_row_q8k(x, n, reinterpret_cast<BlockQ8K*>(dst)); break;
    case ActFormat::Q8A: quantize_row_q8a(x, n, reinterpret_cast<BlockQ8A*>(dst)); break;
    case ActFormat::F32: std::memcpy(dst, x, size_t(n) * sizeof(float)); break;
  }
}

}  // namespace ksdk
