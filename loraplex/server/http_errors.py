"""Map the exceptions a request can raise onto OpenAI-style HTTP errors."""

from __future__ import annotations

from loraplex.errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    CapacityError,
    InvalidRequestError,
)
from loraplex.server.async_engine import EngineDeadError, EngineStepError
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
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), "ServiceUnavailableError", "engine_unavailable")
    if isinstance(exc, EngineStepError):
        return APIError(500, str(exc), "InternalServerError", "engine_step_failed")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "InternalServerError",
                    "internal_error")
