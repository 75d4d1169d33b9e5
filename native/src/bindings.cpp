// The only pybind11 file: exposes the kernels as ksdk._native (see ksdk/_native.pyi).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

#include "ksdk/bandwidth.h"
#include "ksdk/cpu_features.h"
#include "ksdk/host_call.h"
#include "ksdk/moe.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace ksdk {
namespace {

QType to_qtype(int value) {
  switch (value) {
    case int(QType::F16):
    case int(QType::Q8_0):
    case int(QType::Q4_K):
    case int(QType::Q5_K):
    case int(QType::Q6_K):
    case int(QType::BF16): return QType(value);
  }
  throw std::invalid_argument("quant type " + std::to_string(value) +
                              " has no kernel; allowed: F16, Q8_0, Q4_K, Q5_K, Q6_K, BF16");
}

// A [n_expert, rows, bytes_per_row] uint8 buffer (e.g. a GGUF memmap) viewed as expert weights.
ExpertTensor expert_tensor(const py::buffer& buffer, int qtype, int n_expert, int rows, int cols,
                           const char* name) {
  const py::buffer_info info = buffer.request();
  const QType t = to_qtype(qtype);
  const int64_t row_bytes = int64_t(cols / block_values(t)) * int64_t(block_bytes(t));
  if (info.itemsize != 1 || info.ndim != 3 || info.shape[0] != n_expert || info.shape[1] != rows ||
      info.shape[2] != row_bytes || info.strides[2] != 1 || cols % block_values(t) != 0)
    throw std::invalid_argument(std::string(name) + ": expected a uint8 buffer shaped (" +
                                std::to_string(n_expert) + ", " + std::to_string(rows) + ", " +
                                std::to_string(row_bytes) + ") with unit inner stride");
  return ExpertTensor{static_cast<const uint8_t*>(info.ptr), info.strides[0], info.strides[1], t, n_expert,
                      rows, cols};
}

// Keeps the weight buffers alive as long as the runner that reads them.
struct NativeMoe {
  py::object gate, up, down;
  std::unique_ptr<MoeRunner> runner;
};

// ---- host calls (ksdk/host_call.h) ----
// One MoE layer's host call at one batch size; keeps its runner (with the weights) and its log alive.
struct NativeHostCall {
  py::object runner, log;
  HostCall call;
};

// The doorbell server and the host calls it serves (kept alive as long as it).
struct NativeHostCallServer {
  std::vector<py::object> calls;
  std::unique_ptr<HostCallServer> server;
};

}  // namespace
}  // namespace ksdk

