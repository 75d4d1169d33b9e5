"""The model against transformers on the same weights (F32: the float weights; quantized files: the file's
weights as dequantized by the gguf package)."""

from __future__ import annotations

import functools

import pytest
import torch

from ksdk.models import DeepseekForCausalLM, load_model
from ksdk.testing import tiny_gguf
from ksdk.testing.greedy import greedy_generate, prefill_logits
from ksdk.weights.gguf_file import GGUFFile

from .conftest import PROMPTS, hf_greedy

pytest.importorskip("transformers")
from ksdk.testing.reference import hf_model_from_gguf  # noqa: E402

GREEDY_TOKENS = 32


@functools.cache
def ours(kind: str, qtype: str, kv_b: str = "joined") -> DeepseekForCausalLM:
    # The torch experts compute in fp32 like the reference; the native ones (quantized activations) are
    # compared against this path in test_native_experts.py.
    return load_model(GGUFFile.open(tiny_gguf(kind, qtype, kv_b=kv_b)), experts="torch")


@functools.cache
def reference(kind: str, qtype: str):  # noqa: ANN201
    return hf_model_from_gguf(tiny_gguf(kind, qtype))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()


@pytest.mark.parametrize("kind", ["v3", "v2lite"])
def test_f32_matches_transformers(kind: str) -> None:
    model, hf = ours(kind, "F32"), reference(kind, "F32")
    for ids in PROMPTS:
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, -1]
        assert cosine(prefill_logits(model, ids), ref) >= 0.99999
        assert greedy_generate(model, ids, GREEDY_TOKENS) == hf_greedy(hf, ids, GREEDY_TOKENS)


@pytest.mark.parametrize("qtype", ["BF16", "Q8_0", "Q6_K", "Q4_K", "Q4_K_M"])
def test_quantized_matches_transformers_on_dequantized_weights(qtype: str) -> None:
    model, hf = ours("v3", qtype), reference("v3", qtype)
    for ids in PROMPTS[:2]:
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, -1]
        assert cosine(prefill_logits(model, ids), ref) >= 0.9999
        assert greedy_generate(model, ids, GREEDY_TOKENS) == hf_greedy(hf, ids, GREEDY_TOKENS)


def test_greedy_text_is_not_degenerate() -> None:
    out = greedy_generate(ours("v3", "F32"), PROMPTS[0], GREEDY_TOKENS)
    assert len(set(out)) > GREEDY_TOKENS // 2


@pytest.mark.parametrize("kind", ["v3", "v2lite"])
def test_split_kv_b_layout_gives_the_same_logits(kind: str) -> None:
    joined, split = ours(kind, "F32", "joined"), ours(kind, "F32", "split")
    gguf = GGUFFile.open(tiny_gguf(kind, "F32", kv_b="split"))
    assert gguf.has("blk.0.attn_k_b.weight") and not gguf.has("blk.0.attn_kv_b.weight")
    for ids in PROMPTS:
        torch.testing.assert_close(prefill_logits(split, ids), prefill_logits(joined, ids), rtol=1e-5, atol=1e-4)


def test_chunked_prefill_equals_one_chunk() -> None:
    """Prefill in two chunks (the second attends to cached pages) gives the same logits as one chunk."""
    from ksdk.layers.attention_metadata import AttentionMetadata

    model = ours("v3", "F32")
    ids = PROMPTS[1]
    kv = [torch.zeros(4, 16, model.kv_cache_dim) for _ in model.layers]
    pages = [2, 0, 3]  # out of order on purpose
    first = 23
    meta = AttentionMetadata.build([first], [first], [pages], 16)
    model(torch.tensor(ids[:first]), torch.arange(first), meta, kv)
    meta = AttentionMetadata.build([len(ids) - first], [len(ids)], [pages], 16)
    logits = model(torch.tensor(ids[first:]), torch.arange(first, len(ids)), meta, kv)[0]
    torch.testing.assert_close(logits, prefill_logits(model, ids), rtol=1e-5, atol=1e-4)
