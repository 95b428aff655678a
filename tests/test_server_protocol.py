"""The HTTP protocol, honestly: unknown fields are refused by name on every endpoint, a
``max_tokens`` the context cannot hold is a 400 with the numbers, vLLM's extra routes
(``/v1/models/{id}``, ``/tokenize``, ``/detokenize``, ``/version``), malformed JSON located,
and OpenAI's logprob shapes (completions, chat, echo, ``best_of``, streaming) parsed by the
official ``openai`` client.

The server runs in this process over the shipped demo model (``server_fakes``).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from server_fakes import demo_server, demo_tokenizer, openai_client

from loraplex import demo

PHRASE = "hello world"


@pytest.fixture(scope="module")
def srv():
    with demo_server() as server:
        yield server


@pytest.fixture(scope="module")
def client(srv) -> openai.OpenAI:
    return openai_client(srv)


@pytest.fixture(scope="module")
def tok():
    return demo_tokenizer()


def post(srv, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{srv.base_url}{path}", content=content, timeout=60,
                      headers={"Content-Type": "application/json"})


# ------------------------------------------------------------------ unknown fields

VALID_BODIES = {
    "/v1/completions": {"model": "demo", "prompt": "in: a\nout: ", "max_tokens": 2},
    "/v1/chat/completions": {"model": "demo", "messages": [{"role": "user", "content": "a"}],
                             "max_tokens": 2},
    "/tokenize": {"model": "demo", "prompt": "abc"},
    "/detokenize": {"model": "demo", "tokens": [40, 41]},
    "/v1/load_lora_adapter": {"lora_name": "x", "lora_path": "y"},
    "/v1/unload_lora_adapter": {"lora_name": "x"},
}
# OpenAI / vLLM fields loraplex does not (yet) honour, and plain typos: all must be refused.
UNKNOWN = [{"suffix": "x"}, {"functions": []}, {"temprature": 0.5},
           {"bogus": 1, "other_bogus": [1]}]


@pytest.mark.parametrize("path", list(VALID_BODIES))
@pytest.mark.parametrize("extra", UNKNOWN, ids=lambda e: "+".join(e))
def test_unknown_fields_are_400_naming_them(srv, path, extra):
    r = post(srv, path, {**VALID_BODIES[path], **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    for name in extra:
        assert name in err["message"]
    assert err["param"] in extra


def test_unknown_nested_field_is_400(srv):
    body = {**VALID_BODIES["/v1/completions"], "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    r = post(srv, "/v1/completions", body)
    assert r.status_code == 400 and "continuous_usage_stats" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_every_listed_field_is_accepted(srv, path):
    """The fields the docs list as honoured are accepted (not 400) with non-neutral values."""
    body = {**VALID_BODIES[path], "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.01,
            "seed": 1, "stop": ["zz"], "stop_token_ids": [2], "ignore_eos": True, "n": 2,
            "best_of": 3, "presence_penalty": 0.5, "frequency_penalty": 0.5,
            "repetition_penalty": 1.1, "min_tokens": 1, "logit_bias": {"40": 1.5},
            "include_stop_str_in_output": True, "user": "someone"}
    body |= {"logprobs": 2, "echo": True} if "chat" not in path else \
        {"logprobs": True, "top_logprobs": 2, "max_completion_tokens": 2}
    r = post(srv, path, body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2


@pytest.mark.parametrize("body, param", [
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"n": 3, "best_of": 2}, "best_of"), ({"best_of": 2, "stream": True}, "best_of"),
    ({"logprobs": 21}, "logprobs"), ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty")])
def test_out_of_range_values_are_400(srv, body, param):
    r = post(srv, "/v1/completions", {**VALID_BODIES["/v1/completions"], **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_chat_top_logprobs_needs_logprobs(srv):
    r = post(srv, "/v1/chat/completions", {**VALID_BODIES["/v1/chat/completions"],
                                           "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


# ------------------------------------------------------------------ context, JSON


def test_max_tokens_beyond_the_context_is_400_with_the_numbers(srv, client, tok):
    prompt = demo.prompt(PHRASE)
    n = len(tok.encode(prompt))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=prompt, max_tokens=128 - n + 1)
    msg = e.value.body["message"]
    assert "128" in msg and str(129) in msg and f"{n} in the prompt" in msg
    assert e.value.body["param"] == "max_tokens"
    # exactly filling the context is fine
    r = client.completions.create(model="demo", prompt=prompt, max_tokens=128 - n,
                                  temperature=0)
    assert r.choices[0].text == PHRASE
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", max_tokens=200,
                                       messages=[{"role": "user", "content": PHRASE}])
    assert f"{n} in the messages" in e.value.body["message"]


@pytest.mark.parametrize("body, where", [
    (b'{"model": "demo",\n "prompt": x}', "line 2 column 12 (char 29)"),
    (b'{"model": "demo", "prompt": "a",}', "line 1 column 33 (char 32)")])
def test_invalid_json_says_where(srv, body, where):
    r = post(srv, "/v1/completions", body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert where in err["message"] and err["param"] is None
    with pytest.raises(json.JSONDecodeError) as e:  # the same place json.loads names
        json.loads(body)
    assert where in str(e.value)


# ------------------------------------------------------------------ routes


def test_models_retrieve(client):
    assert client.models.retrieve("demo").id == "demo"
    card = client.models.retrieve("caesar")
    assert card.id == "caesar" and card.owned_by == "loraplex"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert "nope" in e.value.body["message"]


def test_tokenize_and_detokenize(srv, tok):
    r = post(srv, "/tokenize", {"model": "upper", "prompt": "in: ab", "return_token_strs": True})
    assert r.status_code == 200
    ids = tok.encode("in: ab")
    assert r.json() == {"count": len(ids), "max_model_len": 128, "tokens": ids,
                        "token_strs": tok.convert_ids_to_tokens(ids)}
    chat = post(srv, "/tokenize", {"messages": [{"role": "user", "content": PHRASE}]}).json()
    assert chat["tokens"] == tok.encode(demo.prompt(PHRASE)) and chat["token_strs"] is None
    back = post(srv, "/detokenize", {"model": "demo", "tokens": ids})
    assert back.json() == {"prompt": "in: ab"}
    assert post(srv, "/detokenize", {"tokens": [100_000]}).status_code == 400
    assert post(srv, "/tokenize", {"model": "nope", "prompt": "a"}).status_code == 404
    assert post(srv, "/tokenize", {"model": "demo"}).status_code == 400  # neither form


def test_version(srv):
    r = httpx.get(f"{srv.base_url}/version")
    assert r.status_code == 200 and isinstance(r.json()["version"], str)


# ------------------------------------------------------------------ demo chat


@pytest.mark.parametrize("adapter", [None, *demo.ADAPTERS])
def test_demo_answers_chat(client, adapter):
    r = client.chat.completions.create(model=adapter or "demo", temperature=0,
                                       messages=[{"role": "user", "content": PHRASE}])
    assert r.choices[0].message.content == demo.expected(PHRASE, adapter)
    assert r.choices[0].finish_reason == "stop"


def test_shipped_chat_template_renders_the_trained_prompt(tok, srv):
    cfg = json.loads((Path(demo.paths()[0]) / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == demo.CHAT_TEMPLATE  # train.py writes the same one
    for phrase in ("a", "hello world", "two  spaces "):
        msgs = [{"role": "user", "content": phrase}]
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) \
            == demo.prompt(phrase)
    r = post(srv, "/v1/chat/completions", {"model": "demo", "messages": [
        {"role": "system", "content": "be nice"}, {"role": "user", "content": PHRASE}]})
    assert r.status_code == 400 and "one user message" in r.json()["error"]["message"]


def test_demo_serve_printed_examples_work(srv, capsys, monkeypatch):
    """The commands ``loraplex demo --serve`` prints (curl and the openai client, completions
    and chat) run as printed against a demo server and give the adapters' answers."""
    import argparse
    import subprocess

    import loraplex.server.api as api
    from loraplex.demo import run

    monkeypatch.setattr(api, "run_server", lambda args: None)
    run._serve(argparse.Namespace(port=srv.port, device="cpu"), *demo.paths())
    text = capsys.readouterr().out
    commands = [c.strip() for c in text.split("\n\n") if c.strip().startswith(("curl", "python"))]
    assert len(commands) == 3
    outputs = [subprocess.run(["bash", "-c", c], capture_output=True, text=True, timeout=120,
                              check=True).stdout for c in commands]
    completion, chat = (json.loads(o) for o in outputs[:2])
    assert completion["choices"][0]["text"] == demo.expected(PHRASE, "reverse")
    assert chat["choices"][0]["message"]["content"] == demo.expected(PHRASE, "upper")
    assert outputs[2].split("\n")[:2] == [demo.expected(PHRASE, "caesar"),
                                          demo.expected(PHRASE, "reverse")]
