"""A server-sent-events response that can give up on a client that stopped reading.

Starlette's ``StreamingResponse`` waits in ``send`` for as long as the client's TCP window
stays shut, holding the connection (and the server's shutdown) for ever. This response
sends the events while watching two things: the client disconnecting, and ``abandon``
(set by ``RequestStream`` once its reader fell too far behind and its requests were
aborted). On ``abandon`` it stops without finishing the response, which makes the ASGI
server close the connection. Either way the event generator is closed (``aclose``), so
its ``finally`` blocks abort whatever still runs in the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None], abandon: asyncio.Event) -> None:
        # No super().__init__: that renders a body and declares its Content-Length.
        self.status_code, self.background = 200, None
        self.init_headers(None)
        self.events, self.abandon = events, abandon

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode("utf-8", "replace"),
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(c) for c in (pump(), disconnected(), self.abandon.wait())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[2] in done and not tasks[0].done():
                logger.warning("dropping a stream whose client stopped reading")
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await self.events.aclose()
        # A client gone mid-send (OSError) is a disconnect, not a server error.
        failure = results[0]
        if isinstance(failure, Exception) and not isinstance(failure, OSError):
            raise failure
