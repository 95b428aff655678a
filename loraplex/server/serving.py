"""The OpenAI completions and chat-completions endpoints over an ``AsyncEngine``.

One HTTP request becomes ``len(prompts) * n`` engine requests (choice ``i * n + j`` is
prompt i's j-th sample). Streams are answered as server-sent events in OpenAI's chunk format
ending with ``data: [DONE]``; text deltas are cut from each output's cumulative ``text``.
Leaving a stream early (client disconnect) or a non-streaming request whose client hangs
up aborts the engine requests that are still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loraplex.server.adapters import ServedModels
from loraplex.server.async_engine import AsyncEngine, RequestStream, SubRequest
from loraplex.server.http_errors import error_from_exception
from loraplex.server.metrics import RequestTracker, ServerMetrics
from loraplex.server.protocol import ChatCompletionRequest, CompletionRequest, bad_request

T = TypeVar("T")


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, registry: ServedModels, metrics: ServerMetrics,
                 tokenizer: Any, max_model_len: int) -> None:
        self.engine, self.registry, self.metrics = engine, registry, metrics
        self.tokenizer, self.max_model_len = tokenizer, max_model_len

    # ------------------------------------------------------------------ completions
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        req.check_supported()
        adapter = self.registry.resolve_model(req.model)
        prompts = req.prompts()
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        subs = [SubRequest(p, req.sampling_params(max_tokens, j), adapter)
                for p in prompts for j in range(req.n)]
        return await self._serve(req, raw, subs, chat=False, prompts_per_choice=req.n)

    # ------------------------------------------------------------------ chat
    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        req.check_supported()
        adapter = self.registry.resolve_model(req.model)
        prompt_ids = self._chat_prompt_ids(req)
        max_tokens = req.requested_max_tokens()
        if max_tokens is None:
            max_tokens = self.max_model_len - len(prompt_ids)
            if max_tokens < 1:
                raise bad_request(f"the chat prompt has {len(prompt_ids)} tokens, which leaves "
                                  f"no room to generate within max_model_len="
                                  f"{self.max_model_len}", param="messages")
        subs = [SubRequest(prompt_ids, req.sampling_params(max_tokens, j), adapter)
                for j in range(req.n)]
        return await self._serve(req, raw, subs, chat=True, prompts_per_choice=req.n)

    def _chat_prompt_ids(self, req: ChatCompletionRequest) -> list[int]:
        """Render the chat template and tokenize without adding special tokens again."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(f"the model '{self.registry.served_model_name}' has no chat "
                              "template (tokenizer_config.json 'chat_template'); use "
                              "/v1/completions instead", param="messages",
                              code="no_chat_template")
        messages = [m.to_template_dict() for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=req.add_generation_prompt)
        except Exception as exc:  # jinja errors on bad roles / orderings are the client's
            raise bad_request(f"the chat template failed on these messages: {exc}",
                              param="messages") from exc
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # ------------------------------------------------------------------ shared
    async def _serve(self, req: CompletionRequest | ChatCompletionRequest, raw: Request,
                     subs: list[SubRequest], chat: bool, prompts_per_choice: int) -> Response:
        kind = "chatcmpl" if chat else "cmpl"
        request_id = f"{kind}-{uuid.uuid4().hex}"
        trackers = [self.metrics.tracker(req.model) for _ in subs]
        stream = await self.engine.add(request_id, subs)  # validation errors raise here
        header = _Header(request_id, int(time.time()), req.model, chat)
        if req.stream:
            events = self._events(stream, trackers, header, req.include_usage,
                                  prompts_per_choice)
            return StreamingResponse(events, media_type="text/event-stream")
        outputs = await _unless_disconnected(raw, self._collect(stream, trackers))
        if outputs is None:
            return Response(status_code=499)  # nobody is listening any more
        return JSONResponse(header.full_response(outputs, prompts_per_choice))

    async def _collect(self, stream: RequestStream, trackers: list[RequestTracker]) -> list[Any]:
        finals: list[Any] = [None] * len(stream.request_ids)
        try:
            async for index, out in stream:
                trackers[index].observe(out)
                finals[index] = out
        finally:
            _close(stream, trackers)
        return finals

    async def _events(self, stream: RequestStream, trackers: list[RequestTracker],
                      header: _Header, include_usage: bool,
                      prompts_per_choice: int) -> AsyncIterator[str]:
        sent = [""] * len(stream.request_ids)
        finals: list[Any] = [None] * len(stream.request_ids)
        try:
            if header.chat:
                for index in range(len(sent)):
                    yield _sse(header.chunk(index, {"role": "assistant", "content": ""}, None))
            async for index, out in stream:
                trackers[index].observe(out)
                finals[index] = out
                delta = out.text[len(sent[index]):] if out.text.startswith(sent[index]) else ""
                if delta:
                    sent[index] = out.text
                    content = {"content": delta} if header.chat else delta
                    yield _sse(header.chunk(index, content, None))
                if out.finished:
                    yield _sse(header.chunk(index, {} if header.chat else "",
                                            _finish_reason(out)))
            if include_usage:
                yield _sse(header.usage_chunk(finals, prompts_per_choice))
        except Exception as exc:  # an engine failure mid-stream becomes an error event
            yield _sse(error_from_exception(exc).body())
        finally:
            _close(stream, trackers)
        yield "data: [DONE]\n\n"


class _Header:
    """Fields shared by every response object of one request, and their builders."""

    def __init__(self, request_id: str, created: int, model: str, chat: bool) -> None:
        self.id, self.created, self.model, self.chat = request_id, created, model, chat

    def _base(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def chunk(self, index: int, delta: Any, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": index, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, finals: list[Any], per_prompt: int) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(kind), "choices": [], "usage": _usage(finals, per_prompt)}

    def full_response(self, finals: list[Any], per_prompt: int) -> dict[str, Any]:
        choices = []
        for index, out in enumerate(finals):
            if self.chat:
                choices.append({"index": index, "logprobs": None,
                                "message": {"role": "assistant", "content": out.text},
                                "finish_reason": _finish_reason(out)})
            else:
                choices.append({"index": index, "text": out.text, "logprobs": None,
                                "finish_reason": _finish_reason(out)})
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._base(kind), "choices": choices, "usage": _usage(finals, per_prompt)}


def _usage(finals: list[Any], per_prompt: int) -> dict[str, int]:
    """Prompt tokens count once per prompt (not per choice), as OpenAI counts them."""
    prompt = sum(len(out.prompt_token_ids) for out in finals[::per_prompt] if out is not None)
    completion = sum(len(out.token_ids) for out in finals if out is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _finish_reason(out: Any) -> str:
    return out.finish_reason or "stop"


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _close(stream: RequestStream, trackers: list[RequestTracker]) -> None:
    """Abort what is still running and count it as aborted."""
    for index in stream.unfinished_indices():
        trackers[index].finish("abort")
    stream.close()


async def _unless_disconnected(raw: Request, work: Awaitable[T]) -> T | None:
    """Await ``work``; if the client disconnects first, cancel it and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(raw))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # also when we are cancelled ourselves
    if task in done:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # let its finally blocks abort the engine requests
    return None


async def _wait_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass
