"""Per-request sampling settings, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loraplex.engine.guided import GuidedParams

# Below this, logits / temperature overflows float32 for ordinary logit ranges and the
# distribution is argmax anyway: ask for temperature=0 (greedy) instead.
MIN_TEMPERATURE = 1e-2
MIN_TOP_P = 1e-6  # a smaller top_p keeps only the most likely token, like any top_p that small
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit; vLLM's default max_logprobs is 20 too


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature`` is 0 (greedy: the argmax of the logits) or at least 0.01. Sampled
    tokens go through temperature -> ``top_k`` -> ``top_p`` -> ``min_p`` (the order vLLM
    uses; ``min_p`` keeps tokens at least ``min_p`` times as likely as the most likely one).
    ``seed`` makes a sampled output reproducible regardless of which other requests share
    the batch (a request's random draws depend on its seed, its step and its logits only).
    ``stop`` strings end generation and are not included in the output text (unless
    ``include_stop_str_in_output``).

    Before temperature, each row's logits go through (vLLM's order, ``engine/penalties.py``):
    ``bad_words`` (token sequences banned at the position that would complete them) ->
    ``min_tokens`` (EOS and ``stop_token_ids`` masked until that many tokens exist; stop
    strings are not checked before either) -> ``logit_bias`` (token id -> additive bias) ->
    ``repetition_penalty`` (tokens seen in prompt or output: positive logits divided by it,
    negative ones multiplied) -> ``frequency_penalty`` * count and ``presence_penalty`` * [seen]
    subtracted, counting generated tokens only (OpenAI's definition).

    ``logprobs=k`` returns, per generated token, its logprob, rank and the ``k`` most likely
    tokens; ``prompt_logprobs=k`` the same for every prompt token but the first. Both are raw:
    ``log_softmax`` of the model's logits before any of the processing above (see
    ``engine/logprobs.py``). ``max_tokens=0`` is allowed with ``prompt_logprobs`` only: the
    prompt is scored and nothing is generated.

    ``n`` / ``best_of`` are read by ``LLM.generate``: ``best_of`` candidates (default ``n``)
    are generated and the ``n`` with the highest cumulative logprob returned.
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
    guided: GuidedParams | None = None  # structured output: the text must match this

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(isinstance(self.stop, (list, tuple)), "stop", self.stop,
               "a string or a list of strings")
        _check(isinstance(self.stop_token_ids, (list, tuple)), "stop_token_ids",
               self.stop_token_ids, "a list of token ids")
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _check(_is_int(self.max_tokens) and (self.max_tokens >= 1 or (
            self.max_tokens == 0 and self.prompt_logprobs is not None)), "max_tokens",
               self.max_tokens, "an integer >= 1 (or 0 together with prompt_logprobs)")
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
        self._check_second_round()
        _check(self.guided is None or isinstance(self.guided, GuidedParams), "guided",
               self.guided, "None or a GuidedParams")

    def _check_second_round(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and 0 <= v <= MAX_LOGPROBS), name, v,
                   f"None or an integer in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_is_number(v) and -2 <= v <= 2, name, v, "a number in [-2, 2]")
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", self.repetition_penalty, "a finite number > 0")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens, "min_tokens",
               self.min_tokens, "an integer >= 0")
        _check(self.min_tokens <= max(self.max_tokens, 0) or self.min_tokens == 0, "min_tokens",
               self.min_tokens, f"at most max_tokens ({self.max_tokens})")
        bias = self.logit_bias
        _check(bias is None or (isinstance(bias, dict) and all(
            _is_int(k) and k >= 0 and _is_number(v) and -100 <= v <= 100
            for k, v in bias.items())), "logit_bias", bias,
            "a dict of token id (>= 0) -> bias in [-100, 100]")
        if bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in bias.items()}
        words = self.bad_words
        _check(words is None or (isinstance(words, (list, tuple))
                                 and all(isinstance(w, str) and w for w in words)),
               "bad_words", words, "a list of non-empty strings")
        if words is not None:
            self.bad_words = list(words)
        _check(isinstance(self.include_stop_str_in_output, bool), "include_stop_str_in_output",
               self.include_stop_str_in_output, "a bool")
        _check(_is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(self.best_of is None or (_is_int(self.best_of) and self.best_of >= self.n),
               "best_of", self.best_of, f"None or an integer >= n ({self.n})")

    @property
    def has_penalties(self) -> bool:
        """Whether any logits processing runs for this request (``engine/penalties.py``)."""
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1 or self.min_tokens or self.logit_bias
                    or self.bad_words)

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
