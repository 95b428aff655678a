"""load_peft_adapter against real PEFT adapters: same modules, A, B and scaling as PEFT's own
model; and a clear AdapterLoadError for each kind of bad adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers_lora import (
    ALL_PROJS,
    edit_adapter_config,
    edit_adapter_tensors,
    make_peft_adapter,
    make_tiny_model,
    peft_lora_modules,
    peft_reference,
)

from loraplex.config import ModelConfig
from loraplex.errors import AdapterLoadError
from loraplex.lora import PROJ_NAMES, LoRAAdapter, load_peft_adapter


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny parses run at one thread; restored after, so the rest of the suite keeps
    its thread count (a call at import time set it for every test collected after it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model_dir, hf = make_tiny_model(tmp_path_factory.mktemp("llama"), tokenizer=False)
    return hf, ModelConfig.from_hf(hf.config)


def assert_matches_peft(adapter: LoRAAdapter, hf_model, adapter_dir) -> None:
    ref = peft_lora_modules(peft_reference(hf_model, adapter_dir))
    assert ref, "PEFT wrapped no module"
    assert set(adapter.weights) == set(ref)  # untargeted modules are absent
    for key, (a, b, scaling) in ref.items():
        w = adapter.weights[key]
        assert w.a.dtype == torch.float32 and w.a.is_contiguous() and w.b.is_contiguous()
        torch.testing.assert_close(w.a, a, rtol=0, atol=0)
        torch.testing.assert_close(w.b, b, rtol=0, atol=0)
        assert w.scaling == pytest.approx(scaling, rel=1e-12), key


CASES = {
    "all_projs": dict(r=8, lora_alpha=16),
    "qv_rslora": dict(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "patterns": dict(
        r=6, lora_alpha=16, rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 3},
        alpha_pattern={r"layers\.\d\.mlp\.up_proj": 5, "v_proj": 7}),
    # PEFT anchors keys to a dotted suffix and takes the first key (in order) that matches
    "pattern_anchoring": dict(r=4, lora_alpha=8, rank_pattern={
        "proj": 5, "layers.1": 2, "mlp.up_proj": 3, "up_proj": 7, r"\d\.self_attn\.k_proj": 6}),
    "rslora_patterns": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"o_proj": 9},
                            alpha_pattern={"gate_proj": 3}),
    "layers_list": dict(r=4, lora_alpha=8, target_modules=["k_proj", "gate_proj"],
                        layers_to_transform=[0, 2]),
    "layers_int_pattern": dict(r=4, lora_alpha=8, target_modules=["self_attn.o_proj", "up_proj"],
                               layers_to_transform=1, layers_pattern="layers"),
    "regex_target": dict(r=5, lora_alpha=10, target_modules=r".*layers\.[02]\..*\.(q|down)_proj"),
    "all_linear_exclude": dict(r=4, lora_alpha=4, target_modules="all-linear",
                               exclude_modules=["k_proj", "model.layers.2.mlp.up_proj"]),
    "exact_name": dict(r=3, lora_alpha=6, target_modules=["model.layers.1.self_attn.v_proj"],
                       layers_to_transform=[0]),  # an exact name ignores the layer filter
}


@pytest.mark.parametrize("case", list(CASES))
def test_loads_like_peft(llama, tmp_path, case):
    hf, mc = llama
    d = make_peft_adapter(hf, tmp_path / case, seed=3, **CASES[case])
    adapter = load_peft_adapter(d, mc, max_lora_rank=16)
    assert_matches_peft(adapter, hf, d)
    assert adapter.name == case and adapter.path == str(d)


def test_adapter_summary(llama, tmp_path):
    hf, mc = llama
    d = make_peft_adapter(hf, tmp_path / "a", r=4, lora_alpha=8,
                          target_modules=["q_proj", "k_proj"],
                          rank_pattern={"model.layers.2.self_attn.k_proj": 7})
    adapter = load_peft_adapter(d, mc, max_lora_rank=8, name="sql")
    assert adapter.name == "sql"
    assert adapter.target_modules() == {"q_proj", "k_proj"}
    assert adapter.max_rank == 7
    q_in, q_out = mc.proj_shapes()["q_proj"]
    k_in, k_out = mc.proj_shapes()["k_proj"]
    assert (k_in, k_out) == (96, 32)  # grouped-query: 2 kv heads of 16
    expected = 4 * 3 * ((q_in + q_out) * 4) + 4 * ((k_in + k_out) * (4 + 4 + 7))
    assert adapter.nbytes == expected
    assert adapter.weights[(2, "k_proj")].a.shape == (7, 96)
    assert adapter.weights[(0, "k_proj")].b.shape == (32, 4)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures(tmp_path, arch):
    _, hf = make_tiny_model(tmp_path / "m", arch=arch, tokenizer=False, num_hidden_layers=2)
    d = make_peft_adapter(hf, tmp_path / "a", r=4, lora_alpha=8, seed=1)
    assert_matches_peft(load_peft_adapter(d, ModelConfig.from_hf(hf.config), 8), hf, d)


def test_bin_format(llama, tmp_path):
    hf, mc = llama
    d = make_peft_adapter(hf, tmp_path / "bin", r=4, safe_serialization=False)
    assert (d / "adapter_model.bin").is_file() and not (d / "adapter_model.safetensors").exists()
    assert_matches_peft(load_peft_adapter(d, mc, 8), hf, d)


def test_fan_in_fan_out_matches_peft(llama, tmp_path):
    # fan_in_fan_out describes the base weight's layout (GPT-2 Conv1D); for nn.Linear targets
    # PEFT warns, turns it off and keeps A/B as saved. We must load the same weights.
    hf, mc = llama
    d = make_peft_adapter(hf, tmp_path / "f", r=4, target_modules=["q_proj", "down_proj"])
    edit_adapter_config(d, fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        assert_matches_peft(load_peft_adapter(d, mc, 8), hf, d)
    # Transposed tensors are not a PEFT layout: refused with the shape at fault.
    edit_adapter_tensors(d, lambda t: {k: v.T for k, v in t.items()})
    with pytest.raises(AdapterLoadError, match=r"q_proj\.lora_A\.weight.*shape \(96, 4\)"):
        load_peft_adapter(d, mc, 8)


def test_adapter_name_in_keys_and_bf16(llama, tmp_path):
    hf, mc = llama
    d = make_peft_adapter(hf, tmp_path / "a", r=4, target_modules=["v_proj", "up_proj"])
    plain = load_peft_adapter(d, mc, 8)
    edit_adapter_tensors(d, lambda t: {
        k.replace(".weight", ".default.weight"): v.to(torch.bfloat16) for k, v in t.items()})
    named = load_peft_adapter(d, mc, 8)
    assert set(named.weights) == set(plain.weights)
    for key, w in plain.weights.items():
        assert named.weights[key].a.dtype == torch.float32
        torch.testing.assert_close(named.weights[key].a, w.a.to(torch.bfloat16).float())
        torch.testing.assert_close(named.weights[key].b, w.b.to(torch.bfloat16).float())


# -- bad adapters ---------------------------------------------------------------------------
@pytest.fixture
def good(llama, tmp_path):
    hf, _ = llama
    return make_peft_adapter(hf, tmp_path / "good", r=4, lora_alpha=8)


def _drop(pattern: str):
    return lambda t: {k: v for k, v in t.items() if pattern not in k}


def _set(key: str, value: torch.Tensor):
    return lambda t: {**t, key: value}


L1Q = "base_model.model.model.layers.1.self_attn.q_proj"
BAD_EDITS = {
    # name: (config changes, tensor edit, message regex)
    "dora": ({"use_dora": True}, None, "use_dora"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    "bias_all": ({"bias": "all"}, None, "bias='all'"),
    "lora_bias": ({"lora_bias": True}, None, "lora_bias"),
    "peft_type": ({"peft_type": "IA3"}, None, "peft_type='IA3'"),
    "unknown_switch": ({"use_fancy_thing": True}, None, "use_fancy_thing"),
    # embeddings are served now: targeting one without its tensors is the weights file's fault
    "embed_target": ({"target_modules": [*PROJ_NAMES, "embed_tokens"]}, _drop("no such key"),
                     "missing tensor 'base_model.model.model.embed_tokens.lora_embedding_A'"),
    "lm_head_target": ({"target_modules": ["lm_head"]}, None, "targets lm_head"),
    "foreign_target": ({"target_modules": ["q_proj", "c_attn"]}, None, "'c_attn' matches no"),
    "catch_all_regex": ({"target_modules": ".*"}, None, r"targets model\b"),
    "no_target": ({"target_modules": None}, None, "target_modules is missing"),
    "selects_nothing": ({"layers_to_transform": [0], "layers_pattern": "h"}, None,
                        "selects no projection"),
    "layer_out_of_range_cfg": ({"layers_to_transform": [0, 5]}, None,
                               "layers_to_transform has layer 5.*3 layers"),
    "regex_with_layers": ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, None,
                          "cannot be used with a regex"),
    "bad_r": ({"r": 0}, None, "r=0"),
    "bad_regex": ({"rank_pattern": {"q_proj(": 2}}, None, "rank_pattern key"),
    "rank_over_max": ({"r": 16, "lora_alpha": 32}, None, "rank 16 .* max_lora_rank=8"),
    "pattern_rank_over_max": ({"rank_pattern": {"down_proj": 9}}, None, "rank 9 of .*down_proj"),
    "rank_mismatch": ({"r": 3}, None, r"shape \(4, 96\).*rank 4 but adapter_config.json gives r=3"),
    "missing_b": ({}, _drop("layers.1.self_attn.q_proj.lora_B"), f"missing tensor '{L1Q}.lora_B"),
    "missing_a": ({}, _drop("layers.2.mlp.down_proj.lora_A"),
                  r"missing tensor .*2\.mlp\.down_proj"),
    "wrong_shape": ({}, _set(f"{L1Q}.lora_B.weight", torch.zeros(95, 4)),
                    r"q_proj\.lora_B\.weight' has shape \(95, 4\), expected \(96, 4\)"),
    "unexpected": ({}, _set("base_model.model.lm_head.lora_A.weight", torch.zeros(4, 96)),
                   "lm_head"),
    "embedding_tensor": ({}, _set("base_model.model.model.embed_tokens.lora_embedding_A",
                                  torch.zeros(4, 128)),
                         "is for model.embed_tokens, which adapter_config.json does not target"),
    "tensor_layer_out_of_range": (
        {}, _set("base_model.model.model.layers.7.mlp.up_proj.lora_A.weight", torch.zeros(4, 96)),
        "layer 7, but the base model has 3 layers"),
    "untargeted_tensor": ({"target_modules": ["q_proj"]}, None,
                          "layers.0.mlp.down_proj, which adapter_config.json does not target"),
    "duplicate": ({}, _set(f"{L1Q}.lora_A.default.weight", torch.zeros(4, 96)), "both lora_A"),
    "nan": ({}, _set(f"{L1Q}.lora_A.weight", torch.full((4, 96), float("nan"))), "NaN"),
    "int_tensor": ({}, _set(f"{L1Q}.lora_A.weight", torch.zeros(4, 96, dtype=torch.int32)),
                   "dtype torch.int32"),
}


@pytest.mark.parametrize("case", list(BAD_EDITS))
def test_bad_adapter_refused(llama, good, case):
    _, mc = llama
    changes, tensor_edit, message = BAD_EDITS[case]
    if changes:
        edit_adapter_config(good, **changes)
    if tensor_edit:
        edit_adapter_tensors(good, tensor_edit)
    with pytest.raises(AdapterLoadError, match=message) as info:
        load_peft_adapter(good, mc, max_lora_rank=8)
    text = str(info.value)
    # every message names the adapter, then the file at fault relative to its directory
    assert text.startswith(("adapter 'good': adapter_model.safetensors: ",
                            "adapter 'good': adapter_config.json: ")), text
    assert ("adapter_model.safetensors" if tensor_edit else "adapter_config.json") in text
    assert str(good.parent) not in text  # no absolute paths


def test_real_dora_and_embedding_adapters_refused(llama, tmp_path):
    hf, mc = llama
    dora = make_peft_adapter(hf, tmp_path / "dora", r=4, use_dora=True)
    with pytest.raises(AdapterLoadError, match="use_dora=True: DoRA"):
        load_peft_adapter(dora, mc, 8)
    emb = make_peft_adapter(hf, tmp_path / "emb", r=4, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(AdapterLoadError, match="embed_tokens"):
        load_peft_adapter(emb, mc, 8)
    # served now (tests/test_full_modules.py): the lm_head copy comes back with the adapter
    mts = make_peft_adapter(hf, tmp_path / "mts", r=4, modules_to_save=["lm_head"])
    assert load_peft_adapter(mts, mc, 8).replaced.lm_head.shape == (128, 96)
    bias = make_peft_adapter(hf, tmp_path / "bias", r=4, bias="all")
    with pytest.raises(AdapterLoadError, match="bias='all'"):
        load_peft_adapter(bias, mc, 8)


def test_adapter_for_deeper_model_refused(tmp_path):
    _, deep = make_tiny_model(tmp_path / "deep", tokenizer=False, num_hidden_layers=4)
    _, shallow = make_tiny_model(tmp_path / "shallow", tokenizer=False)
    d = make_peft_adapter(deep, tmp_path / "a", r=4, target_modules=["v_proj"])
    with pytest.raises(AdapterLoadError, match="layers.3.self_attn.v_proj.*layer 3"):
        load_peft_adapter(d, ModelConfig.from_hf(shallow.config), 8)


def test_gqa_width_mismatch_refused(llama, tmp_path):
    # Same hidden size, 3 kv heads instead of 2: k/v are 48 wide instead of 32.
    _, hf3 = make_tiny_model(tmp_path / "m", tokenizer=False, num_key_value_heads=3)
    d = make_peft_adapter(hf3, tmp_path / "a", r=4, target_modules=["q_proj", "k_proj"])
    with pytest.raises(AdapterLoadError, match=r"k_proj\.lora_B\.weight' has shape \(48, 4\), "
                                               r"expected \(32, 4\)"):
        load_peft_adapter(d, llama[1], 8)


def test_missing_and_corrupt_files(llama, good, tmp_path):
    _, mc = llama
    with pytest.raises(AdapterLoadError, match="does not exist"):
        load_peft_adapter(tmp_path / "nowhere", mc, 8)
    with pytest.raises(AdapterLoadError, match="is not a directory"):
        load_peft_adapter(good / "adapter_config.json", mc, 8)
    weights = good / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors: cannot read"):
        load_peft_adapter(good, mc, 8)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors: cannot read"):
        load_peft_adapter(good, mc, 8)
    weights.unlink()
    with pytest.raises(AdapterLoadError, match="no adapter weights"):
        load_peft_adapter(good, mc, 8)
    (good / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(AdapterLoadError, match="adapter_model.bin: cannot read"):
        load_peft_adapter(good, mc, 8)
    config = good / "adapter_config.json"
    config.write_text("{ not json")
    with pytest.raises(AdapterLoadError, match="adapter_config.json: cannot read JSON"):
        load_peft_adapter(good, mc, 8)
    config.write_text(json.dumps([1, 2]))
    with pytest.raises(AdapterLoadError, match="adapter_config.json: expected a JSON object"):
        load_peft_adapter(good, mc, 8)
    config.unlink()
    with pytest.raises(AdapterLoadError, match="adapter_config.json: missing"):
        load_peft_adapter(good, mc, 8)


def test_helpers_model_and_tokenizer(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    d, hf = make_tiny_model(tmp_path / "m", seed=5)
    _, hf_again = make_tiny_model(tmp_path / "m2", seed=5)
    for p, q in zip(hf.parameters(), hf_again.parameters(), strict=True):
        assert torch.equal(p, q)  # deterministic
    tok = AutoTokenizer.from_pretrained(str(d))
    ids = tok("the cat")["input_ids"]
    assert ids[0] == tok.bos_token_id == hf.config.bos_token_id
    assert tok.eos_token_id == hf.config.eos_token_id and len(tok) <= hf.config.vocab_size
    assert tok.decode(ids, skip_special_tokens=True) == "the cat"
    mc = ModelConfig.from_hf(AutoConfig.from_pretrained(str(d)))
    assert (mc.num_kv_heads, mc.head_dim, mc.num_layers) == (2, 16, 3)
    # the model really is adapted: a non-trivial delta on every targeted module
    a = make_peft_adapter(d, tmp_path / "a", r=2)
    loaded = load_peft_adapter(a, mc, 2)
    assert loaded.target_modules() == set(ALL_PROJS)
    assert all(w.b.abs().sum() > 0 and not math.isnan(w.scaling) for w in loaded.weights.values())
