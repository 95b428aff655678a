"""OpenAI-compatible request bodies (pydantic) and the HTTP error they map to.

Only what loraplex can honour is accepted: fields OpenAI defines but we cannot serve
(``logprobs``, ``echo``, penalties, ...) are refused by name with a 400 when set to
anything but their neutral value, instead of being silently ignored. Unknown fields are
refused too (``extra="forbid"``), and types are strict: ``true`` is not an integer, ``1.0``
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


class _SamplingFields(_GuidedFields):
    """Fields shared by completions and chat completions."""

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
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[Text, float] | None = None
    user: Text | None = None

    def _refuse_unsupported(self, fields: dict[str, Any]) -> None:
        """Raise a 400 naming the first field set to a value loraplex cannot honour."""
        neutral: dict[str, Any] = {"presence_penalty": (None, 0, 0.0),
                                   "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {})}
        neutral.update(fields)
        for name, allowed in neutral.items():
            value = getattr(self, name)
            if value not in allowed:
                raise bad_request(f"'{name}'={value!r} is not supported by loraplex", param=name)
        if self.stream_options is not None and not self.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true",
                              param="stream_options")

    def sampling_params(self, max_tokens: int, choice: int,
                        guided: GuidedParams | None = None) -> SamplingParams:
        """SamplingParams for choice ``choice`` of ``n``: with a seed, choice j uses seed + j.

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
            guided=guided,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt``: text, texts, token ids, or lists of token ids."""

    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(default=16, ge=1, le=_INT64_MAX)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: Text | None = None

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
        self._refuse_unsupported({"echo": (False,), "logprobs": (None,),
                                  "best_of": (None, self.n), "suffix": (None, "")})


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
    """``POST /v1/chat/completions``. Without ``max_tokens``, generation may fill the context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=_INT64_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=_INT64_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[ToolSpec] | None = None  # see server/tools.py
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    add_generation_prompt: bool = True  # vLLM extension

    def check_supported(self) -> None:
        self._refuse_unsupported({
            "logprobs": (None, False), "top_logprobs": (None, 0),
        })

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


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


def _strings(value: Any) -> list[str]:
    """Every string (keys included) inside a JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []

