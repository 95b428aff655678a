"""Prompt text -> token ids, bounded and off both the event loop and the engine thread.

Tokenizing a long text takes seconds and holds the GIL in stretches: on the event loop it
stalls every route (``/health`` included), on the engine thread every running stream. So
the server tokenizes (and renders chat templates) in a small thread pool and hands the
engine token ids. Before any of that work starts, text is bounded by a size every prompt
that could fit in the context satisfies:

    max_chars = max_model_len * chars_per_token
    chars_per_token = max(16, the longest entry of the tokenizer's vocabulary)

A prompt of ``max_model_len`` tokens spells at most that many characters (each token
decodes to at most its vocabulary entry; byte-level entries count bytes, which bound
characters). Longer text is refused with a 400 that names the limit, without tokenizing.
Only tokenizers that map unbounded text onto one token (an ``<unk>`` for a whole unknown
word) can see a valid prompt refused, and then only a pathological one.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from loraplex.server.protocol import bad_request

T = TypeVar("T")
MIN_CHARS_PER_TOKEN = 16


def chars_per_token(tokenizer: Any) -> int:
    """The documented bound on characters per token (see the module docstring)."""
    try:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=0)
    except Exception:  # a tokenizer without a vocabulary listing: use the floor
        longest = 0
    return max(MIN_CHARS_PER_TOKEN, longest)


class PromptTokenizer:
    """Checks prompt sizes on the event loop (cheap ``len``) and tokenizes in a thread pool.

    Each pool thread uses its own copy of the tokenizer: a Hugging Face fast tokenizer is not
    safe to call from two threads at once ("Already borrowed").
    """

    def __init__(self, tokenizer: Any, max_model_len: int, num_threads: int = 2) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.chars_per_token = chars_per_token(tokenizer)
        self.max_chars = max_model_len * self.chars_per_token
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="loraplex-tokenize")

    def check_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_chars:
            raise bad_request(
                f"'{param}' has {num_chars} characters; the limit is {self.max_chars} "
                f"(max_model_len={self.max_model_len} tokens x {self.chars_per_token} "
                f"characters per token), checked before tokenizing", param=param,
                code="prompt_too_long")

    async def encode(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Token ids for each prompt (text is encoded as ``tokenizer.encode`` does, with the
        tokenizer's special tokens; ids pass through)."""
        for p in prompts:
            if isinstance(p, str):
                self.check_chars(len(p), "prompt")
        texts = [p for p in prompts if isinstance(p, str)]
        if not texts:
            return [list(p) for p in prompts]  # type: ignore[arg-type]
        encoded = iter(await self._run(lambda tok: [_encode(tok, t, True) for t in texts]))
        return [next(encoded) if isinstance(p, str) else list(p) for p in prompts]

    async def chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                   num_chars: int, add_special_tokens: bool = False,
                   tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Render the chat template (with ``tools`` as ``apply_chat_template`` takes them)
        and tokenize it (without adding special tokens again, unless ``add_special_tokens``)."""
        self.check_chars(num_chars, "messages")

        def render(tok: Any) -> list[int]:
            try:
                text = tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
            except Exception as exc:  # jinja errors on bad roles / orderings are the client's
                raise bad_request(f"the chat template failed on these messages: {exc}",
                                  param="messages") from exc
            self.check_chars(len(text), "messages")
            return _encode(tok, text, add_special_tokens)

        return await self._run(render)

    async def decode(self, ids: list[int], param: str = "tokens") -> str:
        """Token ids -> text, as ``tokenizer.decode`` does (special tokens kept)."""
        return await self._run(lambda tok: _decode(tok, ids, param))

    async def tokenize(self, prompt: str | list[dict[str, Any]], add_special_tokens: bool | None,
                       add_generation_prompt: bool = True,
                       num_chars: int = 0) -> tuple[list[int], list[str]]:
        """``POST /tokenize``: a text (special tokens added unless told otherwise) or chat
        messages (rendered, no special tokens added unless told); ids and token strings."""
        if isinstance(prompt, str):
            self.check_chars(len(prompt), "prompt")
            add = True if add_special_tokens is None else add_special_tokens
            ids = await self._run(lambda tok: _encode(tok, prompt, add))
        else:
            ids = await self.chat(prompt, add_generation_prompt, num_chars,
                                  add_special_tokens=bool(add_special_tokens))
        return ids, await self._run(lambda tok: tok.convert_ids_to_tokens(ids))

    async def _run(self, fn: Callable[[Any], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn)

    def _call(self, fn: Callable[[Any], T]) -> T:
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = copy.deepcopy(self.tokenizer)
        return fn(tok)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _encode(tok: Any, text: str, add_special_tokens: bool) -> list[int]:
    try:
        return list(tok.encode(text, add_special_tokens=add_special_tokens))
    except (UnicodeError, TypeError, ValueError) as exc:  # text the tokenizer cannot take
        raise bad_request(f"the prompt cannot be tokenized: {exc}", param="prompt") from exc



def _decode(tok: Any, ids: list[int], param: str) -> str:
    try:
        return tok.decode(ids)
    except (OverflowError, IndexError, TypeError, ValueError) as exc:  # ids outside the vocab
        raise bad_request(f"the token ids cannot be decoded: {exc}", param=param) from exc