PYBIND11_MODULE(_native, m) {
  using namespace ksdk;
  m.doc() = "ksdk native CPU kernels (routed experts on GGUF blocks)";

  m.def("cpu_features", [] {
    const CpuFeatures& f = cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["avx512vnni"] = f.avx512vnni;
    d["amx_int8"] = f.amx_int8;
    return d;
  });
  m.def("prefetch_distance", &prefetch_distance);
  m.def("set_prefetch_distance", &set_prefetch_distance, "num_bytes"_a);
  m.def("prefetch_next_row", &prefetch_next_row);
  m.def("set_prefetch_next_row", &set_prefetch_next_row, "on"_a);
  m.def("read_bandwidth", &read_bandwidth_gbs, "num_bytes"_a, "num_threads"_a, "repeats"_a = 3,
        py::call_guard<py::gil_scoped_release>());
  m.def(
      "lock_memory",
      [](const py::buffer& buffer) {
        const py::buffer_info info = buffer.request();
        if (mlock(info.ptr, size_t(info.size * info.itemsize)) != 0) {
          const int err = errno;
          throw py::value_error("mlock failed: " + std::string(std::strerror(err)) +
                                " (raise RLIMIT_MEMLOCK, e.g. `ulimit -l unlimited`)");
        }
      },
      "buffer"_a);

  py::class_<NativeMoe>(m, "MoeRunner")
      .def(py::init([](py::buffer gate, py::buffer up, py::buffer down, int gate_type, int up_type,
                       int down_type, int n_expert, int hidden, int intermediate, int num_threads,
                       const std::string& isa, const std::string& tile_isa, int tile_min_tokens) {
             auto moe = std::make_unique<NativeMoe>();
             const ExpertTensor g = expert_tensor(gate, gate_type, n_expert, intermediate, hidden, "gate");
             const ExpertTensor u = expert_tensor(up, up_type, n_expert, intermediate, hidden, "up");
             const ExpertTensor d = expert_tensor(down, down_type, n_expert, hidden, intermediate, "down");
             moe->gate = gate;
             moe->up = up;
             moe->down = down;
             moe->runner = std::make_unique<MoeRunner>(g, u, d, num_threads, isa,
                                                       TileOptions{select_tile_gemm(tile_isa), tile_min_tokens});
             return moe;
           }),
           "gate"_a, "up"_a, "down"_a, "gate_type"_a, "up_type"_a, "down_type"_a, "n_expert"_a, "hidden"_a,
           "intermediate"_a, "num_threads"_a, "isa"_a = "auto", "tile_isa"_a = "auto", "tile_min_tokens"_a = 8)
      .def(
          "submit",
          [](NativeMoe& self, uintptr_t x, bool x_bf16, uintptr_t topk_ids, bool ids_int64,
             uintptr_t topk_weights, uintptr_t out, int num_tokens, int top_k) {
            MoeCall call{reinterpret_cast<const void*>(x),
                         x_bf16,
                         reinterpret_cast<const void*>(topk_ids),
                         ids_int64,
                         reinterpret_cast<const float*>(topk_weights),
                         reinterpret_cast<float*>(out),
                         num_tokens,
                         top_k};
            self.runner->submit(call);
          },
          "x"_a, "x_bf16"_a, "topk_ids"_a, "ids_int64"_a, "topk_weights"_a, "out"_a, "num_tokens"_a, "top_k"_a,
          py::call_guard<py::gil_scoped_release>())
      .def("wait", [](NativeMoe& self) { self.runner->wait(); }, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("pending", [](const NativeMoe& self) { return self.runner->pending(); })
      .def_property_readonly("isa", [](const NativeMoe& self) { return std::string(self.runner->isa()); })
      .def_property_readonly("tile_isa", [](const NativeMoe& self) { return std::string(self.runner->tile_isa()); })
      .def_property_readonly("tile_min_tokens", [](const NativeMoe& self) { return self.runner->tile_min_tokens(); })
      .def_property_readonly("phase_ns", [](const NativeMoe& self) { return self.runner->phase_ns(); })
      .def_property_readonly("call_buffer_bytes", [](const NativeMoe& self) { return self.runner->call_buffer_bytes(); })
      .def_property_readonly("num_threads", [](const NativeMoe& self) { return self.runner->num_threads(); });

  // ---- host calls (ksdk/host_call.h): routed experts as host nodes of captured decode steps ----
  m.def("moe_host_call_address", [] { return reinterpret_cast<uintptr_t>(&ksdk_moe_host_call); });
  py::class_<HostCallLog>(m, "HostCallLog")
      .def(py::init<>())
      .def("take_error", &HostCallLog::take_error)
      .def("reset_counters", &HostCallLog::reset_counters)
      .def_property_readonly("expert_ns", &HostCallLog::expert_ns)
      .def_property_readonly("calls", &HostCallLog::calls)
      .def("new_step", [](HostCallLog& self) { self.new_step(HostCallLog::now_ns()); })
      .def_property_readonly("gap_ns", &HostCallLog::gap_ns)
      .def_property_readonly("gaps", &HostCallLog::gaps)
      .def_property_readonly("lead_ns", &HostCallLog::lead_ns)
      .def_property_readonly("leads", &HostCallLog::leads)
      .def_property(
          "skip_experts", [](const HostCallLog& self) { return self.skip_experts.load(); },
          [](HostCallLog& self, bool on) { self.skip_experts.store(on); });
  py::class_<NativeHostCall>(m, "HostCall")
      .def(py::init([](py::object runner, py::object log, uintptr_t x, bool x_bf16, uintptr_t topk_ids,
                       bool ids_int64, uintptr_t topk_weights, uintptr_t out, int num_tokens, int top_k,
                       int hidden) {
             if (num_tokens < 1 || top_k < 1 || hidden < 1)
               throw std::invalid_argument("num_tokens, top_k and hidden must be >= 1");
             NativeMoe& moe = runner.cast<NativeMoe&>();
             auto host_call = std::make_unique<NativeHostCall>();
             host_call->runner = runner;
             host_call->log = log;
             host_call->call = HostCall{moe.runner.get(),
                                        MoeCall{reinterpret_cast<const void*>(x), x_bf16,
                                                reinterpret_cast<const void*>(topk_ids), ids_int64,
                                                reinterpret_cast<const float*>(topk_weights),
                                                reinterpret_cast<float*>(out), num_tokens, top_k},
                                        hidden, log.cast<HostCallLog*>()};
             return host_call;
           }),
           "runner"_a, "log"_a, "x"_a, "x_bf16"_a, "topk_ids"_a, "ids_int64"_a, "topk_weights"_a, "out"_a,
           "num_tokens"_a, "top_k"_a, "hidden"_a)
      .def_property_readonly("address",
                             [](NativeHostCall& self) { return reinterpret_cast<uintptr_t>(&self.call); });
  py::class_<NativeHostCallServer>(m, "HostCallServer")
      .def(py::init([](uintptr_t doorbell, uintptr_t done) {
             if (doorbell == 0 || done == 0 || doorbell % 4 != 0 || done % 4 != 0)
               throw std::invalid_argument("doorbell and done must be 4-byte aligned host addresses");
             auto server = std::make_unique<NativeHostCallServer>();
             server->server = std::make_unique<HostCallServer>(reinterpret_cast<uint32_t*>(doorbell),
                                                               reinterpret_cast<uint32_t*>(done));
             return server;
           }),
           "doorbell"_a, "done"_a)
      .def(
          "add",
          [](NativeHostCallServer& self, py::object host_call) {
            NativeHostCall& call = host_call.cast<NativeHostCall&>();
            self.calls.push_back(host_call);
            return self.server->add(&call.call);
          },
          "host_call"_a)
      .def("arm", [](NativeHostCallServer& self, int num_calls) {
             if (num_calls < 0) throw std::invalid_argument("num_calls must be >= 0");
             self.server->arm(num_calls);
           }, "num_calls"_a)
      .def("finish", [](NativeHostCallServer& self, int timeout_ms) { return self.server->finish(timeout_ms); },
           "timeout_ms"_a, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("served", [](const NativeHostCallServer& self) { return self.server->served(); });
}
