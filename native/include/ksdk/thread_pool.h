// A persistent pool of worker threads for the expert kernels.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace ksdk {

// All workers run the same job fn(worker_index) at once; phases inside a job sync with barrier().
// Wake-up latency is low: idle workers spin for spin_us before sleeping on a condition variable, so
// back-to-back layers never pay a futex wake.
class ThreadPool {
 public:
  explicit ThreadPool(int num_threads, int spin_us = 200);
  // The process-wide pool of this size: every layer's experts share it, so layers never oversubscribe
  // the cores (one job runs at a time; a second launch waits for the first one's join).
  static std::shared_ptr<ThreadPool> shared(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()); }
  // Starts fn on every worker and returns at once. If another thread's job is running, waits for its
  // join() first; throws std::logic_error if this thread's own job is still un-joined (a deadlock).
  void launch(std::function<void(int)> fn);
  // Blocks until the launched job has finished on every worker (the launching thread calls it).
  void join();
  // Called by every worker of the running job: returns once all have arrived.
  void barrier();

 private:
  void worker_loop(int index);

  std::vector<std::thread> workers_;
  std::function<void(int)> job_;
  const int spin_us_;
  // Spun on by every worker: each on its own cache line.
  alignas(64) std::atomic<uint64_t> generation_{0};
  alignas(64) std::atomic<int> remaining_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_cv_, done_cv_;
  // One job at a time across the runners sharing this pool.
  std::mutex busy_mutex_;
  std::condition_variable busy_cv_;
  bool busy_ = false;
  std::thread::id busy_owner_;
  // Sense-reversing barrier state.
  alignas(64) std::atomic<int> barrier_count_{0};
  alignas(64) std::atomic<uint64_t> barrier_phase_{0};
};

}  // namespace ksdk
