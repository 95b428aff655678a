"""The repository stands alone: its text cites only files that exist in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = {".md", ".py", ".sh", ".toml"}
# a path from the repository root, or a module path inside the package (as the docs write them)
# (a path that runs on into a glob, e.g. tests/test_*.py, is a pattern, not a citation)
ROOTED = re.compile(r"(?<![\w/.-])((?:docs|benchmarks|tests|scripts|loraplex|\.ci)/[\w./-]*\w)"
                    r"(?![\w*])")
IN_PACKAGE = re.compile(r"`((?:engine|kvcache|models|layers|lora|ops|server|demo)/[\w/.-]+\.py)")
# files outside the repository that earlier text leaned on (spelled so this file has neither)
OUTSIDE = ["DESIGN" + ".md", "STYLE" + ".md", "../" + "shared"]


def _files() -> list[Path]:
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "data"}
    return [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in TEXT
            and not skip & set(p.relative_to(ROOT).parts)]


def test_no_file_cites_a_file_outside_the_repository():
    bad = [(str(p.relative_to(ROOT)), word) for p in _files() for word in OUTSIDE
           if word in p.read_text(errors="replace")]
    assert not bad, bad


def test_cited_paths_exist():
    missing = []
    for path in _files():
        text = path.read_text(errors="replace")
        for ref in ROOTED.findall(text):
            ref = ref.rstrip(".")
            if "*" in ref or "{" in ref or not (ROOT / ref).exists():
                missing.append((str(path.relative_to(ROOT)), ref))
        missing += [(str(path.relative_to(ROOT)), ref) for ref in IN_PACKAGE.findall(text)
                    if not (ROOT / "loraplex" / ref).exists()]
    assert not missing, missing


# -- docs/real-models.md: the walkthrough's commands, requests and adapters ----------------
REAL_MODELS = ROOT / "docs" / "real-models.md"
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)
# verbatim adapter_config.json of the walkthrough's adapters, as published on the Hub
# (sujithatz/quen_2.5_qlora at 3394dab6, XueyingJia/qwen2.5-0.5b-ours at 41ffc79)
HUB_ADAPTER_CONFIGS = {
    "finbot": {
        "alpha_pattern": {}, "auto_mapping": None,
        "base_model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": 32, "lora_dropout": 0.01, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA",
        "r": 16, "rank_pattern": {}, "revision": None,
        "target_modules": ["q_proj", "gate_proj", "k_proj", "down_proj", "v_proj", "up_proj",
                           "o_proj"],
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False},
    "hh-dpo": {
        "alpha_pattern": {}, "auto_mapping": None,
        "base_model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "bias": "none",
        "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": 16, "lora_bias": False, "lora_dropout": 0.05, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA", "r": 8,
        "rank_pattern": {}, "revision": None, "target_modules": ["v_proj", "q_proj"],
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False},
}


def _blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(REAL_MODELS.read_text()) if kind == lang]


def _shell_commands(prefix: str) -> list[list[str]]:
    """The doc's shell commands starting with ``prefix`` (continuation lines joined)."""
    import shlex

    cmds = []
    for body in _blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip().startswith(prefix):
                cmds.append(shlex.split(line, comments=True))
    return cmds


def test_real_models_loraplex_commands_parse_with_the_real_cli(monkeypatch):
    """Every ``loraplex ...`` command in the walkthrough parses with the CLI's own parser
    (an unknown flag exits with status 2), and ``serve`` hands its hub ids to the engine as
    hub ids (not made into paths under the working directory)."""
    from loraplex import cli
    from loraplex.server import api

    seen = []
    monkeypatch.setattr(api, "run_server", seen.append)
    cmds = _shell_commands("loraplex ")
    assert [c[1] for c in cmds] == ["serve"], cmds
    for cmd in cmds:
        assert cli.main(cmd[1:]) == 0, cmd
    (args,) = seen
    config = api.server_config_from_args(args)
    assert args.model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert config.served_model_name == "Qwen2.5-0.5B-Instruct"
    assert config.adapters == {
        "finbot": "sujithatz/quen_2.5_qlora@3394dab6ba21472d2a41011192e49c4da15c3d1c",
        "hh-dpo": "XueyingJia/qwen2.5-0.5b-ours"}
    assert args.max_lora_rank == max(c["r"] for c in HUB_ADAPTER_CONFIGS.values())


