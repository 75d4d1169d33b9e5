// The host function a captured decode step calls for each MoE layer (see ksdk/host_call.h).
#include "ksdk/host_call.h"

#include <chrono>
#include <cstring>
#include <exception>

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

}  // namespace ksdk

extern "C" __attribute__((visibility("default"))) void ksdk_moe_host_call(void* user_data) {
  auto* host_call = static_cast<ksdk::HostCall*>(user_data);
  ksdk::HostCallLog& log = *host_call->log;
  const auto start = std::chrono::steady_clock::now();
  if (log.skip_experts.load(std::memory_order_relaxed)) {
    std::memset(host_call->call.out, 0, sizeof(float) * size_t(host_call->call.num_tokens) * host_call->hidden);
  } else {
    try {
      host_call->runner->submit(host_call->call);
      host_call->runner->wait();
    } catch (const std::exception& e) {  // e.g. an expert id out of range: the step's output is garbage
      log.record_error(e.what());
    } catch (...) {
      log.record_error("unknown exception in the routed experts");
    }
  }
  const auto elapsed = std::chrono::steady_clock::now() - start;
  log.add_call(std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed).count());
}
