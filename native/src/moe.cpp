// Phases of one call, all workers in each (barrier between): A quantize each token once (and, for experts
// on the tile path, pack their tokens into B tiles); B fused gate+up on row tiles of every active expert
// (all of that expert's tokens per weight row, so each row is read once); C quantize each (token, expert)
// intermediate (packed too for tile experts); D down projection on tiles of output rows across all
// active experts, weighted-summed into disjoint output rows (no atomics). Experts with at least
// tile_min_tokens tokens run B and D on int8 tiles (kquant_tiles.h), the others on the row kernels.
#include "ksdk/moe.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>

#include "ksdk/cpu_features.h"

namespace ksdk {
namespace {

constexpr int kGateUpTile = 16;  // rows per work item: small enough to keep every thread busy at T=1
constexpr int kDownTile = 16;
static_assert(kGateUpTile == kTileRows && kDownTile == kTileRows, "a work item is one weight tile");
constexpr int kSkipSlot = -1;  // a topk_ids entry that contributes nothing (e.g. the slot runs on the GPU)

float silu(float v) { return v / (1.f + std::exp(-v)); }

// Prefetches the start of a row the kernels will stream (they keep prefetch_distance() bytes ahead).
inline void prefetch_head(const uint8_t* row, int64_t row_bytes) {
  const int64_t bytes = std::min<int64_t>(prefetch_distance(), row_bytes);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
}

}  // namespace

MoeRunner::MoeRunner(ExpertTensor gate, ExpertTensor up, ExpertTensor down, int num_threads,
                     const std::string& isa, TileOptions tile_options)
    : gate_(gate),
      up_(up),
      down_(down),
      kernels_(select_row_dot(isa)),
      pool_(ThreadPool::shared(num_threads)),
      tiles_(tile_options.tiles),
      tile_min_tokens_(tile_options.min_tokens) {
  if (tile_min_tokens_ < 1)
    throw std::invalid_argument("tile_min_tokens=" + std::to_string(tile_min_tokens_) + " is invalid; allowed: >= 1");
  up_shares_gate_act_ = act_format(gate.type) == act_format(up.type);
  scratch_.resize(pool_->size());
  tiles_gate_up_ = tiles_ && tile_supported(gate.type) && tile_supported(up.type);
  tiles_down_ = tiles_ && tile_supported(down.type);
  if (tiles_gate_up_ || tiles_down_) {
    tile_scratch_.resize(pool_->size());
    for (auto& s : tile_scratch_) s = std::make_unique<TileScratch>();
    tile_acc_.resize(pool_->size());
  }
}

MoeRunner::~MoeRunner() {
  if (pending_) pool_->join();  // the workers still use this runner's buffers
}

void MoeRunner::plan(const MoeCall& call) {
  const int T = call.num_tokens, k = call.top_k, E = gate_.n_expert;
  std::vector<int> ids(size_t(T) * k);
  int n_assign = 0;
  for (int i = 0; i < T * k; ++i) {
    const int64_t id = call.ids_int64 ? static_cast<const int64_t*>(call.topk_ids)[i]
                                      : static_cast<const int32_t*>(call.topk_ids)[i];
    if (id < kSkipSlot || id >= E)
      throw std::invalid_argument("topk_ids[" + std::to_string(i / k) + ", " + std::to_string(i % k) +
                                  "] = " + std::to_string(id) + " is out of range; allowed: 0.." +
                                  std::to_string(E - 1) + ", or -1 to skip the slot");
    ids[i] = int(id);
    n_assign += id != kSkipSlot;
  }
  // Counting sort of assignments by expert (skipped slots take no assignment).
  std::vector<int> count(E + 1, 0);
  for (int id : ids)
    if (id != kSkipSlot) ++count[id + 1];
  active_experts_.clear();
  expert_begin_.assign(1, 0);
  max_tokens_per_expert_ = 0;
  std::vector<int> offset(E, 0);
  for (int e = 0; e < E; ++e) {
    if (count[e + 1] == 0) continue;
    offset[e] = expert_begin_.back();
    active_experts_.push_back(e);
    expert_begin_.push_back(expert_begin_.back() + count[e + 1]);
    max_tokens_per_expert_ = std::max(max_tokens_per_expert_, count[e + 1]);
  }
  assign_token_.resize(n_assign);
  assign_weight_.resize(n_assign);
  for (int i = 0; i < T * k; ++i) {
    if (ids[i] == kSkipSlot) continue;
    const int slot = offset[ids[i]]++;
    assign_token_[slot] = i / k;
    assign_weight_[slot] = call.topk_weights[i];
  }

  const int H = gate_.cols, I = gate_.rows;
  const size_t gate_row = act_row_bytes(gate_.type, H), up_row = act_row_bytes(up_.type, H);
  const size_t down_row = act_row_bytes(down_.type, I);
  x_gate_q_.resize(size_t(T) * gate_row);
  if (!up_shares_gate_act_) x_up_q_.resize(size_t(T) * up_row);
  h_.resize(size_t(n_assign) * I);
  h_q_.resize(size_t(n_assign) * down_row);
  gate_acts_.resize(n_assign);
  up_acts_.resize(n_assign);
  down_acts_.resize(n_assign);
  const uint8_t* x_up = up_shares_gate_act_ ? x_gate_q_.data() : x_up_q_.data();
  for (int j = 0; j < n_assign; ++j) {
    gate_acts_[j] = x_gate_q_.data() + size_t(assign_token_[j]) * gate_row;
    up_acts_[j] = x_up + size_t(assign_token_[j]) * up_row;
    down_acts_[j] = h_q_.data() + size_t(j) * down_row;
  }
  const size_t scratch = std::max<size_t>(H, 3 * size_t(max_tokens_per_expert_));
  for (auto& s : scratch_) s.resize(scratch);
  plan_tiles();
  for (auto& c : next_item_) c.next.store(0, std::memory_order_relaxed);
  workers_done_.next.store(0, std::memory_order_relaxed);
}

void MoeRunner::plan_tiles() {
  const int n_active = int(active_experts_.size());
  first_tile_.assign(n_active, -1);
  token_tiles_.clear();
  packed_x_tiles_.clear();
  n_packed_tiles_ = 0;
  int max_tiles = 0;
  for (int a = 0; a < n_active; ++a) {
    const int n_tok = expert_begin_[a + 1] - expert_begin_[a];
    const int n_tiles = (n_tok + kTileTokens - 1) / kTileTokens;
    for (int t = 0; t < n_tiles; ++t) token_tiles_.emplace_back(a, t);
    if (!(tiles_gate_up_ || tiles_down_) || n_tok < tile_min_tokens_) continue;
    first_tile_[a] = n_packed_tiles_;
    n_packed_tiles_ += n_tiles;
    max_tiles = std::max(max_tiles, n_tiles);
    if (tiles_gate_up_)
      for (int t = 0; t < n_tiles; ++t) packed_x_tiles_.emplace_back(a, t);
  }
  if (n_packed_tiles_ == 0) return;
  const size_t n_sb_h = size_t(gate_.cols / kSuperBlock), n_sb_i = size_t(down_.cols / kSuperBlock);
  if (tiles_gate_up_) {
    x_packed_.resize(n_packed_tiles_ * n_sb_h * kTokenBlockBytes);
    x_meta_.resize(n_packed_tiles_ * n_sb_h);
  }
  if (tiles_down_) {
    h_packed_.resize(n_packed_tiles_ * n_sb_i * kTokenBlockBytes);
    h_meta_.resize(n_packed_tiles_ * n_sb_i);
  }
  for (auto& acc : tile_acc_) acc.resize(size_t(2) * kTileRows * kTileTokens * max_tiles);
}

PackedTokens MoeRunner::packed(bool intermediate, int a) {
  const int n_sb = (intermediate ? down_.cols : gate_.cols) / kSuperBlock;
  const int n_tok = expert_begin_[a + 1] - expert_begin_[a];
  const size_t first = size_t(first_tile_[a]) * n_sb;
  AlignedBytes& data = intermediate ? h_packed_ : x_packed_;
  auto& meta = intermediate ? h_meta_ : x_meta_;
  return PackedTokens{reinterpret_cast<int8_t*>(data.data()) + first * kTokenBlockBytes, meta.data() + first,
                      (n_tok + kTileTokens - 1) / kTileTokens, n_sb};
}

void MoeRunner::submit(const MoeCall& call) {
  if (pending_) throw std::logic_error("submit() called twice without wait()");
  plan(call);
  call_ = call;
  pool_->launch([this](int worker) { work(worker); });
  pending_ = true;
}

void MoeRunner::wait() {
  if (!pending_) throw std::logic_error("wait() called without a pending submit()");
  pool_->join();
  pending_ = false;
  release_large_buffers();
}

size_t MoeRunner::call_buffer_bytes() const {
  size_t bytes = x_gate_q_.capacity() + x_up_q_.capacity() + h_q_.capacity() + x_packed_.capacity() +
                 h_packed_.capacity() + h_.capacity() * sizeof(float);
  for (const auto& acc : tile_acc_) bytes += acc.capacity() * sizeof(float);
  return bytes;
}

// Every MoE layer has its own runner; a long prompt's buffers kept by each would add up to gigabytes over
// R1's 58 layers (~170 MB a layer at T=1024). Decode-sized buffers stay; prefill-sized ones go after the call
// (allocating them again costs page faults spread over the workers, small beside such a call's time).
void MoeRunner::release_large_buffers() {
  if (call_buffer_bytes() <= kKeepBufferBytes) return;
  AlignedBytes().swap(x_gate_q_);
  AlignedBytes().swap(x_up_q_);
  AlignedBytes().swap(h_q_);
  AlignedBytes().swap(x_packed_);
  AlignedBytes().swap(h_packed_);
  std::vector<float>().swap(h_);
  for (auto& acc : tile_acc_) std::vector<float>().swap(acc);
}

void MoeRunner::work(int worker) {
  const bool tiles = n_packed_tiles_ > 0;  // the same answer on every worker: the plan is shared
  if (tiles) tiles_->begin_thread();
  using Clock = std::chrono::steady_clock;
  auto start = Clock::now();
  auto phase_done = [&](int phase) {  // worker 0 times the phases after each barrier
    if (worker != 0) return;
    const auto now = Clock::now();
    phase_ns_[phase] = std::chrono::duration_cast<std::chrono::nanoseconds>(now - start).count();
    start = now;
  };
  quantize_tokens(worker);
  pool_->barrier();
  phase_done(0);
  if (!packed_x_tiles_.empty()) {
    pack_tokens();
    pool_->barrier();
  }
  phase_done(1);
  gate_up(worker);
  pool_->barrier();
  phase_done(2);
  quantize_intermediate();
  pool_->barrier();
  phase_done(3);
  if (worker == 0) down_start_ns_ = Clock::now().time_since_epoch().count();
  down(worker);
  if (tiles) tiles_->end_thread();
  // The last worker to finish times the down phase (no barrier: join() is the end).
  if (workers_done_.next.fetch_add(1) + 1 == pool_->size())
    phase_ns_[4] = Clock::now().time_since_epoch().count() - down_start_ns_;
}

void MoeRunner::pack_tokens() {
  const int n_items = int(packed_x_tiles_.size());
  for (int i; (i = next_item_[4].next.fetch_add(1)) < n_items;) {
    const auto [a, t] = packed_x_tiles_[i];
    const int first = expert_begin_[a] + t * kTileTokens;
    const int n = std::min(kTileTokens, expert_begin_[a + 1] - first);
    pack_token_tile(gate_acts_.data() + first, n, packed(false, a), t);
  }
}

void MoeRunner::quantize_tokens(int worker) {
  const int H = gate_.cols;
  float* row = scratch_[worker].data();
  for (int t; (t = next_item_[0].next.fetch_add(1)) < call_.num_tokens;) {
    const float* x;
    if (call_.x_bf16) {
      const uint16_t* xb = static_cast<const uint16_t*>(call_.x) + size_t(t) * H;
      for (int i = 0; i < H; ++i) row[i] = bf16_to_fp32(xb[i]);
      x = row;
    } else {
      x = static_cast<const float*>(call_.x) + size_t(t) * H;
    }
    quantize_activation(gate_.type, x, H, x_gate_q_.data() + size_t(t) * act_row_bytes(gate_.type, H));
    if (!up_shares_gate_act_)
      quantize_activation(up_.type, x, H, x_up_q_.data() + size_t(t) * act_row_bytes(up_.type, H));
  }
}

void MoeRunner::gate_up(int worker) {
  const int I = gate_.rows, H = gate_.cols;
  const int tiles_per_expert = (I + kGateUpTile - 1) / kGateUpTile;
  const int n_items = int(active_experts_.size()) * tiles_per_expert;
  const RowDot gate_dot = kernels_.get(gate_.type), up_dot = kernels_.get(up_.type);
  float* g = scratch_[worker].data();
  float* u = g + max_tokens_per_expert_;
  auto gate_row = [&](int item, int r) {
    return gate_.data + active_experts_[item / tiles_per_expert] * gate_.expert_stride + r * gate_.row_stride;
  };
  auto first_row = [&](int item) { return (item % tiles_per_expert) * kGateUpTile; };
  // The next item is claimed before this one ends, so the kernels stream on into it without a gap.
  int item = next_item_[1].next.fetch_add(1);
  if (item < n_items) prefetch_head(gate_row(item, first_row(item)), gate_.row_stride);
  while (item < n_items) {
    const int next_item = next_item_[1].next.fetch_add(1);
    const int a = item / tiles_per_expert, e = active_experts_[a];
    const int begin = expert_begin_[a], n_tok = expert_begin_[a + 1] - begin;
    const int r0 = first_row(item), r1 = std::min(I, r0 + kGateUpTile);
    if (tiles_gate_up_ && first_tile_[a] >= 0) {
      tile_gate_up(worker, a, r0);
      item = next_item;
      continue;
    }
    const uint8_t* gate_rows = gate_.data + e * gate_.expert_stride;
    const uint8_t* up_rows = up_.data + e * up_.expert_stride;
    for (int r = r0; r < r1; ++r) {
      const uint8_t* up_row = up_rows + r * up_.row_stride;
      // Hints go only to rows of the same type (a kernel streams `distance` bytes of its own row length).
      const bool same_type = up_.type == gate_.type;
      const uint8_t* after = !same_type         ? nullptr
                             : r + 1 < r1        ? gate_rows + (r + 1) * gate_.row_stride
                             : next_item < n_items ? gate_row(next_item, first_row(next_item))
                                                   : nullptr;
      gate_dot(gate_rows + r * gate_.row_stride, same_type ? up_row : nullptr, gate_acts_.data() + begin, n_tok,
               H, g);
      up_dot(up_row, after, up_acts_.data() + begin, n_tok, H, u);
      for (int j = 0; j < n_tok; ++j) h_[size_t(begin + j) * I + r] = silu(g[j]) * u[j];
    }
    item = next_item;
  }
}

void MoeRunner::tile_gate_up(int worker, int a, int r0) {
  const int I = gate_.rows, e = active_experts_[a];
  const int begin = expert_begin_[a], n_tok = expert_begin_[a + 1] - begin;
  const int n_rows = std::min(kTileRows, I - r0);
  const WeightTile w[2] = {
      {gate_.data + e * gate_.expert_stride + r0 * gate_.row_stride, gate_.row_stride, n_rows, gate_.type},
      {up_.data + e * up_.expert_stride + r0 * up_.row_stride, up_.row_stride, n_rows, up_.type}};
  const PackedTokens x = packed(false, a);
  const int stride = x.n_tiles * kTileTokens;
  float* g = tile_acc_[worker].data();
  float* u = g + kTileRows * stride;
  float* acc[2] = {g, u};
  weight_tiles_times_tokens(*tiles_, w, acc, 2, stride, x, *tile_scratch_[worker]);
  for (int j = 0; j < n_tok; ++j)
    for (int r = 0; r < n_rows; ++r)
      h_[size_t(begin + j) * I + r0 + r] = silu(g[r * stride + j]) * u[r * stride + j];
}

// Items are token tiles of 16 assignments of one expert: a tile expert's tile is packed right after
// its rows are quantized, while they are in cache.
void MoeRunner::quantize_intermediate() {
  const int I = gate_.rows, n_items = int(token_tiles_.size());
  const size_t row_bytes = act_row_bytes(down_.type, I);
  for (int i; (i = next_item_[2].next.fetch_add(1)) < n_items;) {
    const auto [a, t] = token_tiles_[i];
    const int first = expert_begin_[a] + t * kTileTokens;
    const int n = std::min(kTileTokens, expert_begin_[a + 1] - first);
    for (int j = first; j < first + n; ++j)
      quantize_activation(down_.type, h_.data() + size_t(j) * I, I, h_q_.data() + size_t(j) * row_bytes);
    if (tiles_down_ && first_tile_[a] >= 0) pack_token_tile(down_acts_.data() + first, n, packed(true, a), t);
  }
}

void MoeRunner::tile_down(int worker, int a, int r0) {
  const int H = down_.rows, e = active_experts_[a];
  const int begin = expert_begin_[a], n_tok = expert_begin_[a + 1] - begin;
  const int n_rows = std::min(kTileRows, H - r0);
  const WeightTile w{down_.data + e * down_.expert_stride + r0 * down_.row_stride, down_.row_stride, n_rows,
                     down_.type};
  const PackedTokens x = packed(true, a);
  const int stride = x.n_tiles * kTileTokens;
  float* y = tile_acc_[worker].data();
  weight_tiles_times_tokens(*tiles_, &w, &y, 1, stride, x, *tile_scratch_[worker]);
  for (int j = 0; j < n_tok; ++j) {  // each token's 16 outputs are contiguous
    float* out = call_.out + size_t(assign_token_[begin + j]) * H + r0;
    for (int r = 0; r < n_rows; ++r) out[r] += assign_weight_[begin + j] * y[r * stride + j];
  }
}

void MoeRunner::down(int worker) {
  const int H = down_.rows, I = down_.cols, T = call_.num_tokens;
  const int n_items = (H + kDownTile - 1) / kDownTile;
  const int n_active = int(active_experts_.size());
  const RowDot down_dot = kernels_.get(down_.type);
  float* y = scratch_[worker].data();
  auto row_of = [&](int a, int r) {
    return down_.data + active_experts_[a] * down_.expert_stride + r * down_.row_stride;
  };
  int item = next_item_[3].next.fetch_add(1);
  if (item < n_items) prefetch_head(row_of(0, item * kDownTile), down_.row_stride);
  while (item < n_items) {
    const int next_item = next_item_[3].next.fetch_add(1);
    const int r0 = item * kDownTile, r1 = std::min(H, r0 + kDownTile);
    for (int t = 0; t < T; ++t)
      for (int r = r0; r < r1; ++r) call_.out[size_t(t) * H + r] = 0.f;
    for (int a = 0; a < n_active; ++a) {
      if (tiles_down_ && first_tile_[a] >= 0) {
        tile_down(worker, a, r0);
        continue;
      }
      const int begin = expert_begin_[a], n_tok = expert_begin_[a + 1] - begin;
      for (int r = r0; r < r1; ++r) {
        const uint8_t* after = r + 1 < r1         ? row_of(a, r + 1)
                               : a + 1 < n_active ? row_of(a + 1, r0)
                               : next_item < n_items ? row_of(0, next_item * kDownTile)
                                                     : nullptr;
        down_dot(row_of(a, r), after, down_acts_.data() + begin, n_tok, I, y);
        for (int j = 0; j < n_tok; ++j)
          call_.out[size_t(assign_token_[begin + j]) * H + r] += assign_weight_[begin + j] * y[j];
      }
    }
    item = next_item;
  }
}

}  // namespace ksdk
