// The routed-experts MoE operation on GGUF blocks, run on a persistent thread pool.
//
// NUMA design (not implemented yet; one node is assumed): experts are never copied per node. Each
// expert's rows are split across nodes instead (gate/up rows [0, I) and down rows [0, H) in n_nodes
// contiguous ranges, placed with mbind on the node that owns them), and every node's workers take
// only the row tiles whose weights are local. Phase B then writes disjoint slices of the intermediate
// and phase D disjoint output rows, so the node split needs no extra reduction and memory stays 1x.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "ksdk/kquant_tiles.h"
#include "ksdk/quant_blocks.h"
#include "ksdk/row_dot.h"
#include "ksdk/thread_pool.h"

namespace ksdk {

// Allocates on 64-byte boundaries: activation blocks (BlockQ8K) are cache-line aligned only in such buffers.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
using AlignedBytes = std::vector<uint8_t, CacheLineAllocator<uint8_t>>;

// One 3-D expert tensor in GGUF blocks: expert e, row r starts at data + e*expert_stride + r*row_stride.
struct ExpertTensor {
  const uint8_t* data;
  int64_t expert_stride, row_stride;
  QType type;
  int n_expert, rows, cols;  // cols = in_features (values per row)
};

// One call: T tokens of hidden states, each routed to k experts with weights; out is overwritten.
struct MoeCall {
  const void* x;  // [T, H], fp32 or bf16
  bool x_bf16;
  const void* topk_ids;  // [T, k], int32 or int64; -1 skips the slot (a token with only -1 gets zeros)
  bool ids_int64;
  const float* topk_weights;  // [T, k]
  float* out;                 // [T, H] fp32
  int num_tokens, top_k;
};

// How experts with many tokens are computed: on int8 tiles (kquant_tiles.h) when `tiles` is set, the
// weight types are k-quants and the expert has at least min_tokens tokens in the call; else the row kernels.
struct TileOptions {
  const TileGemm* tiles;  // from select_tile_gemm(); nullptr: row kernels only
  int min_tokens;
};

class MoeRunner {
 public:
  MoeRunner(ExpertTensor gate, ExpertTensor up, ExpertTensor down, int num_threads, const std::string& isa,
            TileOptions tile_options);
  ~MoeRunner();
  MoeRunner(const MoeRunner&) = delete;
  MoeRunner& operator=(const MoeRunner&) = delete;

  // Plans on the calling thread (throws std::invalid_argument for a bad expert id) and starts the
  // workers; returns before the result is ready. Buffers must stay alive until wait() returns.
  void submit(const MoeCall& call);
  void wait();
  bool pending() const { return pending_; }
  // Bytes of the per-call buffers (activations, intermediates, tile scratch) held between calls: those of a
  // decode-sized call stay, larger ones are freed by wait() (kKeepBufferBytes).
  size_t call_buffer_bytes() const;
  static constexpr size_t kKeepBufferBytes = size_t(16) << 20;
  const char* isa() const { return kernels_.isa; }
  const char* tile_isa() const { return tiles_ ? tiles_->name : "off"; }
  int tile_min_tokens() const { return tile_min_tokens_; }
  // Wall time of the last call's phases (quantize x, pack x, gate+up, quantize h, down), in ns, as worker
  // 0 saw them (each ends when the slowest worker reaches the barrier). Valid after wait().
  const std::array<int64_t, 5>& phase_ns() const { return phase_ns_; }
  int num_threads() const { return pool_->size(); }

 private:
  void plan(const MoeCall& call);
  void plan_tiles();
  void release_large_buffers();  // frees the call buffers when above kKeepBufferBytes
  void work(int worker);
  void quantize_tokens(int worker);
  void gate_up(int worker);
  void pack_tokens();
  void quantize_intermediate();
  void down(int worker);
  PackedTokens packed(bool intermediate, int a);
  void tile_gate_up(int worker, int a, int r0);
  void tile_down(int worker, int a, int r0);

  ExpertTensor gate_, up_, down_;
  const RowDotTable& kernels_;
  std::shared_ptr<ThreadPool> pool_;  // shared by every runner of this thread count
  bool pending_ = false;
  MoeCall call_{};

  // Plan of the current call: assignments (token, weight) grouped by expert, in active-expert order.
  std::vector<int> active_experts_, expert_begin_, assign_token_;
  std::vector<float> assign_weight_;
  int max_tokens_per_expert_ = 0;
  // Quantized activations and the per-assignment pointers the kernels take.
  AlignedBytes x_gate_q_, x_up_q_, h_q_;
  bool up_shares_gate_act_;
  std::vector<const uint8_t*> gate_acts_, up_acts_, down_acts_;
  std::vector<float> h_;  // [n_assign, I]: SiLU(gate) * up
  std::vector<std::vector<float>> scratch_;  // per worker
  // Tile path: per active expert, its first packed token tile (-1: row kernels); the (expert, token tile)
  // pairs of every active expert, the work items that quantize the intermediate; packed x and h.
  const TileGemm* tiles_;
  int tile_min_tokens_;
  bool tiles_gate_up_, tiles_down_;  // the weight types allow it
  std::vector<int> first_tile_;
  std::vector<std::pair<int, int>> token_tiles_;
  int n_packed_tiles_ = 0;
  std::vector<std::pair<int, int>> packed_x_tiles_;  // (expert, tile) to pack for gate/up
  AlignedBytes x_packed_, h_packed_;
  std::vector<TokenTileMeta, CacheLineAllocator<TokenTileMeta>> x_meta_, h_meta_;
  std::vector<std::unique_ptr<TileScratch>> tile_scratch_;  // per worker
  std::vector<std::vector<float>> tile_acc_;                // per worker: [2][16][16 * tiles]
  // Work counters of the four phases, each on its own cache line: every worker bumps them, and they
  // must not evict the read-mostly fields above from the other workers' caches.
  struct alignas(64) Counter {
    std::atomic<int> next{0};
  };
  Counter next_item_[5];
  std::array<int64_t, 5> phase_ns_{};
  Counter workers_done_;       // workers past the down phase: the last one times it
  int64_t down_start_ns_ = 0;  // steady_clock; worker 0 writes it before counting itself done
};

}  // namespace ksdk
