"""Per-request sampling settings, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Below this, logits / temperature overflows float32 for ordinary logit ranges and the
# distribution is argmax anyway: ask for temperature=0 (greedy) instead.
MIN_TEMPERATURE = 1e-2
MIN_TOP_P = 1e-6  # a smaller top_p keeps only the most likely token, like any top_p that small


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature`` is 0 (greedy: the argmax of the logits) or at least 0.01. Sampled
    tokens go through temperature -> ``top_k`` -> ``top_p`` -> ``min_p`` (the order vLLM
    uses; ``min_p`` keeps tokens at least ``min_p`` times as likely as the most likely one).
    ``seed`` makes a sampled output reproducible regardless of which other requests share
    the batch (a request's random draws depend on its seed, its step and its logits only).
    ``stop`` strings end generation and are not included in the output text.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    min_p: float = 0.0
    # Placeholder fields (names from the shared interface) so the server builds its params
    # before the sampling branch merges; that branch's definitions replace these.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    n: int = 1
    best_of: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(isinstance(self.stop, (list, tuple)), "stop", self.stop,
               "a string or a list of strings")
        _check(isinstance(self.stop_token_ids, (list, tuple)), "stop_token_ids",
               self.stop_token_ids, "a list of token ids")
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens,
               "an integer >= 1")
        _check(_is_number(self.temperature)
               and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE),
               "temperature", self.temperature,
               f"0 (greedy) or a finite number >= {MIN_TEMPERATURE}")
        _check(_is_number(self.top_p) and MIN_TOP_P <= self.top_p <= 1, "top_p", self.top_p,
               f"in [{MIN_TOP_P}, 1]")
        _check(_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "top_k",
               self.top_k, "-1 (disabled) or an integer >= 1")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "a list of non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "a list of token ids >= 0")
        _check(self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**64),
               "seed", self.seed, "a 64-bit integer")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "a bool")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(ok: bool, name: str, value: object, want: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: must be {want}")
