"""ksdk: giant Mixture-of-Experts LLMs on one GPU plus host RAM, as an embeddable asyncio engine."""

from ksdk.chat import ChatTemplate
from ksdk.engine import Engine, EngineConfig, EngineState, EngineStats
from ksdk.errors import (
    CacheConfigError,
    ContextLengthError,
    EngineBusyError,
    EngineClosedError,
    InvalidRequestError,
    KsdkError,
    ModelFileError,
    NativeExtensionError,
    RequestAbortedError,
    SamplingParamError,
    UnsupportedModelError,
    UnsupportedQuantError,
)
from ksdk.outputs import ChatResult, CompletionResult, StreamEvent, TokenLogprob, Usage
from ksdk.reasoning import ReasoningParser
from ksdk.sampling import SamplingParams
from ksdk.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = [
    "CacheConfigError",
    "ChatResult",
    "ChatTemplate",
    "CompletionResult",
    "ContextLengthError",
    "Engine",
    "EngineBusyError",
    "EngineClosedError",
    "EngineConfig",
    "EngineState",
    "EngineStats",
    "IncrementalDetokenizer",
    "InvalidRequestError",
    "KsdkError",
    "ModelFileError",
    "NativeExtensionError",
    "ReasoningParser",
    "RequestAbortedError",
    "SamplingParamError",
    "SamplingParams",
    "StreamEvent",
    "TokenLogprob",
    "Tokenizer",
    "UnsupportedModelError",
    "UnsupportedQuantError",
    "Usage",
]
__version__ = "0.1.0"
