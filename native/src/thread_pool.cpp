#include "ksdk/thread_pool.h"

#include <chrono>
#include <map>
#include <stdexcept>

#include "ksdk/cpu_relax.h"

namespace ksdk {
namespace {

using Clock = std::chrono::steady_clock;

// Spins until pred() or spin_us elapse; returns pred()'s last value.
template <typename Pred>
bool spin_until(Pred pred, int spin_us) {
  const auto deadline = Clock::now() + std::chrono::microseconds(spin_us);
  for (int i = 0;; ++i) {
    if (pred()) return true;
    cpu_relax();
    if ((i & 255) == 255 && Clock::now() > deadline) return pred();
  }
}

}  // namespace

ThreadPool::ThreadPool(int num_threads, int spin_us) : spin_us_(spin_us) {
  if (num_threads < 1) num_threads = 1;
  workers_.reserve(num_threads);
  for (int i = 0; i < num_threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  join();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
  }
  wake_cv_.notify_all();
  for (auto& w : workers_) w.join();
}

std::shared_ptr<ThreadPool> ThreadPool::shared(int num_threads) {
  static std::mutex registry_mutex;
  static std::map<int, std::weak_ptr<ThreadPool>> registry;
  std::lock_guard<std::mutex> lock(registry_mutex);
  std::shared_ptr<ThreadPool> pool = registry[num_threads].lock();
  if (!pool) {
    pool = std::make_shared<ThreadPool>(num_threads);
    registry[num_threads] = pool;
  }
  return pool;
}

void ThreadPool::launch(std::function<void(int)> fn) {
  {
    std::unique_lock<std::mutex> lock(busy_mutex_);
    if (busy_ && busy_owner_ == std::this_thread::get_id())
      throw std::logic_error(
          "this thread already has a pending call on the shared expert thread pool; wait() for it first");
    busy_cv_.wait(lock, [this] { return !busy_; });
    busy_ = true;
    busy_owner_ = std::this_thread::get_id();
  }
  job_ = std::move(fn);
  remaining_.store(size(), std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.fetch_add(1, std::memory_order_release);
  }
  wake_cv_.notify_all();
}

void ThreadPool::join() {
  auto done = [this] { return remaining_.load(std::memory_order_acquire) == 0; };
  if (!spin_until(done, spin_us_)) {
    std::unique_lock<std::mutex> lock(mutex_);
    done_cv_.wait(lock, done);
  }
  {
    std::lock_guard<std::mutex> lock(busy_mutex_);
    busy_ = false;
  }
  busy_cv_.notify_one();
}

void ThreadPool::barrier() {
  const uint64_t phase = barrier_phase_.load(std::memory_order_acquire);
  if (barrier_count_.fetch_add(1, std::memory_order_acq_rel) + 1 == size()) {
    barrier_count_.store(0, std::memory_order_relaxed);
    barrier_phase_.fetch_add(1, std::memory_order_release);
    return;
  }
  for (int i = 0; barrier_phase_.load(std::memory_order_acquire) == phase; ++i) {
    cpu_relax();
    // More workers than free cores (a busy host): let the stragglers run.
    if (i > 4096) std::this_thread::yield();
  }
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  for (;;) {
    auto has_work = [&] {
      return generation_.load(std::memory_order_acquire) != seen || stop_.load(std::memory_order_relaxed);
    };
    if (!spin_until(has_work, spin_us_)) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_cv_.wait(lock, has_work);
    }
    if (stop_.load()) return;
    seen = generation_.load(std::memory_order_acquire);
    job_(index);
    if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(mutex_);  // pairs with join()'s predicate check under the lock
      done_cv_.notify_all();
    }
  }
}

}  // namespace ksdk
