"""Tensor parallelism over torch.distributed (gloo on CPU): 2 and 4 ranks, spawned, each build
the sharded model from a checkpoint on disk, install sharded LoRA buffers and layers, write the
same full adapters into their slots and run the same steps. Every rank's logits must equal the
unsharded model's (TP=1 in this process) within 1e-5: a prefill of several sequences mixing
adapters of different ranks (rank_pattern, DoRA, embedding LoRA) and base rows in one batch,
a decode step over the KV cache, then again after a slot is cleared and refilled.

Models: Llama (GQA 8 heads / 2 kv: kv = tp at 2, replicated kv heads at 4; a vocabulary that
does not divide by the group), Mistral (4 kv heads: 2 per rank at 2, kv = tp at 4), Qwen2 (q/k/v
biases, tied embeddings, one kv head: replicated at every size).

A rank that fails makes the test fail with its traceback; one that hangs or dies is found by
the parent's deadline (results come back through a multiprocessing queue), never a hung run.
"""

from __future__ import annotations

import io
import queue
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers_lora import make_peft_adapter, tiny_hf_config

SHAPE = dict(hidden_size=128, num_attention_heads=8, intermediate_size=96, num_hidden_layers=2,
             vocab_size=131, max_position_embeddings=256)
MODELS = {  # name -> config overrides (Llama, Mistral, Qwen2: helpers_lora's tiny configs)
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=4),
    "qwen2": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "qwen3": dict(num_key_value_heads=2, head_dim=24),  # head_dim != hidden / heads
    "gemma3": dict(num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
                   layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(num_key_value_heads=2),  # q|k|v and gate|up fused in the checkpoint
}
ADAPTERS = {  # name -> make_peft_adapter kwargs
    "r8": dict(r=8, lora_alpha=16),
    "patterns": dict(r=8, lora_alpha=16, rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
                     alpha_pattern={"v_proj": 4, "o_proj": 3}),
    "rows": dict(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True,
                 target_modules=["k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    "emb": dict(r=16, lora_alpha=8, use_rslora=True,
                target_modules=["embed_tokens", "q_proj", "gate_proj"]),
}
# Phi-3's checkpoint (and so PEFT) names the fused projections
PHI3_NAMES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
              "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
NUM_SLOTS, MAX_RANK, BLOCK = 4, 16, 4
# (lora slot per sequence, sorted as the engine sorts them, and prompt lengths)
PREFILL = ([-1, -1, 0, 1, 2, 3], [5, 2, 7, 3, 9, 6])
REFILL = ([-1, 1, 1, 3], [4, 6, 8, 5])
TIMEOUT_S = 240


def _hf_config(name: str):
    import transformers as tf
    from helpers_lora import BOS, EOS, PAD

    fields = dict(SHAPE, **MODELS[name], bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if name in ("llama", "mistral", "qwen2"):
        return tiny_hf_config(name, **fields)
    classes = {"qwen3": tf.Qwen3Config, "gemma3": tf.Gemma3TextConfig, "phi3": tf.Phi3Config}
    return classes[name](**fields)


def _adapter_kwargs(name: str, kw: dict) -> dict:
    if name != "phi3":
        return kw
    kw = dict(kw)
    targets = kw.get("target_modules", list(PHI3_NAMES) + ["o_proj", "down_proj"])
    kw["target_modules"] = sorted({PHI3_NAMES.get(t, t) for t in targets})
    for key in ("rank_pattern", "alpha_pattern"):
        if key in kw:
            kw[key] = {PHI3_NAMES.get(k, k): v for k, v in kw[key].items()}
    return kw


def _build_checkpoints(root: Path) -> dict[str, dict]:
    """model name -> {"model": dir, "adapters": {name: dir}}."""
    from transformers import AutoModelForCausalLM

    specs = {}
    for name in MODELS:
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(_hf_config(name)).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # biases (Qwen2) and norms random: a bias added on every rank,
            for pname, p in hf.named_parameters():  # or a norm on a wrong shard, shows
                if pname.endswith(".bias") or "norm" in pname:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        d = root / name
        hf.save_pretrained(d)
        adapters = {a: str(make_peft_adapter(hf, root / f"{name}-{a}", seed=i, b_scale=0.5,
                                             **_adapter_kwargs(name, kw)))
                    for i, (a, kw) in enumerate(ADAPTERS.items())}
        specs[name] = {"model": str(d), "adapters": adapters}
    return specs


def run_steps(spec: dict, device: str = "cpu", with_adapters: bool = True) -> list[torch.Tensor]:
    """Build the (sharded, per this process's tensor-parallel state) model, LoRA and KV cache
    from ``spec`` and run: prefill + decode with slots 0-3 = r8, patterns, rows, dora; then
    clear slot 1, write the embedding adapter there, and prefill + decode again. Returns the
    float32 CPU logits of each forward. ``with_adapters=False``: the slots stay empty."""
    from loraplex.layers.linear import can_prepack, prepack_linear_weights
    from loraplex.lora.base_weights import CheckpointWeights
    from loraplex.lora.batch import LoRABatchBuilder
    from loraplex.lora.buffers import LoRABuffers
    from loraplex.lora.layers import install_lora_layers
    from loraplex.lora.peft_loader import load_peft_adapter
    from loraplex.models.loader import load_model, load_model_config

    dev, dtype = torch.device(device), torch.float32
    cfg, _ = load_model_config(spec["model"])
    model = load_model(spec["model"], cfg, dtype, dev)
    if can_prepack(dev, dtype):
        prepack_linear_weights(model)  # CPU serving packs the (sharded) weights
    weights = CheckpointWeights(spec["model"]).get  # DoRA's column norms: full base weights
    adapters = {name: load_peft_adapter(path, cfg, MAX_RANK, base_weight=weights)
                for name, path in spec["adapters"].items()}
    buffers = LoRABuffers(cfg, NUM_SLOTS, MAX_RANK, dtype, dev)
    max_tokens = 64
    install_lora_layers(model, buffers, "torch", max_tokens, dtype, dev)
    builder = LoRABatchBuilder(max_tokens, NUM_SLOTS, dev)
    for slot, name in enumerate(["r8", "patterns", "rows", "dora"]):
        if with_adapters:
            buffers.write(slot, adapters[name])
    out = _prefill_then_decode(model, cfg, builder, dev, *PREFILL)
    buffers.clear(1)
    if with_adapters:
        buffers.write(1, adapters["emb"])
    out += _prefill_then_decode(model, cfg, builder, dev, *REFILL)
    return out


def _prefill_then_decode(model, cfg, builder, dev, slots, lengths) -> list[torch.Tensor]:
    from loraplex.kvcache.kv_cache import allocate_kv_cache
    from loraplex.layers.forward_context import ForwardBatch, forward_context
    from loraplex.layers.prefill_groups import plan_prefill

    blocks_per_seq = 4
    caches = allocate_kv_cache(cfg, blocks_per_seq * len(slots), BLOCK, torch.float32, dev)
    g = torch.Generator().manual_seed(sum(lengths))
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)

    def slot_of(b: int, pos: int) -> int:  # sequence b owns blocks b*4 .. b*4+3
        return (b * blocks_per_seq + pos // BLOCK) * BLOCK + pos % BLOCK

    def t(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=dev)

    with torch.inference_mode():
        batch = ForwardBatch(
            is_prefill=True, num_tokens=cu[-1], cu_seqlens=cu, prefill_groups=plan_prefill(cu, dev),
            slot_mapping=t([slot_of(b, p) for b, n in enumerate(lengths) for p in range(n)]),
            kv_caches=caches, lora=builder.prepare(slots, lengths))
        with forward_context(batch):
            hidden = model(t([i for p in prompts for i in p]),
                           t([p for n in lengths for p in range(n)]))
            prefill = model.compute_logits(hidden)
        nxt = prefill[[c - 1 for c in cu[1:]]].argmax(-1).tolist()
        batch = ForwardBatch(
            is_prefill=False, num_tokens=len(lengths),
            slot_mapping=t([slot_of(b, n) for b, n in enumerate(lengths)]),
            block_tables=t([[b * blocks_per_seq + j for j in range(blocks_per_seq)]
                            for b in range(len(lengths))]),
            context_lens=t([n + 1 for n in lengths]), max_context_len=max(lengths) + 1,
            kv_caches=caches, lora=builder.prepare(slots, [1] * len(lengths), is_decode=True))
        with forward_context(batch):
            decode = model.compute_logits(model(t(nxt), t(lengths)))
    return [prefill.float().cpu(), decode.float().cpu()]


def _worker(rank: int, world: int, init_method: str, specs: dict, device: str, results,
            fail_rank: int) -> None:
    try:
        torch.set_num_threads(1)  # ranks share the CPU
        from loraplex.distributed import parallel_state as ps

        backend = "nccl" if device == "cuda" else "gloo"
        ps.init_tensor_parallel(rank, world, init_method, backend=backend)
        if rank == fail_rank:  # the others are left waiting in their first collective
            raise RuntimeError("injected failure")
        dev = f"cuda:{rank}" if device == "cuda" else "cpu"
        out = {"collectives": _check_collectives(rank, world, dev)}
        for name, spec in specs.items():
            out[name] = run_steps(spec, dev)
        out["stats"] = ps.comm_stats()
        # bytes, not tensors: a tensor put on the queue lives in this process's shared
        # memory, gone when it exits
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, buf.getvalue()))
        ps.destroy_tensor_parallel()
    except BaseException:
        results.put((rank, traceback.format_exc()))


