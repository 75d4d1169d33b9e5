"""The native host-call entry point (ksdk_moe_host_call), called through ctypes as the CUDA driver would
call it from a graph's host node, on a real MoeRunner with real buffers (no GPU needed)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from ksdk.bench.random_blocks import random_expert_tensor
from ksdk.offload import CPUExperts, load_native
from ksdk.offload.native import native_available
from tests.offload.host_call_buffers import HIDDEN, N_EXPERT, TOP_K, Buffers, Q, make_experts

pytestmark = pytest.mark.skipif(not native_available(), reason="ksdk._native not built")

HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # CUhostFn: void (*)(void* user_data)


@pytest.fixture(scope="module")
def experts() -> CPUExperts:
    return make_experts(seed=1)


def call(host_call: object) -> None:
    HOST_FN(load_native().moe_host_call_address())(host_call.address)


def test_exported_symbol_is_the_address_the_module_reports() -> None:
    native = load_native()
    lib = ctypes.CDLL(native.__file__)
    assert ctypes.cast(lib.ksdk_moe_host_call, ctypes.c_void_p).value == native.moe_host_call_address()


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 3, 32])
def test_host_call_equals_submit_wait(experts: CPUExperts, num_tokens: int, x_dtype: torch.dtype) -> None:
    bufs = Buffers(num_tokens, x_dtype, seed=num_tokens)
    log = load_native().HostCallLog()
    host_call = bufs.host_call(experts, log)
    expected = experts.forward(bufs.x, bufs.ids, bufs.weights)
    for _ in range(2):  # the same fixed buffers, called again as a replay would
        bufs.out.fill_(float("nan"))
        call(host_call)
        torch.testing.assert_close(bufs.out, expected, rtol=0, atol=0)
    assert log.take_error() == ""
    assert log.calls == 2 and log.expert_ns > 0


def test_new_inputs_in_the_same_buffers_give_new_outputs(experts: CPUExperts) -> None:
    bufs, other = Buffers(2, torch.float32, seed=1), Buffers(2, torch.float32, seed=2)
    host_call = bufs.host_call(experts, load_native().HostCallLog())
    call(host_call)
    first = bufs.out.clone()
    bufs.x.copy_(other.x)
    bufs.ids.copy_(other.ids)
    bufs.weights.copy_(other.weights)
    call(host_call)
    torch.testing.assert_close(bufs.out, experts.forward(other.x, other.ids, other.weights), rtol=0, atol=0)
    assert not torch.equal(bufs.out, first)


def test_an_error_is_recorded_not_thrown_and_taken_once(experts: CPUExperts) -> None:
    bufs = Buffers(2, torch.float32)
    log = load_native().HostCallLog()
    host_call = bufs.host_call(experts, log)
    bufs.ids[1, 2] = N_EXPERT  # out of range
    call(host_call)
    bufs.ids[0, 0] = N_EXPERT + 5
    call(host_call)
    error = log.take_error()
    assert "topk_ids[1, 2] = 8 is out of range" in error  # the first error is kept
    assert log.take_error() == ""
    assert log.calls == 2
    bufs.ids[0, 0], bufs.ids[1, 2] = 0, 1  # the runner is usable again
    call(host_call)
    assert log.take_error() == ""
    torch.testing.assert_close(bufs.out, experts.forward(bufs.x, bufs.ids, bufs.weights), rtol=0, atol=0)


def test_skip_experts_zeroes_the_output_and_still_counts(experts: CPUExperts) -> None:
    bufs = Buffers(3, torch.float32)
    log = load_native().HostCallLog()
    host_call = bufs.host_call(experts, log)
    log.skip_experts = True
    call(host_call)
    assert torch.equal(bufs.out, torch.zeros_like(bufs.out))
    assert log.calls == 1
    log.skip_experts = False
    log.reset_counters()
    assert log.calls == 0 and log.expert_ns == 0


def test_host_call_keeps_runner_and_log_alive() -> None:
    """The graph holds only the raw address: the Python HostCall must own what it points at."""
    experts = CPUExperts(*(random_expert_tensor(Q.Q8_0, 4, 64, 64, seed=s) for s in (4, 5, 6)), num_threads=1)
    x, ids = torch.randn(1, 64), torch.tensor([[1, 3]])
    weights, out = torch.tensor([[0.5, 0.25]]), torch.empty(1, 64)
    expected = experts.forward(x, ids, weights)
    host_call = load_native().HostCall(experts._runner, load_native().HostCallLog(), x.data_ptr(), False,
                                       ids.data_ptr(), True, weights.data_ptr(), out.data_ptr(), 1, 2, 64)
    del experts  # the runner (and the expert weights) now live only through host_call
    call(host_call)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_bad_sizes_are_refused(experts: CPUExperts) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        load_native().HostCall(experts._runner, load_native().HostCallLog(), 0, False, 0, True, 0, 0, 0, TOP_K,
                               HIDDEN)


def test_log_times_the_spans_between_a_steps_host_calls(experts: CPUExperts) -> None:
    """Two steps of three host calls: two gaps per step and one lead (new_step to the first call), none across
    steps; the spans hold the host work done between the calls."""
    import time

    bufs = Buffers(1, torch.float32)
    log = load_native().HostCallLog()
    host_call = bufs.host_call(experts, log)
    pause = 0.005
    for _ in range(2):
        log.new_step()
        time.sleep(pause)  # the "dense layers" before the first MoE layer
        for layer in range(3):
            if layer:
                time.sleep(pause)  # a MoE layer's "GPU work"
            call(host_call)
        time.sleep(3 * pause)  # the step's tail and the next launch: not a gap
    assert log.calls == 6 and log.gaps == 4 and log.leads == 2
    assert pause <= log.gap_ns / 1e9 / log.gaps < 3 * pause
    assert pause <= log.lead_ns / 1e9 / log.leads < 3 * pause
    log.reset_counters()
    assert (log.calls, log.gaps, log.leads, log.gap_ns, log.lead_ns, log.expert_ns) == (0, 0, 0, 0, 0, 0)
    call(host_call)  # after the last call of a step and without new_step(): a gap, but no lead
    assert log.gaps == 1 and log.leads == 0
