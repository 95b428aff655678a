"""What the CPU LoRA path allocates per step, counted by torch's profiler (every CPU tensor
allocation, with its size), not inferred from buffer addresses.

- The per-step LoRA metadata (``LoRAManager.prepare``) is written into preallocated buffers:
  no allocation at all, prefill or decode.
- The float32 ops allocate only their products, never a copy of adapter weights: per call,
  at most ``tokens x width x 4`` bytes (``width`` = the stacked rank columns for shrink,
  the output columns for expand).
- The gate/up expand fused into the activation allocates the activation's output, as the
  activation does without LoRA, and nothing else (its scratch is made once and kept); the
  norms with the expand and shrink on either side fused in allocate their output, as the
  norm does without LoRA; the rotary with the qkv expand fused in allocates nothing (it
  rotates in place, as it does without LoRA).
"""

from __future__ import annotations

import torch
from helpers_lora import make_peft_adapter, make_tiny_model
from torch.profiler import ProfilerActivity, profile

from loraplex import LLM, SamplingParams
from loraplex.lora.layers import LoRANorm, LoRARotary
from loraplex.ops import lora_cpu


def allocated(fn, *args, **kwargs):
    """(fn's result, [bytes of each CPU allocation fn made])."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args, **kwargs)
    return result, [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]


def test_probe_sees_allocations():
    _, sizes = allocated(torch.empty, 1000, dtype=torch.float32)
    assert sizes == [4000]


def test_lora_step_metadata_and_ops_allocate_no_weight_copies(tmp_path):
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    dirs = {n: str(make_peft_adapter(hf, tmp_path / n, seed=i, r=4 + 4 * i))
            for i, n in enumerate("abc")}
    llm = LLM(str(d), adapters=dirs, device="cpu", dtype="float32")
    lora = llm.engine.lora_batches
    prepared: list[list[int]] = []
    op_calls: list[tuple[str, int, int, list[int]]] = []  # (op, tokens, width, sizes)

    real_prepare = lora.prepare

    def prepare(*args, **kwargs):
        batch, sizes = allocated(real_prepare, *args, **kwargs)
        prepared.append(sizes)
        return batch

    lora.prepare = prepare
    for w in llm.engine.lora_layers:
        shrink, expand = w.shrink, w.expand

        def spy_shrink(x, a, ranks, batch, out, _op=shrink):
            _, sizes = allocated(_op, x, a, ranks, batch, out)
            op_calls.append(("shrink", batch.num_tokens, a.shape[1], sizes))

        def spy_expand(h, b, ranks, scalings, offsets, batch, y, col_scales=None, _op=expand):
            _, sizes = allocated(_op, h, b, ranks, scalings, offsets, batch, y, col_scales)
            op_calls.append(("expand", batch.num_tokens, b.shape[1], sizes))

        w.shrink, w.expand = spy_shrink, spy_expand
        if w.expand_silu_mul is not None:  # gate/up: the expand fused into the activation
            def spy_fused(h, b, ranks, scalings, offsets, batch, y, col_scales=None, then=None,
                          _op=w.expand_silu_mul):
                out, sizes = allocated(_op, h, b, ranks, scalings, offsets, batch, y, col_scales,
                                       then)
                op_calls.append(("expand+act", batch.num_tokens, b.shape[1], sizes))
                assert out is not None  # float32 on this CPU: the fused path ran
                assert then is not None  # ... with the down projection's shrink inside
                return out

            w.expand_silu_mul = spy_fused
    norms = [m for m in llm.engine.runner.model.modules() if isinstance(m, LoRANorm)]
    assert len(norms) == 2 * len(llm.engine.lora_layers) // 4 + 1  # two a layer, and the last
    for n in norms:
        def spy_norm(x, residual, weight, eps, batch, before=None, then=None,
                     _op=n.add_rms_norm, _n=n):
            out, sizes = allocated(_op, x, residual, weight, eps, batch, before, then)
            op_calls.append(("norm", batch.num_tokens, x.shape[1], sizes))
            assert out is not None  # float32 on this CPU: the fused path ran
            # ... with the expand before it and the shrink after it, where they exist
            assert (before is not None) == (_n.prev is not None)
            assert (then is not None) == (_n.next is not None)
            return out

        n.add_rms_norm = spy_norm

    rotaries = [m for m in llm.engine.runner.model.modules() if isinstance(m, LoRARotary)]
    assert len(rotaries) == len(llm.engine.lora_layers) // 4  # one a layer
    for r in rotaries:
        def spy_rotary(x, cos, sin, batch, before=None, y=None, _op=r.rotary):
            out, sizes = allocated(_op, x, cos, sin, batch, before, y)
            op_calls.append(("rotary", batch.num_tokens, x.shape[1] * x.shape[2], sizes))
            assert out is x  # float32 on this CPU: the fused path ran, in place
            assert before is not None  # ... with the qkv expand inside
            return out

        r.rotary = spy_rotary

    prompts = [[1, 4, 5, 6, 7, 8], [1, 9], [1, 3, 3, 3], [1, 7, 7]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True),
                        adapters=["a", "b", None, "c"])
    assert all(len(o.token_ids) == 4 for o in outs)
    assert len(prepared) == 4 and all(sizes == [] for sizes in prepared), prepared
    # per layer and step: the rotary (the qkv expand inside), the o shrink, the gate/up
    # expand + activation (with the down shrink inside) and the two norms (the o and down
    # expands and the qkv and gate/up shrinks inside), and the final norm (the last down
    # expand inside)
    layers = len(llm.engine.lora_layers) // 4
    assert len(op_calls) == 4 * (5 * layers + 1)
    assert sorted({op for op, *_ in op_calls}) == ["expand+act", "norm", "rotary", "shrink"]
    # the CPU backend writes every product in place (into the destination views): no op
    # allocates at all (test_probe_sees_allocations shows the probe would see it), but for
    # the fused gate/up expand + activation, which allocates exactly the activation's output
    # [tokens, I] (what the activation allocates without LoRA; its scratch is kept), and the
    # norms, which allocate exactly their output [tokens, hidden] (as without LoRA)
    assert all(sizes == [] for op, *_, sizes in op_calls if op in ("rotary", "shrink")), op_calls
    assert all(sizes == [t * w * 4] for op, t, w, sizes in op_calls if op == "norm"), op_calls
    fused = [(t, w, sizes) for op, t, w, sizes in op_calls if op == "expand+act"]
    assert fused and all(sizes[0] == t * (w // 2) * 4 for t, w, sizes in fused), fused
    # the scratch: made on this thread's first fused call (if no earlier test made it), kept
    threads, rank = torch.get_num_threads(), llm.engine.lora_layers[0].buffers.b.shape[2]
    scratch = threads * lora_cpu._native().scratch_floats(fused[0][1] // 2, rank) * 4
    assert fused[0][2][1:] in ([], [scratch]) and all(len(s) == 1 for *_, s in fused[1:]), fused
