"""Models and adapters by Hugging Face Hub id, from a pre-populated hub cache in offline mode
(no network): ``LLM("org/name")``, ``revision=``, adapters ``org/adapter[@revision]``, local
paths first, and clear errors for ids the cache lacks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers_lora import make_peft_adapter, make_tiny_model

from loraplex import LLM, AdapterLoadError, ModelLoadError, SamplingParams

SP = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = [[1, 17, 29, 40, 8]]


def put_in_cache(cache: Path, repo_id: str, src: Path, commit: str,
                 refs: tuple[str, ...] = ("main",)) -> None:
    """Lay ``src``'s files out as the hub cache does: ``models--org--name/snapshots/<commit>``
    (blob symlinks there are an optimisation; plain files are what a reader sees), and
    ``refs/<ref>`` files holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub cache holding org/tiny (main = model A; commit "b"*40 and branch v2 = model B)
    and org/tiny-adapter; offline mode, HF_HUB_CACHE pointing at it."""
    a, hf_a = make_tiny_model(tmp_path / "a", "llama", seed=0)
    b, _ = make_tiny_model(tmp_path / "b", "llama", seed=1)
    adapter = make_peft_adapter(hf_a, tmp_path / "adapter", seed=3, r=4)
    cache = tmp_path / "hub"
    put_in_cache(cache, "org/tiny", a, "a" * 40)
    put_in_cache(cache, "org/tiny", b, "b" * 40, refs=("v2",))
    put_in_cache(cache, "org/tiny-adapter", adapter, "c" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"a": a, "b": b, "adapter": adapter, "cache": cache}


def _tokens(llm: LLM, adapter: str | None = None) -> list[int]:
    return llm.generate(PROMPT, SP, adapters=adapter)[0].token_ids


def test_model_and_adapter_by_hub_id(hub):
    local = LLM(str(hub["a"]), adapters={"x": str(hub["adapter"])}, device="cpu")
    by_id = LLM("org/tiny", adapters={"x": "org/tiny-adapter"}, device="cpu")
    assert _tokens(by_id) == _tokens(local)
    assert _tokens(by_id, "x") == _tokens(local, "x") != _tokens(local)
    by_id.load_adapter("y", "org/tiny-adapter@" + "c" * 40)
    assert _tokens(by_id, "y") == _tokens(local, "x")


def test_revision_picks_the_snapshot(hub, monkeypatch):
    want_b = _tokens(LLM(str(hub["b"]), device="cpu"))
    assert _tokens(LLM(str(hub["a"]), device="cpu")) != want_b  # the two models differ
    assert _tokens(LLM("org/tiny", device="cpu", revision="v2")) == want_b
    assert _tokens(LLM("org/tiny", device="cpu", revision="b" * 40)) == want_b
    # HF_HOME (its hub/ folder) works as well as HF_HUB_CACHE
    home = hub["cache"].parent / "home"
    shutil.copytree(hub["cache"], home / "hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert _tokens(LLM("org/tiny", device="cpu", revision="v2")) == want_b


def test_local_path_wins_over_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(hub["b"], tmp_path / "org" / "tiny")  # a local "org/tiny" directory
    assert _tokens(LLM("org/tiny", device="cpu")) == _tokens(LLM(str(hub["b"]), device="cpu"))
    with pytest.raises(ModelLoadError, match="local path; revision"):
        LLM("org/tiny", device="cpu", revision="v2")


def test_ids_missing_from_the_cache_are_clear_errors(hub):
    with pytest.raises(ModelLoadError, match=r"'org/absent' is not a local path .*HF_HUB_OFFLINE"):
        LLM("org/absent", device="cpu")
    with pytest.raises(ModelLoadError, match="revision 'nope'"):
        LLM("org/tiny", device="cpu", revision="nope")
    llm = LLM("org/tiny", device="cpu")
    with pytest.raises(AdapterLoadError, match="'org/no-adapter'"):
        llm.load_adapter("z", "org/no-adapter")
    assert llm.list_adapters() == []


def test_cli_generate_with_hub_ids(hub, capsys):
    from loraplex.cli import main

    local = LLM(str(hub["a"]), adapters={"x": str(hub["adapter"])}, device="cpu")
    sp = SamplingParams(max_tokens=4, temperature=0)
    want = local.generate(["the cat"], sp, adapters="x")[0].text
    rc = main(["generate", "--model", "org/tiny", "--adapter", "x=org/tiny-adapter",
               "--use-adapter", "x", "--device", "cpu", "--max-tokens", "4",
               "--prompt", "the cat"])
    assert rc in (0, None)
    assert capsys.readouterr().out == want + "\n"
