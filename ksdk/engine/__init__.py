"""ksdk.engine: continuous batching over a paged MLA KV cache, behind an async streaming API."""

from ksdk.engine.config import EngineConfig
from ksdk.engine.engine import Engine, EngineState
from ksdk.engine.request_stream import RequestStream
from ksdk.engine.stats import EngineStats

__all__ = ["Engine", "EngineConfig", "EngineState", "EngineStats", "RequestStream"]
