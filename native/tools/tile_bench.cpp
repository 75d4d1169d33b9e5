// Tile-path microbenchmark (not part of the module): ns per 16-row x 256-value weight piece of
// weight_tiles_times_tokens, split into its parts by varying what runs:
//   - "none": a TileGemm whose superblock() does nothing: decode + epilogue + loop, no tile work;
//   - "amx" / "amx-emulated": the real path;
// at 1, 2 and 4 token tiles (the slope over token tiles is the per-16-token cost: tile work + epilogue; the
// rest is the decode), with the weights hot (one expert's rows, in L2) or streamed (a 1 GiB buffer walked
// once, as a prefill call reads them), on 1 thread and on N threads at once. `tile_bench N tiles-only` skips
// the "none" rows. On the lent AMX host, runs of the same build differ by up to 2x at 1 thread (less at N):
// compare variants within one run, several times.
// Build: g++ -O3 -std=c++17 -pthread -Inative/include native/tools/tile_bench.cpp native/src/kquant_tiles.cpp \
//          native/src/tile_gemm_amx.cpp native/src/tile_gemm_emulated.cpp native/src/cpu_features.cpp \
//          native/src/row_dot_*.cpp native/src/quantize.cpp -o /tmp/tile_bench && /tmp/tile_bench 15
#include <algorithm>
#include <chrono>
#include <memory>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ksdk/kquant_tiles.h"
#include "ksdk/quant_blocks.h"
#include "ksdk/tile_gemm.h"

using namespace ksdk;

namespace {

void no_thread_setup() {}
void no_superblock(const uint8_t*, const uint8_t*, const int8_t* const*, int, int32_t* c) { c[0] = 0; }
const TileGemm kNoTiles{"none", no_thread_setup, no_thread_setup, no_superblock};

// Random blocks with small sane f16 scales (d, dmin for Q4_K; d for Q6_K).
std::vector<uint8_t> random_rows(QType type, int64_t rows, int cols, uint32_t seed) {
  const int64_t bb = block_bytes(type), row_bytes = cols / 256 * bb;
  std::vector<uint8_t> w(size_t(rows * row_bytes));
  std::mt19937 rng(seed);
  const size_t pattern = std::min<size_t>(w.size(), 1 << 20);  // 1 MB of random bytes, repeated: fast to make
  for (size_t i = 0; i < pattern; ++i) w[i] = uint8_t(rng());
  for (size_t i = pattern; i < w.size(); i += pattern) std::memcpy(&w[i], w.data(), std::min(pattern, w.size() - i));
  const uint16_t d = 0x2000;
  for (int64_t b = 0; b < rows * (cols / 256); ++b) {
    uint8_t* blk = w.data() + b * bb;
    if (type == QType::Q6_K) {
      std::memcpy(blk + 208, &d, 2);
    } else {
      std::memcpy(blk, &d, 2);
      std::memcpy(blk + 2, &d, 2);
    }
  }
  return w;
}

struct Case {
  QType type;
  int cols, n_w;  // K, weights per call (gate + up: 2)
  const char* what;
};

// ns per 16 x 256 weight piece for one thread's loop over `pieces` pieces.
double run(const TileGemm& gemm, const Case& c, int n_tiles, bool stream, int threads) {
  const int n_sb = c.cols / 256;
  const int64_t row_bytes = int64_t(n_sb) * block_bytes(c.type);
  const int64_t tile_bytes = 16 * row_bytes;
  // Streamed: each thread walks its own 1 GiB / threads of weight tiles once; hot: one tile set again and again.
  const int64_t stream_tiles = (int64_t(1) << 30) / tile_bytes / threads / c.n_w * c.n_w;
  const int64_t stream_calls = stream_tiles / c.n_w;  // hot: as many calls as fit in 50 ms
  std::vector<double> ns(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      const int64_t tiles = stream ? stream_tiles : c.n_w;
      std::vector<uint8_t> w = random_rows(c.type, tiles * 16, c.cols, 7 + t);
      // Tokens: random Q8_K rows packed into n_tiles tiles.
      const int n_tok = 16 * n_tiles;
      std::vector<BlockQ8K> acts(size_t(n_tok) * n_sb);
      std::mt19937 rng(100 + t);
      for (BlockQ8K& b : acts) {
        b.d = 0.01f;
        for (auto& q : b.qs) q = int8_t(int(rng() % 127) - 63);
        for (auto& s : b.bsums) s = int16_t(int(rng() % 255) - 127);
      }
      std::vector<const uint8_t*> rows(n_tok);
      for (int i = 0; i < n_tok; ++i) rows[i] = reinterpret_cast<const uint8_t*>(acts.data() + size_t(i) * n_sb);
      std::vector<int8_t> data(size_t(n_tiles) * n_sb * kTokenBlockBytes);
      std::vector<TokenTileMeta> meta(size_t(n_tiles) * n_sb);
      PackedTokens x{data.data(), meta.data(), n_tiles, n_sb};
      for (int tile = 0; tile < n_tiles; ++tile) pack_token_tile(rows.data() + 16 * tile, 16, x, tile);
      auto scratch = std::make_unique<TileScratch>();
      std::vector<float> acc(size_t(c.n_w) * 16 * n_tok);
      float* accs[2] = {acc.data(), acc.data() + 16 * n_tok};
      gemm.begin_thread();
      auto call = [&](int64_t i) {
        WeightTile wt[2];
        for (int j = 0; j < c.n_w; ++j)
          wt[j] = {w.data() + ((stream ? i * c.n_w : 0) + j) * tile_bytes, row_bytes, 16, c.type};
        weight_tiles_times_tokens(gemm, wt, accs, c.n_w, n_tok, x, *scratch);
      };
      call(0);
      const auto start = std::chrono::steady_clock::now();
      double elapsed = 0;
      int64_t calls = 0;
      for (; stream ? calls < stream_calls : elapsed < 50e6; ++calls) {
        call(calls);
        elapsed = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
      }
      gemm.end_thread();
      ns[t] = elapsed / (double(calls) * c.n_w * n_sb);
    });
  }
  for (auto& th : pool) th.join();
  double worst = 0;
  for (double v : ns) worst = std::max(worst, v);
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IONBF, 0);  // lines show as they are measured
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const bool tiles_only = argc > 2 && std::string(argv[2]) == "tiles-only";  // skip the "none" rows
  std::vector<const TileGemm*> gemms;
  if (!tiles_only) gemms.push_back(&kNoTiles);
  try {
    gemms.push_back(select_tile_gemm("amx"));
  } catch (const std::exception& e) {  // the emulation instead: slow, but the same loop
    std::printf("(%s)\n", e.what());
    gemms.push_back(select_tile_gemm("amx-emulated"));
  }
  const Case cases[] = {{QType::Q4_K, 7168, 2, "Q4_K gate+up, K=7168"}, {QType::Q6_K, 2048, 1, "Q6_K down, K=2048"}};
  std::printf("ns per 16x256 weight piece (per thread; the slowest thread of N), 1/2/4 token tiles of 16\n");
  for (const Case& c : cases) {
    for (bool stream : {false, true}) {
      for (int n : {1, threads}) {
        for (const TileGemm* g : gemms) {
          std::printf("%-22s %-8s %2d thr %-13s", c.what, stream ? "stream" : "hot", n, g->name);
          for (int tiles : {1, 2, 4}) std::printf(" %8.1f", run(*g, c, tiles, stream, n));
          std::printf("\n");
          std::fflush(stdout);
        }
        if (threads == 1) break;
      }
    }
  }
  return 0;
}
