"""Tool calling for chat: rendering, forcing, parsing and streaming tool calls.

Tools reach the model through its chat template, as ``apply_chat_template(tools=...)``
renders them (the OpenAI ``{"type": "function", "function": {...}}`` dicts), and assistant
``tool_calls`` in the history get their JSON-string ``arguments`` as objects, which is what
templates expect. The model's reply is parsed by one of two parsers, picked by
``--tool-call-parser`` or, without the flag, from the chat template (``<tool_call>`` in it:
hermes; ``<|python_tag|>`` or ``"parameters"``: llama3_json):

- ``llama3_json`` (Llama 3.1-3.3): the whole reply is ``{"name": ..., "parameters": {...}}``
  (several separated by ``;``), optionally after ``<|python_tag|>``.
- ``hermes`` (Qwen2.5, Hermes): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
  blocks; text before the first block is the message content.

``tool_choice``: "none" renders the tools and parses nothing; "auto" parses what the model
wrote; "required" and a named function force one call through the structured-output path
(a grammar for one call to any of the tools, or to the named one, in the parser's format).
A reply with calls ends with finish_reason "tool_calls". Streaming holds text back while it
may still become a tool call and sends each parsed call as one delta when the reply ends.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from loraplex.engine.guided import GuidedParams
from loraplex.server.protocol import ChatCompletionRequest, bad_request

TOOL_CALL_PARSERS = ("llama3_json", "hermes")
_PYTHON_TAG = "<|python_tag|>"
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name,
                             "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def detect_parser(chat_template: str | None) -> str | None:
    """The parser a chat template's tool format implies, or None (see the module docstring)."""
    if not chat_template:
        return None
    if _OPEN in chat_template:
        return "hermes"
    if _PYTHON_TAG in chat_template or '"parameters"' in chat_template:
        return "llama3_json"
    return None


def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished reply; no calls (and all the text) if it does not
    parse as the format's tool calls."""
    if parser == "hermes":
        start = text.find(_OPEN)
        if start == -1:
            return text, []
        calls = [_call(json_text, "arguments") for json_text in _HERMES_BLOCK.findall(text[start:])]
        if not calls or None in calls:
            return text, []
        return text[:start].strip() or None, calls  # type: ignore[return-value]
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG):].lstrip()
    if not body.startswith("{"):
        return text, []
    calls = [_call(part, "parameters") for part in _split_json_objects(body)]
    if not calls or None in calls:
        return text, []
    return None, calls  # type: ignore[return-value]


def _call(json_text: str, args_key: str) -> ToolCall | None:
    try:
        obj = json.loads(json_text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments" if args_key == "parameters" else "parameters",
                                     {}))
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def _split_json_objects(body: str) -> list[str]:
    """``{...}; {...}`` -> the objects' texts (raises nothing: bad JSON comes back as is)."""
    decoder, parts, pos = json.JSONDecoder(), [], 0
    while pos < len(body):
        try:
            _, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return [body[pos:]]
        parts.append(body[pos:end])
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return parts


def forced_call_grammar(parser: str, tools: list[dict[str, Any]]) -> GuidedParams:
    """One call to one of ``tools`` (OpenAI dicts), in ``parser``'s format."""
    args_key = "arguments" if parser == "hermes" else "parameters"
    cases = [{"type": "object",
              "properties": {"name": {"const": t["function"]["name"]},
                             args_key: t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", args_key], "additionalProperties": False} for t in tools]
    schema = cases[0] if len(cases) == 1 else {"anyOf": cases}
    if parser == "llama3_json":
        return GuidedParams(json_schema=schema)
    import xgrammar as xgr

    from loraplex.engine.guided import json_grammar

    call = xgr.Grammar.concat(xgr.Grammar.from_ebnf(f'root ::= "{_OPEN}\\n"'),
                              json_grammar(json.dumps(schema)),
                              xgr.Grammar.from_ebnf(f'root ::= "\\n{_CLOSE}"'))
    return GuidedParams(grammar=str(call))


@dataclass
class ToolPlan:
    """What a chat request does with tools: template input, parser, forced grammar."""

    tools: list[dict[str, Any]] | None  # for the template
    parser: str | None  # None: the reply is plain content
    guided: GuidedParams | None  # set for "required" / a named function


def plan_tools(req: ChatCompletionRequest, parser: str | None) -> ToolPlan:
    """APIError 400 for a choice that cannot be served (no parser, unknown function name,
    tools together with another output constraint when a call is forced)."""
    if not req.tools:
        if req.tool_choice not in (None, "none"):
            raise bad_request("'tool_choice' needs 'tools'", param="tool_choice")
        return ToolPlan(None, None, None)
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    choice = req.tool_choice or "auto"
    if choice == "none":
        return ToolPlan(tools, None, None)
    if parser is None:
        raise bad_request("this server has no tool-call parser for its chat template; start "
                          "it with --tool-call-parser llama3_json|hermes", param="tool_choice")
    if choice == "auto":
        return ToolPlan(tools, parser, None)
    forced = tools
    if not isinstance(choice, str):
        forced = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not forced:
            raise bad_request(f"tool_choice names function '{choice.function.name}', which is "
                              "not in 'tools'", param="tool_choice")
    try:
        return ToolPlan(tools, parser, forced_call_grammar(parser, forced))
    except ValueError as exc:  # a parameters schema xgrammar cannot take
        raise bad_request(f"the tools' parameters cannot be enforced: {exc}",
                          param="tools") from None


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as templates expect them: tool-call arguments as objects, not JSON text."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            m = {**m, "tool_calls": [_arguments_as_object(c) for c in calls]}
        out.append(m)
    return out


def _arguments_as_object(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except json.JSONDecodeError:
        raise bad_request(f"tool call arguments are not valid JSON: {fn['arguments'][:100]!r}",
                          param="messages") from None
    return {**call, "function": {**fn, "arguments": args}}


class ToolCallStream:
    """Streams a reply's content while holding back what may still be a tool call.

    ``feed(text)`` returns the content that can be sent now; ``finish()`` returns the rest
    of the content and the parsed calls."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.text = ""  # the whole reply so far
        self.sent = 0  # characters of it already sent as content

    def feed(self, text: str) -> str:
        self.text += text
        hold = self._hold_from()
        out = self.text[self.sent:hold]
        self.sent = max(self.sent, hold)
        return out

    def _hold_from(self) -> int:
        """Where the text that may belong to a tool call starts."""
        if self.parser == "hermes":
            start = self.text.find(_OPEN, self.sent)
            if start != -1:
                return start
            for k in range(min(len(_OPEN) - 1, len(self.text)), 0, -1):
                if _OPEN.startswith(self.text[-k:]):  # a tag may be coming
                    return len(self.text) - k
            return len(self.text)
        if self.sent:
            return len(self.text)  # already decided: plain content
        body = self.text.lstrip()
        if not body or body.startswith("{") or _PYTHON_TAG.startswith(body[:len(_PYTHON_TAG)]):
            return 0  # empty so far, JSON, or (a prefix of) the python tag
        return len(self.text)

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        if not rest:
            return "", []
        content, calls = parse_tool_calls(self.parser, rest)
        return (content or "") if calls else rest, calls
