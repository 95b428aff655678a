"""Multi-LoRA overhead on CPU: the random Llama of bench_engine.py cut to 4 layers, 16 rank-16
adapters on all seven projections, float32, 2 threads. In one run:

  (a) prefill of 32 x 128-token prompts, (b) 32 decode steps, each on the base model, on 16
  adapters in consecutive slots (the best case) and on 16 adapters in scattered slots (what
  serving sees after loads and evictions); (c) the scattered mix through transformers + PEFT
  (``adapter_names=``) and PEFT's own base; (d) 16 DoRA adapters (``use_dora``, same ranks
  and targets), (e) 16 adapters that also target ``embed_tokens`` and (f) 16 that also target
  ``lm_head`` (``enable_lm_head_lora``), each in consecutive slots, against (a)/(b)'s plain
  LoRA in consecutive slots; (g) the scattered mix again with the torch backend's LoRA ops
  swapped into the same engine (the engine's own are the C ones, "cpu", where they build),
  and (h) with the engine's ops but the gate/up expand and the down projection's shrink run
  apart from the MLP's activation (the engine fuses them into it on CPUs with AVX-512:
  ``lora_cpu.lora_expand_silu_mul``).

  Then (i) ``--prefill-pairs`` more rounds of the prefill alone, base and scattered (the
  order alternating), for the headline ratio: the median of the paired ratios and their
  quartiles (a prefill pair takes seconds, so a slow spell on a shared host hits both runs of
  a pair; the full rounds above are too few for a tight median).

    python benchmarks/bench_lora.py [--adapters 16] [--layers 4] [--repeat 5] \
        [--prefill-pairs 20] [--write-docs]

On a shared host, ``--threads 1 --clock cpu`` times with the process's CPU time, which does
not count the time the process waited for a core (at 2 threads a waiting thread stalls the
other at every parallel region, so wall times under load say little).

Prints the table with the decode floor computed from measured memory bandwidth; with
``--write-docs`` also writes it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import (
    ALL_PROJS,
    bench_threads,
    make_adapters,
    make_bench_model,
    markdown_table,
    write_section,
)

from loraplex import LLM, SamplingParams
from loraplex.lora.layers import LoRAEmbedding, LoRALinear, LoRANorm, LoRARotary
from loraplex.ops import get_lora_ops


def measure_bandwidth() -> float:
    """Bytes/s of a large copy (read + write counted), best of 5."""
    src = torch.randn(64 << 20 >> 2)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def loraplex_times(llm: LLM, prompts, names, steps: int,
                   clock=time.perf_counter) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step) of one batch through the engine."""
    engine = llm.engine
    sp = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    for i, (p, a) in enumerate(zip(prompts, names, strict=True)):
        engine.add_request(f"b{i}", p, sp, a)
    t = clock()
    started: set[str] = set()
    while len(started) < len(prompts):  # the prefill may take more than one step
        started.update(o.request_id for o in engine.step())
    prefill = clock() - t
    t = clock()
    for _ in range(steps):
        engine.step()
    decode = (clock() - t) / steps
    assert not engine.has_unfinished_requests()
    return prefill, decode


def prefill_time(llm: LLM, prompts, names, clock=time.perf_counter) -> float:
    """Seconds of one batch's prefill alone (one token generated per prompt)."""
    engine = llm.engine
    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    for i, (p, a) in enumerate(zip(prompts, names, strict=True)):
        engine.add_request(f"p{i}", p, sp, a)
    t = clock()
    while engine.has_unfinished_requests():
        engine.step()
    return clock() - t


def paired_prefill(llm: LLM, prompts, names, pairs: int, clock) -> list[float]:
    """``pairs`` ratios of the batch's prefill time to the base model's, each from a base run
    and a run with ``names`` back to back (which runs first alternates)."""
    base = [None] * len(prompts)
    ratios = []
    for k in range(pairs):
        first, second = (base, names) if k % 2 == 0 else (names, base)
        t1, t2 = prefill_time(llm, prompts, first, clock), prefill_time(llm, prompts, second, clock)
        ratios.append(t2 / t1 if k % 2 == 0 else t1 / t2)
    return ratios


