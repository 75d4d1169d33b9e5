// Host calls of captured decode steps: the driver's host function, and the doorbell server (ksdk/host_call.h).
#include "ksdk/host_call.h"

#include <chrono>
#include <cstring>
#include <exception>

#include "ksdk/cpu_relax.h"

namespace ksdk {

void HostCallLog::record_error(const std::string& what) {
  std::lock_guard<std::mutex> lock(mu_);
  if (first_error_.empty()) first_error_ = what.empty() ? "unknown error" : what;
}

std::string HostCallLog::take_error() {
  std::lock_guard<std::mutex> lock(mu_);
  std::string error;
  error.swap(first_error_);
  return error;
}

void run_host_call(HostCall& host_call) {
  HostCallLog& log = *host_call.log;
  const int64_t start = HostCallLog::now_ns();
  log.begin_call(start);
  if (log.skip_experts.load(std::memory_order_relaxed)) {
    std::memset(host_call.call.out, 0, sizeof(float) * size_t(host_call.call.num_tokens) * host_call.hidden);
  } else {
    try {
      host_call.runner->submit(host_call.call);
      host_call.runner->wait();
    } catch (const std::exception& e) {  // e.g. an expert id out of range: the step's output is garbage
      log.record_error(e.what());
    } catch (...) {
      log.record_error("unknown exception in the routed experts");
    }
  }
  log.end_call(start, HostCallLog::now_ns());
}

HostCallServer::HostCallServer(uint32_t* doorbell, uint32_t* done)
    : doorbell_(doorbell), done_(done), thread_([this] { loop(); }) {}

HostCallServer::~HostCallServer() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cancel_.store(true);
  cv_.notify_all();
  thread_.join();
}

uint32_t HostCallServer::add(HostCall* call) {
  std::lock_guard<std::mutex> lock(mu_);
  calls_.push_back(call);
  return uint32_t(calls_.size());
}

void HostCallServer::arm(int num_calls) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    to_serve_ += num_calls;
  }
  cv_.notify_all();
}

bool HostCallServer::finish(int timeout_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  if (cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [this] { return to_serve_ == 0; })) return true;
  cancel_.store(true);
  cv_.wait(lock, [this] { return to_serve_ == 0; });
  cancel_.store(false);
  return false;
}

void HostCallServer::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [this] { return stop_ || to_serve_ > 0; });
    if (stop_) return;
    while (to_serve_ > 0 && !cancel_.load(std::memory_order_relaxed)) {
      lock.unlock();
      uint32_t id = 0;
      for (int i = 0; !cancel_.load(std::memory_order_relaxed); ++i) {
        id = __atomic_load_n(doorbell_, __ATOMIC_ACQUIRE);  // the GPU wrote it after the inputs landed
        if (id != 0) break;
        cpu_relax();
      }
      lock.lock();
      if (id == 0) break;  // cancelled
      __atomic_store_n(doorbell_, 0u, __ATOMIC_RELAXED);  // before `done`: the next doorbell comes after it
      HostCall* call = id <= calls_.size() ? calls_[id - 1] : nullptr;
      lock.unlock();
      if (call != nullptr) run_host_call(*call);
      __atomic_store_n(done_, id, __ATOMIC_RELEASE);  // an unknown id is answered too: the GPU never hangs
      served_.fetch_add(1, std::memory_order_relaxed);
      lock.lock();
      --to_serve_;
    }
    to_serve_ = 0;
    cv_.notify_all();  // finish()
  }
}

}  // namespace ksdk

extern "C" __attribute__((visibility("default"))) void ksdk_moe_host_call(void* user_data) {
  ksdk::run_host_call(*static_cast<ksdk::HostCall*>(user_data));
}
