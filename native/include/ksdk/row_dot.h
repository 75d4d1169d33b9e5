// Per-ISA row kernels: one weight row dotted with several activation rows.
#pragma once

#include <cstdint>

#include "ksdk/quant_blocks.h"

namespace ksdk {

// out[t] = dot(weight row, activation row acts[t]) for t < n_tok. The row holds n_values values in the
// weight's GGUF blocks; each activation row is in act_format(weight type). fp32 accumulation.
// `next` is a hint: the row (same type and length) the caller computes after this one, or null. The SIMD
// k-quant kernels keep prefetch_distance() bytes ahead of their reads in flight into L1, running on into
// `next` (and, if prefetch_next_row(), stream `next` into L2 one row ahead); the caller should have
// prefetched this row's first prefetch_distance() bytes. A steady stream per thread keeps enough misses in
// flight without bursts; a short row (1.7-4 KB) is too short for the hardware prefetcher to ramp up.
// Other kernels ignore it.
using RowDot = void (*)(const uint8_t* row, const uint8_t* next, const uint8_t* const* acts, int n_tok,
                        int n_values, float* out);

// Bytes the k-quant kernels prefetch ahead of their reads (process-wide; 0 turns software prefetch off).
constexpr int kMaxPrefetchDistance = 1 << 16;
int prefetch_distance();
void set_prefetch_distance(int num_bytes);  // throws std::invalid_argument outside 0..kMaxPrefetchDistance
// Whether the k-quant kernels also stream `next` into L2 one row ahead (process-wide; default off).
bool prefetch_next_row();
void set_prefetch_next_row(bool on);

struct RowDotTable {
  const char* isa;
  RowDot q4_k, q5_k, q6_k, q8_0, bf16, f16;

  RowDot get(QType t) const {
    switch (t) {
      case QType::Q4_K: return q4_k;
      case QType::Q5_K: return q5_k;
      case QType::Q6_K: return q6_k;
      case QType::Q8_0: return q8_0;
      case QType::BF16: return bf16;
      case QType::F16: return f16;
    }
    return nullptr;
  }
};

const RowDotTable& row_dot_scalar();
const RowDotTable& row_dot_avx2();        // needs AVX2, FMA, F16C
const RowDotTable& row_dot_avx512vnni();  // needs AVX512F/BW/VL + AVX512-VNNI too

// Activation quantization, once per token (x) and once per (token, expert) (the intermediate).
void quantize_row_q8k(const float* x, int n, BlockQ8K* y);
void quantize_row_q8a(const float* x, int n, BlockQ8A* y);
// Writes n values of x in the activation format of weight type t into dst (act_row_bytes(t, n) bytes).
void quantize_activation(QType t, const float* x, int n, uint8_t* dst);

}  // namespace ksdk
