"""OpenAI response objects (full responses and stream chunks) built from engine deltas.

``ChoiceOutput`` gathers one engine request's deltas and turns each into the ``Piece`` the
client sees: with ``echo`` the first piece starts with the prompt (text, and its tokens'
logprobs once the engine has them); a scoring request (``max_tokens: 0``, run by the engine
with one token) hides what was generated. ``ResponseBuilder`` writes pieces into OpenAI's
shapes for completions or chat, streamed or whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraplex.server.async_engine import OutputDelta
from loraplex.server.openai_logprobs import (
    TokenPair,
    TokenStrings,
    chat_logprobs,
    completion_logprobs,
    pair,
)
from loraplex.server.tools import ToolCall, parse_tool_calls


@dataclass
class Piece:
    """What one delta adds to a choice: text, and (token id, logprobs) pairs when asked."""

    text: str
    tokens: list[TokenPair]
    finish_reason: str | None


@dataclass
class ChoiceOutput:
    """One engine request's output as a choice. ``echo``: the prompt's text (None: no echo);
    ``score_only``: generated tokens are dropped (``max_tokens: 0``)."""

    prompt_ids: list[int]
    echo: str | None = None
    wants_prompt_logprobs: bool = False
    score_only: bool = False
    pieces: list[Piece] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_tokens: int = 0
    num_cached_tokens: int = 0
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    text_offset: int = 0  # streamed completions: where the next token string starts
    # generated output held back while an echoed prompt waits for its logprobs
    _held_text: str = ""
    _held_tokens: list[TokenPair] = field(default_factory=list)

    def add(self, delta: OutputDelta) -> Piece:
        self.num_prompt_tokens = delta.num_prompt_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        if self.score_only:
            finish = "length" if delta.finished else None
        else:
            self.num_tokens += len(delta.token_ids)
            if delta.cumulative_logprob is not None:
                self.cumulative_logprob = delta.cumulative_logprob
            elif delta.logprobs:  # an engine that gives no running sum: add it up here
                self.cumulative_logprob = (self.cumulative_logprob or 0.0) + sum(
                    e.logprob for e in delta.logprobs)
            self._held_text += delta.text
            self._held_tokens += pair(delta.token_ids, delta.logprobs)
            finish = (delta.finish_reason or "stop") if delta.finished else None
        text, tokens = "", []
        if self.echo is not None:
            if self.wants_prompt_logprobs and delta.prompt_logprobs is None \
                    and not delta.finished:
                return self._piece("", [], finish)  # the prompt comes first: hold the rest
            text, tokens = self.echo, pair(self.prompt_ids, delta.prompt_logprobs)
            self.echo = None
        text, tokens = text + self._held_text, tokens + self._held_tokens
        self._held_text, self._held_tokens = "", []
        return self._piece(text, tokens, finish)

    def _piece(self, text: str, tokens: list[TokenPair], finish: str | None) -> Piece:
        self.finish_reason = finish or self.finish_reason
        piece = Piece(text, tokens, finish)
        self.pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)

    @property
    def tokens(self) -> list[TokenPair]:
        return [t for p in self.pieces for t in p.tokens]

    @property
    def score(self) -> float:
        """Rank for ``best_of``: cumulative logprob (higher is better)."""
        return float("-inf") if self.cumulative_logprob is None else self.cumulative_logprob


def best_of(outputs: list[ChoiceOutput], candidates: int, n: int) -> list[ChoiceOutput]:
    """Per prompt (``candidates`` consecutive outputs), the ``n`` with the highest
    cumulative logprob, best first (ties keep generation order)."""
    if candidates == n:
        return outputs
    chosen = []
    for start in range(0, len(outputs), candidates):
        group = outputs[start:start + candidates]
        chosen += sorted(group, key=lambda o: -o.score)[:n]
    return chosen


def usage(outputs: list[ChoiceOutput], candidates: int) -> dict[str, Any]:
    """Prompt tokens count once per prompt (not per choice), as OpenAI counts them;
    completion tokens count every candidate generated (``best_of`` ones too)."""
    firsts = outputs[::candidates]
    prompt = sum(o.num_prompt_tokens for o in firsts)
    completion = sum(o.num_tokens for o in outputs if not o.score_only)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens
                                                           for o in firsts)}}


class ResponseBuilder:
    """Fields shared by every response object of one request, and their builders.
    ``logprobs``: whether the client asked for them (else every ``logprobs`` is null)."""

    def __init__(self, request_id: str, created: int, model: str, chat: bool,
                 logprobs: bool, strings: TokenStrings | None,
                 tool_parser: str | None = None) -> None:
        self.id, self.created, self.model, self.chat = request_id, created, model, chat
        self.logprobs, self.strings = logprobs, strings
        self.tool_parser = tool_parser  # chat replies are parsed for tool calls (tools.py)

    def _base(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def _logprobs(self, tokens: list[TokenPair], out: ChoiceOutput | None) -> Any:
        if not self.logprobs or self.strings is None:
            return None
        if self.chat:
            return chat_logprobs(tokens, self.strings)
        offset = 0 if out is None else out.text_offset
        result, offset = completion_logprobs(tokens, self.strings, offset)
        if out is not None:
            out.text_offset = offset
        return result

    def wants_chunk(self, piece: Piece) -> bool:
        return bool(piece.text) or (self.logprobs and bool(piece.tokens))

    def chunk(self, index: int, piece: Piece, out: ChoiceOutput,
              role: bool = False) -> dict[str, Any]:
        logprobs = self._logprobs(piece.tokens, out) if piece.tokens else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": piece.text} if piece.text else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": piece.finish_reason}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": piece.text, "logprobs": logprobs,
                  "finish_reason": piece.finish_reason}
        return {**self._base("text_completion"), "choices": [choice]}

    def tool_calls_chunk(self, index: int, calls: list[ToolCall]) -> dict[str, Any]:
        delta = {"tool_calls": [{"index": k, **call.to_openai()}
                                for k, call in enumerate(calls)]}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        return {**self._base("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, outputs: list[ChoiceOutput], candidates: int) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(kind), "choices": [], "usage": usage(outputs, candidates)}

    def full_response(self, outputs: list[ChoiceOutput], candidates: int,
                      n: int) -> dict[str, Any]:
        choices = []
        for index, out in enumerate(best_of(outputs, candidates, n)):
            logprobs = self._logprobs(out.tokens, None)
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": out.text}
                reason = out.finish_reason or "stop"
                content, calls = parse_tool_calls(self.tool_parser, out.text) \
                    if self.tool_parser else (out.text, [])
                if calls:
                    message = {"role": "assistant", "content": content,
                               "tool_calls": [c.to_openai() for c in calls]}
                    reason = "tool_calls"
                choices.append({"index": index, "logprobs": logprobs, "message": message,
                                "finish_reason": reason})
            else:
                choices.append({"index": index, "text": out.text, "logprobs": logprobs,
                                "finish_reason": out.finish_reason or "stop"})
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._base(kind), "choices": choices, "usage": usage(outputs, candidates)}
