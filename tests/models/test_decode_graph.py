"""The whole decode step replayed from CUDA graphs (routed experts as host work: doorbells served by a native
thread, or the driver's host nodes) against eager MoE layers.

The reference is ``cuda_graphs="attention"``: the same kernels (its per-layer attention graphs use the same
length buckets, so the attention splits alike), with the MoE layers eager (sync, submit, wait). The step
graph must give the very same greedy tokens. All tests need a CUDA GPU and the native extension.
"""

from __future__ import annotations

import pytest
import torch

from ksdk.errors import InvalidRequestError
from ksdk.layers.attention_metadata import AttentionMetadata
from ksdk.models import DeepseekForCausalLM, load_model
from ksdk.offload.native import native_available
from ksdk.offload.options import ExpertOptions
from ksdk.testing import tiny_gguf
from ksdk.testing.greedy import greedy_generate
from ksdk.weights.gguf_file import GGUFFile

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not native_available(), reason="ksdk._native not built")]

PAGE_SIZE = 16
NATIVE_ONLY = ExpertOptions(backend="native", gpu_stream_threshold=0)


def load(options: ExpertOptions = NATIVE_ONLY) -> DeepseekForCausalLM:
    return load_model(GGUFFile.open(tiny_gguf("v3", "Q8_0")), device="cuda", dtype=torch.float32, experts=options)


@pytest.fixture(scope="module")
def model() -> DeepseekForCausalLM:
    return load()


def in_mode(model: DeepseekForCausalLM, mode: str, fn):  # noqa: ANN001, ANN201
    saved = model.cuda_graphs
    model.cuda_graphs = mode
    try:
        return fn()
    finally:
        model.cuda_graphs = saved


