// Routed experts as a host node of a CUDA graph.
//
// A captured decode step copies a MoE layer's hidden states, expert ids and weights into fixed pinned
// host buffers, then enqueues ksdk_moe_host_call(user_data) with the driver's cuLaunchHostFunc: the
// driver runs it on its own thread, in stream order, after the copies have landed, and the copy of the
// output back to the GPU waits for it to return. The function runs one MoeRunner call (submit, wait) on
// those buffers. It must never throw (the driver's thread would terminate) and never calls CUDA: errors
// and timings go to a HostCallLog that Python reads after the step. This file does not include CUDA.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>

#include "ksdk/moe.h"

namespace ksdk {

// Shared by every host call of one model's step graphs: the first error of a step, and the time spent.
class HostCallLog {
 public:
  void record_error(const std::string& what);
  // The first error recorded since the last take, or "" when none; clears it.
  std::string take_error();
  void add_call(int64_t ns) {
    expert_ns_.fetch_add(ns, std::memory_order_relaxed);
    calls_.fetch_add(1, std::memory_order_relaxed);
  }
  int64_t expert_ns() const { return expert_ns_.load(std::memory_order_relaxed); }
  int64_t calls() const { return calls_.load(std::memory_order_relaxed); }
  void reset_counters() {
    expert_ns_.store(0, std::memory_order_relaxed);
    calls_.store(0, std::memory_order_relaxed);
  }
  // When set, host calls zero their output instead of running the experts (measures everything else).
  std::atomic<bool> skip_experts{false};

 private:
  std::mutex mu_;
  std::string first_error_;
  std::atomic<int64_t> expert_ns_{0}, calls_{0};
};

// One MoE layer's call at one batch size: fixed buffers, bound once at capture.
struct HostCall {
  MoeRunner* runner;
  MoeCall call;  // its pointers are the pinned host buffers the graph's copies fill and drain
  int hidden;    // out is [call.num_tokens, hidden] fp32
  HostCallLog* log;
};

}  // namespace ksdk

// The CUhostFn: user_data is a ksdk::HostCall*. Exported with C linkage so that ctypes can find it too.
extern "C" void ksdk_moe_host_call(void* user_data);
