"""Structured outputs in the engine: sampled text from a random model always matches the
request's grammar (checked by ``jsonschema`` / ``re``, not by xgrammar), rows with and
without a grammar mix across adapters without changing the unguided rows, and a grammar
failure ends its request alone."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from helpers_lora import make_peft_adapter, make_tiny_model

from loraplex import LLM, SamplingParams
from loraplex.engine.guided import GuidedDecoding, GuidedParams

# Nested object, enum, array, required fields; strings and arrays bounded so a random
# model's draws end within max_tokens (an unbounded string would run ~100 tokens).
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "owl"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                           "vip": {"type": "boolean"}},
            "required": ["id"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "tags", "owner"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("guided")
    d, hf = make_tiny_model(root / "base", "llama")
    adapters = {"a1": str(make_peft_adapter(hf, root / "a1", seed=1, r=4)),
                "a2": str(make_peft_adapter(hf, root / "a2", seed=2, r=8))}
    return LLM(str(d), adapters=adapters, device="cpu", max_num_seqs=64, max_lora_rank=8)


def test_vocab_wider_than_tokenizer(llm):
    # the premise of test_json_schema_draws: masks must cover logits ids the tokenizer lacks
    assert llm.engine.model_config.vocab_size > len(llm.tokenizer)


def test_json_schema_draws_all_validate(llm):
    guided = GuidedParams(json_schema=SCHEMA)
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=i, guided=guided)
              for i in range(100)]
    adapters = [[None, "a1", "a2"][i % 3] for i in range(100)]
    outs = llm.generate(["The cat"] * 100, params, adapters=adapters)
    texts = set()
    for out in outs:
        assert out.finish_reason == "stop", out
        jsonschema.validate(json.loads(out.text), SCHEMA)
        texts.add(out.text)
    assert len(texts) > 50  # really sampled, not one forced string


def test_json_schema_as_text_and_json_object(llm):
    outs = llm.generate(["x", "y"], [
        SamplingParams(max_tokens=120, temperature=1.0, seed=3,
                       guided=GuidedParams(json_schema=json.dumps(SCHEMA))),
        SamplingParams(max_tokens=200, temperature=0.0, guided=GuidedParams(json_object=True)),
    ])
    jsonschema.validate(json.loads(outs[0].text), SCHEMA)
    assert outs[1].text.startswith("{")
    # greedy on a random model may run out of tokens inside the object; if it ends, it parses
    if outs[1].finish_reason == "stop":
        assert isinstance(json.loads(outs[1].text), dict)


def test_regex_and_choice(llm):
    regex = r"(ab|cd)[0-9]{2,4}-[xyz]+!"
    choices = ["yes", "no", "maybe so", 'say "hi"']
    params = ([SamplingParams(max_tokens=60, temperature=1.0, seed=i,
                              guided=GuidedParams(regex=regex)) for i in range(20)]
              + [SamplingParams(max_tokens=20, temperature=1.0, seed=i,
                                guided=GuidedParams(choice=choices)) for i in range(20)])
    outs = llm.generate(["hello"] * 40, params)
    for out in outs[:20]:
        assert out.finish_reason == "stop" and re.fullmatch(regex, out.text), out
    got = {out.text for out in outs[20:]}
    assert got <= set(choices) and len(got) > 1, got
    assert all(out.finish_reason == "stop" for out in outs[20:])


def test_grammar_ends_request_even_with_ignore_eos(llm):
    out = llm.generate(["q"], SamplingParams(max_tokens=30, temperature=1.0, seed=1,
                                             ignore_eos=True,
                                             guided=GuidedParams(choice=["alpha", "beta"])))[0]
    assert out.finish_reason == "stop" and out.text in ("alpha", "beta")


def test_ebnf_grammar(llm):
    grammar = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c] | "zz"'
    outs = llm.generate(["g"] * 8, [SamplingParams(max_tokens=40, temperature=1.0, seed=i,
                                                   guided=GuidedParams(grammar=grammar))
                                    for i in range(8)])
    for out in outs:
        if out.finish_reason == "stop":
            assert re.fullmatch(r"\((?:[a-c]|zz)(?:,(?:[a-c]|zz))*\)", out.text), out
        else:  # ran out of tokens inside the list: still a prefix of the language
            assert re.fullmatch(r"\((?:[a-c]|zz|,)*z?", out.text), out


def test_mixed_batch_leaves_unguided_rows_unchanged(llm):
    prompts = ["The cat sat", "A dog", "owls at night", "the end"]
    free = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True),
            SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=8, ignore_eos=True),
            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)]
    free_adapters = [None, "a1", "a2", "a1"]
    alone = llm.generate(prompts, free, adapters=free_adapters)
    guided = [SamplingParams(max_tokens=120, temperature=1.0, seed=20 + i,
                             guided=GuidedParams(json_schema=SCHEMA)) for i in range(4)]
    guided_adapters = ["a2", None, "a1", "a2"]
    mixed = llm.generate(
        [p for pair in zip(prompts, prompts) for p in pair],
        [p for pair in zip(free, guided) for p in pair],
        adapters=[a for pair in zip(free_adapters, guided_adapters) for a in pair])
    for i, ref in enumerate(alone):
        assert mixed[2 * i].token_ids == ref.token_ids
        jsonschema.validate(json.loads(mixed[2 * i + 1].text), SCHEMA)


def test_rejected_token_fails_only_its_request(llm, monkeypatch):
    accept = GuidedDecoding.accept
    victim = GuidedParams(regex="[a-z]+")

    def flaky(self, seq_id, token):
        seq = next(s for s in llm.engine.requests.values() if s.seq_id == seq_id)
        return (False, False) if seq.params.guided is victim else accept(self, seq_id, token)

    monkeypatch.setattr(GuidedDecoding, "accept", flaky)
    outs = llm.generate(["a", "b"], [
        SamplingParams(max_tokens=8, temperature=1.0, seed=1, guided=victim),
        SamplingParams(max_tokens=20, temperature=1.0, seed=2, guided=GuidedParams(
            choice=["red", "green"]))])
    assert outs[0].finish_reason == "error" and "regex grammar" in outs[0].error
    assert outs[1].finish_reason == "stop" and outs[1].text in ("red", "green")
    assert not llm.engine.runner.guided.matchers  # every matcher dropped with its request


@pytest.mark.parametrize("kwargs, field", [
    ({}, "exactly one"),
    ({"regex": "a", "choice": ["a"]}, "exactly one"),
    ({"regex": "(a"}, "GuidedParams.regex"),
    ({"json_schema": "{not json"}, "GuidedParams.json_schema"),
    ({"json_schema": "[1, 2]"}, "GuidedParams.json_schema"),
    ({"json_schema": {"type": 5}}, "GuidedParams.json_schema"),
    ({"grammar": "root ::= "}, "GuidedParams.grammar"),
    ({"choice": []}, "GuidedParams.choice"),
    ({"choice": ["a", 3]}, "GuidedParams.choice"),
    ({"json_object": "yes"}, "GuidedParams.json_object"),
])
def test_bad_specs_are_refused_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        GuidedParams(**kwargs)


def test_sampling_params_checks_guided_type():
    with pytest.raises(ValueError, match="SamplingParams.guided"):
        SamplingParams(guided={"regex": "a"})


def test_mask_semantics_against_the_vocabulary(tmp_path):
    import torch
    from helpers_lora import make_tokenizer

    tok = make_tokenizer(tmp_path / "tok")
    vocab = 128  # the logits' width: ids past the tokenizer's never allowed under a grammar
    state = GuidedDecoding(tok, vocab, [tok.eos_token_id], max_batch=1)  # grows to 3 rows
    choices = ["ab", "cd", "th!"]
    state.add(7, GuidedParams(choice=choices))
    logits = torch.randn(3, vocab)
    masked = logits.clone()
    state.apply(masked, [5, 7, 9])  # only seq 7 has a grammar
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])
    # reference: the tokens whose text starts one of the choices
    want = {i for i in range(len(tok)) if (s := tok.decode([i])) and not
            tok.convert_ids_to_tokens(i).startswith("<") and any(c.startswith(s) for c in choices)}
    allowed = set(torch.isfinite(masked[1]).nonzero().flatten().tolist())
    assert allowed == want and {tok.convert_ids_to_tokens(i) for i in want} == {"a", "c", "t", "th"}
    assert torch.equal(masked[1, list(allowed)], logits[1, list(allowed)])