def peft_times(model, ids: torch.Tensor, names, steps: int) -> tuple[float, float]:
    kw = {} if names is None else {"adapter_names": names}
    mask = torch.ones_like(ids)
    with torch.no_grad():
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                       pad_token_id=0, **kw)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps + 1,
                       min_new_tokens=steps + 1, do_sample=False, pad_token_id=0, **kw)
        total = time.perf_counter() - t
    return prefill, (total - prefill) / steps  # <= 0 when noise swamps it: shown as n/a


def make_variant_adapters(model, out_root: Path, n: int, r: int, prefix: str,
                          **lora_kwargs) -> dict[str, str]:
    """``n`` random rank-``r`` adapters on all seven projections with extra ``LoraConfig``
    fields (``use_dora=True``; ``target_modules`` for embedding LoRA); DoRA magnitudes are
    perturbed away from PEFT's initial ||W + s*B@A|| (as training would)."""
    import copy

    from peft import LoraConfig, get_peft_model

    dirs = {}
    lora_kwargs.setdefault("target_modules", list(ALL_PROJS))
    for i in range(n):
        torch.manual_seed(2000 + i)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, lora_dropout=0.0,
                         **lora_kwargs)
        pm = get_peft_model(copy.deepcopy(model), cfg)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(0.5 + torch.rand_like(p))
        path = out_root / f"{prefix}{i}"
        pm.save_pretrained(str(path))
        dirs[f"{prefix}{i}"] = str(path)
    return dirs


def keep_best(rows: dict[str, tuple[float, float]], key: str, run: tuple[float, float]) -> None:
    """``rows[key]``: the smallest (prefill, decode) times seen so far."""
    old = rows.get(key, (float("inf"), float("inf")))
    rows[key] = (min(old[0], run[0]), min(old[1], run[1]))


TORCH_OPS = "scattered, torch ops"  # the case run with the torch backend's LoRA ops
UNFUSED = "scattered, unfused"  # the engine's ops, nothing fused into activation, norms, rotary


def use_lora_ops(llm: LLM, backend: str, fused: bool = True) -> None:
    """Give every LoRA wrapper of the engine ``backend``'s ops (side-by-side cases of one
    engine: same weights, same slots); ``fused=False`` drops the ops fused into the MLP
    activation, the norms and the rotary (each projection then shrinks and expands in calls
    of its own, around the activation, the norms and the rotary)."""
    ops = get_lora_ops(backend)
    for m in llm.engine.runner.model.modules():
        if isinstance(m, LoRALinear):
            m.shrink, m.expand = ops.shrink, ops.expand
            m.expand_silu_mul = ops.expand_silu_mul if fused else None
        elif isinstance(m, LoRANorm):
            m.add_rms_norm = ops.add_rms_norm if fused else None
        elif isinstance(m, LoRARotary):
            m.rotary = ops.rotary if fused else None
        elif isinstance(m, LoRAEmbedding):
            m.expand = ops.expand


def interleaved_runs(llm: LLM, prompts, cases: dict[str, list], args,
                     clock) -> dict[str, list[tuple[float, float]]]:
    """(prefill, decode) of every case in each of ``args.repeat`` rounds, each round running
    every case once, so load drifts hit every case alike. The ``TORCH_OPS`` case runs the
    torch backend's ops, the ``UNFUSED`` one the engine's without the fused ones."""
    runs: dict[str, list[tuple[float, float]]] = {key: [] for key in cases}
    for _ in range(args.repeat):
        for key, ns in cases.items():
            use_lora_ops(llm, "torch" if key == TORCH_OPS else llm.engine.lora_backend,
                         fused=key != UNFUSED)
            runs[key].append(loraplex_times(llm, prompts, ns, args.steps, clock))
    use_lora_ops(llm, llm.engine.lora_backend)
    return runs


