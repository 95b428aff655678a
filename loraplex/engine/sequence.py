"""Request state: one ``Sequence`` per request (n > 1 is fanned out by the caller)."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

from loraplex.engine.logprobs import TokenLogprobs
from loraplex.sampling_params import SamplingParams

T = TypeVar("T")


class Prefix(SequenceABC, Generic[T]):
    """The first ``n`` items of an append-only list, without copying them: what a running
    request's ``RequestOutput`` holds. A copy per step costs O(tokens so far), so over a
    stream of n tokens O(n^2); this costs O(1), and reading the new items (``out[k:]``)
    O(new items). Items appended to the list later stay invisible, so an output keeps its
    step's contents (the owner only ever appends). Slices are plain lists; ``==`` compares
    with any list, tuple or Prefix; ``pickle`` and ``copy`` give plain lists."""

    __slots__ = ("_items", "_n")

    def __init__(self, items: list[T], n: int | None = None) -> None:
        self._items, self._n = items, len(items) if n is None else n

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> list[T]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self._n)
            if step == 1:
                return self._items[start:stop]
            return [self._items[j] for j in range(start, stop, step)]
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexError(f"index {i} out of range for {self._n} items")
        return self._items[j]

    def __iter__(self) -> Iterator[T]:
        return itertools.islice(self._items, self._n)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (list, tuple, Prefix)):
            return NotImplemented
        return len(other) == self._n and all(a == b for a, b in zip(self, other, strict=False))

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are unhashable

    def __add__(self, other: Any) -> list[T]:
        return list(self) + list(other)

    def __radd__(self, other: Any) -> list[T]:
        return list(other) + list(self)

    def __reduce__(self):
        return list, (list(self),)

    def __repr__(self) -> str:
        return repr(list(self))


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """A request's state after a step: cumulative ``token_ids`` and ``text``.

    While the request runs, ``token_ids`` and ``logprobs`` are ``Prefix`` views of the
    request's own lists as of this step (sequences that read like lists, O(1) to hand out);
    in the output that finishes it they are plain lists.

    ``text`` has stop strings removed and, while running, may hold back a tail that could
    still become a stop string. ``finish_reason`` is "stop", "length", "abort", "error" or
    None. "error": the engine ended this request alone (e.g. its logits were NaN/inf, as a
    broken adapter can cause) and ``error`` says why; the other requests ran on. "abort"
    with ``error`` set: the request could not start (e.g. its adapter failed to load).
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] | Prefix[int]
    text: str
    finished: bool
    finish_reason: str | None
    adapter: str | None = None
    error: str | None = None  # why the engine failed this request (see finish_reason)
    # -- logprobs (SamplingParams.logprobs / prompt_logprobs; see engine/logprobs.py) --
    logprobs: list[TokenLogprobs] | Prefix[TokenLogprobs] | None = None  # one per token
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # first prompt token: None
    cumulative_logprob: float | None = None  # sum of the generated tokens' logprobs
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    # the adapter generation recorded when the request was added (see lora.registry), and
    # the lora slot it holds a pin on from admission until it ends (kept across preemption)
    adapter_generation: int | None = None
    lora_slot: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    arrival_time: float = field(default_factory=time.monotonic)
    seed: int | None = None  # keys the request's random draws; params.seed when set
    text: str = ""  # detokenized output, stop strings removed
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    # scheduling progress: tokens whose K/V are in the cache (back to 0 on preemption), and
    # the prompt tokens the prefix cache served at admission
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    # hashes of the leading full blocks of all_token_ids (kvcache.prefix_cache), kept
    # incrementally; only the scheduler reads them
    block_hashes: list[bytes] = field(default_factory=list)
    # incremental detokenization offsets into all_token_ids (see engine.detokenizer)
    prefix_offset: int = 0
    read_offset: int = 0
    # -- logprobs and penalties (engine/logprobs.py, engine/penalties.py) --
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    cumulative_logprob: float = 0.0
    bad_words_ids: list[list[int]] = field(default_factory=list)  # tokenized params.bad_words

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = self.params.seed
        self.read_offset = len(self.prompt_token_ids)
        self.prefix_offset = max(self.read_offset - 5, 0)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = []

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs still to compute: the prefill must produce logits at these prompt
        positions (so their K/V cannot come from the prefix cache)."""
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids))

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_window(self, start: int, end: int | None = None) -> list[int]:
        """``all_token_ids[start:end]`` without building the whole list (the detokenizer
        reads a few tokens a step; copying prompt + output would cost O(context) a row)."""
        p = len(self.prompt_token_ids)
        end = self.num_tokens if end is None else end
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:min(end, p)] + self.output_token_ids[: max(0, end - p)]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def output(self, visible_text: str | None = None) -> RequestOutput:
        """This step's output. A running request hands out views (``Prefix``), not copies: a
        stream of n tokens would otherwise copy O(n^2) list items; the finishing output holds
        plain lists, once (what ``LLM.generate`` returns)."""
        snapshot = list if self.finished else Prefix
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            token_ids=snapshot(self.output_token_ids),
            text=self.text if visible_text is None else visible_text,
            finished=self.finished,
            finish_reason=self.finish_reason,
            adapter=self.adapter,
            error=self.error,
            logprobs=None if self.logprobs is None else snapshot(self.logprobs),
            prompt_logprobs=self.prompt_logprobs,  # complete after the prefill; not copied
            cumulative_logprob=None if self.logprobs is None else self.cumulative_logprob,
            num_cached_tokens=self.num_cached_tokens,
        )
