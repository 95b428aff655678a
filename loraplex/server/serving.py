"""The OpenAI completions and chat-completions endpoints over an ``AsyncEngine``.

One HTTP request becomes ``len(prompts) * k`` engine requests, ``k`` = ``best_of`` or ``n``
(candidate ``i * k + j`` is prompt i's j-th sample), at most ``max_sequences`` of them; with
``best_of`` the ``n`` candidates of highest cumulative logprob become the choices.
``max_tokens`` that does not fit the context left after the prompt is a 400 with the
numbers. Prompts are size-checked and
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
    RequestFailedError,
    RequestStream,
    SubRequest,
)
from loraplex.server.http_errors import error_from_exception
from loraplex.server.metrics import RequestTracker, ServerMetrics
from loraplex.server.openai_logprobs import TokenStrings
from loraplex.server.prompts import PromptTokenizer
from loraplex.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    not_found,
)
from loraplex.server.responses import ChoiceOutput, Piece, ResponseBuilder
from loraplex.server.sse import EventStreamResponse
from loraplex.server.structured import prepare_guided, request_guided
from loraplex.server.tools import ToolCallStream, plan_tools, template_messages

T = TypeVar("T")


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, registry: ServedModels, metrics: ServerMetrics,
                 prompts: PromptTokenizer, max_sequences: int,
                 tool_parser: str | None = None) -> None:
        self.engine, self.registry, self.metrics = engine, registry, metrics
        self.prompts, self.max_model_len = prompts, prompts.max_model_len
        self.max_sequences = max_sequences
        self.served_model_name = registry.served_model_name
        self.strings = TokenStrings(prompts.tokenizer)
        self.tool_parser = tool_parser  # server/tools.py: llama3_json | hermes | None

    def _check_sequences(self, num_prompts: int, n: int) -> None:
        if num_prompts * n > self.max_sequences:
            raise bad_request(f"this request asks for {num_prompts} prompt(s) x n={n} = "
                              f"{num_prompts * n} sequences; the limit is "
                              f"{self.max_sequences} (--max-sequences-per-request)",
                              param="n", code="too_many_sequences")

    def _check_room(self, num_prompt_tokens: int, max_tokens: int, what: str) -> None:
        """400 (vLLM's wording) when prompt + max_tokens does not fit the context."""
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {num_prompt_tokens + max_tokens} tokens "
                f"({num_prompt_tokens} in the {what}, {max_tokens} in the completion). "
                f"Please reduce the length of the {what} or completion.",
                param="max_tokens", code="context_length_exceeded")

    # ------------------------------------------------------------------ completions
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        req.check_supported()
        adapter = self.registry.resolve_model(req.model)
        prompts = req.prompts()
        k = req.num_candidates
        self._check_sequences(len(prompts), k)
        guided = await request_guided(req)  # structured outputs: 400 if malformed
        await prepare_guided(self.engine.engine, guided)
        ids = await self.prompts.encode(prompts)
        # Logprobs of the chosen tokens rank best_of candidates even when not returned.
        logprobs = req.logprobs if req.logprobs is not None or k == req.n else 0
        prompt_logprobs = req.logprobs if req.echo else None
        subs, outs = [], []
        for text, p in zip(prompts, ids, strict=True):
            left = self.max_model_len - len(p)
            if req.max_tokens is None:
                max_tokens = max(1, min(16, left))  # OpenAI's default, within the context
            else:
                self._check_room(len(p), req.max_tokens, "prompt")
                # 0 scores the prompt: with logprobs the engine generates nothing
                # (SamplingParams(max_tokens=0) needs prompt_logprobs); a plain echo runs
                # one token and hides it
                max_tokens = req.max_tokens or (0 if prompt_logprobs is not None else 1)
            echo = (text if isinstance(text, str) else await self.prompts.decode(p, "prompt")) \
                if req.echo else None
            for j in range(k):
                params = req.sampling_params(max_tokens, j, guided, logprobs=logprobs,
                                             prompt_logprobs=prompt_logprobs)
                subs.append(SubRequest(p, params, adapter))
                outs.append(ChoiceOutput(p, echo, prompt_logprobs is not None,
                                         score_only=req.max_tokens == 0))
        return await self._serve(req, raw, subs, outs, chat=False,
                                 logprobs=req.logprobs is not None)

    # ------------------------------------------------------------------ chat
    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        req.check_supported()
        adapter = self.registry.resolve_model(req.model)
        k = req.num_candidates
        self._check_sequences(1, k)
        if not getattr(self.prompts.tokenizer, "chat_template", None):
            raise bad_request(f"the model '{self.served_model_name}' has no chat "
                              "template (tokenizer_config.json 'chat_template'); use "
                              "/v1/completions instead", param="messages",
                              code="no_chat_template")
        # structured outputs and tools (server/structured.py, server/tools.py)
        guided = await request_guided(req)
        tools = await asyncio.to_thread(plan_tools, req, self.tool_parser) if req.tools \
            else plan_tools(req, self.tool_parser)  # a forced call builds a grammar
        if tools.guided is not None:
            if guided is not None:
                raise bad_request("tool_choice 'required' or a named function forces a tool "
                                  "call; it cannot be combined with another output "
                                  "constraint", param="tool_choice")
            guided = tools.guided
        tool_chars = len(json.dumps(tools.tools)) if tools.tools else 0
        prompt_ids = await self.prompts.chat(
            template_messages([m.to_template_dict() for m in req.messages]),
            req.add_generation_prompt, sum(m.num_chars() for m in req.messages) + tool_chars,
            tools=tools.tools)
        max_tokens = req.requested_max_tokens()
        if max_tokens is None:
            max_tokens = self.max_model_len - len(prompt_ids)
            if max_tokens < 1:
                raise bad_request(f"the chat prompt has {len(prompt_ids)} tokens, which leaves "
                                  f"no room to generate within max_model_len="
                                  f"{self.max_model_len}", param="messages")
        else:
            self._check_room(len(prompt_ids), max_tokens, "messages")
        logprobs = req.num_logprobs if req.num_logprobs is not None or k == req.n else 0
        subs = [SubRequest(prompt_ids, req.sampling_params(max_tokens, j, guided,
                                                           logprobs=logprobs), adapter)
                for j in range(k)]
        await prepare_guided(self.engine.engine, guided)
        outs = [ChoiceOutput(prompt_ids) for _ in range(k)]
        return await self._serve(req, raw, subs, outs, chat=True, logprobs=req.logprobs,
                                 tool_parser=tools.parser)

    # ------------------------------------------------------------------ shared
    async def _serve(self, req: CompletionRequest | ChatCompletionRequest, raw: Request,
                     subs: list[SubRequest], outs: list[ChoiceOutput], chat: bool,
                     logprobs: bool, tool_parser: str | None = None) -> Response:
        kind = "chatcmpl" if chat else "cmpl"
        request_id = f"{kind}-{uuid.uuid4().hex}"
        trackers = [self.metrics.tracker(req.model) for _ in subs]
        try:
            stream = await self.engine.add(request_id, subs)  # validation errors raise here
        except AdapterNotFoundError:  # unloaded since resolve_model: answer as it would
            raise self._model_gone(req.model) from None
        builder = ResponseBuilder(request_id, int(time.time()), req.model, chat, logprobs,
                                  self.strings, tool_parser)
        if req.stream:  # best_of > n was refused: candidates are the choices
            events = self._events(stream, trackers, builder, outs, req.include_usage,
                                  req.num_candidates)
            return EventStreamResponse(events, stream.abandoned)
        done = await _unless_disconnected(raw, self._collect(stream, trackers, outs, req.model))
        if done is None:
            return Response(status_code=499)  # nobody is listening any more
        return JSONResponse(builder.full_response(outs, req.num_candidates, req.n))

    def _model_gone(self, model: str) -> Exception:
        return not_found(f"The model '{model}' does not exist (any more).")

    def _request_error(self, exc: Exception, model: str) -> Exception:
        """A request that failed alone: 404 if its adapter was unloaded while it waited."""
        if isinstance(exc, RequestFailedError) and model != self.served_model_name \
                and model not in self.registry.adapters:
            return self._model_gone(model)
        return exc

    async def _collect(self, stream: RequestStream, trackers: list[RequestTracker],
                       outs: list[ChoiceOutput], model: str) -> bool:
        try:
            async for index, delta in stream:
                trackers[index].observe(delta)
                outs[index].add(delta)
        except RequestFailedError as exc:
            trackers[exc.index].finish("error")
            raise self._request_error(exc, model) from None
        finally:
            _close(stream, trackers)
        return True

    async def _events(self, stream: RequestStream, trackers: list[RequestTracker],
                      builder: ResponseBuilder, outs: list[ChoiceOutput], include_usage: bool,
                      candidates: int) -> AsyncIterator[str]:
        tool_streams = ([ToolCallStream(builder.tool_parser) for _ in outs]
                        if builder.tool_parser else None)
        try:
            if builder.chat:
                for index, out in enumerate(outs):
                    yield _sse(builder.chunk(index, Piece("", [], None), out, role=True))
            async for index, delta in stream:
                trackers[index].observe(delta)
                piece = outs[index].add(delta)
                text = tool_streams[index].feed(piece.text) if tool_streams else piece.text
                if builder.wants_chunk(Piece(text, piece.tokens, None)):
                    yield _sse(builder.chunk(index, Piece(text, piece.tokens, None),
                                             outs[index]))
                reason = piece.finish_reason
                if reason is not None and tool_streams:  # held back: content or calls
                    rest, calls = tool_streams[index].finish()
                    if rest:
                        yield _sse(builder.chunk(index, Piece(rest, [], None), outs[index]))
                    if calls:
                        reason = "tool_calls"
                        yield _sse(builder.tool_calls_chunk(index, calls))
                if reason is not None:
                    yield _sse(builder.chunk(index, Piece("", [], reason), outs[index]))
            if include_usage:
                yield _sse(builder.usage_chunk(outs, candidates))
        except Exception as exc:  # an engine failure mid-stream becomes an error event
            if isinstance(exc, RequestFailedError):
                trackers[exc.index].finish("error")
            yield _sse(error_from_exception(self._request_error(exc, builder.model)).body())
        finally:
            _close(stream, trackers)
        yield "data: [DONE]\n\n"


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
