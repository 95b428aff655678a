"""The rotary embedding in C on CPU float32 (``elementwise.cpu_rotary_``, what the base model
runs) and the qkv projection's LoRA expand fused into it (``lora_cpu.lora_rotary_``), wired into
a model by ``lora/layers.LoRARotary``: against torch's rotary bit for bit, against float64
references and against the unfused path."""

from __future__ import annotations

import pytest
import torch
from helpers_cpu import CAN_BUILD, needs_simd

from loraplex.config import RopeConfig
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.ops import lora_cpu
from loraplex.ops.elementwise import cpu_rotary_
from loraplex.ops.lora_testing import (
    build,
    check_declines_when_disabled,
    naive_expand,
    poisoned_h,
)


def tables(t: int, d: int, seed: int, scaling: str | None = None):
    """(cos, sin) [T, 1, d] for random positions, as the model looks them up."""
    rope = RopeConfig(scaling_type=scaling, factor=8.0)
    emb = RotaryEmbedding(d, 8192, rope)
    pos = torch.randint(0, 8192, (t,), generator=torch.Generator().manual_seed(seed))
    return emb.lookup(pos, torch.float32)


@needs_simd
def test_cpu_rotary_is_torchs_bit_for_bit(torch_threads: int) -> None:
    """Head widths past and under 16-wide vectors (and not a multiple of them), row counts past
    16-row blocks, a view of q/k inside a wider qkv row (v untouched), a contiguous tensor,
    [T, d] tables and Llama 3 scaling: in place, equal to ``RotaryEmbedding.rotate``."""
    g = torch.Generator().manual_seed(0)
    for k, (t, heads, d, extra) in enumerate([(1, 3, 64, 0), (17, 20, 64, 512), (40, 5, 24, 7),
                                              (33, 2, 8, 0), (5, 4, 128, 256), (3, 1, 2, 0)]):
        cos, sin = tables(t, d, seed=k, scaling="llama3" if k % 2 else None)
        qkv = torch.randn(t, heads * d + extra, generator=g) * 4
        v0 = qkv[:, heads * d :].clone()
        x = qkv[:, : heads * d].view(t, heads, d)
        want = RotaryEmbedding.rotate((cos, sin), x.clone())
        out = cpu_rotary_(x, cos, sin)
        assert out is x and torch.equal(x, want), (t, heads, d)
        assert torch.equal(qkv[:, heads * d :], v0)
        flat = want.clone()  # [T, d] tables, a contiguous x: the same values
        x2 = RotaryEmbedding.rotate((cos, sin), flat.clone())
        assert torch.equal(cpu_rotary_(flat, cos[:, 0], sin[:, 0]), x2)
    empty = torch.empty(0, 2, 8)
    assert cpu_rotary_(empty, *tables(0, 8, 0)) is empty


def test_cpu_rotary_declines_what_it_does_not_cover(monkeypatch) -> None:
    """None, writing nothing (the layer runs torch's ops): half precision, an odd head width,
    a column stride, tables of another width or row count or dtype, a 2-D input, no AVX-512,
    LORAPLEX_FUSED_ELEMENTWISE=0."""
    x = torch.randn(4, 2, 8)
    x0 = x.clone()
    cos, sin = tables(4, 8, 0)
    assert cpu_rotary_(x.bfloat16(), cos, sin) is None
    assert cpu_rotary_(torch.randn(4, 2, 7), *tables(4, 7, 0)) is None
    assert cpu_rotary_(torch.randn(4, 8, 2).transpose(1, 2), cos, sin) is None
    assert cpu_rotary_(x, *tables(4, 16, 0)) is None
    assert cpu_rotary_(x, *tables(3, 8, 0)) is None
    assert cpu_rotary_(x, cos.double(), sin.double()) is None
    assert cpu_rotary_(x[:, 0], cos, sin) is None
    monkeypatch.setenv("LORAPLEX_FUSED_ELEMENTWISE", "0")
    assert cpu_rotary_(x, cos, sin) is None
    monkeypatch.delenv("LORAPLEX_FUSED_ELEMENTWISE")
    if CAN_BUILD and not isinstance(lora_cpu._native(), str):
        monkeypatch.setattr(lora_cpu._native(), "simd", 0)
        assert cpu_rotary_(x, cos, sin) is None
    assert torch.equal(x, x0)


