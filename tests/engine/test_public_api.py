from __future__ import annotations

import pytest

import ksdk.engine
from ksdk.engine import EngineConfig
from ksdk.errors import CacheConfigError, InvalidRequestError

from tests.engine.fakes import make_engine


def test_engine_package_exports_a_sorted_all_that_resolves() -> None:
    assert ksdk.engine.__all__ == sorted(ksdk.engine.__all__)
    for name in ksdk.engine.__all__:
        assert getattr(ksdk.engine, name) is not None


def test_impossible_cache_sizes_fail_fast_with_clear_errors() -> None:
    with pytest.raises(CacheConfigError, match="kv_cache_tokens=1000000000000"):
        make_engine(kv_cache_tokens=10**12)
    with pytest.raises(CacheConfigError, match="fewer than one request of max_model_len=64"):
        make_engine(max_model_len=64, kv_cache_tokens=16)
    with pytest.raises(CacheConfigError, match="exceeds the model's context length 256"):
        make_engine(max_model_len=1000)


def test_engine_config_validates_once() -> None:
    with pytest.raises(InvalidRequestError, match="page_size: got 0"):
        EngineConfig(page_size=0)
    with pytest.raises(InvalidRequestError, match="max_waiting"):
        EngineConfig(max_waiting=-1)
