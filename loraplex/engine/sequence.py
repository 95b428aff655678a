"""Request state: one ``Sequence`` per request (n > 1 is fanned out by the caller)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from loraplex.engine.logprobs import TokenLogprobs
from loraplex.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """A request's state after a step: cumulative ``token_ids`` and ``text``.

    ``text`` has stop strings removed and, while running, may hold back a tail that could
    still become a stop string. ``finish_reason`` is "stop", "length", "abort", "error" or
    None. "error": the engine ended this request alone (e.g. its logits were NaN/inf, as a
    broken adapter can cause) and ``error`` says why; the other requests ran on. "abort"
    with ``error`` set: the request could not start (e.g. its adapter failed to load).
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    adapter: str | None = None
    error: str | None = None  # why the engine failed this request (see finish_reason)
    # -- logprobs (SamplingParams.logprobs / prompt_logprobs; see engine/logprobs.py) --
    logprobs: list[TokenLogprobs] | None = None  # one per generated token
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
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            token_ids=list(self.output_token_ids),
            text=self.text if visible_text is None else visible_text,
            finished=self.finished,
            finish_reason=self.finish_reason,
            adapter=self.adapter,
            error=self.error,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            prompt_logprobs=self.prompt_logprobs,  # complete after the prefill; not copied
            cumulative_logprob=None if self.logprobs is None else self.cumulative_logprob,
            num_cached_tokens=self.num_cached_tokens,
        )
