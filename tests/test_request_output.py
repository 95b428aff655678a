"""A running request's ``RequestOutput`` hands out views of its token ids and logprobs
(``Prefix``), not copies: each step's output keeps exactly that step's tokens and logprobs
after later steps append more, reads like a list, and the finishing output holds plain lists
equal to what the steps handed out."""

from __future__ import annotations

import copy
import pickle

import pytest
from helpers_lora import make_peft_adapter, make_tiny_model

from loraplex import LLM, SamplingParams
from loraplex.engine.sequence import Prefix


def test_prefix_reads_like_the_list_as_it_was():
    items = [10, 11, 12]
    view = Prefix(items)
    items += [13, 14]  # appended after the snapshot: invisible to it
    assert len(view) == 3 and list(view) == [10, 11, 12]
    assert view == [10, 11, 12] and [10, 11, 12] == view and view == (10, 11, 12)
    assert view != [10, 11, 12, 13] and view != [10, 11]
    assert view[-1] == 12 and view[0] == 10
    with pytest.raises(IndexError):
        view[3]  # exists in the list, but not in the snapshot
    with pytest.raises(IndexError):
        view[-4]
    assert view[1:] == [11, 12] and view[5:] == [] and view[::-1] == [12, 11, 10]
    assert type(view[1:]) is list
    assert view + [0] == [10, 11, 12, 0] and [0] + view == [0, 10, 11, 12]
    assert 12 in view and 13 not in view
    for clone in (pickle.loads(pickle.dumps(view)), copy.copy(view), copy.deepcopy(view)):
        assert type(clone) is list and clone == [10, 11, 12]
    assert repr(view) == "[10, 11, 12]"


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("request_output")
    d, hf = make_tiny_model(root / "base", "llama")
    lora = make_peft_adapter(hf, root / "a", seed=1, r=4, lora_alpha=8, b_scale=0.5)
    return LLM(str(d), adapters={"a": str(lora)}, device="cpu", max_num_seqs=4, max_lora_rank=4)


def test_streamed_outputs_keep_their_step_and_match_generate(llm):
    engine = llm.engine
    prompts = [[1, 40, 50, 60], [1, 70, 80]]
    sp = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True, logprobs=2)
    for i, (p, a) in enumerate(zip(prompts, ["a", None], strict=True)):
        engine.add_request(f"s{i}", p, sp, a)
    steps: dict[str, list] = {"s0": [], "s1": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            # what the step saw, read now: later appends must not show through
            steps[out.request_id].append((out, list(out.token_ids), list(out.logprobs)))
    want = llm.generate(prompts, sp, adapters=["a", None])
    for rid, ref in zip(["s0", "s1"], want, strict=True):
        outs = steps[rid]
        assert [len(seen) for _, seen, _ in outs] == list(range(1, 10))
        final = outs[-1][0]
        assert final.finished and type(final.token_ids) is list
        assert type(final.logprobs) is list
        assert final.token_ids == ref.token_ids
        assert [e.token_id for e in final.logprobs] == ref.token_ids
        assert [e.logprob for e in final.logprobs] == [e.logprob for e in ref.logprobs]
        for k, (out, seen_ids, seen_lps) in enumerate(outs[:-1], start=1):
            assert isinstance(out.token_ids, Prefix) and isinstance(out.logprobs, Prefix)
            assert len(out.token_ids) == len(out.logprobs) == k  # still k, steps later
            assert out.token_ids == seen_ids == ref.token_ids[:k]
            assert out.logprobs == seen_lps == final.logprobs[:k]
            assert out.token_ids[k - 1:] == [ref.token_ids[k - 1]]  # the step's new token