# (slot pattern, tokens, q/k heads, kv heads, head dim, max rank)
CASES = [("some_none", 40, 6, 2, 16, 8), ("zipf", 300, 4, 2, 32, 16), ("distinct", 7, 3, 1, 8, 16),
         ([3] * 61 + [-1] * 3 + [0] * 9, 73, 20, 4, 64, 16), ([0, 1, -1, 2, 3, 1], 6, 3, 1, 24, 4)]


@needs_simd
def test_fused_rotary_equals_expand_then_rotary(torch_threads: int) -> None:
    """``lora_rotary_`` against float64: every column of qkv (v too) gets its LoRA delta, then
    q and k are rotated. Per-slot ranks incl. 0 and partial (NaN poison past them never read),
    long items and one-row items, base rows exactly ``cpu_rotary_``'s values."""
    for k, (pattern, tokens, heads, kv, d, rank) in enumerate(CASES):
        q_w, kv_w = (heads - kv) * d, kv * d  # heads: q and k heads together
        case = build(3, tokens, pattern, rank, seed=k, widths=(q_w, kv_w, kv_w))
        g = torch.Generator().manual_seed(k)
        y0 = torch.randn(tokens, q_w + 2 * kv_w, generator=g)
        h = poisoned_h(case)
        cos, sin = tables(tokens, d, seed=k)
        y = y0.clone()
        x = y[:, : heads * d].view(tokens, heads, d)
        before = (h, case.b, case.ranks, case.scalings, case.offsets, None)
        out = lora_cpu.lora_rotary_(x, cos, sin, case.batch, before, y)
        assert out is x
        summed = naive_expand(case, h, y0)  # float64: base + delta
        assert not y.isnan().any(), "a poisoned (unused) entry leaked in"
        torch.testing.assert_close(y[:, heads * d :].double(), summed[:, heads * d :],
                                   rtol=1e-5, atol=1e-5)
        want = RotaryEmbedding.rotate((cos.double(), sin.double()),
                                      summed[:, : heads * d].view(tokens, heads, d))
        torch.testing.assert_close(x.double(), want, rtol=1e-5, atol=1e-5)
        base = torch.tensor([s < 0 for s in case.token_lora_slots])
        plain = y0.clone()
        cpu_rotary_(plain[:, : heads * d].view(tokens, heads, d), cos, sin)
        assert torch.equal(y[base], plain[base])


def test_fused_rotary_declines_where_it_does_not_apply(monkeypatch) -> None:
    """None, with qkv untouched, for a y that x is not the leading columns of, a y of another
    width than the expand's, half precision, a pool the C code does not take, no AVX-512 or
    LORAPLEX_FUSED_ELEMENTWISE=0: ``LoRARotary`` then runs the expand and the rotary apart."""
    case = build(3, 9, "distinct", 4, seed=1, widths=(16, 8, 8))
    y = torch.randn(9, 32)
    y0 = y.clone()
    x = y[:, :24].view(9, 3, 8)
    cos, sin = tables(9, 8, 0)
    h = poisoned_h(case)

    def run(before=(h, case.b, case.ranks, case.scalings, case.offsets, None), yy=y, xx=x):
        return lora_cpu.lora_rotary_(xx, cos, sin, case.batch, before, yy)

    assert run(yy=torch.randn(9, 32)) is None
    assert run(xx=y[:, 8:32].view(9, 3, 8)) is None
    assert run(yy=y[:, :31]) is None
    assert run((h, case.b.double(), case.ranks, case.scalings, case.offsets, None)) is None
    check_declines_when_disabled(monkeypatch, run)
    assert torch.equal(y, y0)


