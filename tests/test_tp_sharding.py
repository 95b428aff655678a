"""Per-rank sizes of a tensor-parallel model (``distributed/sharding.py``), and what one rank
builds and reads: its shards of the checkpoint (only its slices, through safetensors'
``get_slice``), its LoRA buffers and its KV cache. No process group is needed to build a
rank's shard, so these run in this process with the group state set to one rank's."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers_lora import make_tiny_model
from safetensors.torch import load_file

from loraplex.config import ModelConfig
from loraplex.distributed import parallel_state as ps
from loraplex.distributed.sharding import (
    RankShape,
    divide,
    kv_head_range,
    kv_heads_per_rank,
    proj_shards,
    vocab_per_rank,
    vocab_range,
)
from loraplex.errors import ConfigError

HEADS_KV_TP = [(h, kv, tp)
               for h, kv, tp in itertools.product([4, 8, 16], [1, 2, 4, 8], [1, 2, 4, 8])
               if kv <= h and h % kv == 0 and h % tp == 0 and (kv % tp == 0 or tp % kv == 0)]


@pytest.mark.parametrize(("heads", "kv", "tp"), HEADS_KV_TP)
def test_each_rank_holds_the_kv_heads_its_query_heads_read(heads, kv, tp):
    group, local_heads = heads // kv, heads // tp
    held = []
    for rank in range(tp):
        lo, hi = kv_head_range(kv, heads, tp, rank)
        assert hi - lo == kv_heads_per_rank(kv, heads, tp) == (kv // tp if kv >= tp else 1)
        local_group = local_heads // (hi - lo)  # grouped-query attention on the rank
        for j in range(local_heads):  # local query head j is global head rank*H/tp + j
            assert lo + j // local_group == (rank * local_heads + j) // group
        held.append((lo, hi))
    # every kv head lives somewhere; replicated ones on tp / kv consecutive ranks
    assert sorted({h for lo, hi in held for h in range(lo, hi)}) == list(range(kv))
    if kv < tp:
        assert [lo for lo, _ in held] == [r * kv // tp for r in range(tp)]


@pytest.mark.parametrize("vocab", [1, 7, 128, 131, 32000, 151936])
@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_vocab_ranges_tile_the_vocabulary_with_padding_at_the_end(vocab, tp):
    per = vocab_per_rank(vocab, tp)
    ranges = [vocab_range(vocab, tp, r) for r in range(tp)]
    assert per * tp >= vocab > (per - 1) * tp  # ceil(vocab / tp): the least that fits
    ids = [i for lo, hi in ranges for i in range(lo, hi)]
    assert ids == list(range(vocab))  # each id once, in rank order: the gather's column order
    assert all(0 <= hi - lo <= per for lo, hi in ranges)


def test_indivisible_shapes_are_config_errors_naming_the_field():
    with pytest.raises(ConfigError, match="num_attention_heads"):
        kv_heads_per_rank(2, 6, 4)
    with pytest.raises(ConfigError, match=r"num_key_value_heads \(3\) must divide"):
        kv_heads_per_rank(3, 12, 4)  # 3 kv heads cannot be replicated evenly on 4 ranks
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        kv_heads_per_rank(6, 12, 4)
    with pytest.raises(ConfigError, match=r"intermediate_size \(10\)"):
        divide(10, 4, "intermediate_size")


def _cfg(**kw) -> ModelConfig:
    from helpers_lora import tiny_hf_config

    return ModelConfig.from_hf(tiny_hf_config("llama", **kw))


@pytest.mark.parametrize("tp", [2, 4])
def test_proj_shards_split_columns_by_output_and_rows_by_input(tp):
    cfg = _cfg(hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
               intermediate_size=96)
    shards = [proj_shards(cfg, tp, r) for r in range(tp)]
    full = cfg.proj_shapes()
    for proj in ("q_proj", "gate_proj", "up_proj"):  # outputs split evenly, in rank order
        assert [(s[proj].out_lo, s[proj].out_hi) for s in shards] == [
            (r * full[proj][1] // tp, (r + 1) * full[proj][1] // tp) for r in range(tp)]
        assert all((s[proj].in_lo, s[proj].in_hi) == (0, cfg.hidden_size) for s in shards)
    for proj in ("o_proj", "down_proj"):  # inputs split, outputs whole
        assert [(s[proj].in_lo, s[proj].in_hi) for s in shards] == [
            (r * full[proj][0] // tp, (r + 1) * full[proj][0] // tp) for r in range(tp)]
        assert all(s[proj].shape[1] == cfg.hidden_size for s in shards)
    d = cfg.head_dim
    kv = [(s["k_proj"].out_lo // d, s["k_proj"].out_hi // d) for s in shards]
    assert kv == [kv_head_range(2, 8, tp, r) for r in range(tp)]
    assert all(s["k_proj"] == s["v_proj"] for s in shards)
    local = RankShape.of(cfg, tp)
    assert shards[0]["q_proj"].shape[1] == local.num_heads * d
    assert shards[0]["k_proj"].shape[1] == local.num_kv_heads * d


@pytest.fixture
def as_rank(monkeypatch):
    """Make this process rank ``rank`` of ``size`` for building (no collectives run)."""
    def set_rank(rank: int, size: int) -> None:
        monkeypatch.setattr(ps._state, "rank", rank)
        monkeypatch.setattr(ps._state, "size", size)
    return set_rank


class _SpyOpen:
    """``safe_open`` that records every element a loader reads, per tensor name."""

    def __init__(self, real, log: dict[str, int]) -> None:
        self.real, self.log = real, log

    def __call__(self, *args, **kwargs):
        spy = self

        class Handle:
            def __enter__(self):
                self.f = spy.real(*args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, name):
                raise AssertionError(f"whole tensor {name} read")

            def get_slice(self, name):
                real = self.f.get_slice(name)

                class Slice:
                    def get_shape(self):
                        return real.get_shape()

                    def __getitem__(self, index):
                        t = real[index]
                        spy.log[name] = spy.log.get(name, 0) + t.numel()
                        return t

                return Slice()

        return Handle()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_rank_reads_and_holds_only_its_shards(tmp_path, as_rank, monkeypatch, arch):
    from loraplex.kvcache.kv_cache import allocate_kv_cache, bytes_per_block
    from loraplex.models import loader

    tp, rank = 4, 3
    shape = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=96, vocab_size=130, num_hidden_layers=2)
    d, _ = make_tiny_model(tmp_path / "m", arch, tokenizer=False, **shape,
                           **({"tie_word_embeddings": True} if arch == "qwen2" else {}))
    full = load_file(str(d / "model.safetensors"))
    cfg, _ = loader.load_model_config(d)
    read: dict[str, int] = {}
    monkeypatch.setattr(loader, "safe_open", _SpyOpen(loader.safe_open, read))
    as_rank(rank, tp)
    model = loader.load_model(d, cfg, torch.float32, torch.device("cpu"))

    sharded = [k for k in full if k.endswith(("_proj.weight", "_proj.bias"))
               or "embed_tokens" in k or k.startswith("lm_head")]
    for key in sharded:
        # k/v: one replicated head of 2 (kv < tp) is half the tensor; everything else 1/tp
        # (the vocabulary: ceil(130 / 4) = 33 rows, the last rank's 31)
        assert read[key] <= full[key].numel() // 2, (key, read[key], full[key].numel())
        if "k_proj" not in key and "v_proj" not in key:
            assert read[key] <= -(-full[key].shape[0] // tp) * (full[key].numel()
                                                                // full[key].shape[0])
    for key in set(full) - set(sharded):  # norms: replicated, read whole
        assert read[key] == full[key].numel()

    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    w = full["model.layers.1.self_attn.k_proj.weight"]
    kv_lo, _ = kv_head_range(2, 8, tp, rank)  # rank 3 of 4 holds kv head 1
    assert kv_lo == 1 and (attn.kv_heads, attn.heads) == (1, 2)
    q0, q1 = attn.qkv_proj.shard_range("q")
    k0, k1 = attn.qkv_proj.shard_range("k")
    assert torch.equal(attn.qkv_proj.weight[k0:k1], w[16:32])
    assert torch.equal(attn.qkv_proj.weight[q0:q1],
                       full["model.layers.1.self_attn.q_proj.weight"][96:128])
    if arch == "qwen2":
        assert torch.equal(attn.qkv_proj.bias[k0:k1],
                           full["model.layers.1.self_attn.k_proj.bias"][16:32])
    assert torch.equal(attn.o_proj.weight, full["model.layers.1.self_attn.o_proj.weight"][:, 96:])
    g0, g1 = mlp.gate_up_proj.shard_range("up")
    assert torch.equal(mlp.gate_up_proj.weight[g0:g1],
                       full["model.layers.1.mlp.up_proj.weight"][72:])
    emb = model.model.embed_tokens.weight
    assert emb.shape == (33, 128)
    assert torch.equal(emb[:31], full["model.embed_tokens.weight"][99:])
    assert not emb[31:].any()  # padding rows past the vocabulary
    if arch == "qwen2":
        assert model.lm_head.weight is emb  # tied: one shard

    # the KV cache holds the rank's one kv head; a block costs 1/2 of the unsharded one
    (k, _v), *_ = allocate_kv_cache(cfg, 3, 16, torch.float32, torch.device("cpu"))
    assert k.shape == (3, 16, 1, cfg.head_dim)
    per_rank = bytes_per_block(cfg, 16, torch.float32)
    as_rank(0, 1)
    assert per_rank * 2 == bytes_per_block(cfg, 16, torch.float32)


def test_lora_buffers_hold_this_ranks_shards(tmp_path, as_rank):
    from helpers_lora import make_peft_adapter

    from loraplex.lora.buffers import LoRABuffers
    from loraplex.lora.peft_loader import load_peft_adapter

    shape = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=96, num_hidden_layers=2)
    d, hf = make_tiny_model(tmp_path / "m", tokenizer=False, **shape)
    adapter_dir = make_peft_adapter(hf, tmp_path / "a", r=8, rank_pattern={"o_proj": 4})
    cfg = ModelConfig.from_hf(hf.config)
    adapter = load_peft_adapter(adapter_dir, cfg, 16)
    as_rank(1, 2)
    buffers = LoRABuffers(cfg, 2, 16, torch.float32, torch.device("cpu"))
    buffers.write(1, adapter)
    qkv, o = buffers.buffers[(0, "qkv_proj")], buffers.buffers[(0, "o_proj")]
    assert qkv.offsets == (0, 64, 80, 96)  # 4 query heads, 1 kv head each of k and v
    q, k = adapter.weights[(0, "q_proj")], adapter.weights[(0, "k_proj")]
    assert torch.equal(qkv.a[1, :8], q.a)  # column kind: A whole
    assert torch.equal(qkv.b[1, :64, :8], q.b[64:])  # B: this rank's query rows
    assert torch.equal(qkv.b[1, 64:80, :8], k.b[16:])  # and its kv head (1 of 2)
    ow = adapter.weights[(0, "o_proj")]
    assert o.a.shape == (2, 16, 64) and torch.equal(o.a[1, :4], ow.a[:, 64:])  # row: A cols
    assert torch.equal(o.b[1, :, :4], ow.b)  # B whole
    assert o.ranks[1].tolist() == [4] and qkv.ranks[1].tolist() == [8, 8, 8]
    # the CUDA path (one packed host->device copy per layer) cuts the same shards
    staged = LoRABuffers(cfg, 2, 16, torch.float32, torch.device("cpu"), staged=True)
    staged.write(1, adapter)
    assert staged.num_transfers == cfg.num_layers
    for key, buf in buffers.buffers.items():
        assert torch.equal(staged.buffers[key].a, buf.a) and torch.equal(staged.buffers[key].b,
                                                                          buf.b), key
