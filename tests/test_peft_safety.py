"""Hostile adapter directories: regular expressions that backtrack catastrophically and
symlinks out of the adapter directory are refused with an AdapterLoadError naming the field or
file, and without printing absolute paths; the patterns PEFT users write keep PEFT's meaning
(checked against PEFT's own matching functions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers_lora import ALL_PROJS, make_peft_adapter, make_tiny_model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from loraplex.config import ModelConfig
from loraplex.errors import AdapterLoadError
from loraplex.lora import load_peft_adapter
from loraplex.lora.adapter import hf_module_name
from loraplex.lora.module_match import is_bounded
from loraplex.lora.peft_config import parse_peft_config
from loraplex.lora.peft_loader import _other_module_names

TESTS = Path(__file__).parent
EVIL = "(.*.*)*X"  # exponential backtracking on any name without an X


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    _, hf = make_tiny_model(tmp_path_factory.mktemp("llama"), tokenizer=False)
    return hf, ModelConfig.from_hf(hf.config)


@pytest.fixture
def good(llama, tmp_path):
    return make_peft_adapter(llama[0], tmp_path / "good", r=4, lora_alpha=8)


# -- regular expressions ---------------------------------------------------------------------
EVIL_CONFIGS = {
    "target_modules": {"target_modules": EVIL},
    "exclude_modules": {"exclude_modules": EVIL},
    "rank_pattern key": {"rank_pattern": {EVIL: 2}},
    "alpha_pattern key": {"alpha_pattern": {"q_proj": 3, EVIL: 2}},
    "layers_pattern": {"layers_to_transform": [0], "layers_pattern": EVIL},
}


def test_catastrophic_patterns_refused_quickly(good, tmp_path):
    """Each pathological pattern is refused by name, in a child process with a hard timeout
    so that a regression fails this test instead of hanging the suite."""
    dirs = {}
    for field, changes in EVIL_CONFIGS.items():
        d = tmp_path / field.replace(" ", "_")
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((d / "adapter_config.json").read_text()) | changes
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        dirs[field] = str(d)
    script = textwrap.dedent("""
        import json, sys
        from helpers_lora import tiny_hf_config
        from loraplex.config import ModelConfig
        from loraplex.errors import AdapterLoadError
        from loraplex.lora import load_peft_adapter
        mc = ModelConfig.from_hf(tiny_hf_config())
        out = {}
        for field, d in json.loads(sys.argv[1]).items():
            try:
                load_peft_adapter(d, mc, 8)
                out[field] = "loaded"
            except AdapterLoadError as e:
                out[field] = str(e)
        print(json.dumps(out))
    """)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(dirs)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = json.loads(done.stdout.splitlines()[-1])
    for field in EVIL_CONFIGS:
        msg = errors[field]
        assert msg.startswith(f"adapter '{Path(dirs[field]).name}': adapter_config.json: "), msg
        assert f"{field} {EVIL!r}" in msg and "backtracks catastrophically" in msg, msg
        assert str(tmp_path) not in msg


def test_pattern_too_long_refused():
    cfg = {"r": 4, "target_modules": "q_proj|" * 400 + "v_proj"}
    with pytest.raises(AdapterLoadError, match="target_modules 'q_proj.*at most 2000"):
        parse_peft_config(cfg, Path("adapter_config.json"))


# (target_modules, exclude_modules, layers_to_transform, layers_pattern, patterns for ranks)
PEFT_PATTERNS = [
    (r".*\.(q_proj|v_proj)", None, None, None, {}),
    (r"^(?!.*mlp).*(q_proj|k_proj|o_proj)$", None, None, None, {}),
    (r"model\.layers\.[0-2]\.self_attn\.(q|k|v)_proj", None, None, None, {}),
    (r".*layers\.[02]\..*\.(q|down)_proj", None, None, None, {}),
    (r"model\.layers\.(\d+\.)+self_attn\.(q|v)_proj", None, None, None, {}),  # nested: child
    (r"(?:.*\.)*(up|down)_proj", None, None, None, {}),  # a repeat of a repeat: child
    (["q_proj", "up_proj", "down_proj"], r".*\.1\..*", None, None, {}),
    (["q_proj", "v_proj", "gate_proj"], ["layers.2.self_attn.v_proj"], [0, 2], None, {}),
    (["q_proj", "o_proj"], None, [1], ["layers", "h"], {}),
    (["k_proj", "mlp.up_proj"], None, 2, "(la|xx)yers", {}),
    (ALL_PROJS, None, None, None, {r"layers\.\d\.mlp\.up_proj": 2, "v_proj": 3,
                                   r"(\d\.)+self_attn\.q_proj": 5, "proj": 7, "layers.1": 9,
                                   r"self_attn\.(k|o)_proj": 6}),
]


@pytest.mark.parametrize("case", range(len(PEFT_PATTERNS)))
def test_patterns_match_like_peft(case):
    """Our matching (in process or in the child) gives PEFT's answer on every module name."""
    target, exclude, layers, layers_pattern, ranks = PEFT_PATTERNS[case]
    raw = {"r": 4, "lora_alpha": 8, "target_modules": target, "exclude_modules": exclude,
           "layers_to_transform": layers, "layers_pattern": layers_pattern,
           "rank_pattern": ranks, "alpha_pattern": {k: float(v) for k, v in ranks.items()}}
    cfg = parse_peft_config(raw, Path("adapter_config.json"))
    names = _other_module_names(4) + [hf_module_name(i, p) for i in range(4) for p in ALL_PROJS]
    cfg.prepare(names)
    peft_cfg = SimpleNamespace(target_modules=target, exclude_modules=exclude,
                               layers_to_transform=layers, layers_pattern=layers_pattern,
                               modules_to_save=None, target_parameters=None)
    for name in names:
        want = check_target_module_exists(peft_cfg, name)
        want = bool(want) and type(want).__name__ != "_ExcludedModule"
        assert cfg.targets(name) == want, name
        key = get_pattern_key(list(ranks), name)
        assert cfg.rank_and_alpha(name) == (ranks.get(key, 4), float(ranks.get(key, 8))), name