@needs_simd
def test_lora_rotary_fused_equals_the_plain_path() -> None:
    """``LoRARotary`` after a qkv ``LoRALinear``: the expand left to the rotary, against the
    same wrappers with the fused op off (expand, then the rotary): the same values within
    rounding, one row (decode) too; an output that reaches the rotary changed is an error, not
    a lost delta; a step that fails in between does not harm the next."""
    from loraplex.layers.forward_context import ForwardBatch, forward_context
    from loraplex.layers.linear import QKVLinear
    from loraplex.layers.rotary import ApplyRotary
    from loraplex.lora.buffers import SlotBuffers
    from loraplex.lora.layers import LoRALinear, LoRARotary
    from loraplex.ops import get_lora_ops
    from loraplex.ops.lora_meta import LoRABatch

    hidden, heads, kv, d, rank = 64, 4, 2, 16, 8
    g = torch.Generator().manual_seed(0)
    ops = get_lora_ops("cpu")
    qkv = QKVLinear(hidden, d, heads, kv, bias=True, tp_size=1, tp_rank=0)
    qkv.weight.data = torch.randn(qkv.out_features, hidden, generator=g) * 0.1
    qkv.bias.data = torch.randn(qkv.out_features, generator=g)
    widths = (heads * d, kv * d, kv * d)
    offsets = (0, widths[0], widths[0] + widths[1], qkv.out_features)
    buffers = SlotBuffers(torch.randn(4, 3 * rank, hidden, generator=g) * 0.1,
                          torch.randn(4, qkv.out_features, rank, generator=g) * 0.1,
                          torch.tensor([[8, 8, 8], [0, 3, 0], [5, 0, 8], [8, 2, 1]],
                                       dtype=torch.int32),
                          torch.rand(4, 3, generator=g) + 0.5, offsets, None)
    for t, slots in [(40, [0] * 6 + [-1] * 4 + [3] * 20 + [1] * 9 + [2]), (1, [3])]:
        w = LoRALinear(qkv, buffers, torch.zeros(t, 3 * rank), ops)
        rot = LoRARotary(ApplyRotary(), w, ops.rotary)
        assert w.defer_to is rot and "prev" not in dict(rot.named_children())
        x = torch.randn(t, hidden, generator=g)
        rope = tables(t, d, seed=t)

        def run(w=w, rot=rot, x=x, rope=rope, t=t):
            y = w(x)
            return rot(rope, y[:, : (heads + kv) * d].view(t, heads + kv, d)), y

        with forward_context(ForwardBatch(is_prefill=True, num_tokens=t, slot_mapping=None,
                                          lora=LoRABatch.from_token_slots(slots))):
            fused, fused_y = run()
            rot.rotary = None
            plain, plain_y = run()
            rot.rotary = ops.rotary
            torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fused_y, plain_y, rtol=1e-5, atol=1e-6)
            with pytest.raises(RuntimeError, match="did not reach the layer"):
                rot(rope, w(x).clone()[:, : (heads + kv) * d].view(t, heads + kv, d))
            w(x)  # a step that fails between the projection and its rotary ...
        with forward_context(ForwardBatch(is_prefill=True, num_tokens=t, slot_mapping=None,
                                          lora=None)):
            y = w(x)  # ... leaves the next step unharmed
            out = rot(rope, y[:, : (heads + kv) * d].view(t, heads + kv, d))
            want = qkv(x)
            torch.testing.assert_close(
                out, RotaryEmbedding.rotate(rope, want[:, : (heads + kv) * d].view(t, heads + kv,
                                                                                    d)))


def test_rotary_wiring_follows_the_model(tmp_path) -> None:
    """A Llama's layers get ``LoRARotary`` (with the cpu backend, where the op exists); a
    Qwen3's do not (its q/k norms sit between qkv and the rotary; its LoRA outputs against
    PEFT's: tests/test_models_parity.py); the module tree stays acyclic (repr works)."""
    import transformers as tf
    from helpers_lora import make_peft_adapter, make_tokenizer

    from loraplex import LLM
    from loraplex.lora.layers import LoRARotary

    shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, intermediate_size=96, vocab_size=128, head_dim=16)
    for arch, config, wired in [("llama", tf.LlamaConfig, True), ("qwen3", tf.Qwen3Config, False)]:
        torch.manual_seed(0)
        hf = tf.AutoModelForCausalLM.from_config(config(**shape)).eval()
        d = tmp_path / arch
        hf.save_pretrained(d)
        make_tokenizer(d)
        a = make_peft_adapter(hf, tmp_path / f"{arch}-a", seed=1, r=4)
        llm = LLM(str(d), adapters={"a": str(a)}, device="cpu", dtype="float32",
                  lora_backend="cpu")
        model = llm.engine.runner.model
        rotaries = [m for m in model.modules() if isinstance(m, LoRARotary)]
        assert len(rotaries) == (len(model.model.layers) if wired else 0), arch
        assert ("LoRARotary" in repr(model)) == wired
        names = [n for n, _ in model.named_modules()]
        assert not any(".defer_to" in n or ".prev" in n or ".next" in n for n in names), names
