"""The OpenAI completions and chat-completions endpoints over an ``AsyncEngine``.

One HTTP request becomes ``len(prompts) * n`` engine requests (choice ``i * n + j`` is
prompt i's j-th sample), at most ``max_sequences`` of them. Prompts are size-checked and
tokenized by ``PromptTokenizer`` (off the event loop and the engine thread); the engine gets
token ids. Streams are answered as server-sent events in OpenAI's chunk format ending with
``data: [DONE]``, one chunk per ``OutputDelta``. Leaving a stream early (client disconnect),
a stream whose client stops reading (``RequestStream.abandoned``) or a non-streaming request
whose client hangs up aborts the engine requests that are still running. A request that
fails alone gets an error body, or an error event in its stream; one whose adapter was
unloaded while it waited gets a 404 naming the model it asked for.
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
from fastapi.responses import JSONResponse, Response

from loraplex.errors import AdapterNotFoundError
from loraplex.server.adapters import ServedModels
from loraplex.server.async_engine import (
    AsyncEngine,
    OutputDelta,
    RequestFailedError,
    RequestStream,
    SubRequest,
)
from loraplex.server.http_errors import error_from_exception
from loraplex.server.metrics import RequestTracker, ServerMetrics
from loraplex.server.prompts import PromptTokenizer
from loraplex.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    not_found,
)
from loraplex.server.sse import EventStreamResponse

T = TypeVar("T")


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, registry: ServedModels, metrics: ServerMetrics,
                 prompts: PromptTokenizer, max_sequences: int) -> None:
        self.engine, self.registry, self.metrics = engine, registry, metrics
        self.prompts, self.max_model_len = prompts, prompts.max_model_len
        self.max_sequences = max_sequences
        self.served_model_name = registry.served_model_name

    def _check_sequences(self, num_prompts: int, n: int) -> None:
        if num_prompts * n > self.max_sequences:
            raise bad_request(f"this request asks for {num_prompts} prompt(s) x n={n} = "
                              f"{num_prompts * n} sequences; the limit is "
                              f"{self.max_sequences} (--max-sequences-per-request)",
                              param="n", code="too_many_sequences")

    # ------------------------------------------------------------------ completions
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        req.check_supported()
        adapter = self.registry.resolve_model(req.model)
        prompts = req.prompts()
        self._check_sequences(len(prompts), req.n)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        params = [req.sampling_params(max_tokens, j) for j in range(req.n)]  # 400 if invalid
        ids = await self.prompts.encode(prompts)
        subs = [SubRequest(p, params[j], adapter) for p in ids for j in range(req.n)]
        return await self._serve(req, raw, subs, chat=False, prompts_per_choice=req.n)

    # ------------------------------------------------------------------ chat
    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        req.check_supported()
        adapter = self.registry.resolve_model(req.model)
        self._check_sequences(1, req.n)
        if not getattr(self.prompts.tokenizer, "chat_template", None):
            raise bad_request(f"the model '{self.served_model_name}' has no chat "
                              "template (tokenizer_config.json 'chat_template'); use "
                              "/v1/completions instead", param="messages",
                              code="no_chat_template")
        prompt_ids = await self.prompts.chat(
            [m.to_template_dict() for m in req.messages], req.add_generation_prompt,
            sum(m.num_chars() for m in req.messages))
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

    # ------------------------------------------------------------------ shared
    async def _serve(self, req: CompletionRequest | ChatCompletionRequest, raw: Request,
                     subs: list[SubRequest], chat: bool, prompts_per_choice: int) -> Response:
        kind = "chatcmpl" if chat else "cmpl"
        request_id = f"{kind}-{uuid.uuid4().hex}"
        trackers = [self.metrics.tracker(req.model) for _ in subs]
        try:
            stream = await self.engine.add(request_id, subs)  # validation errors raise here
        except AdapterNotFoundError:  # unloaded since resolve_model: answer as it would
            raise self._model_gone(req.model) from None
        header = _Header(request_id, int(time.time()), req.model, chat)
        if req.stream:
            events = self._events(stream, trackers, header, req.include_usage,
                                  prompts_per_choice)
            return EventStreamResponse(events, stream.abandoned)
        outputs = await _unless_disconnected(raw, self._collect(stream, trackers, req.model))
        if outputs is None:
            return Response(status_code=499)  # nobody is listening any more
        return JSONResponse(header.full_response(outputs, prompts_per_choice))

    def _model_gone(self, model: str) -> Exception:
        return not_found(f"The model '{model}' does not exist (any more).")

    def _request_error(self, exc: Exception, model: str) -> Exception:
        """A request that failed alone: 404 if its adapter was unloaded while it waited."""
        if isinstance(exc, RequestFailedError) and model != self.served_model_name \
                and model not in self.registry.adapters:
            return self._model_gone(model)
        return exc

    async def _collect(self, stream: RequestStream, trackers: list[RequestTracker],
                       model: str) -> list[_Final]:
        finals = [_Final() for _ in stream.request_ids]
        try:
            async for index, delta in stream:
                trackers[index].observe(delta)
                finals[index].add(delta)
        except RequestFailedError as exc:
            trackers[exc.index].finish("error")
            raise self._request_error(exc, model) from None
        finally:
            _close(stream, trackers)
        return finals

    async def _events(self, stream: RequestStream, trackers: list[RequestTracker],
                      header: _Header, include_usage: bool,
                      prompts_per_choice: int) -> AsyncIterator[str]:
        finals = [_Final() for _ in stream.request_ids]
        try:
            if header.chat:
                for index in range(len(finals)):
                    yield _sse(header.chunk(index, {"role": "assistant", "content": ""}, None))
            async for index, delta in stream:
                trackers[index].observe(delta)
                finals[index].add(delta)
                if delta.text:
                    content = {"content": delta.text} if header.chat else delta.text
                    yield _sse(header.chunk(index, content, None))
                if delta.finished:
                    yield _sse(header.chunk(index, {} if header.chat else "",
                                            _finish_reason(delta)))
            if include_usage:
                yield _sse(header.usage_chunk(finals, prompts_per_choice))
        except Exception as exc:  # an engine failure mid-stream becomes an error event
            if isinstance(exc, RequestFailedError):
                trackers[exc.index].finish("error")
            yield _sse(error_from_exception(self._request_error(exc, header.model)).body())
        finally:
            _close(stream, trackers)
        yield "data: [DONE]\n\n"


class _Final:
    """A sub-request's output put together from its deltas (for full responses, usage)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.num_prompt_tokens = self.num_tokens = self.num_cached_tokens = 0
        self.finish_reason: str | None = None

    def add(self, delta: OutputDelta) -> None:
        if delta.text:
            self.parts.append(delta.text)
        self.num_prompt_tokens = delta.num_prompt_tokens
        self.num_cached_tokens = delta.num_cached_tokens
        self.num_tokens += len(delta.token_ids)
        self.finish_reason = delta.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.parts)


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

    def usage_chunk(self, finals: list[_Final], per_prompt: int) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(kind), "choices": [], "usage": _usage(finals, per_prompt)}

    def full_response(self, finals: list[_Final], per_prompt: int) -> dict[str, Any]:
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


def _usage(finals: list[_Final], per_prompt: int) -> dict[str, Any]:
    """Prompt tokens count once per prompt (not per choice), as OpenAI counts them; so do
    the ones the prefix cache served (the first choice's)."""
    prompt = sum(out.num_prompt_tokens for out in finals[::per_prompt])
    cached = sum(out.num_cached_tokens for out in finals[::per_prompt])
    completion = sum(out.num_tokens for out in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _finish_reason(out: OutputDelta | _Final) -> str:
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
