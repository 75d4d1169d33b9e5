// GGUF quant block layouts (as stored in the file) and the activation formats the kernels dot them with.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace ksdk {

// Values of gguf.GGMLQuantizationType for the weight types we have kernels for.
enum class QType : int { F16 = 1, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

constexpr int kSuperBlock = 256;  // values per k-quant super-block (and per Q8_K block)
constexpr int kQ8Block = 32;      // values per Q8_0 block

struct BlockQ4K {
  uint16_t d, dmin;  // f16 scale of the 6-bit sub-block scales, and of the mins
  uint8_t scales[12];
  uint8_t qs[128];
};
struct BlockQ5K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
struct BlockQ6K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
static_assert(sizeof(BlockQ4K) == 144 && sizeof(BlockQ5K) == 176, "k-quant layout");
static_assert(sizeof(BlockQ6K) == 210 && sizeof(BlockQ8_0) == 34, "quant layout");

// Activation block for k-quant weights: 256 int8 values, sums of each 16 (for the mins), one fp32 scale.
// Values first and 64-byte aligned (in 64-byte aligned buffers): every 512-bit load of them is one cache
// line, never a split (a split load costs Intel cores about two loads).
// fsums = d * bsums in fp32 lets the 512-bit kernels apply a row block's 16 mins with one FMA per token.
struct alignas(64) BlockQ8K {
  int8_t qs[256];
  float fsums[16];
  int16_t bsums[16];
  float d;
};
static_assert(sizeof(BlockQ8K) == 384, "Q8_K activation layout");
// Activation block for Q8_0 weights (fp32 scale: activations are never stored in a file).
struct BlockQ8A {
  float d;
  int8_t qs[32];
};

// What an activation row looks like for a weight type.
enum class ActFormat { Q8K, Q8A, F32 };

static inline ActFormat act_format(QType t) {
  switch (t) {
    case QType::Q4_K:
    case QType::Q5_K:
    case QType::Q6_K: return ActFormat::Q8K;
    case QType::Q8_0: return ActFormat::Q8A;
    default: return ActFormat::F32;
  }
}

// Values per block of the weight type, and bytes per block.
static inline int block_values(QType t) {
  switch (t) {
    case QType::Q4_K:
    case QType::Q5_K:
    case QType::Q6_K: return kSuperBlock;
    case QType::Q8_0: return kQ8Block;
    default: return 1;
  }
}
static inline size_t block_bytes(QType t) {
  switch (t) {
    case QType::Q4_K: return sizeof(BlockQ4K);
    case QType::Q5_K: return sizeof(BlockQ5K);
    case QType::Q6_K: return sizeof(BlockQ6K);
    case QType::Q8_0: return sizeof(BlockQ8_0);
    default: return 2;
  }
}
// Bytes of one activation row of n values in the format a weight type wants.
static inline size_t act_row_bytes(QType t, int n) {
  switch (act_format(t)) {
    case ActFormat::Q8K: return size_t(n / kSuperBlock) * sizeof(BlockQ8K);
    case ActFormat::Q8A: return size_t(n / kQ8Block) * sizeof(BlockQ8A);
    default: return size_t(n) * sizeof(float);
  }
}

static inline float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      do { ++e; mant <<= 1; } while ((mant & 0x400) == 0);
      bits = sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3FF) << 13;
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline float bf16_to_fp32(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block.
static inline void kquant_scale_min(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

}  // namespace ksdk
