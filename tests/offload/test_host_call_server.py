"""The native doorbell server (HostCallServer), with a Python thread playing the GPU: it rings a call's id into
the doorbell word, spins until the done word holds it, and writes 0 back, as a captured step's stream memory
operations do. Plain host memory stands in for the pinned words (no GPU needed)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ksdk.offload import CPUExperts, load_native
from ksdk.offload.native import native_available
from tests.offload.host_call_buffers import N_EXPERT, Buffers, Q, make_experts

pytestmark = pytest.mark.skipif(not native_available(), reason="ksdk._native not built")


@pytest.fixture(scope="module")
def experts() -> CPUExperts:
    return make_experts(seed=11, up_type=Q.Q5_K)


class FakeGpu:
    """The two words (on separate cache lines) and the stream's side of the protocol."""

    def __init__(self) -> None:
        self.words = torch.zeros(32, dtype=torch.int32)
        self.server = load_native().HostCallServer(self.words[0:].data_ptr(), self.words[16:].data_ptr())

    def ring(self, call_id: int, timeout_s: float = 10.0) -> None:
        self.words[0] = call_id  # cuStreamWriteValue32(doorbell, id)
        deadline = time.monotonic() + timeout_s
        while int(self.words[16]) != call_id:  # cuStreamWaitValue32(done, id, EQ)
            assert time.monotonic() < deadline, "the server never answered"
        self.words[16] = 0  # cuStreamWriteValue32(done, 0)


def test_a_step_of_layers_is_served_in_order_with_the_right_outputs(experts: CPUExperts) -> None:
    log = load_native().HostCallLog()
    gpu = FakeGpu()
    layers = [Buffers(num_tokens, torch.float32, seed) for seed, num_tokens in enumerate([1, 3, 2])]
    ids = [gpu.server.add(layer.host_call(experts, log)) for layer in layers]
    assert ids == [1, 2, 3]
    for step in range(3):
        for layer in layers:
            layer.out.fill_(float("nan"))
        gpu.server.arm(len(layers))
        for call_id in ids:
            gpu.ring(call_id)
        assert gpu.server.finish(5000)
        assert int(gpu.words[0]) == 0  # the server cleared the doorbell
        for layer in layers:
            torch.testing.assert_close(layer.out, experts.forward(layer.x, layer.ids, layer.weights), rtol=0, atol=0)
    assert gpu.server.served == 9 and log.calls == 9 and log.take_error() == ""


def test_the_gpu_side_can_ring_before_the_server_is_armed(experts: CPUExperts) -> None:
    """A step is armed after its launch: a doorbell already rung is served once the server arms."""
    log = load_native().HostCallLog()
    gpu = FakeGpu()
    layer = Buffers(2, torch.float32, seed=5)
    call_id = gpu.server.add(layer.host_call(experts, log))
    ringer = threading.Thread(target=gpu.ring, args=(call_id,))
    ringer.start()
    time.sleep(0.05)
    assert gpu.server.served == 0
    gpu.server.arm(1)
    ringer.join()
    assert gpu.server.finish(5000)
    torch.testing.assert_close(layer.out, experts.forward(layer.x, layer.ids, layer.weights), rtol=0, atol=0)


def test_an_expert_error_is_logged_and_the_call_still_answered(experts: CPUExperts) -> None:
    log = load_native().HostCallLog()
    gpu = FakeGpu()
    layer = Buffers(2, torch.float32, seed=6)
    call_id = gpu.server.add(layer.host_call(experts, log))
    layer.ids[1, 0] = N_EXPERT  # out of range
    gpu.server.arm(1)
    gpu.ring(call_id)  # answered: the stream never hangs on a failed call
    assert gpu.server.finish(5000)
    assert "topk_ids[1, 0] = 8 is out of range" in log.take_error()


def test_an_unknown_id_is_answered_without_a_call() -> None:
    gpu = FakeGpu()
    gpu.server.arm(1)
    gpu.ring(7)
    assert gpu.server.finish(5000) and gpu.server.served == 1


def test_finish_gives_up_on_doorbells_that_never_come(experts: CPUExperts) -> None:
    """Armed for more calls than rung (a failed launch): finish() times out, releases the server, and the next
    step is served normally."""
    log = load_native().HostCallLog()
    gpu = FakeGpu()
    layer = Buffers(1, torch.float32, seed=7)
    call_id = gpu.server.add(layer.host_call(experts, log))
    gpu.server.arm(2)
    gpu.ring(call_id)
    start = time.monotonic()
    assert not gpu.server.finish(100)
    assert time.monotonic() - start < 5
    gpu.server.arm(1)
    gpu.ring(call_id)
    assert gpu.server.finish(5000) and gpu.server.served == 2


def test_a_server_armed_at_destruction_stops() -> None:
    gpu = FakeGpu()
    gpu.server.arm(3)
    del gpu  # joins its thread: must not hang
