"""Structured outputs over HTTP: OpenAI's ``response_format`` and vLLM's ``guided_*`` fields
on chat and completions, read by the official ``openai`` client (streaming too), and
malformed or conflicting constraints answered with a 400 naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from helpers_lora import make_peft_adapter, make_tiny_model
from server_utils import openai_client_on
from test_guided import SCHEMA

FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA,
                                                 "strict": True}}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("guided_srv")
    d, hf = make_tiny_model(root / "base", "llama")
    adapters = {"a1": str(make_peft_adapter(hf, root / "a1", seed=1, r=4))}
    with openai_client_on(d, adapters, num_kv_blocks=128, max_lora_rank=8) as client:
        yield client


@pytest.mark.parametrize("model", ["tiny", "a1"])
def test_chat_response_format_json_schema(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                       response_format=FORMAT, n=4, seed=3, max_tokens=150)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], response_format=FORMAT,
        seed=3, max_tokens=150, stream=True))
    assert text == r.choices[0].message.content  # same seed, same draw, streamed


def test_completions_response_format_and_guided_json(client):
    for extra in ({"response_format": FORMAT}, {"guided_json": SCHEMA},
                  {"guided_json": json.dumps(SCHEMA)}):
        r = client.completions.create(model="a1", prompt="The", max_tokens=150, seed=1,
                                      extra_body=extra)
        jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_json_object(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"}, seed=2,
                                       max_tokens=200, temperature=0.7)
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_guided_choice_regex_grammar(client):
    choices = ["red", "green", "blue"]
    r = client.completions.create(model="tiny", prompt=["a", "b"], n=3, max_tokens=10, seed=0,
                                  extra_body={"guided_choice": choices})
    assert len(r.choices) == 6 and all(c.text in choices for c in r.choices)
    stream = client.completions.create(model="a1", prompt="z", max_tokens=30, stream=True,
                                       extra_body={"guided_regex": r"[0-9]{3}-[a-c]{2,5}"})
    assert re.fullmatch(r"[0-9]{3}-[a-c]{2,5}", "".join(c.choices[0].text for c in stream))
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=30,
        extra_body={"guided_grammar": 'root ::= "x" ("y" | "z")+ "!"'})
    assert re.fullmatch(r"x[yz]+!", r.choices[0].message.content)


def test_response_format_text_constrains_nothing(client):
    kw = dict(model="tiny", prompt="The cat", max_tokens=12, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    same = client.completions.create(extra_body={"response_format": {"type": "text"}}, **kw)
    assert same.choices[0].text == plain


@pytest.mark.parametrize("extra, param", [
    ({"guided_regex": "(a"}, "guided_regex"),
    ({"guided_json": {"type": 5}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": "root ::= "}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": 7}}}}}},
     "response_format"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "response_format"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_regex"),
])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_bad_constraints_are_400(client, extra, param, endpoint):
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "chat":
            client.chat.completions.create(model="tiny", max_tokens=4, extra_body=extra,
                                           messages=[{"role": "user", "content": "q"}])
        else:
            client.completions.create(model="tiny", prompt="q", max_tokens=4, extra_body=extra)
    assert err.value.body["param"] == param, err.value.body


def test_unknown_response_format_fields_are_refused(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": SCHEMA, "bogus": 1}})
