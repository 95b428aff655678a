"""Engine logprobs (``engine.logprobs.TokenLogprobs``) in OpenAI's two response shapes.

Completions (and their stream chunks)::

    {"tokens": [str], "token_logprobs": [float | None],
     "top_logprobs": [{str: float} | None], "text_offset": [int]}

``top_logprobs[i]`` maps the k most likely tokens' strings to their logprobs and, as vLLM
does, also holds the chosen token (so it may have k + 1 entries). ``text_offset[i]`` is
where token i's string starts: the running sum of the previous token strings' lengths over
the whole choice (echoed prompt first). A prompt's first token has no logprob: ``None``
in both ``token_logprobs`` and ``top_logprobs``.

Chat::

    {"content": [{"token": str, "logprob": float, "bytes": [int],
                  "top_logprobs": [{"token", "logprob", "bytes"}]}]}

A token's string is ``tokenizer.decode([id])`` (a byte-level piece of a multi-byte
character decodes to U+FFFD, as in vLLM); ``bytes`` is that string's UTF-8 encoding.
JSON has no infinity: a logprob of ``-inf`` is written as -9999.0, as vLLM does.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Protocol

# Each pair: a token id and its engine logprobs (None where there are none: a prompt's first).
TokenPair = tuple[int, Any]
FLOOR = -9999.0


class TokenLogprobsLike(Protocol):
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


class TokenStrings:
    """Token id -> string, cached. Uses its own copy of the tokenizer: a Hugging Face fast
    tokenizer must not be called from two threads at once, and the engine thread decodes
    with the original."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = copy.deepcopy(tokenizer)
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self._cache[token_id] = self._tokenizer.decode([token_id])
        return s


def _value(logprob: float) -> float:
    return logprob if logprob >= FLOOR or math.isnan(logprob) else FLOOR


def completion_logprobs(pairs: list[TokenPair], strings: TokenStrings,
                        text_offset: int = 0) -> tuple[dict[str, list[Any]], int]:
    """The completions ``logprobs`` object for ``pairs``, and the text offset after them."""
    tokens, values, tops, offsets = [], [], [], []
    for token_id, entry in pairs:
        s = strings(token_id)
        tokens.append(s)
        offsets.append(text_offset)
        text_offset += len(s)
        if entry is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(_value(entry.logprob))
        top: dict[str, float] = {}
        for alt_id, alt_logprob in entry.top:
            top.setdefault(strings(alt_id), _value(alt_logprob))  # best first wins a clash
        top.setdefault(s, _value(entry.logprob))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}, text_offset


def _chat_token(token_id: int, logprob: float, strings: TokenStrings) -> dict[str, Any]:
    s = strings(token_id)
    return {"token": s, "logprob": _value(logprob), "bytes": list(s.encode("utf-8"))}


def chat_logprobs(pairs: list[TokenPair], strings: TokenStrings) -> dict[str, Any]:
    """The chat ``logprobs`` object (``{"content": [...]}``) for generated tokens."""
    content = []
    for token_id, entry in pairs:
        if entry is None:  # the engine gave none for this token (never for generated ones)
            continue
        item = _chat_token(token_id, entry.logprob, strings)
        item["top_logprobs"] = [_chat_token(t, lp, strings) for t, lp in entry.top]
        content.append(item)
    return {"content": content}


def pair(token_ids: list[int], entries: list[Any] | None) -> list[TokenPair]:
    """Token ids with their logprob entries (None past the end of ``entries``)."""
    entries = entries or []
    return [(t, entries[i] if i < len(entries) else None) for i, t in enumerate(token_ids)]