def _check_collectives(rank: int, world: int, dev: str) -> bool:
    from loraplex.distributed import parallel_state as ps

    assert (ps.tp_rank(), ps.tp_size()) == (rank, world) and ps.tp_group() is not None
    x = torch.full((2, 3), float(rank + 1), device=dev)
    assert ps.all_reduce_(x) is x
    assert torch.equal(x.cpu(), torch.full((2, 3), world * (world + 1) / 2))
    g = ps.all_gather_last(torch.full((2, 1), float(rank), device=dev))
    assert torch.equal(g.cpu(), torch.arange(world, dtype=torch.float32).expand(2, world))
    stats = ps.comm_stats()
    assert (stats["all_reduce_calls"], stats["all_gather_calls"]) == (1, 1)
    assert stats["all_reduce_bytes"] == 6 * 4 and stats["all_reduce_seconds"] == 0  # not timed
    ps.enable_comm_timing(True)
    ps.all_reduce_(x)
    assert ps.comm_stats()["all_reduce_seconds"] > 0
    ps.enable_comm_timing(False)
    ps.reset_comm_stats()
    return True


def run_ranks(world: int, specs: dict, tmp_path: Path, device: str = "cpu",
              fail_rank: int = -1) -> dict[int, dict]:
    """Spawn ``world`` ranks running ``_worker``; their outputs by rank. Fails (and ends the
    other ranks) on a rank's exception, a rank that dies without answering, or the deadline."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"file://{tmp_path / f'tp{world}.init'}"
    procs = [ctx.Process(target=_worker, args=(r, world, init, specs, device, results, fail_rank),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, dict] = {}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(out) < world:
            try:
                rank, res = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode is not None]
                if dead:
                    pytest.fail(f"rank(s) {dead} exited (codes "
                                f"{[procs[r].exitcode for r in dead]}) without a result")
                if time.monotonic() > deadline:
                    pytest.fail(f"ranks {sorted(set(range(world)) - set(out))} gave no result "
                                f"in {TIMEOUT_S} s")
                continue
            if isinstance(res, str):
                pytest.fail(f"rank {rank} failed:\n{res}")
            out[rank] = torch.load(io.BytesIO(res))
    finally:
        for p in procs:
            if len(out) < world:  # failed: the others may wait in a collective forever
                p.terminate()
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return out


def _assert_same_logits(ours: list[torch.Tensor], ref: list[torch.Tensor], what: str) -> None:
    assert len(ours) == len(ref) == 4
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.shape == b.shape, (what, i, a.shape, b.shape)
        err = (a - b).abs().max().item()
        assert err <= 1e-5, f"{what}, forward {i}: max |logit diff| {err:.2e}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    specs = _build_checkpoints(root)
    refs = {name: run_steps(spec) for name, spec in specs.items()}  # TP=1, this process
    return root, specs, refs


def test_reference_steps_are_meaningful(checkpoints):
    """The TP=1 reference against the same steps with empty slots: base rows are the same,
    every adapter (the refilled slot's new one included) moves its rows, so the comparisons
    below see a wrong shard of any adapter or a stale slot."""
    _, specs, refs = checkpoints
    for name, spec in specs.items():
        base = run_steps(spec, with_adapters=False)
        for (slots, lengths), ours, plain in ((PREFILL, refs[name][0], base[0]),
                                              (REFILL, refs[name][2], base[2])):
            start = 0
            for slot, n in zip(slots, lengths, strict=True):
                diff = (ours[start : start + n] - plain[start : start + n]).abs().max().item()
                if slot < 0:
                    assert diff == 0, (name, slot, diff)
                else:
                    assert diff > 1e-2, (name, slot, diff)
                start += n


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_logits_equal_unsharded(checkpoints, world):
    root, specs, refs = checkpoints
    out = run_ranks(world, specs, root)
    for rank, res in out.items():
        assert res["collectives"]
        for name in MODELS:
            _assert_same_logits(res[name], refs[name], f"{name}, tp={world}, rank {rank}")
        stats = res["stats"]  # one all-reduce per row-parallel layer, embedding, LoRA shrink
        assert stats["all_reduce_calls"] > 0 and stats["all_gather_calls"] > 0


def test_a_failing_rank_fails_the_run_instead_of_hanging(tmp_path):
    # rank 0 blocks in a collective that rank 1 never joins: the run must end on rank 1's
    # report (not on the deadline), and rank 0 is ended with it
    with pytest.raises(pytest.fail.Exception, match=r"(?s)rank 1 failed:.*injected failure"):
        run_ranks(2, {}, tmp_path, fail_rank=1)


@pytest.mark.gpu
def test_sharded_logits_equal_unsharded_on_two_gpus(checkpoints):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    root, specs, _ = checkpoints
    # the reference on the same kind of device: CUDA's kernels round differently from CPU's
    refs = {name: run_steps(spec, "cuda:0") for name, spec in specs.items()}
    out = run_ranks(2, specs, root, device="cuda")
    for rank, res in out.items():
        for name in MODELS:
            _assert_same_logits(res[name], refs[name], f"{name}, cuda tp=2, rank {rank}")
