"""bench_decode_gpu.py's two sides compute the same model: the transformers reference built on
views of the engine model's weights gives the engine's logits, and a decode step over
injected (not prefilled) sequences equals the step a real prefill would lead to."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import decode_hf  # noqa: E402
from decode_engine import (  # noqa: E402
    build_engine,
    build_model,
    inject_decoding,
    model_config,
)

from loraplex.sampling_params import SamplingParams  # noqa: E402

SHAPE = (2, 64, 128, 4, 2, 16, 512, True)  # layers, hidden, inter, heads, kv, d, vocab, tied


def test_hf_views_share_storage_and_match_the_engine():
    cfg = model_config(SHAPE, max_position=4096)
    cpu = torch.device("cpu")
    model = build_model(cfg, cpu, torch.float32)
    hf = decode_hf.build_hf(cfg, decode_hf.weight_views(model, cfg), cpu)
    qkv = model.model.layers[1].self_attn.qkv_proj.weight
    assert hf.model.layers[1].self_attn.v_proj.weight.data_ptr() > qkv.data_ptr()
    assert hf.model.layers[1].self_attn.v_proj.weight.untyped_storage().data_ptr() == \
        qkv.untyped_storage().data_ptr()  # a view, not a copy
    engine = build_engine(model, cfg, cpu, torch.float32, [], 16, max_num_seqs=2,
                          max_model_len=256, num_blocks=32)
    ids = torch.randint(3, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    ours = engine.score([ids.tolist()], [None])[0]
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_injected_decode_step_equals_a_prefilled_one():
    """An injected request's decode step reads the KV blocks it was given: with the KV a real
    prefill wrote copied in, its logits are the prompt's next-token logits; with the random
    contents they are not. So the benchmark times a real decode at the requested context."""
    cfg = model_config(SHAPE, max_position=4096)
    cpu = torch.device("cpu")
    engine = build_engine(build_model(cfg, cpu, torch.float32), cfg, cpu, torch.float32, [],
                          16, max_num_seqs=2, max_model_len=256, num_blocks=32)
    # the step below must prefill "real" alone (chunked prefill would decode the injected
    # request in the same step)
    engine.scheduler.cfg = dataclasses.replace(engine.scheduler.cfg,
                                               enable_chunked_prefill=False)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    (rid,) = inject_decoding(engine, 37, params, [None])
    seq = engine.requests[rid]
    want = engine.score([seq.prompt_token_ids], [None])[0][-1]

    def decode_logits():
        return engine.runner._decode([seq], [-1])[0].clone()

    assert (decode_logits() - want).abs().max() > 1e-2 * want.abs().max()  # random prefix
    engine.add_request("real", list(seq.prompt_token_ids), params)
    real = engine.scheduler.waiting[0]
    engine.step()  # prefill of "real" only: writes the prompt's K/V
    src, dst = engine.blocks.tables[real.seq_id], engine.blocks.tables[seq.seq_id]
    for k, v in engine.kv_caches:
        k[dst] = k[src]
        v[dst] = v[src]
    assert (decode_logits() - want).abs().max() <= 1e-4 * want.abs().max()
    outs = {o.request_id: o.token_ids for o in engine.step()}  # a whole step over both
    assert outs[rid] == [int(want.argmax())]