def test_real_models_benchmark_commands_use_existing_flags(monkeypatch):
    import importlib
    import subprocess
    import sys

    cmds = _shell_commands("python benchmarks/bench_real_shape.py")
    assert len(cmds) == 2
    help_text = subprocess.run([sys.executable, "benchmarks/bench_real_shape.py", "--help"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for cmd in cmds:
        for word in cmd[2:]:
            if word.startswith("--"):
                assert word in help_text, word
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module("bench_real_shape")
    shape = module.MODELS["qwen2.5-0.5b"]
    for a in shape.adapters:  # the benchmark's adapters are the walkthrough's
        cfg = HUB_ADAPTER_CONFIGS[a.name]
        assert (a.r, a.lora_alpha, set(a.target_modules)) == (
            cfg["r"], cfg["lora_alpha"], set(cfg["target_modules"]))


def test_real_models_requests_are_valid_api_requests():
    """The curl bodies validate against the server's request models, and name the served
    models the serve command registers."""
    import json

    from loraplex.server.protocol import ChatCompletionRequest, CompletionRequest

    kinds = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
    found = []
    for cmd in _shell_commands("curl"):
        url = next(w for w in cmd if w.startswith("localhost:"))
        path = url.removeprefix("localhost:8000")
        if "-d" not in cmd:
            assert path == "/v1/models"
            continue
        body = json.loads(cmd[cmd.index("-d") + 1])
        kinds[path].model_validate(body)
        found.append(body["model"])
    assert found == ["finbot", "hh-dpo", "Qwen2.5-0.5B-Instruct"]


def test_real_models_python_snippets_compile_and_use_real_arguments():
    import ast
    import inspect

    from loraplex import LLM, SamplingParams

    signatures = {"LLM": inspect.signature(LLM), "SamplingParams": inspect.signature(
        SamplingParams)}
    checked = 0
    for body in _blocks("python"):
        tree = ast.parse(body)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in signatures:
                params = signatures[node.func.id].parameters
                for kw in node.keywords:
                    assert kw.arg in params, (node.func.id, kw.arg)
                checked += 1
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "generate":
                params = inspect.signature(LLM.generate).parameters
                assert all(kw.arg in params for kw in node.keywords)
    assert checked >= 2


def test_hub_adapter_configs_load_and_equal_peft(tmp_path):
    """The two published adapter_config.json files, verbatim, on a small random Qwen2 with
    PEFT-made weights of their ranks and targets: loraplex loads both and serves them in one
    batch with the base model, each equal to PEFT's logits."""
    import json

    import torch
    from helpers_lora import make_peft_adapter, make_tiny_model, peft_reference

    from loraplex import LLM

    model_dir, hf = make_tiny_model(tmp_path / "qwen2", "qwen2", tie_word_embeddings=True)
    dirs = {}
    for i, (name, cfg) in enumerate(HUB_ADAPTER_CONFIGS.items()):
        d = make_peft_adapter(hf, tmp_path / name, seed=10 + i, r=cfg["r"],
                              lora_alpha=cfg["lora_alpha"],
                              target_modules=cfg["target_modules"], b_scale=0.5)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        dirs[name] = str(d)
    llm = LLM(str(model_dir), adapters=dirs, device="cpu", max_lora_rank=16)
    prompt = [1, 17, 42, 99, 5, 64, 23]
    names = ["finbot", None, "hh-dpo"]
    got = llm.score([prompt] * 3, adapters=names)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        base = hf(ids).logits[0]
        for name, logits in zip(names, got, strict=True):
            ref = base if name is None else peft_reference(hf, dirs[name])(ids).logits[0]
            assert (logits - ref).abs().max() <= 1e-4 * ref.abs().max(), name
        assert (got[0] - base).abs().max() > 1e-3  # the adapters change the logits
        assert (got[2] - base).abs().max() > 1e-3