class Batch:
    """A tiny scheduler: sequences share one page pool; each step feeds some of them some new tokens."""

    def __init__(self, model: DeepseekForCausalLM, prompts: list[list[int]], max_new: int) -> None:
        self.model = model
        pages_each = -(-(max(map(len, prompts)) + max_new) // PAGE_SIZE)
        self.kv = [torch.zeros(len(prompts) * pages_each, PAGE_SIZE, model.kv_cache_dim, device="cuda")
                   for _ in model.layers]
        self.pages = [list(range(i * pages_each, (i + 1) * pages_each)) for i in range(len(prompts))]
        self.tokens = [list(p) for p in prompts]
        self.done = [0] * len(prompts)  # tokens already in the cache
        self.new: list[list[int]] = [[] for _ in prompts]

    def step(self, seqs: list[int]) -> None:
        """One forward over ``seqs``: each brings all its uncached tokens; each samples one greedy token."""
        ids, positions, q_lens, s_lens = [], [], [], []
        for i in seqs:
            start, end = self.done[i], len(self.tokens[i])
            ids += self.tokens[i][start:end]
            positions += range(start, end)
            q_lens.append(end - start)
            s_lens.append(end)
        meta = AttentionMetadata.build(q_lens, s_lens, [self.pages[i] for i in seqs], PAGE_SIZE, "cuda")
        logits = self.model(torch.tensor(ids, device="cuda"), torch.tensor(positions, device="cuda"), meta, self.kv)
        for row, i in enumerate(seqs):
            token = int(logits[row].argmax())
            self.done[i] = len(self.tokens[i])
            self.tokens[i].append(token)
            self.new[i].append(token)


def batched_run(model: DeepseekForCausalLM, decode_steps: int) -> list[list[int]]:
    """Prefill two sequences, a mixed step (their decode + a third's prefill), then batch-3 decode steps
    across the 256 -> 512 length bucket (the third prompt is 250 tokens), with one more mixed step between."""
    prompts = [[0, 1000, 2000, 3000, 4000, 5000, 6000, 7000], list(range(100, 141)), list(range(500, 750))]
    batch = Batch(model, prompts, decode_steps + 4)
    batch.step([0, 1])  # prefill
    batch.step([0, 1, 2])  # mixed: two decodes and a prefill
    for n in range(decode_steps):
        if n == decode_steps // 2:
            batch.tokens[1] += [42, 43]  # a 3-token chunk for sequence 1 next to two decodes: eager
        batch.step([0, 1, 2])
    return batch.new


@pytest.mark.parametrize("host_calls", ["doorbell", "driver"])
def test_step_graph_greedy_equals_eager_batch_1(model: DeepseekForCausalLM, host_calls: str) -> None:
    model.decode_graphs.host_calls = host_calls
    prompts = [[0, 1000, 2000, 3000, 4000, 5000, 6000, 7000], list(range(400, 650))]  # the second crosses 256
    eager = in_mode(model, "attention", lambda: [greedy_generate(model, ids, 16) for ids in prompts])
    calls = model.decode_graphs.log.calls
    graphed = in_mode(model, "step", lambda: [greedy_generate(model, ids, 16) for ids in prompts])
    assert graphed == eager
    moe_layers = sum(1 for layer in model.layers if hasattr(layer.ffn, "experts"))
    assert model.decode_graphs.log.calls - calls >= 2 * 15 * moe_layers  # every decode step ran host calls
    assert {(1, 256), (1, 512)} <= set(model.decode_graphs._graphs)  # the second prompt's cache, both buckets
    server = model.decode_graphs._ctx.server
    assert (server is None) == (host_calls == "driver")
    if server is not None:
        assert server.served >= 2 * 15 * moe_layers


@pytest.mark.parametrize("host_calls", ["doorbell", "driver"])
def test_step_graph_greedy_equals_eager_batch_3_with_mixed_steps(model: DeepseekForCausalLM, host_calls: str) -> None:
    model.decode_graphs.host_calls = host_calls
    eager = in_mode(model, "attention", lambda: batched_run(model, 12))
    graphed = in_mode(model, "step", lambda: batched_run(model, 12))
    assert graphed == eager
    assert {(3, 256), (3, 512)} <= set(model.decode_graphs._graphs)


def test_host_call_modes_are_checked(model: DeepseekForCausalLM) -> None:
    with pytest.raises(InvalidRequestError, match="host_calls=.poll.; allowed: doorbell, driver"):
        model.decode_graphs.host_calls = "poll"


def test_step_graph_is_used_with_hybrid_experts() -> None:
    """HybridRoutedExperts (GPU streaming for long prompts) still decode through the graph, on their CPU part."""
    hybrid = load(ExpertOptions(backend="native"))
    assert type(hybrid.layers[-1].ffn.experts).__name__ == "HybridRoutedExperts"
    assert hybrid.decode_graphs.capturable
    greedy_generate(hybrid, [1, 2, 3], 4)
    assert hybrid.decode_graphs._graphs and hybrid.decode_graphs.log.calls > 0


def test_torch_experts_fall_back_to_attention_graphs() -> None:
    torch_model = load(ExpertOptions(backend="torch"))
    assert not torch_model.decode_graphs.capturable
    greedy_generate(torch_model, [1, 2, 3], 4)
    assert not torch_model.decode_graphs._graphs
    assert all(layer.attn._graphs for layer in torch_model.layers)


class OffsetRouter(torch.nn.Module):
    """Adds a device-side offset to the chosen expert ids: set it out of range to make the host call fail."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.offset = torch.zeros((), dtype=torch.int64, device="cuda")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = self.inner(x)
        return ids + self.offset, weights


@pytest.mark.parametrize("host_calls", ["doorbell", "driver"])
def test_an_error_in_the_host_call_raises_after_the_step(host_calls: str) -> None:
    broken = load()
    broken.decode_graphs.host_calls = host_calls
    moe = broken.layers[-1].ffn
    moe.router = router = OffsetRouter(moe.router)
    batch = Batch(broken, [[5, 6, 7, 8]], 8)
    batch.step([0])  # prefill (eager)
    batch.step([0])  # captures the batch-1 graph with valid ids
    graphs = dict(broken.decode_graphs._graphs)
    assert len(graphs) == 1
    router.offset.fill_(1000)
    with pytest.raises(InvalidRequestError, match="captured decode step failed: topk_ids.*out of range"):
        batch.step([0])  # a replay
    assert broken.decode_graphs._graphs == graphs
    router.offset.fill_(0)
    batch.step([0])  # the error was taken: the next replay is fine
    batch.step([0])
    assert len(batch.new[0]) == 4  # prefill, capture, two replays: the failed step sampled nothing
    other = Batch(broken, [[9, 10, 11]], 4)
    other.step([0])  # prefill
    router.offset.fill_(1000)
    with pytest.raises(InvalidRequestError, match="captured decode step failed: .*out of range"):
        other.step([0])  # another cache, so a new graph: the warm-up before its capture fails
    assert not broken.decode_graphs._graphs  # the first cache's graphs were dropped, none was kept for this one


def test_steps_are_captured_again_after_every_graph_was_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh graph pool used only by step graphs: dropping them all (a new KV cache, another host-call mode)
    and capturing again works (torch releases a private pool nothing uses; the pool's anchor graph keeps it)."""
    from ksdk.layers import mla
    from ksdk.models import decode_graph

    pool = mla._GraphPool()
    monkeypatch.setattr(mla, "GRAPH_POOL", pool)
    monkeypatch.setattr(decode_graph, "GRAPH_POOL", pool)
    fresh = load()
    first = greedy_generate(fresh, [3, 4, 5], 4)
    assert fresh.decode_graphs._graphs and not any(layer.attn._graphs for layer in fresh.layers)
    fresh.decode_graphs.host_calls = "driver"  # drops every step graph
    assert not fresh.decode_graphs._graphs
    assert greedy_generate(fresh, [3, 4, 5], 4) == first
    assert fresh.decode_graphs._graphs
