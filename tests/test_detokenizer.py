"""Streaming text: incremental detokenization, stop strings and the held-back tail.

The reference for text is the tokenizer's own ``decode`` of the whole output. The engine runs
for real on the shipped demo model (its tokenizer is one character per token, so every stop
string of two or more characters crosses a token boundary); cases that need bytes split across
tokens swap in a byte-fallback tokenizer (as Llama's and Mistral's have) and script the
sampled ids, since no shipped model emits them.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from loraplex import LLM, SamplingParams, demo
from loraplex.engine.detokenizer import visible_text
from loraplex.engine.sampler import SamplerOutput

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # the demo model's ids 0..3 (EOS = 2)
PIECES = SPECIALS + [chr(c) for c in range(32, 127)] + [f"<0x{b:02X}>" for b in range(256)]
PIECES.append("\ufffd")  # a token whose text is U+FFFD itself (vocabularies have one)
VOCAB = {piece: i for i, piece in enumerate(PIECES)}


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def llm() -> LLM:
    model_dir, adapters = demo.paths()
    return LLM(model_dir, adapters=adapters, device="cpu")


def stream(llm: LLM, prompt, params: SamplingParams) -> list:
    """Every output the engine gives for one request, step by step (the last one finished)."""
    engine = llm.engine
    engine.add_request("r", prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == "r"]
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    return outs


@pytest.fixture
def scripted(llm, monkeypatch):
    """The demo engine with the byte-fallback tokenizer, sampling the given pieces in order."""
    engine = llm.engine
    tok = byte_fallback_tokenizer()
    monkeypatch.setattr(engine, "tokenizer", tok)

    def run(pieces: list[str], params: SamplingParams):
        ids = [VOCAB[p] for p in pieces]
        monkeypatch.setattr(engine.runner, "run", lambda batch: SamplerOutput(
            [ids[len(s.output_token_ids)] for s in batch.sampling_seqs],
            [True] * len(batch.sampling_seqs)))
        outs = stream(llm, [VOCAB[c] for c in "in: x out: "], params)
        assert outs[-1].token_ids == ids
        return tok, outs

    return run


def test_visible_text_holds_back_a_possible_stop_string_start():
    assert visible_text("hello wo", ["world"]) == "hello "
    assert visible_text("hello w", ["xyz", "wo", "lo w!"]) == "hel"  # the longest hold wins
    assert visible_text("hello", ["world"]) == "hello"
    assert visible_text("hel", []) == "hel"
    assert visible_text("wor", ["world"]) == ""  # shorter than the stop string
    assert visible_text("hello world", ["world"]) == "hello world"  # found: cut by the engine


def test_stop_string_across_tokens_is_cut_and_never_streamed(llm):
    outs = stream(llm, demo.prompt("hello world"), SamplingParams(max_tokens=20, stop=["lo w"]))
    assert outs[-1].text == "hel" and outs[-1].finish_reason == "stop"
    # "hel" ends with "l", a possible start of "lo w": held back until it cannot be
    assert [o.text for o in outs] == ["h", "he", "he", "hel", "hel", "hel", "hel"]


def test_held_back_text_is_released_when_the_stop_string_does_not_follow(llm):
    outs = stream(llm, demo.prompt("hello world"), SamplingParams(max_tokens=20, stop=["lo x"]))
    final = outs[-1]
    assert final.text == "hello world" and final.finish_reason == "stop"  # by EOS
    texts = [o.text for o in outs]
    assert "he" in texts and texts.count("hel") >= 3  # "l", "lo", "lo " held in turn
    assert all(final.text.startswith(t) for t in texts)  # a stream never takes text back


def test_character_split_across_tokens_streams_whole(scripted):
    tok, outs = scripted(["h", "<0xE2>", "<0x82>", "<0xAC>", "!"], SamplingParams(max_tokens=5))
    assert outs[-1].text == tok.decode(outs[-1].token_ids) == "h\u20ac!"
    assert [o.text for o in outs] == ["h", "h", "h", "h\u20ac", "h\u20ac!"]


def test_genuine_trailing_replacement_character_is_kept(scripted):
    """U+FFFD as the last token (at the length limit, or before EOS) is the model's text."""
    tok, outs = scripted(["o", "k", "\ufffd"], SamplingParams(max_tokens=3))
    assert outs[-1].finish_reason == "length"
    assert outs[-1].text == tok.decode(outs[-1].token_ids) == "ok\ufffd"
    tok, outs = scripted(["o", "k", "\ufffd", "</s>"], SamplingParams(max_tokens=9))
    assert outs[-1].finish_reason == "stop"
    assert outs[-1].text == tok.decode(outs[-1].token_ids, skip_special_tokens=True) == "ok\ufffd"


def test_character_cut_off_by_the_length_limit_decodes_as_the_tokenizer_does(scripted):
    tok, outs = scripted(["a", "<0xE2>", "<0x82>"], SamplingParams(max_tokens=3))
    assert outs[-1].text == tok.decode(outs[-1].token_ids) == "a\ufffd\ufffd"
    assert [o.text for o in outs[:-1]] == ["a", "a"]  # incomplete: not streamed before the end


def test_replacement_character_mid_output_is_kept(scripted):
    tok, outs = scripted(["\ufffd", "x"], SamplingParams(max_tokens=2))
    assert outs[-1].text == tok.decode(outs[-1].token_ids) == "\ufffdx"


def test_token_window_equals_slicing_all_token_ids():
    from loraplex.engine.sequence import Sequence

    seq = Sequence(0, "r", [1, 2, 3, 4, 5], SamplingParams())
    seq.output_token_ids = [6, 7, 8]
    whole = seq.all_token_ids
    for start in range(0, 9):
        for end in [None, *range(start, 9)]:
            assert seq.token_window(start, end) == whole[start:end], (start, end)
