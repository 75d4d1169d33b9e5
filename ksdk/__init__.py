"""ksdk: giant Mixture-of-Experts LLMs on one GPU plus host RAM, as an embeddable asyncio engine."""

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
from ksdk.sampling import SamplingParams

__all__ = [
    "CacheConfigError",
    "ChatResult",
    "CompletionResult",
    "ContextLengthError",
    "EngineBusyError",
    "EngineClosedError",
    "InvalidRequestError",
    "KsdkError",
    "ModelFileError",
    "NativeExtensionError",
    "RequestAbortedError",
    "SamplingParamError",
    "SamplingParams",
    "StreamEvent",
    "TokenLogprob",
    "UnsupportedModelError",
    "UnsupportedQuantError",
    "Usage",
]
__version__ = "0.1.0"