def test_common_patterns_match_in_process():
    """Patterns of the usual shapes need no child process; nested repeats and repeats over
    alternations do (they are still matched, by ``re``, with a deadline)."""
    for p in [r".*\.(q_proj|v_proj)", r"^(?!.*vision).*(q|k)_proj$", r"(.*\.)?(q_proj)$",
              r"(?:^|.*?\.)layers\.(?P<idx>\d+)\.", r"model\.layers\.\d+\.mlp\.up_proj"]:
        assert is_bounded(p), p
    for p in [EVIL, r"(\d+\.)+x", r"(a|a)*b", r"(?:x{1,9}){1,9}", r"(a)\1", ".*.*.*.*"]:
        assert not is_bounded(p), p


# -- symlinks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("file", ["adapter_config.json", "adapter_model.safetensors"])
def test_symlink_out_of_adapter_dir_refused(llama, good, tmp_path, file):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = outside / file
    (good / file).rename(target)  # a valid file, but outside the adapter directory
    (good / file).symlink_to(target)
    with pytest.raises(AdapterLoadError) as info:
        load_peft_adapter(good, llama[1], 8)
    msg = str(info.value)
    assert msg.startswith(f"adapter 'good': {file}: resolves to a file outside"), msg
    assert str(outside) not in msg and str(tmp_path) not in msg


def test_bin_symlink_out_of_adapter_dir_refused(llama, tmp_path):
    d = make_peft_adapter(llama[0], tmp_path / "bin", r=4, safe_serialization=False)
    secret = tmp_path / "secret.bin"
    (d / "adapter_model.bin").rename(secret)
    (d / "adapter_model.bin").symlink_to(secret)
    with pytest.raises(AdapterLoadError, match="adapter_model.bin: resolves to a file outside"):
        load_peft_adapter(d, llama[1], 8)


def test_symlinks_inside_adapter_dir_and_hub_snapshots_load(llama, good, tmp_path):
    hf, mc = llama
    ref = load_peft_adapter(good, mc, 8)
    # a symlink to a file inside the directory (a relative one, through a subdirectory)
    (good / "real").mkdir()
    (good / "adapter_model.safetensors").rename(good / "real" / "w.safetensors")
    (good / "adapter_model.safetensors").symlink_to(Path("real") / "w.safetensors")
    inside = load_peft_adapter(good, mc, 8)
    assert inside.weights.keys() == ref.weights.keys()
    # the Hugging Face hub cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--x--y"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(["adapter_config.json", "adapter_model.safetensors"]):
        (good / f).resolve().rename(blobs / f"h{i}")
        (snap / f).symlink_to(Path("..") / ".." / "blobs" / f"h{i}")
    hub = load_peft_adapter(snap, mc, 8, name="hub")
    for key, w in ref.weights.items():
        assert (hub.weights[key].a == w.a).all() and hub.weights[key].scaling == w.scaling
