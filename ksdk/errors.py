"""The exceptions ksdk raises.

Everything a user can trigger derives from :class:`KsdkError`::

    KsdkError
    ├── ModelFileError            a file is missing, truncated, not GGUF, or lacks a tensor or key
    │   └── UnsupportedModelError the file is GGUF but not an architecture or layout ksdk runs
    │       └── UnsupportedQuantError   a tensor's quant type has no kernel here
    ├── InvalidRequestError       (also a ValueError) a request or option has a bad value
    │   ├── SamplingParamError    a sampling keyword is out of range; ``.param`` names it
    │   └── ContextLengthError    prompt (+ max_tokens) does not fit the context window
    ├── EngineBusyError           the waiting queue is full; try again later
    ├── EngineClosedError         the engine was used before start or after aclose()
    ├── RequestAbortedError       the request was aborted while a caller waited on it
    ├── CacheConfigError          the KV cache cannot be sized as asked (too big or too small)
    └── NativeExtensionError      ksdk._native is missing or was built for another CPU
"""

from __future__ import annotations

__all__ = [
    "CacheConfigError",
    "ContextLengthError",
    "EngineBusyError",
    "EngineClosedError",
    "InvalidRequestError",
    "KsdkError",
    "ModelFileError",
    "NativeExtensionError",
    "RequestAbortedError",
    "SamplingParamError",
    "UnsupportedModelError",
    "UnsupportedQuantError",
]


class KsdkError(Exception):
    """Base of every error ksdk raises on purpose."""


class ModelFileError(KsdkError):
    """A model file is missing, unreadable, truncated, or not a GGUF file."""


class UnsupportedModelError(ModelFileError):
    """The GGUF file is valid but describes a model ksdk does not run."""


class UnsupportedQuantError(UnsupportedModelError):
    """A tensor is stored in a quantization type ksdk has no kernel for."""

    def __init__(self, tensor: str, qtype: str, supported: list[str] | None = None) -> None:
        self.tensor = tensor
        self.qtype = qtype
        allowed = f"; supported: {', '.join(supported)}" if supported else ""
        super().__init__(f"tensor {tensor!r} has quant type {qtype}, which ksdk does not support{allowed}")


class InvalidRequestError(KsdkError, ValueError):
    """A request or an option has a value ksdk cannot honor."""


class SamplingParamError(InvalidRequestError):
    """A sampling parameter is outside its allowed range."""

    def __init__(self, param: str, message: str) -> None:
        self.param = param
        super().__init__(f"{param}: {message}")


class ContextLengthError(InvalidRequestError):
    """The prompt, plus the tokens asked for, does not fit the model's context."""


class EngineBusyError(KsdkError):
    """Too many requests are waiting; the caller should retry later."""


class EngineClosedError(KsdkError):
    """The engine is not running (not started yet, or closed)."""


class RequestAbortedError(KsdkError):
    """The request was aborted before it finished."""


class CacheConfigError(KsdkError):
    """The KV cache cannot be sized as configured."""


class NativeExtensionError(KsdkError):
    """The compiled extension ksdk._native is missing or unusable."""
