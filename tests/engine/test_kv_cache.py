from __future__ import annotations

import pytest
import torch

from ksdk.engine.kv_cache import KVCache, KVCachePlan
from ksdk.errors import CacheConfigError

BASE = dict(num_layers=2, kv_cache_dim=8, dtype=torch.float32, context_length=1024, page_size=16,
            max_num_seqs=4)  # 64 bytes per token


def plan(**kw: object) -> KVCachePlan:
    return KVCachePlan.build(**{**BASE, **kw})  # type: ignore[arg-type]


def test_defaults_fit_memory_and_hold_a_full_length_request() -> None:
    p = plan(max_model_len=None, kv_cache_tokens=None, available_bytes=64 * 1000)
    assert p.max_model_len == 992 and p.num_pages == 62  # whole pages only
    p = plan(max_model_len=256, kv_cache_tokens=None, available_bytes=1 << 30)
    assert p.num_pages * p.page_size == 4 * 256  # max_num_seqs full-length requests


def test_more_tokens_than_memory_is_refused_before_allocating() -> None:
    with pytest.raises(CacheConfigError, match="kv_cache_tokens=1000000000000 needs"):
        plan(max_model_len=256, kv_cache_tokens=10**12, available_bytes=1 << 30)


def test_fewer_pages_than_one_max_length_request_is_refused() -> None:
    with pytest.raises(CacheConfigError, match="fewer than one request of max_model_len=512"):
        plan(max_model_len=512, kv_cache_tokens=100, available_bytes=1 << 30)


def test_max_model_len_beyond_the_models_context_is_refused() -> None:
    with pytest.raises(CacheConfigError, match="exceeds the model's context length 1024"):
        plan(max_model_len=4096, kv_cache_tokens=None, available_bytes=1 << 30)


def test_no_room_for_one_page_is_refused() -> None:
    with pytest.raises(CacheConfigError, match="at least one page"):
        plan(max_model_len=None, kv_cache_tokens=None, available_bytes=64 * 10)


def test_cache_tensors_have_the_model_contract_shape() -> None:
    p = plan(max_model_len=64, kv_cache_tokens=128, available_bytes=1 << 30)
    cache = KVCache(p, num_layers=2, kv_cache_dim=8, dtype=torch.float32, device=torch.device("cpu"))
    assert [t.shape for t in cache.layers] == [torch.Size([8, 16, 8])] * 2