def best_of(runs: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    rows: dict[str, tuple[float, float]] = {}
    for key, rs in runs.items():
        for run in rs:
            keep_best(rows, key, run)
    return rows


def median_ratios(runs: dict[str, list[tuple[float, float]]], key: str) -> tuple[float, float]:
    """Median over rounds of (prefill, decode) of ``key`` / base in the same round: a paired
    statistic, steadier than best-of ratios on a shared host (a slow spell hits both)."""
    pairs = list(zip(runs[key], runs["base"], strict=True))
    return (statistics.median(k[0] / b[0] for k, b in pairs),
            statistics.median(k[1] / b[1] if b[1] > 0 else 0.0 for k, b in pairs))


def interleaved_best(llm: LLM, prompts, cases: dict[str, list], args,
                     clock) -> dict[str, tuple[float, float]]:
    """Best (prefill, decode) of ``interleaved_runs``."""
    return best_of(interleaved_runs(llm, prompts, cases, args, clock))


def best(fn, repeat: int) -> tuple[float, float]:
    runs = [fn() for _ in range(repeat)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def slot_layout(llm: LLM, names: list[str]) -> list[int]:
    """The adapter slots the batch's adapters occupy (sorted)."""
    keys = [None if k is None else k[0] for k in llm.engine.lora_pool.keys]  # (name, generation)
    return sorted({keys.index(n) for n in names})


def full_module_overhead(args, clock) -> str:
    """``--full-modules``: PEFT ``modules_to_save`` (full embed_tokens + lm_head copies) and
    ``trainable_token_indices`` (64 tokens, embedding rows only) against plain LoRA with the
    same LoRA weights: ``--batch`` prompts over 2 adapters of each kind, in turn, base too.
    Every full-copy row still runs the base lm_head GEMM, then its own (lora/
    full_module_layers.py), so lm_head work doubles for those rows; the embedding side is a
    gather. Returns the table."""
    kinds = {"plain LoRA": {}, "modules_to_save embed+lm_head": dict(
        modules_to_save=["embed_tokens", "lm_head"]),
        "trainable tokens (64)": dict(trainable_token_indices=list(range(100, 164)))}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf = make_bench_model(root / "model", num_hidden_layers=args.layers)
        dirs, names = {}, {}
        for k, (label, kw) in enumerate(kinds.items()):
            made = make_variant_adapters(hf, root, 2, args.rank, f"k{k}_", **kw)
            dirs |= made
            names[label] = [list(made)[i % 2] for i in range(args.batch)]
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, 32000, (args.batch, args.prompt_len), generator=g).tolist()
        llm = LLM(str(root / "model"), adapters=dirs, device="cpu", max_num_seqs=args.batch,
                  max_loras_per_batch=len(dirs), max_lora_rank=args.rank,
                  max_full_module_adapters=2, enable_prefix_caching=False)
        cases = {"base": [None] * args.batch} | names
        for ns in cases.values():  # warm up, and load every adapter into its slot
            loraplex_times(llm, prompts[:2], ns[:2], 1)
        rows = interleaved_best(llm, prompts, cases, args, clock)
    plain = rows["plain LoRA"]
    table = markdown_table(
        ["run", "prefill s", "decode ms/step", "prefill / plain LoRA", "decode / plain LoRA"],
        [[k, f"{p:.3f}", f"{d * 1e3:.1f}", f"{p / plain[0]:.3f}", f"{d / plain[1]:.3f}"]
         for k, (p, d) in rows.items()])
    return (f"Random Llama (hidden 1024, vocab 32000, {args.layers} layers), {args.batch} "
            f"prompts x {args.prompt_len} tokens, {args.steps} decode steps, 2 rank-{args.rank} "
            f"adapters of each kind on all seven projections, CPU float32, {args.threads} "
            f"threads, {args.clock} clock, best of {args.repeat}.\n\n"
            f"`python benchmarks/bench_lora.py --full-modules`\n\n{table}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--adapters", type=int, default=16, help="distinct adapters in the batch")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="picks the scattered slots")
    ap.add_argument("--prefill-pairs", type=int, default=20,
                    help="paired base / scattered prefill runs for the headline ratio")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="time with wall time or the process's CPU time (--threads 1)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--write-docs", action="store_true",
                    help="also write the table into docs/benchmarks.md")
    ap.add_argument("--full-modules", action="store_true",
                    help="only the modules_to_save / trainable tokens vs plain LoRA case")
    args = ap.parse_args()
    bench_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.full_modules:
        print(full_module_overhead(args, clock))
        return
    n = args.adapters
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf = make_bench_model(root / "model", num_hidden_layers=args.layers)
        # 2n adapters fill 2n slots (lora{i} in slot i); "in order" serves lora0..lora{n-1}
        # (consecutive slots, the best case), "scattered" a random n of the 2n (slots with gaps,
        # as in real serving after loads and evictions).
        dirs = make_adapters(hf, root, 2 * n, args.rank)
        dora_dirs = make_variant_adapters(hf, root, n, args.rank, "dora", use_dora=True)
        emb_dirs = make_variant_adapters(hf, root, n, args.rank, "emb",
                                         target_modules=[*ALL_PROJS, "embed_tokens"])
        head_dirs = make_variant_adapters(hf, root, n, args.rank, "head",
                                          target_modules=[*ALL_PROJS, "lm_head"])
        ordered = [f"lora{i % n}" for i in range(args.batch)]
        picked = random.Random(args.seed).sample(range(2 * n), n)
        scattered = [f"lora{picked[i % n]}" for i in range(args.batch)]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 32000, (args.batch, args.prompt_len), generator=g)
        prompts = ids.tolist()
        dora = [f"dora{i % n}" for i in range(args.batch)]
        emb = [f"emb{i % n}" for i in range(args.batch)]
        head = [f"head{i % n}" for i in range(args.batch)]
        # enable_lm_head_lora for (f): every case runs with it on (lm_head adapters resident)
        llm = LLM(str(root / "model"), adapters=dirs | dora_dirs | emb_dirs | head_dirs,
                  device="cpu", max_num_seqs=max(args.batch, 2 * n), max_loras_per_batch=5 * n,
                  max_lora_rank=args.rank, enable_prefix_caching=False,  # repeats prompts
                  enable_lm_head_lora=True)
        # one at a time: lora{i} lands in slot i, dora{i} in 2n + i, emb{i} in 3n + i,
        # head{i} in 4n + i
        for name in ([f"lora{i}" for i in range(2 * n)] + [f"dora{i}" for i in range(n)]
                     + [f"emb{i}" for i in range(n)] + [f"head{i}" for i in range(n)]):
            loraplex_times(llm, prompts[:1], [name], 1)
        layouts = {"in order": slot_layout(llm, ordered), "scattered": slot_layout(llm, scattered),
                   "DoRA": slot_layout(llm, dora), "embedding": slot_layout(llm, emb),
                   "lm_head": slot_layout(llm, head)}
        for key, slots in layouts.items():
            print(f"{key}: slots {slots}", flush=True)
        cases = {"base": [None] * args.batch, "in order": ordered, "scattered": scattered,
                 TORCH_OPS: scattered, UNFUSED: scattered,
                 "DoRA": dora, "embedding": emb, "lm_head": head}
        runs = interleaved_runs(llm, prompts, cases, args, clock)
        rows = best_of(runs)
        pairs = paired_prefill(llm, prompts, scattered, args.prefill_pairs, clock)
        if not args.skip_peft:
            from peft import PeftModel

            pm = PeftModel.from_pretrained(hf, dirs["lora0"], adapter_name="lora0")
            for name in sorted(set(ordered) | set(scattered)):
                if name != "lora0":
                    pm.load_adapter(dirs[name], adapter_name=name)
            pm.eval()
            peft_times(pm, ids[:2], ordered[:2], 2)  # warm up
            best_p: dict[str, tuple[float, float]] = {}
            for _ in range(args.repeat):  # interleaved as above
                with pm.disable_adapter():
                    runs = {"peft_base": peft_times(pm, ids, None, args.steps)}
                runs["peft_mixed"] = peft_times(pm, ids, scattered, args.steps)
                for key, run in runs.items():
                    keep_best(best_p, key, run)
            rows |= best_p
    bw = measure_bandwidth()
    cfg = llm.engine.model_config  # bytes of one adapter: A [r, in] + B [out, r], float32
    per_adapter = args.rank * 4 * cfg.num_layers * sum(
        i + o for i, o in cfg.proj_shapes().values())
    floor = rows["base"][1] + n * per_adapter / bw
    ntok = args.batch
    base = rows["base"]

    def row(label: str, t: tuple[float, float], ref: tuple[float, float],
            key: str | None = None) -> list[str]:
        ok = t[1] > 0 and ref[1] > 0
        med = median_ratios(runs, key) if key in runs else None
        return [label, f"{t[0]:.3f}", f"{t[1] * 1e3:.1f}" if ok else "n/a",
                f"{ntok / t[1]:.0f}" if ok else "n/a", f"{t[0] / ref[0]:.3f}",
                f"{t[1] / ref[1]:.3f}" if ok else "n/a",
                f"{med[0]:.3f} / {med[1]:.3f}" if med else ""]

    table_rows = [
        row("loraplex base", base, base),
        row(f"loraplex {n} adapters, slots in order", rows["in order"], base, "in order"),
        row(f"loraplex {n} adapters, slots scattered", rows["scattered"], base, "scattered"),
        row(f"loraplex {n} adapters, slots scattered, torch ops", rows[TORCH_OPS], base,
            TORCH_OPS),
        row(f"loraplex {n} adapters, slots scattered, LoRA ops not fused", rows[UNFUSED],
            base, UNFUSED),
        row(f"loraplex {n} DoRA adapters, slots in order", rows["DoRA"], base, "DoRA"),
        row(f"loraplex {n} adapters + embed_tokens LoRA, slots in order", rows["embedding"],
            base, "embedding"),
        row(f"loraplex {n} adapters + lm_head LoRA, slots in order", rows["lm_head"], base,
            "lm_head"),
        ["decode floor (base + adapter bytes / bandwidth)", "", f"{floor * 1e3:.1f}", "", "",
         f"{floor / base[1]:.3f}", ""],
    ]
    plain, dr, em, hd = rows["in order"], rows["DoRA"], rows["embedding"], rows["lm_head"]
    summary = ""
    if len(pairs) >= 2:
        q = statistics.quantiles(pairs, n=4)
        summary = (f"\nScattered prefill / base over {len(pairs)} paired prefill-only runs: "
                   f"median **{statistics.median(pairs):.3f}**, quartiles {q[0]:.3f}-{q[2]:.3f}"
                   f", range {min(pairs):.3f}-{max(pairs):.3f}.\n")
    summary += (f"\nAgainst plain LoRA in consecutive slots (time ratio): DoRA prefill "
               f"{dr[0] / plain[0]:.3f}x, decode {dr[1] / plain[1]:.3f}x; + embed_tokens LoRA "
               f"prefill {em[0] / plain[0]:.3f}x, decode {em[1] / plain[1]:.3f}x; + lm_head "
               f"LoRA prefill {hd[0] / plain[0]:.3f}x, decode {hd[1] / plain[1]:.3f}x.\n")
    if "peft_mixed" in rows:
        pb, pmx = rows["peft_base"], rows["peft_mixed"]
        table_rows += [row("transformers base", pb, pb),
                       row(f"transformers + PEFT {n} adapters", pmx, pb)]
        summary += "\nloraplex vs transformers + PEFT on the same mixed batch (speed ratio):\n"
        for key in ("in order", "scattered"):
            decode = f"{pmx[1] / rows[key][1]:.2f}x" if pmx[1] > 0 else "n/a"
            summary += (f"- slots {key}: prefill {pmx[0] / rows[key][0]:.2f}x, decode "
                        f"{decode} PEFT's speed\n")
    table = markdown_table(["run", "prefill s", "decode ms/step", "decode tok/s",
                            "prefill / base", "decode / base",
                            "median of rounds: prefill / decode vs base"], table_rows)
    body = (f"Random Llama (hidden 1024, {args.layers} layers), {args.batch} prompts x "
            f"{args.prompt_len} tokens, {args.steps} decode steps, {n} distinct rank-{args.rank} "
            f"adapters on all seven projections, out of {2 * n} held in {2 * n} slots; CPU "
            f"float32, {args.threads} threads, {args.clock} clock, LoRA ops "
            f"\"{llm.engine.lora_backend}\" (\"torch ops\": the torch backend's, on the same "
            f"engine; \"not fused\": every shrink and expand a call of its own, none in the MLP "
            f"activation's or the norms' pass); best "
            f"of {args.repeat} rounds, each running every case once (base and mixed runs "
            f"interleaved in one run); the last column is the median over the rounds "
            f"of each round's ratio to that round's base. Scattered slots: {layouts['scattered']}; "
            f"{n} DoRA adapters (same rank and targets) in slots {layouts['DoRA']}; {n} adapters "
            f"also on embed_tokens in slots {layouts['embedding']}; {n} also on lm_head "
            f"(vocabulary {cfg.vocab_size}) in slots {layouts['lm_head']}. Measured copy "
            f"bandwidth {bw / 1e9:.1f} GB/s; one adapter is {per_adapter / 1e6:.1f} MB.\n\n"
            f"`python benchmarks/bench_lora.py`\n\n{table}\n{summary}")
    print(body)
    if args.write_docs:
        write_section(Path(__file__).parents[1] / "docs" / "benchmarks.md",
                      "Multi-LoRA overhead (CPU)", body)


if __name__ == "__main__":
    main()
