"""OpenAI-compatible request bodies (pydantic) and the HTTP error they map to.

Every field a model lists is honoured (``user``, OpenAI's metadata, is accepted and not
used); anything else is refused by name with a 400 (``extra="forbid"``): a client never
gets a 200 for a setting that did not apply. Types are strict: ``true`` is not an integer, ``1.0``
is not a token id, ``5`` is not a stop string, ``NaN`` is not a temperature. Every string
must be encodable as UTF-8 (a lone surrogate such as ``"\\ud800"`` is refused with a 400).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from loraplex.engine.guided import GuidedParams
from loraplex.sampling_params import SamplingParams

# The bounds a well-formed request can reach: token ids and seeds fit in int64.
_INT64_MAX = 2**63 - 1
_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid UTF-8 text ({exc.reason} at position {exc.start})") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]
TokenId = Annotated[int, Field(ge=0, le=_INT64_MAX)]
# Adapter names a client may load: no spaces, newlines or megabyte-long names.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9._:/-]{1,128}$"


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "code", "param"}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str, code: str,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type, code, param)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code,
                          "param": self.param}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> APIError:
    return APIError(400, message, "BadRequestError", code, param)


def not_found(message: str, code: str = "model_not_found") -> APIError:
    return APIError(404, message, "NotFoundError", code)


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


# ---- structured outputs and tools (read by server/structured.py and server/tools.py) ----
class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's named schema."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False,
                              populate_by_name=True)

    name: Text = Field(min_length=1, max_length=64)
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionSpec(BaseModel):
    model_config = _STRICT

    name: Text = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(BaseModel):
    """One entry of chat ``tools``."""

    model_config = _STRICT

    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = _STRICT

    name: Text


class NamedToolChoice(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    model_config = _STRICT

    type: Literal["function"]
    function: NamedFunction


class _GuidedFields(BaseModel):
    """OpenAI's ``response_format`` and vLLM's ``guided_*`` fields; at most one may
    constrain the output (server/structured.py turns them into GuidedParams)."""

    model_config = _STRICT

    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None
# ---- end of structured outputs and tools ----


# vLLM's default cap on logprobs per token (``--max-logprobs``); OpenAI allows 5 / 20.
MAX_LOGPROBS = 20


class _SamplingFields(_GuidedFields):
    """Fields shared by completions and chat completions; every one is honoured.

    ``user`` is OpenAI's end-user id for abuse monitoring: metadata, accepted and not used.
    ``n`` choices are separate engine requests; choice j of a seeded request uses seed + j.
    ``best_of`` > ``n`` generates ``best_of`` candidates per prompt and returns the ``n``
    with the highest cumulative logprob (not with ``stream``).
    """

    model_config = _STRICT

    model: Text
    temperature: float | None = None
    top_p: float | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)  # vLLM extension
    top_k: int | None = Field(default=None, ge=-1, le=_INT64_MAX)  # vLLM; -1/absent = off
    seed: int | None = Field(default=None, ge=-_INT64_MAX, le=_INT64_MAX - 128)
    stop: Text | list[Text] | None = None
    stop_token_ids: list[TokenId] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    n: int = Field(default=1, ge=1, le=128)
    best_of: int | None = Field(default=None, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=1e4)  # vLLM extension
    min_tokens: int | None = Field(default=None, ge=0, le=_INT64_MAX)  # vLLM extension
    # OpenAI sends token ids as JSON object keys, i.e. strings: {"50256": -100}
    logit_bias: dict[Text, Annotated[float, Field(ge=-100, le=100)]] | None = None
    include_stop_str_in_output: bool = False  # vLLM extension
    user: Text | None = None  # OpenAI end-user id: metadata, not used

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true",
                              param="stream_options")
        if self.best_of is not None and self.best_of < self.n:
            raise bad_request(f"'best_of'={self.best_of} must be >= 'n'={self.n}",
                              param="best_of")
        if self.stream and self.num_candidates > self.n:
            raise bad_request("'best_of' > 'n' cannot be streamed (the best choices are "
                              "known only once all candidates finished)", param="best_of")
        for key in self.logit_bias or {}:
            if not key.isascii() or not key.isdigit():
                raise bad_request(f"'logit_bias' key {key!r} is not a token id (a string of "
                                  "digits such as \"50256\")", param="logit_bias")

    @property
    def num_candidates(self) -> int:
        """Engine requests per prompt: ``best_of`` if set, else ``n``."""
        return self.n if self.best_of is None else self.best_of

    def sampling_params(self, max_tokens: int, choice: int,
                        guided: GuidedParams | None = None, *,
                        logprobs: int | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """SamplingParams for candidate ``choice``: with a seed, candidate j uses seed + j.
        ``guided``: the structured-output constraint, if any (``engine.guided.GuidedParams``).

        Raises ValueError (answered as 400) for out-of-range values.
        """
        stop = self.stop if self.stop is not None else []
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k in (None, 0) else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            stop=[stop] if isinstance(stop, str) else list(stop),
            stop_token_ids=list(self.stop_token_ids or []),
            seed=None if self.seed is None else self.seed + choice,
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None
            else self.repetition_penalty,
            min_tokens=self.min_tokens or 0,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias
            else None,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            guided=guided,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt``: text, texts, token ids, or lists of token ids.

    ``logprobs``: how many top alternatives per token (0: the chosen token's only). ``echo``
    prepends the prompt to each choice's text, and with ``logprobs`` its tokens' logprobs
    (the first prompt token has none); ``max_tokens: 0`` with ``echo`` generates nothing
    and returns the prompt alone, which is how harnesses score a continuation. Without
    ``max_tokens``, up to 16 tokens, fewer if the context has less room left.
    """

    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(default=None, ge=0, le=_INT64_MAX)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a flat list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("'prompt' must not be an empty list", param="prompt")
        if all(isinstance(t, int) for t in p):
            return [list(p)]  # one prompt given as token ids
        return list(p)

    def check_supported(self) -> None:
        self._check_common()
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("'max_tokens'=0 is only allowed with 'echo': true (to score "
                              "the prompt)", param="max_tokens")


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """One chat turn. Extra keys (``name``, ``tool_calls``...) pass through to the template
    (checked for UTF-8 like every other string)."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    role: Text
    content: Text | list[TextPart] | None = None

    @model_validator(mode="after")
    def _extras_are_utf8(self) -> ChatMessage:
        for key, value in (self.model_extra or {}).items():
            for s in _strings([key, value]):
                _utf8(s)
        return self

    def num_chars(self) -> int:
        """Characters of text this turn hands to the chat template (a size bound)."""
        return sum(len(s) for s in _strings(self.model_dump(exclude_none=True)))

    def to_template_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):  # text parts only: join them into one string
            d["content"] = "".join(part.text for part in self.content)
        return d


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``. Without ``max_tokens``, generation may fill the context.

    ``logprobs: true`` returns each generated token's logprob, with ``top_logprobs``
    alternatives per token (which needs ``logprobs: true``).
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=_INT64_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=_INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolSpec] | None = None  # see server/tools.py
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    add_generation_prompt: bool = True  # vLLM extension

    def check_supported(self) -> None:
        self._check_common()
        if self.top_logprobs and not self.logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per generated token to ask the engine for (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's body for ``POST /v1/load_lora_adapter``. ``lora_name``: 1-128 characters of
    ``[A-Za-z0-9._:/-]``."""

    model_config = _STRICT

    lora_name: Text = Field(pattern=ADAPTER_NAME_PATTERN)
    lora_path: Text = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's body for ``POST /v1/unload_lora_adapter``."""

    model_config = _STRICT

    lora_name: Text = Field(min_length=1, max_length=128)
    lora_int_id: int | None = None  # vLLM sends it; names identify adapters here


class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize``: either ``prompt`` (text) or chat ``messages`` (rendered by
    the chat template first). ``model`` picks the adapter, whose tokenizer is the base
    model's. ``add_special_tokens`` defaults to true for a prompt and false for messages
    (the template writes them), as vLLM does."""

    model_config = _STRICT

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's ``POST /detokenize``: token ids back to text."""

    model_config = _STRICT

    model: Text | None = None
    tokens: list[TokenId]


def _strings(value: Any) -> list[str]:
    """Every string (keys included) inside a JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []

