"""The offline Python API: ``LLM.generate`` and ``LLM.score`` over many adapters at once."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import replace

import torch

from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.sequence import RequestOutput
from loraplex.errors import InvalidRequestError, LoraplexError
from loraplex.sampling_params import SamplingParams


class LLM:
    """One base model plus named PEFT adapters; see docs/design.md for the contract."""

    def __init__(
        self,
        model: str,
        adapters: dict[str, str] | None = None,
        max_loras_per_batch: int = 8,
        max_lora_rank: int = 64,
        max_cpu_loras: int | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        lora_backend: str = "auto",
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        max_full_module_adapters: int = 0,
        tensor_parallel_size: int = 1,
        **engine_kwargs,
    ) -> None:
        """Engine arguments beyond these (``max_num_batched_tokens``, ``num_kv_blocks``,
        ``kv_cache_memory_bytes``, ``cuda_graphs``, ...) go to ``LLMEngine.from_args``; out of
        range or mistyped ones raise ``ConfigError`` naming the argument.
        ``enable_prefix_caching``: requests with the same adapter and prompt prefix share its
        KV blocks; ``enable_chunked_prefill``: prompt chunks and decodes share each step's
        token budget (see engine/scheduler.py). ``max_full_module_adapters``: device slots for
        adapters that carry a full embedding / lm_head copy (PEFT ``modules_to_save``), each
        ``2 x vocab x hidden`` in the serving dtype; 0 refuses such adapters at load.

        ``tensor_parallel_size``: ranks the model is split over (``torch.distributed``: gloo
        on CPU, NCCL on one GPU a rank); this process is rank 0 and starts the others, which
        ``close()`` (or leaving a ``with LLM(...)`` block, or interpreter exit) stops.
        ``enable_lm_head_lora=True`` (an engine argument) serves adapters that target
        ``lm_head``; it allocates their vocabulary-wide B buffers up front, so it is off by
        default and such adapters are refused."""
        self.engine = LLMEngine.from_args(
            model,
            adapters=adapters,
            max_loras_per_batch=max_loras_per_batch,
            max_lora_rank=max_lora_rank,
            max_cpu_loras=max_cpu_loras,
            device=device,
            dtype=dtype,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            lora_backend=lora_backend,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
            enable_chunked_prefill=enable_chunked_prefill,
            max_full_module_adapters=max_full_module_adapters,
            tensor_parallel_size=tensor_parallel_size,
            **engine_kwargs,
        )
        self._counter = itertools.count()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any; safe to call more than once."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Seq[str] | Seq[list[int]] | str,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        adapters: str | None | Seq[str | None] = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt in one continuously batched run; outputs in prompt order.

        Every request is validated before any runs; a request the engine fails comes back
        with ``finish_reason="error"`` and ``error`` set (e.g. its logits were NaN/inf, its
        adapter was unloaded before it started, or its adapter's files vanished); the others
        run on.

        A prompt whose params have ``n`` > 1 gives ``n`` outputs, one after another in the
        returned list (so the list has ``sum(n)`` entries). With ``best_of``, that many
        candidates run and the ``n`` with the highest ``cumulative_logprob`` come back, best
        first; otherwise the ``n`` samples come in the order they were drawn. A seeded
        request's ``i``-th candidate draws with ``seed + i`` (vLLM's rule), so the candidates
        differ and still repeat.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        params = _per_prompt(sampling_params or SamplingParams(), len(prompts), "sampling_params")
        names = _per_prompt(adapters, len(prompts), "adapters")
        ids = [self.engine.tokenize(p) for p in prompts]
        for p, sp, a in zip(ids, params, names):
            self.engine.validate_prompt(p)
            self.engine.validate_params(sp)
            if a is not None:
                self.engine.check_adapter(a)
        groups = [[(f"llm-{next(self._counter)}", c) for c in _candidates(sp)] for sp in params]
        done: dict[str, RequestOutput] = {}
        requests = [(rid, p, c, a) for g, p, a in zip(groups, ids, names) for rid, c in g]
        rids = [r[0] for r in requests]
        try:
            for rid, p, sp, a in requests:
                self.engine.add_request(rid, p, sp, a)
            while len(done) < len(rids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:
            for rid in rids:
                self.engine.abort_request(rid)
            raise
        return [out for g, sp in zip(groups, params) for out in _best(g, sp, done)]

    def score(
        self, prompts: Seq[list[int]] | Seq[str], adapters: str | None | Seq[str | None] = None
    ) -> list[torch.Tensor]:
        """Next-token logits at every position: a float32 CPU tensor [len(prompt), vocab] each."""
        ids = [self.engine.tokenize(p) for p in prompts]
        return self.engine.score(ids, _per_prompt(adapters, len(ids), "adapters"))

    def load_adapter(self, name: str, path: str) -> None:
        self.engine.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    def list_adapters(self) -> list[str]:
        return self.engine.list_adapters()


def _candidates(sp: SamplingParams) -> list[SamplingParams]:
    """The requests that run for one prompt: ``best_of`` (else ``n``) single samples; ranked
    candidates compute their logprobs (k = 0: the chosen token's only) to be ranked."""
    count = sp.best_of or sp.n
    if count == 1:
        return [sp]
    logprobs = sp.logprobs if sp.logprobs is not None or sp.best_of is None else 0
    return [replace(sp, n=1, best_of=None, logprobs=logprobs,
                    seed=None if sp.seed is None else (sp.seed + i) % 2**64)
            for i in range(count)]


def _best(group: list[tuple[str, SamplingParams]], sp: SamplingParams,
          done: dict[str, RequestOutput]) -> list[RequestOutput]:
    outs = [done[rid] for rid, _ in group]
    if sp.best_of is None:
        return outs
    # failed candidates last; stable, so ties keep their draw order
    outs.sort(key=lambda o: (o.finish_reason != "error", o.cumulative_logprob), reverse=True)
    if sp.logprobs is None:  # computed for the ranking only: not asked for
        for o in outs:
            o.logprobs = None
    return outs[: sp.n]


def _per_prompt(value, n: int, field: str) -> list:
    if value is None or isinstance(value, (str, SamplingParams)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise InvalidRequestError(f"{field} has {len(value)} entries for {n} prompts")
    return value


__all__ = ["LLM", "LoraplexError"]
