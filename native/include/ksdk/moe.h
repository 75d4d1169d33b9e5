// The routed-experts MoE operation on GGUF blocks, run on a persistent thread pool.
//
// NUMA design (not implemented yet; one node is assumed): experts are never copied per node. Each
// expert's rows are split across nodes instead (gate/up rows [0, I) and down rows [0, H) in n_nodes
// contiguous ranges, placed with mbind on the node that owns them), and every node's workers take
// only the row tiles whose weights are local. Phase B then writes disjoint slices of the intermediate
// and phase D disjoint output rows, so the node split needs no extra reduction and memory stays 1x.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>
#include <vector>

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

class MoeRunner {
 public:
  MoeRunner(ExpertTensor gate, ExpertTensor up, ExpertTensor down, int num_threads, const std::string& isa);
  ~MoeRunner();
  MoeRunner(const MoeRunner&) = delete;
  MoeRunner& operator=(const MoeRunner&) = delete;

  // Plans on the calling thread (throws std::invalid_argument for a bad expert id) and starts the
  // workers; returns before the result is ready. Buffers must stay alive until wait() returns.
  void submit(const MoeCall& call);
  void wait();
  bool pending() const { return pending_; }
  const char* isa() const { return kernels_.isa; }
  int num_threads() const { return pool_->size(); }

 private:
  void plan(const MoeCall& call);
  void work(int worker);
  void quantize_tokens(int worker);
  void gate_up(int worker);
  void quantize_intermediate();
  void down(int worker);

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
  // Work counters of the four phases, each on its own cache line: every worker bumps them, and they
  // must not evict the read-mostly fields above from the other workers' caches.
  struct alignas(64) Counter {
    std::atomic<int> next{0};
  };
  Counter next_item_[4];
};

}  // namespace ksdk
