"""Map the exceptions a request can raise onto OpenAI-style HTTP errors."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from loraplex.errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    CapacityError,
    InvalidRequestError,
    TensorParallelError,
)
from loraplex.server.async_engine import (
    EngineDeadError,
    EngineStepError,
    RequestFailedError,
    StreamBacklogError,
)
from loraplex.server.protocol import APIError, bad_request, not_found


def error_from_exception(exc: BaseException) -> APIError:
    """The HTTP answer for ``exc``: user errors are 4xx, engine failures 5xx."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterNotFoundError):
        return not_found(str(exc))
    if isinstance(exc, AdapterLoadError):
        return bad_request(str(exc), code="adapter_load_failed")
    if isinstance(exc, CapacityError):
        return bad_request(str(exc), code="capacity_exceeded")
    if isinstance(exc, (InvalidRequestError, ValueError)):
        return bad_request(str(exc))
    if isinstance(exc, (EngineDeadError, TensorParallelError)):
        return APIError(503, str(exc), "ServiceUnavailableError", "engine_unavailable")
    if isinstance(exc, StreamBacklogError):
        return APIError(408, str(exc), "RequestTimeoutError", "stream_backlog_exceeded")
    if isinstance(exc, RequestFailedError):
        return APIError(500, f"the engine failed this request: {exc}", "InternalServerError",
                        "request_failed")
    if isinstance(exc, EngineStepError):
        return APIError(500, str(exc), "InternalServerError", "engine_step_failed")
    return APIError(500, f"internal error: {type(exc).__name__}", "InternalServerError",
                    "internal_error")


class ErrorResponse(JSONResponse):
    """An ``APIError`` as JSON; ASCII-escaped, so a message quoting undecodable client
    input (a lone surrogate) still renders instead of failing with a 500."""

    def __init__(self, err: APIError, headers: dict[str, str] | None = None) -> None:
        super().__init__(err.body(), status_code=err.status, headers=headers)

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()
