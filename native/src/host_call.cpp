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
  const int64_t start = ksdk::HostCallLog::now_ns();
  log.begin_call(start);
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
  log.end_call(start, ksdk::HostCallLog::now_ns());
}
