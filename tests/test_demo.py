"""The shipped demo model and adapters: meaning, not only numbers. 100 random phrases, every
adapter and the base model in ONE mixed batch, through LLM and through the HTTP server; and the
shipped adapters are real PEFT adapters that give the same outputs in peft."""

from __future__ import annotations

import asyncio
import random
import string
from collections import Counter

import pytest
import torch

from loraplex import LLM, SamplingParams, demo

MODES = [None, *demo.ADAPTERS]


def random_phrases(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    phrases = []
    while len(phrases) < n:
        words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 8)))
                 for _ in range(rng.randint(1, 4))]
        phrase = " ".join(words)
        if len(phrase) <= 24:
            phrases.append(phrase)
    return phrases


@pytest.fixture(scope="module")
def llm() -> LLM:
    model_dir, adapters = demo.paths()
    return LLM(model_dir, adapters=adapters, device="cpu", max_num_seqs=128)


def _accuracy(phrases, modes, texts) -> dict[str | None, float]:
    right, total = Counter(), Counter()
    for phrase, mode, text in zip(phrases, modes, texts, strict=True):
        total[mode] += 1
        right[mode] += text == demo.expected(phrase, mode)
    return {m: right[m] / total[m] for m in total}


def test_one_mixed_batch_is_right_for_every_adapter(llm):
    phrases = random_phrases(100)
    reqs = [(p, m) for p in phrases for m in MODES]
    outs = llm.generate([demo.prompt(p) for p, _ in reqs], SamplingParams(max_tokens=40,
                        temperature=0), adapters=[m for _, m in reqs])
    assert all(o.finish_reason == "stop" for o in outs[:8])
    acc = _accuracy([p for p, _ in reqs], [m for _, m in reqs], [o.text for o in outs])
    assert set(acc) == set(MODES)
    assert all(a >= 0.95 for a in acc.values()), acc


def test_same_through_the_http_server(tmp_path):
    import openai
    from server_utils import CLIENT_TIMEOUT, ServerProcess

    model_dir, adapters = demo.paths()
    args = ["--model", model_dir, "--served-model-name", "demo", "--max-num-seqs", "128"]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    server = ServerProcess(args, tmp_path / "server.log")
    phrases = random_phrases(100)
    prompts = [demo.prompt(p) for p in phrases]

    async def run() -> dict[str | None, list[str]]:
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x",
                                     timeout=CLIENT_TIMEOUT)

        async def one(mode):  # one request per adapter, 100 prompts each: all in flight at once
            r = await client.completions.create(model=mode or "demo", prompt=prompts,
                                                max_tokens=40, temperature=0)
            return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

        texts = await asyncio.gather(*(one(m) for m in MODES))
        await client.close()
        return dict(zip(MODES, texts, strict=True))

    try:
        texts = asyncio.run(run())
    finally:
        server.stop()
    for mode in MODES:
        acc = _accuracy(phrases, [mode] * len(phrases), texts[mode])[mode]
        assert acc >= 0.95, (mode, acc)


def test_shipped_adapters_are_peft_adapters_with_the_same_outputs(llm):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, adapters = demo.paths()
    tok = AutoTokenizer.from_pretrained(model_dir)
    phrases = random_phrases(6, seed=7)
    for name, path in adapters.items():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(base, path).eval()
        ours = llm.generate([demo.prompt(p) for p in phrases],
                            SamplingParams(max_tokens=40, temperature=0), adapters=name)
        for phrase, out in zip(phrases, ours, strict=True):
            ids = torch.tensor([tok.encode(demo.prompt(phrase))])
            with torch.no_grad():
                ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=40, do_sample=False)[0, ids.shape[1]:]
            assert out.token_ids == ref.tolist()[: len(out.token_ids)], (name, phrase)
            assert tok.decode(ref, skip_special_tokens=True) == out.text


def test_bench_runs_on_the_demo_model_with_its_default_sizes(capsys):
    """The demo's context is 128 tokens and its vocabulary 100 ids: the default request size
    (128 + 32) and ids past 100 used to be refused before a single step ran."""
    from loraplex import cli

    model_dir, adapters = demo.paths()
    flags = [f"--adapter={n}={p}" for n, p in adapters.items()]
    assert cli.main(["bench", "--model", model_dir, "--batch", "6", *flags]) == 0
    line = capsys.readouterr().out
    assert "6 requests (96 prompt + 32 output tokens each), over 3 adapters" in line, line
    assert cli.main(["bench", "--model", model_dir, "--batch", "2"]) == 0
    line = capsys.readouterr().out
    assert "base model only: 64 tokens" in line, line


def test_bench_sizes_fit_the_context_and_vocabulary():
    from loraplex.cli import bench_prompts, bench_sizes

    assert bench_sizes(4096, None, None) == (128, 32)
    for ctx in (2, 16, 128, 150):
        inp, out = bench_sizes(ctx, None, None)
        assert inp >= 1 and out >= 1 and inp + out <= ctx, (ctx, inp, out)
    assert bench_sizes(128, 200, 7) == (200, 7)  # explicit sizes are the user's to get right
    prompts = bench_prompts(5, 300, 100, [0, 1, 2, 3])
    assert len(prompts) == 5 and all(len(p) == 300 for p in prompts)
    assert {t for p in prompts for t in p} <= set(range(4, 100))
    assert len({tuple(p) for p in prompts}) == 5


def test_help_shows_defaults_and_no_markup(capsys):
    from loraplex import cli

    for argv in (["--help"], ["bench", "--help"], ["serve", "--help"], ["generate", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        text = capsys.readouterr().out
        assert "``" not in text and "from_args" not in text, argv
        if argv != ["--help"]:
            assert "default: 8" in " ".join(text.split()), argv  # --max-loras-per-batch
        if argv == ["generate", "--help"]:
            assert "--temperature TEMPERATURE default: 0.0" in " ".join(text.split())


def test_training_script_writes_a_new_directory_by_default(tmp_path, monkeypatch):
    from pathlib import Path

    from loraplex.demo import train

    monkeypatch.chdir(tmp_path)
    out = train.parse_args([]).out.resolve()
    shipped = Path(demo.__file__).resolve().parent / "data"
    assert out == tmp_path / "loraplex-demo-trained"
    assert shipped not in (out, *out.parents)
    assert train.parse_args(["--out", "x"]).out == Path("x")


def test_training_script_run_leaves_the_shipped_files_alone(tmp_path):
    """``python -m loraplex.demo.train`` (a few steps) without --out: everything lands in
    ./loraplex-demo-trained, loadable by loraplex; the shipped files are untouched."""
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    shipped = Path(demo.__file__).resolve().parent / "data"

    def digest() -> dict[str, str]:
        return {str(p.relative_to(shipped)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(shipped.rglob("*")) if p.is_file()}

    before = digest()
    done = subprocess.run(
        [sys.executable, "-m", "loraplex.demo.train", "--base-steps", "5",
         "--adapter-steps", "2", "--eval-n", "2", "--batch", "8"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(Path(demo.__file__).parents[2])},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "loraplex-demo-trained"
    assert {p.name for p in out.iterdir()} == {"model", *demo.ADAPTERS}
    assert digest() == before
    llm = LLM(str(out / "model"), adapters={n: str(out / n) for n in demo.ADAPTERS}, device="cpu")
    assert len(llm.generate(["in: ab"], SamplingParams(max_tokens=2), adapters="upper")) == 1
