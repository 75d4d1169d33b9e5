// Portable kernels: the plain reference the SIMD kernels are tested against, and the fallback.
#include "ksdk/row_dot.h"

namespace ksdk {
namespace {

// A k-quant super-block unpacked to integers: value q[i] has scale sc[i/16] and min mn[i/16]; the
// block's value is d*sc*q - dmin*mn.
struct Unpacked {
  int q[256];
  int sc[16];
  int mn[16];
  float d, dmin;
};

// Q4_K and Q5_K share the super-block scale, min and the eight 6-bit sub-block scale/min pairs.
template <class Block>
void unpack_scales_mins(const Block& b, Unpacked& u) {
  u.d = fp16_to_fp32(b.d);
  u.dmin = fp16_to_fp32(b.dmin);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    kquant_scale_min(j, b.scales, &sc, &m);
    u.sc[2 * j] = u.sc[2 * j + 1] = sc;
    u.mn[2 * j] = u.mn[2 * j + 1] = m;
  }
}

void unpack_q4k(const BlockQ4K& b, Unpacked& u) {
  unpack_scales_mins(b, u);
  for (int k = 0; k < 4; ++k)
    for (int l = 0; l < 32; ++l) {
      u.q[64 * k + l] = b.qs[32 * k + l] & 0xF;
      u.q[64 * k + 32 + l] = b.qs[32 * k + l] >> 4;
    }
}

void unpack_q5k(const BlockQ5K& b, Unpacked& u) {
  unpack_scales_mins(b, u);
  for (int k = 0; k < 4; ++k)
    for (int l = 0; l < 32; ++l) {
      u.q[64 * k + l] = (b.qs[32 * k + l] & 0xF) | (((b.qh[l] >> (2 * k)) & 1) << 4);
      u.q[64 * k + 32 + l] = (b.qs[32 * k + l] >> 4) | (((b.qh[l] >> (2 * k + 1)) & 1) << 4);
    }
}

// Q6_K values are q - 32 with a signed scale per 16: expressed as a min of 32*sc with dmin = d.
void unpack_q6k(const BlockQ6K& b, Unpacked& u) {
  u.d = u.dmin = fp16_to_fp32(b.d);
  for (int i = 0; i < 16; ++i) {
    u.sc[i] = b.scales[i];
    u.mn[i] = 32 * b.scales[i];
  }
  for (int n = 0; n < 2; ++n) {
    const uint8_t* ql = b.ql + 64 * n;
    const uint8_t* qh = b.qh + 32 * n;
    int* q = u.q + 128 * n;
    for (int l = 0; l < 32; ++l) {
      q[l] = (ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4);
      q[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
      q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
      q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
    }
  }
}

template <typename Block, void (*Unpack)(const Block&, Unpacked&)>
void dot_kquant(const uint8_t* row, const uint8_t* /*next*/, const uint8_t* const* acts, int n_tok,
                int n_values, float* out) {
  const Block* blocks = reinterpret_cast<const Block*>(row);
  for (int t = 0; t < n_tok; ++t) out[t] = 0.f;
  Unpacked u;
  for (int b = 0; b < n_values / kSuperBlock; ++b) {
    Unpack(blocks[b], u);
    for (int t = 0; t < n_tok; ++t) {
      const BlockQ8K& a = reinterpret_cast<const BlockQ8K*>(acts[t])[b];
      int sum = 0, sum_min = 0;
      for (int g = 0; g < 16; ++g) {
        int s = 0;
        for (int i = 0; i < 16; ++i) s += u.q[16 * g + i] * a.qs[16 * g + i];
        sum += u.sc[g] * s;
        sum_min += u.mn[g] * a.bsums[g];
      }
      out[t] += a.d * (u.d * float(sum) - u.dmin * float(sum_min));
    }
  }
}

void dot_q8_0(const uint8_t* row, const uint8_t* /*next*/, const uint8_t* const* acts, int n_tok,
                int n_values, float* out) {
  const BlockQ8_0* blocks = reinterpret_cast<const BlockQ8_0*>(row);
  for (int t = 0; t < n_tok; ++t) {
    const BlockQ8A* a = reinterpret_cast<const BlockQ8A*>(acts[t]);
    float acc = 0.f;
    for (int b = 0; b < n_values / kQ8Block; ++b) {
      int s = 0;
      for (int i = 0; i < kQ8Block; ++i) s += blocks[b].qs[i] * a[b].qs[i];
      acc += fp16_to_fp32(blocks[b].d) * a[b].d * float(s);
    }
    out[t] = acc;
  }
}

template <float (*ToF32)(uint16_t)>
void dot_half(const uint8_t* row, const uint8_t* /*next*/, const uint8_t* const* acts, int n_tok,
                int n_values, float* out) {
  const uint16_t* w = reinterpret_cast<const uint16_t*>(row);
  for (int t = 0; t < n_tok; ++t) {
    const float* a = reinterpret_cast<const float*>(acts[t]);
    float acc = 0.f;
    for (int i = 0; i < n_values; ++i) acc += ToF32(w[i]) * a[i];
    out[t] = acc;
  }
}

}  // namespace

const RowDotTable& row_dot_scalar() {
  static const RowDotTable table{
      "scalar",
      dot_kquant<BlockQ4K, unpack_q4k>,
      dot_kquant<BlockQ5K, unpack_q5k>,
      dot_kquant<BlockQ6K, unpack_q6k>,
      dot_q8_0,
      dot_half<bf16_to_fp32>,
      dot_half<fp16_to_fp32>,
  };
  return table;
}

}  // namespace ksdk
