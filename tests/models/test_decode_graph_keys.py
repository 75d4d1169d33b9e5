"""DecodeGraphs' bookkeeping without a GPU: which steps it serves, when it captures, when it drops graphs, and
that it raises what a host call recorded. The capture itself is replaced by a stand-in (the GPU tests in
test_decode_graph.py run the real one)."""

from __future__ import annotations

import types

import pytest
import torch

from ksdk.errors import InvalidRequestError
from ksdk.layers.attention_metadata import AttentionMetadata
from ksdk.models import decode_graph
from ksdk.models.decode_graph import DecodeGraphs
from ksdk.offload.native import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="ksdk._native not built")


class FakeStep:
    captured: list[tuple[int, int]] = []

    fail_replay = False

    def __init__(self, model, x, positions, meta, kv_cache, bucket, ctx, num_host_calls) -> None:  # noqa: ANN001
        FakeStep.captured.append((x.shape[0], bucket))
        self.vocab = 7

    def replay(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if FakeStep.fail_replay:
            raise RuntimeError("launch failed")
        return torch.zeros(x.shape[0], self.vocab)


class FakeServer:
    """Stands in for the doorbell server: records when a step arms and finishes it."""

    events: list[str] = []

    def arm(self, num_calls: int) -> None:
        FakeServer.events.append(f"arm {num_calls}")

    finish_error: Exception | None = None

    def finish(self) -> None:
        FakeServer.events.append("finish")
        if FakeServer.finish_error is not None:
            raise FakeServer.finish_error


@pytest.fixture
def graphs(monkeypatch: pytest.MonkeyPatch) -> DecodeGraphs:
    FakeStep.captured, FakeStep.fail_replay, FakeServer.events, FakeServer.finish_error = [], False, [], None
    monkeypatch.setattr(decode_graph, "_CapturedStep", FakeStep)
    monkeypatch.setattr(decode_graph, "DoorbellServer", FakeServer)
    stream = types.SimpleNamespace(synchronize=lambda: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: object())
    event = types.SimpleNamespace(record=lambda stream=None: None, synchronize=lambda: None)
    monkeypatch.setattr(torch.cuda, "Event", lambda **kwargs: event)
    model = types.SimpleNamespace(layers=[], device=torch.device("cuda"))
    return DecodeGraphs(model)  # type: ignore[arg-type]


def decode_meta(seq_lens: list[int]) -> AttentionMetadata:
    return AttentionMetadata.build([1] * len(seq_lens), seq_lens, [[0] * 40 for _ in seq_lens], 16)


def step(graphs: DecodeGraphs, seq_lens: list[int], kv: list[torch.Tensor]) -> torch.Tensor:
    B = len(seq_lens)
    return graphs.run(torch.zeros(B, 4), torch.zeros(B, dtype=torch.int64), decode_meta(seq_lens), kv)


def test_one_capture_per_batch_size_and_bucket(graphs: DecodeGraphs) -> None:
    kv = [torch.zeros(1)]
    for seq_lens in ([10], [200], [256], [257], [10, 20, 30], [300, 5, 6], [257]):
        assert step(graphs, seq_lens, kv).shape == (len(seq_lens), 7)
    assert FakeStep.captured == [(1, 256), (1, 512), (3, 256), (3, 512)]


def test_each_replay_arms_the_doorbell_server_and_finishes_it(graphs: DecodeGraphs) -> None:
    graphs.model.layers = []  # no MoE layers: armed for 0 calls
    kv = [torch.zeros(1)]
    step(graphs, [10], kv)
    step(graphs, [11], kv)
    assert FakeServer.events == ["arm 0", "finish"] * 2
    FakeStep.fail_replay = True  # the launch fails: nothing armed
    with pytest.raises(RuntimeError, match="launch failed"):
        step(graphs, [12], kv)
    assert FakeServer.events == ["arm 0", "finish"] * 2


def test_a_failing_wait_finishes_the_server_and_keeps_its_own_error(graphs: DecodeGraphs) -> None:
    kv = [torch.zeros(1)]
    step(graphs, [10], kv)

    def fail() -> None:
        raise RuntimeError("device lost")

    graphs._done = types.SimpleNamespace(record=lambda stream=None: None, synchronize=fail)
    FakeServer.finish_error = RuntimeError("a captured decode step rang fewer doorbells")
    with pytest.raises(RuntimeError, match="device lost"):
        step(graphs, [11], kv)
    assert FakeServer.events[-2:] == ["arm 0", "finish"]


def test_driver_host_calls_use_no_server(graphs: DecodeGraphs) -> None:
    graphs.host_calls = "driver"
    step(graphs, [10], [torch.zeros(1)])
    assert FakeServer.events == [] and graphs._ctx.server is None
    with pytest.raises(InvalidRequestError, match="host_calls='poll'"):
        graphs.host_calls = "poll"


def test_another_cache_drops_the_graphs(graphs: DecodeGraphs) -> None:
    first, second = [torch.zeros(1)], [torch.zeros(1)]
    step(graphs, [10], first)
    step(graphs, [10], second)
    step(graphs, [10], second)
    assert FakeStep.captured == [(1, 256), (1, 256)] and list(graphs._graphs) == [(1, 256)]


def test_serves_decode_batches_up_to_32_only(graphs: DecodeGraphs) -> None:
    assert graphs.serves(decode_meta([5] * 32))
    assert not graphs.serves(decode_meta([5] * 33))
    mixed = AttentionMetadata.build([1, 3], [5, 9], [[0], [1]], 16)
    assert not graphs.serves(mixed)


def test_a_recorded_host_call_error_is_raised_once(graphs: DecodeGraphs, monkeypatch: pytest.MonkeyPatch) -> None:
    errors = iter(["topk_ids[0, 1] = 99 is out of range", ""])
    monkeypatch.setattr(graphs, "_log", types.SimpleNamespace(take_error=lambda: next(errors), new_step=lambda: None))
    kv = [torch.zeros(1)]
    with pytest.raises(InvalidRequestError, match="captured decode step failed: topk_ids.*out of range"):
        step(graphs, [10], kv)
    step(graphs, [10], kv)
