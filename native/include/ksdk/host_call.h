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
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ksdk/moe.h"

namespace ksdk {

// Shared by every host call of one model's step graphs: the first error of a step, and the time spent.
class HostCallLog {
 public:
  // steady_clock in ns: the clock of every time below (Python passes new_step() the same one).
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  void record_error(const std::string& what);
  // The first error recorded since the last take, or "" when none; clears it.
  std::string take_error();
  // A step's host calls run one after another on the driver's thread, so the time from one call's end to
  // the next one's start is the GPU work of one MoE layer between them (plus the copies and the round
  // trip). new_step(), called before a step is launched, stops that span from reaching across steps and
  // starts the lead: from the launch to the step's first host call (dense layers and the first attention).
  void new_step(int64_t now_ns) {
    last_end_ns_.store(0, std::memory_order_relaxed);
    step_start_ns_.store(now_ns, std::memory_order_relaxed);
  }
  void begin_call(int64_t now_ns) {
    const int64_t last_end = last_end_ns_.load(std::memory_order_relaxed);
    if (last_end != 0) {
      gap_ns_.fetch_add(now_ns - last_end, std::memory_order_relaxed);
      gaps_.fetch_add(1, std::memory_order_relaxed);
    } else if (const int64_t start = step_start_ns_.exchange(0, std::memory_order_relaxed); start != 0) {
      lead_ns_.fetch_add(now_ns - start, std::memory_order_relaxed);
      leads_.fetch_add(1, std::memory_order_relaxed);
    }
  }
  void end_call(int64_t start_ns, int64_t now_ns) {
    expert_ns_.fetch_add(now_ns - start_ns, std::memory_order_relaxed);
    calls_.fetch_add(1, std::memory_order_relaxed);
    last_end_ns_.store(now_ns, std::memory_order_relaxed);
  }
  int64_t expert_ns() const { return expert_ns_.load(std::memory_order_relaxed); }
  int64_t calls() const { return calls_.load(std::memory_order_relaxed); }
  // Summed spans between consecutive host calls of a step, and how many.
  int64_t gap_ns() const { return gap_ns_.load(std::memory_order_relaxed); }
  int64_t gaps() const { return gaps_.load(std::memory_order_relaxed); }
  // Summed spans from new_step() to the step's first host call, and how many.
  int64_t lead_ns() const { return lead_ns_.load(std::memory_order_relaxed); }
  int64_t leads() const { return leads_.load(std::memory_order_relaxed); }
  void reset_counters() {
    for (auto* counter : {&expert_ns_, &calls_, &gap_ns_, &gaps_, &lead_ns_, &leads_})
      counter->store(0, std::memory_order_relaxed);
  }
  // When set, host calls zero their output instead of running the experts (measures everything else).
  std::atomic<bool> skip_experts{false};

 private:
  std::mutex mu_;
  std::string first_error_;
  std::atomic<int64_t> expert_ns_{0}, calls_{0}, gap_ns_{0}, gaps_{0}, lead_ns_{0}, leads_{0};
  std::atomic<int64_t> last_end_ns_{0}, step_start_ns_{0};  // steady_clock ns; 0: none
};

// One MoE layer's call at one batch size: fixed buffers, bound once at capture.
struct HostCall {
  MoeRunner* runner;
  MoeCall call;  // its pointers are the pinned host buffers the graph's copies fill and drain
  int hidden;    // out is [call.num_tokens, hidden] fp32
  HostCallLog* log;
};

// Runs one host call and records it in its log; never throws.
void run_host_call(HostCall& host_call);

// Serves a step's host calls through two words of pinned host memory instead of the driver's host-function
// thread: the step writes a call's id into `doorbell` (cuStreamWriteValue32, after the copies of its inputs)
// and waits until `done` equals that id (cuStreamWaitValue32), then writes 0 to `done`. This server's thread
// spins on `doorbell` while armed, clears it, runs the call, and stores the id in `done`. A host-function
// node costs two trips through the driver (the GPU wakes the driver's thread, the thread's return releases
// the stream); here the GPU and this thread only poll memory. The expert workers still sleep between layers
// (after the pool's spin window): on the lent H100 host, keeping them spinning through the step made a
// batch-1 layer's experts 1.4-1.7x slower.
class HostCallServer {
 public:
  HostCallServer(uint32_t* doorbell, uint32_t* done);
  ~HostCallServer();  // cancels an armed step and joins the thread
  HostCallServer(const HostCallServer&) = delete;
  HostCallServer& operator=(const HostCallServer&) = delete;

  // Registers a call (it must outlive this server) and returns its id, from 1 on.
  uint32_t add(HostCall* call);
  // Serves the next num_calls doorbells, then goes back to sleep (call it once the step is launched).
  void arm(int num_calls);
  // Waits until the armed calls are served (true), or gives up after timeout_ms (false): then the server
  // stops waiting for the rest and returns to sleep. A step whose doorbells never came (a failed
  // launch) must not leave this thread spinning.
  bool finish(int timeout_ms);
  int64_t served() const { return served_.load(std::memory_order_relaxed); }

 private:
  void loop();

  uint32_t* const doorbell_;
  uint32_t* const done_;
  std::vector<HostCall*> calls_;  // id - 1 -> call; guarded by mu_
  std::mutex mu_;
  std::condition_variable cv_;
  int to_serve_ = 0;  // guarded by mu_
  bool stop_ = false;  // guarded by mu_
  std::atomic<bool> cancel_{false};
  std::atomic<int64_t> served_{0};
  std::thread thread_;
};

}  // namespace ksdk

// The CUhostFn: user_data is a ksdk::HostCall*. Exported with C linkage so that ctypes can find it too.
extern "C" void ksdk_moe_host_call(void* user_data);
