"""What every request goes through before (and around) its route.

``RequestGuard`` is a plain ASGI middleware, so it runs before FastAPI reads or decodes a
body: it checks the API key on ``/v1`` routes first (an unauthenticated client cannot make
the server parse anything), then reads the body while counting its bytes and answers 413
as soon as it passes ``max_request_bytes`` (a declared ``Content-Length`` over the limit is
refused before a byte is read). The route sees the buffered body replayed. The guard is
also the last line of defence: an exception nothing else handled becomes a 500 JSON body on
a connection that stays open (Starlette's catch-all handler would re-raise after answering,
and the server would drop the keep-alive connection).

``install_error_handlers`` maps typed errors and FastAPI's own (validation, unknown route)
onto the OpenAI error shape.
"""

from __future__ import annotations

import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.errors import LoraplexError
from loraplex.server.async_engine import EngineDeadError, EngineStepError
from loraplex.server.http_errors import ErrorResponse, error_from_exception
from loraplex.server.protocol import APIError, bad_request

logger = logging.getLogger(__name__)


class RequestGuard:
    def __init__(self, app: ASGIApp, api_key: str | None, max_request_bytes: int) -> None:
        self.app, self.api_key, self.max_bytes = app, api_key, max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            refusal = self._check_headers(scope)
            if refusal is None:
                body, refusal = await self._read_body(receive)
            if refusal is not None:
                # The unread rest of a refused body makes the server close the connection.
                return await ErrorResponse(refusal)(scope, receive, send)
            await self.app(scope, _replay(body, receive), tracking_send)
        except Exception as exc:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await ErrorResponse(error_from_exception(exc))(scope, receive, send)

    def _check_headers(self, scope: Scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith("/v1"):
            scheme, _, token = headers.get("authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(
                    token.strip(), self.api_key.encode()):
                return APIError(401, "Missing or invalid API key: send 'Authorization: Bearer "
                                "<key>'", "AuthenticationError", "invalid_api_key")
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return bad_request("invalid Content-Length header")
            if int(length) > self.max_bytes:
                return self._too_large()
        return None

    async def _read_body(self, receive: Receive) -> tuple[bytes, APIError | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected: the route sees it too
                return b"".join(chunks), None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return b"", self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_bytes} bytes "
                        f"(--max-request-bytes)", "RequestTooLargeError", "request_too_large")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that returns the buffered body once, then defers to the real one (so a
    route still sees ``http.disconnect``)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> ErrorResponse:
        invalid_json = _invalid_json(exc)
        if invalid_json is not None:
            return ErrorResponse(bad_request(invalid_json, code="invalid_json"))
        # One message per top-level field (a union type fails once per member: keep the first).
        fields: dict[str, str] = {}
        for e in exc.errors():
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            fields.setdefault(loc[0] if loc else "body", f"{'.'.join(loc) or 'body'}: "
                                                         f"{e.get('msg')}")
        message = "invalid request: " + "; ".join(fields.values())
        return ErrorResponse(bad_request(message, param=next(iter(fields), None)))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException) -> ErrorResponse:
        kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(exc.status_code,
                                                                         "HTTPError")
        return ErrorResponse(APIError(exc.status_code, str(exc.detail), kind,
                                      str(exc.status_code)), headers=exc.headers)

    async def on_error(_: Request, exc: Exception) -> ErrorResponse:
        err = error_from_exception(exc)
        if err.status >= 500:
            logger.error("request failed: %s", err.message, exc_info=exc)
        return ErrorResponse(err)

    # Expected errors by class, answered without a traceback. Anything else reaches
    # RequestGuard (a handler for Exception here would re-raise and drop the connection).
    for kind in (APIError, LoraplexError, ValueError, EngineStepError, EngineDeadError):
        app.add_exception_handler(kind, on_error)


def _invalid_json(exc: RequestValidationError) -> str | None:
    """For a body that is not JSON, a message saying where it broke (like ``json.loads``:
    line, column, char); None for any other validation error. FastAPI reports the offset
    as the error's location, which is no field (it was answered as ``param: "1"``)."""
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            loc = [x for x in e.get("loc", ()) if x != "body"]
            pos = loc[0] if loc and isinstance(loc[0], int) else None
            why = (e.get("ctx") or {}).get("error", "not valid JSON")
            if pos is None:
                return f"the request body is not valid JSON: {why}"
            doc = exc.body if isinstance(exc.body, str) else ""
            line = doc.count("\n", 0, pos) + 1
            column = pos - (doc.rfind("\n", 0, pos) + 1) + 1
            return (f"the request body is not valid JSON: {why}: line {line} column "
                    f"{column} (char {pos})")
    return None
