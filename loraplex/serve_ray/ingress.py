"""The HTTP entry: reads ``model`` from the body, forwards the raw request to a replica.

A request for a registered adapter carries it as Ray's ``multiplexed_model_id``, so Ray
routes it to a replica that already holds that adapter. Everything else (the base model, an
unknown name, a body that is not JSON, ``/health``) goes to any replica, whose app answers
exactly as ``loraplex serve`` would (an unknown name: its 404 body).

A replica that dies before anything reached the client costs nothing but time: the request
is sent once more (Ray routes it to a live replica). A stream is answered only once its
first event is here, so that covers streams that had no token yet; once one has reached
the client, the stream ends with an error event instead, then ``[DONE]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from loraplex.server.protocol import APIError

logger = logging.getLogger(__name__)

REPLICA_GONE = (RayActorError, ActorUnavailableError)
_HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}


def replica_failed(detail: str) -> APIError:
    return APIError(503, f"the replica serving this request failed: {detail}",
                    "ServiceUnavailableError", "replica_failed")


def model_of(body: bytes) -> str | None:
    """The ``model`` field of a JSON body, or None if there is none."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):  # not JSON, or not an object
        return None
    return model if isinstance(model, str) else None


class Ingress:
    def __init__(self, replicas: DeploymentHandle, adapters: list[str],
                 routing: str = "multiplexed") -> None:
        self.replicas, self.adapters, self.routing = replicas, set(adapters), routing

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        model = model_of(body) if request.method == "POST" else None
        adapter = model if model in self.adapters else None
        handle = self.replicas.options(stream=True)
        if adapter is not None and self.routing == "multiplexed":
            handle = handle.options(multiplexed_model_id=adapter)
        # the app's own path: under a route prefix, scope["path"] starts with root_path
        path, root = request.scope["path"], request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        args = (adapter, request.method, path, request.url.query.encode(),
                list(request.headers.raw), body)
        for attempt in (1, 2):
            gen: DeploymentResponseGenerator = handle.handle.remote(*args)
            try:
                head = await gen.__anext__()
                head["attempt"] = attempt
                if _is_stream(head):  # answered once its first event (a token) is here
                    first = await anext(gen, b"")
                    return StreamingResponse(_chunks(first, gen), status_code=head["status"],
                                             headers=_headers(head))
                chunks = [chunk async for chunk in gen]  # nothing sent yet: still retryable
            except REPLICA_GONE as exc:
                if attempt == 1:
                    logger.warning("replica failed before answering; retrying once: %s", exc)
                    continue
                error = replica_failed(type(exc).__name__)
                return JSONResponse(error.body(), status_code=error.status)
            return Response(b"".join(chunks), status_code=head["status"],
                            headers=_headers(head))
        raise AssertionError("unreachable")


def _is_stream(head: dict[str, Any]) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
               for k, v in head["headers"])


def _headers(head: dict[str, Any]) -> dict[str, str]:
    # which replica answered (its actor name), its adapter loads so far, and whether this
    # is the retry: what routing and fault-tolerance checks read
    out = {"x-loraplex-replica": head["replica"],
           "x-loraplex-replica-adapter-loads": str(head["adapter_loads"]),
           "x-loraplex-attempt": str(head["attempt"])}
    for k, v in head["headers"]:
        if k.lower() not in _HOP_HEADERS:  # the proxy frames the body itself
            out[k.decode("latin-1")] = v.decode("latin-1")
    return out


async def _chunks(first: bytes, gen: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    try:
        yield first
        async for chunk in gen:
            yield chunk
    except REPLICA_GONE as exc:  # tokens already reached the client: no retry
        error = replica_failed(type(exc).__name__)
        yield f"data: {json.dumps(error.body())}\n\n".encode()
        yield b"data: [DONE]\n\n"
    finally:
        gen.cancel()  # the client left early: stop the replica's generation too
