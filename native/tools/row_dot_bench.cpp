// Row-kernel microbenchmark (not part of the module): ns per 256-value block for Q4_K and Q6_K rows of
// hidden 7168, per ISA and token count, on a working set of `rows` rows (16: in L1/L2; 60000: from DRAM).
// Build: g++ -O3 -std=c++17 -Inative/include native/tools/row_dot_bench.cpp native/src/row_dot_*.cpp \
//          native/src/quantize.cpp native/src/cpu_features.cpp -o /tmp/row_dot_bench && /tmp/row_dot_bench 16 1
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <random>
#include <cstring>
#include "ksdk/moe.h"
#include "ksdk/row_dot.h"
using namespace ksdk;
int main(int argc, char** argv) {
  int H = 7168, rows = argc > 1 ? atoi(argv[1]) : 16;  // working set
  int ntok = argc > 2 ? atoi(argv[2]) : 1;
  std::mt19937 rng(1);
  for (QType qt : {QType::Q4_K, QType::Q6_K}) {
    size_t rb = H / 256 * block_bytes(qt);
    std::vector<uint8_t> w(rb * rows);
    for (auto& b : w) b = rng();
    for (size_t r = 0; r < rows; ++r) {  // sane f16 d: small
      for (int b = 0; b < H / 256; ++b) {
        uint8_t* blk = w.data() + r * rb + b * block_bytes(qt);
        uint16_t d = 0x2000;
        if (qt == QType::Q4_K) { memcpy(blk, &d, 2); memcpy(blk + 2, &d, 2); }
        else memcpy(blk + 208, &d, 2);
      }
    }
    std::vector<float> x(H * ntok);
    for (auto& v : x) v = (rng() % 1000) / 500.f - 1;
    std::vector<uint8_t, CacheLineAllocator<uint8_t>> act(act_row_bytes(qt, H) * ntok);
    std::vector<const uint8_t*> ap(ntok);
    for (int t = 0; t < ntok; ++t) {
      ap[t] = act.data() + t * act_row_bytes(qt, H);
      quantize_activation(qt, x.data() + t * H, H, act.data() + t * act_row_bytes(qt, H));
    }
    for (const RowDotTable* tab : {&row_dot_avx2(), &row_dot_avx512vnni()}) {
      std::vector<float> out(ntok);
      RowDot f = tab->get(qt);
      double best = 1e9;
      for (int rep = 0; rep < 20; ++rep) {
        auto t0 = std::chrono::steady_clock::now();
        for (int it = 0; it < 20; ++it)
          for (int r = 0; r < rows; ++r)
            f(w.data() + r * rb, r + 1 < rows ? w.data() + (r + 1) * rb : nullptr, ap.data(), ntok, H, out.data());
        double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 20;
        if (s < best) best = s;
      }
      double blocks = double(rows) * H / 256;
      printf("%s %s ntok=%d rows=%d: %.2f ns/block (%.2f ns/block/token), %.1f GB/s weights\n", tab->isa,
             qt == QType::Q4_K ? "Q4K" : "Q6K", ntok, rows, best / blocks * 1e9, best / blocks / ntok * 1e9,
             rb * rows / best / 1e9);
    }
  }
}
