"""OpenAI-style error objects, and the mapping from ksdk's exceptions to HTTP statuses.

Every error the gateway answers has the body ``{"error": {"message", "type", "param", "code"}}``:

    status  type                    when
    400     invalid_request_error   a value out of range, an unknown or unsupported field, context too long
    401     authentication_error    the API key is missing or wrong
    404     invalid_request_error   an unknown model id (code ``model_not_found``) or path
    405     invalid_request_error   a known path with the wrong method
    413     invalid_request_error   the body is larger than ``max_body_bytes``
    422     invalid_request_error   the body is not JSON, or a field has the wrong type or is missing
    429     rate_limit_error        the concurrency limit or the engine's waiting queue is full
    503     service_unavailable     the engine is starting, closed or failed
    500     internal_error          a bug; the message does not leak details
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import ksdk

__all__ = [
    "APIError",
    "api_error_handler",
    "error_body",
    "error_response",
    "from_engine_error",
    "http_exception_handler",
]

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered to the client as an OpenAI error object with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code


def error_body(err: APIError) -> dict[str, object]:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(err: APIError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(error_body(err), status_code=err.status, headers=headers)


def from_engine_error(exc: ksdk.KsdkError) -> APIError:
    """Map an engine exception raised for one request to the error the client sees."""
    if isinstance(exc, ksdk.SamplingParamError):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, ksdk.ContextLengthError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, ksdk.InvalidRequestError):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, ksdk.EngineBusyError):
        return APIError(429, str(exc), type="rate_limit_error", code="engine_busy")
    if isinstance(exc, ksdk.EngineClosedError):
        return APIError(503, str(exc), type="service_unavailable", code="engine_closed")
    if isinstance(exc, ksdk.RequestAbortedError):
        return APIError(503, str(exc), type="service_unavailable", code="request_aborted")
    logger.error("engine error while serving a request", exc_info=exc)
    return APIError(500, f"engine error: {type(exc).__name__}", type="internal_error", code="engine_error")


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown path, wrong method) as OpenAI error objects."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
    response = error_response(err)
    if exc.headers:
        response.headers.update(exc.headers)
    return response
