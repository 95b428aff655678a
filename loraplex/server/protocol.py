"""OpenAI-compatible request bodies (pydantic) and the HTTP error they map to.

Only what loraplex can honour is accepted: fields OpenAI defines but we cannot serve
(``logprobs``, ``echo``, penalties, tools, ...) are refused by name with a 400 when set to
anything but their neutral value, instead of being silently ignored. Unknown extra fields
are ignored, as OpenAI's own clients add new ones over time.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraplex.sampling_params import SamplingParams


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
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension; -1 or absent = disabled
    min_p: float | None = None  # vLLM extension; 0 or absent = disabled
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

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

    def sampling_params(self, max_tokens: int, choice: int) -> SamplingParams:
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
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt``: text, texts, token ids, or lists of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

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
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat turn. Extra keys (``name``, ``tool_calls``...) pass through to the template."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None

    def to_template_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):  # text parts only: join them into one string
            d["content"] = "".join(part.text for part in self.content)
        return d


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``. Without ``max_tokens``, generation may fill the context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True  # vLLM extension

    def check_supported(self) -> None:
        self._refuse_unsupported({
            "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
            "tool_choice": (None, "none", "auto"),
            "response_format": (None, {"type": "text"}),
        })

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's body for ``POST /v1/load_lora_adapter``."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's body for ``POST /v1/unload_lora_adapter`` (``lora_int_id`` is ignored)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)
