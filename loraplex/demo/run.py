"""``loraplex demo``: one mixed batch over the shipped demo model and its three adapters."""

from __future__ import annotations

import argparse
import time

from loraplex.demo import ADAPTERS, expected, paths, prompt

PHRASES = ["hello world", "lora serving", "one batch", "many adapters"]


def run_demo(args: argparse.Namespace) -> None:
    model_dir, adapter_dirs = paths()
    if args.serve:
        return _serve(args, model_dir, adapter_dirs)
    from loraplex.llm import LLM
    from loraplex.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model_dir, adapters=adapter_dirs, device=args.device)
    load_s = time.perf_counter() - t0
    names: list[str | None] = [None, *ADAPTERS]
    requests = [(p, a) for p in PHRASES for a in names]
    sp = SamplingParams(max_tokens=32, temperature=0)
    t0 = time.perf_counter()
    outs = llm.generate([prompt(p) for p, _ in requests], sp, adapters=[a for _, a in requests])
    gen_s = time.perf_counter() - t0
    width = max(len(p) for p in PHRASES) + 2
    print(f"{'phrase':<{width}} {'adapter':<9} output")
    print(f"{'-' * width} {'-' * 9} {'-' * 28}")
    right = 0
    for (phrase, adapter), out in zip(requests, outs, strict=True):
        ok = out.text == expected(phrase, adapter)
        right += ok
        mark = "" if ok else "   (expected " + expected(phrase, adapter) + ")"
        print(f"{phrase:<{width}} {adapter or 'base':<9} {out.text}{mark}")
    tokens = sum(len(o.token_ids) for o in outs)
    print(
        f"\n{len(requests)} requests, {len(names) - 1} adapters + base in one batch: "
        f"{tokens} tokens in {gen_s * 1000:.0f} ms ({tokens / gen_s:.0f} tok/s, "
        f"{llm.engine.device}, load {load_s:.1f} s); {right}/{len(requests)} as expected"
    )


def _serve(args: argparse.Namespace, model_dir: str, adapter_dirs: dict[str, str]) -> None:
    from loraplex.server.api import add_serve_args, run_server

    parser = add_serve_args(argparse.ArgumentParser())
    argv = [
        "--model",
        model_dir,
        "--served-model-name",
        "demo",
        "--port",
        str(args.port),
        "--device",
        args.device,
    ]
    for name, path in adapter_dirs.items():
        argv += ["--adapter", f"{name}={path}"]
    serve_args = parser.parse_args(argv)
    base = f"http://127.0.0.1:{args.port}/v1"
    print(
        f"""Serving the demo model as "demo" with adapters {", ".join(adapter_dirs)}.
Try, in another terminal:

  curl {base}/completions -H 'Content-Type: application/json' -d '{{"model": "reverse",
    "prompt": "in: hello world\\nout: ", "max_tokens": 32, "temperature": 0}}'

  curl {base}/chat/completions -H 'Content-Type: application/json' -d '{{"model": "upper",
    "messages": [{{"role": "user", "content": "hello world"}}], "temperature": 0}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{base}', api_key='none'); \\
print(c.completions.create(model='caesar', prompt='in: hello world\\nout: ', \\
max_tokens=32, temperature=0).choices[0].text); \\
print(c.chat.completions.create(model='reverse', messages=[{{'role': 'user', \\
'content': 'hello world'}}], temperature=0).choices[0].message.content)"

The chat template turns one user message (the phrase) into the prompt above.
""",
        flush=True,
    )
    run_server(serve_args)
