"""Tool calling: templates render tools exactly as transformers does, the parsers round-trip
OpenAI tool calls, forced calls from a random model always parse and validate, and the
official ``openai`` client reads ``tool_calls`` from full and streamed responses."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest
from helpers_lora import make_peft_adapter, make_tiny_model
from server_utils import openai_client_on

from loraplex import LLM, SamplingParams
from loraplex.server.prompts import PromptTokenizer
from loraplex.server.tools import (
    ToolCall,
    ToolCallStream,
    detect_parser,
    forced_call_grammar,
    parse_tool_calls,
    template_messages,
)

# Written for these tests in the style of Qwen2.5's (hermes) and Llama 3.1's templates.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Reply with <tool_call>
{"name": <name>, "arguments": <args>}
</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == "assistant" and m.tool_calls %}<|im_start|>assistant
{%- for tc in m.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == "tool" %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if tools %}<|start_header_id|>system<|end_header_id|>

Respond with a JSON call {"name": function name, "parameters": arguments}.
{%- for t in tools %}
{{ t | tojson(indent=4) }}
{%- endfor %}<|eot_id|>
{%- endif %}
{%- for m in messages %}
{%- if m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{%- for tc in m.tool_calls %}{"name": "{{ tc.function.name }}", "parameters": \
{{ tc.function.arguments | tojson }}}{% endfor %}<|eot_id|>
{%- elif m.role == "tool" %}<|start_header_id|>ipython<|end_header_id|>

{{ m.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{{ m.content }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 8},
                                  "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                  "maximum": 12}},
        "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "20 C"},
    {"role": "user", "content": "And the time?"},
]


def _check_call(name: str, args: dict) -> None:
    tool = next(t for t in TOOLS if t["function"]["name"] == name)
    jsonschema.validate(args, tool["function"]["parameters"])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tools")
    # char-level tokens: the tools' JSON alone is hundreds of them
    d, hf = make_tiny_model(root / "base", "llama", max_position_embeddings=2048)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = HERMES_TEMPLATE
    tok.save_pretrained(d)
    return d, {"a1": str(make_peft_adapter(hf, root / "a1", seed=1, r=4))}


# ---------------------------------------------------------------- templates and parsers
@pytest.mark.parametrize("template", [HERMES_TEMPLATE, LLAMA3_TEMPLATE],
                         ids=["hermes", "llama3"])
def test_rendering_equals_transformers(models, template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models[0])
    tok.chat_template = template
    # transformers' documented input: tool-call arguments as objects
    reference_messages = [dict(m) for m in HISTORY]
    reference_messages[1] = {**HISTORY[1], "tool_calls": [
        {**HISTORY[1]["tool_calls"][0], "function": {
            "name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]}
    text = tok.apply_chat_template(reference_messages, tools=TOOLS, tokenize=False,
                                   add_generation_prompt=True)
    assert '"get_time"' in text and '"city": "Paris"' in text  # tools and history rendered
    want = tok.encode(text, add_special_tokens=False)
    prompts = PromptTokenizer(tok, max_model_len=100_000)
    try:  # the server's path: OpenAI messages (arguments as JSON text) -> template
        got = asyncio.run(prompts.chat(template_messages(HISTORY), True, 10_000, tools=TOOLS))
    finally:
        prompts.shutdown()
    assert got == want


def test_detect_parser():
    assert detect_parser(HERMES_TEMPLATE) == "hermes"
    assert detect_parser(LLAMA3_TEMPLATE) == "llama3_json"
    assert detect_parser("{{ messages }}") is None


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_parsers_round_trip(parser):
    calls = [ToolCall("get_weather", {"city": "Zürich", "unit": "c"}),
             ToolCall("get_time", {"zone": -3, "nested": {"a": [1, 2]}})]
    key = "arguments" if parser == "hermes" else "parameters"
    bodies = [json.dumps({"name": c.name, key: c.arguments}, ensure_ascii=False) for c in calls]
    if parser == "hermes":
        text = "Let me check.\n" + "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in bodies)
        content = "Let me check."
    else:
        text = "<|python_tag|>" + "; ".join(bodies)
        content = None
    got_content, got = parse_tool_calls(parser, text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == [(c.name, c.arguments) for c in calls]
    # OpenAI form: arguments as a JSON string that loads back to the same object
    for c, g in zip(calls, got):
        o = g.to_openai()
        assert o["type"] == "function" and o["id"].startswith("call_")
        assert json.loads(o["function"]["arguments"]) == c.arguments


@pytest.mark.parametrize("parser, text", [
    ("hermes", "no call here {\"name\": \"x\"}"),
    ("hermes", "<tool_call>\n{not json}\n</tool_call>"),
    ("llama3_json", "Hello {\"name\": \"x\", \"parameters\": {}}"),
    ("llama3_json", '{"name": "x", "parameters": {'),
    ("llama3_json", '{"nom": "x"}'),
])
def test_parsers_leave_plain_text_alone(parser, text):
    assert parse_tool_calls(parser, text) == (text, [])


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_stream_holds_back_only_possible_calls(parser):
    call = ('<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool_call>'
            if parser == "hermes" else '{"name": "get_time", "parameters": {"zone": 1}}')
    lead = "Sure. " if parser == "hermes" else ""
    s = ToolCallStream(parser)
    sent = "".join(s.feed(ch) for ch in lead + call)
    assert sent == lead  # the call itself never leaks out as content
    rest, calls = s.finish()
    assert rest == "" and [(c.name, c.arguments) for c in calls] == [("get_time", {"zone": 1})]
    plain = ToolCallStream(parser)
    text = "Just text < here {x}"
    sent = "".join(plain.feed(ch) for ch in text)
    rest, calls = plain.finish()
    assert sent + rest == text and not calls
    assert len(sent) >= len("Just text")  # plain text streams as it comes


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_forced_calls_from_random_model_parse_and_validate(models, parser):
    d, adapters = models
    llm = LLM(str(d), adapters=adapters, device="cpu", max_lora_rank=8)
    guided = forced_call_grammar(parser, TOOLS)
    outs = llm.generate(["call"] * 24, [SamplingParams(max_tokens=150, temperature=1.0, seed=i,
                                                       guided=guided) for i in range(24)],
                        adapters=[[None, "a1"][i % 2] for i in range(24)])
    names = set()
    for out in outs:
        assert out.finish_reason == "stop", out
        content, calls = parse_tool_calls(parser, out.text)
        assert len(calls) == 1 and not content, out.text
        _check_call(calls[0].name, calls[0].arguments)
        names.add(calls[0].name)
    assert names == {"get_weather", "get_time"}


# ---------------------------------------------------------------- through the server
@pytest.fixture(scope="module")
def server(models):
    d, adapters = models
    with openai_client_on(d, adapters, num_kv_blocks=128, max_lora_rank=8) as client:
        yield client


def _stream_calls(client, **kw):
    content, calls, reasons = "", {}, []
    for chunk in client.chat.completions.create(stream=True, **kw):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        if choice.finish_reason:
            reasons.append(choice.finish_reason)
    return content, [calls[k] for k in sorted(calls)], reasons


@pytest.mark.parametrize("model", ["tiny", "a1"])
def test_required_tool_call_full_and_streamed(server, model):
    kw = dict(model=model, messages=HISTORY, tools=TOOLS, tool_choice="required",
              temperature=1.0, max_tokens=150)
    for seed in range(3):
        r = server.chat.completions.create(seed=seed, **kw)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and len(msg.tool_calls) == 1
        tc = msg.tool_calls[0]
        assert tc.type == "function" and tc.id.startswith("call_")
        _check_call(tc.function.name, json.loads(tc.function.arguments))
        content, calls, reasons = _stream_calls(server, seed=seed, **kw)
        assert reasons == ["tool_calls"] and content == ""
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
            [(tc.function.name, json.loads(tc.function.arguments))]


def test_named_function_is_the_one_called(server):
    for seed in range(3):
        r = server.chat.completions.create(
            model="tiny", messages=HISTORY[:1], tools=TOOLS, seed=seed, max_tokens=150,
            tool_choice={"type": "function", "function": {"name": "get_time"}})
        (tc,) = r.choices[0].message.tool_calls
        assert tc.function.name == "get_time"
        _check_call("get_time", json.loads(tc.function.arguments))


def test_auto_parses_what_the_model_wrote(server):
    # a regex makes the random model write content followed by a hermes tool call
    written = 'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": 2}}\n</tool_call>'
    kw = dict(model="tiny", messages=HISTORY, tools=TOOLS, tool_choice="auto", max_tokens=200,
              extra_body={"guided_regex": re.escape(written)})
    msg = server.chat.completions.create(**kw).choices[0].message
    assert msg.content == "Sure."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls] == \
        [("get_time", {"zone": 2})]
    content, calls, reasons = _stream_calls(server, **kw)
    assert content == "Sure.\n" and reasons == ["tool_calls"]
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_time", '{"zone": 2}')]
    # tool_choice "none": the same text is plain content
    r = server.chat.completions.create(**{**kw, "tool_choice": "none"})
    assert r.choices[0].message.content == written and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    # no call written: plain content, finish_reason as usual
    r = server.chat.completions.create(model="tiny", messages=HISTORY, tools=TOOLS,
                                       extra_body={"guided_regex": "[a-z ]{3,9}"})
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert re.fullmatch("[a-z ]{3,9}", r.choices[0].message.content)


@pytest.mark.parametrize("kw, param", [
    (dict(tool_choice="required"), "tool_choice"),  # no tools
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice"),
    (dict(tools=TOOLS, tool_choice="required",
          response_format={"type": "json_object"}), "tool_choice"),
    (dict(tools=TOOLS, tool_choice="sometimes"), None),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), None),
])
def test_bad_tool_requests_are_400(server, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        server.chat.completions.create(model="tiny", messages=HISTORY[:1], max_tokens=4, **kw)
    if param is not None:
        assert err.value.body["param"] == param


def test_tool_call_parser_flag(tmp_path):
    import argparse

    from loraplex.server.api import ServerConfig, add_serve_args, server_config_from_args

    parser = add_serve_args(argparse.ArgumentParser())
    args = parser.parse_args(["--model", str(tmp_path), "--tool-call-parser", "llama3_json"])
    assert server_config_from_args(args).tool_call_parser == "llama3_json"
    assert server_config_from_args(parser.parse_args(["--model", str(tmp_path)])) \
        .tool_call_parser is None  # detected from the template
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", str(tmp_path), "--tool-call-parser", "mistral"])
    with pytest.raises(ValueError, match="tool-call-parser"):
        ServerConfig("m", str(tmp_path), {}, tool_call_parser="mistral")
