"""The synchronous engine: add_request / step / abort. One step = schedule -> run -> finish."""

from __future__ import annotations

import contextlib
import itertools
import threading
from concurrent.futures import Future
from pathlib import Path

import torch

from loraplex.config import (
    CacheConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
    apply_cpu_threads,
    check_adapter_map,
    check_int,
    check_tensor_parallel,
    resolve_device,
    resolve_dtype,
)
from loraplex.distributed.executor import TPExecutor
from loraplex.distributed.parallel_state import tp_size
from loraplex.engine.cuda_graph import graph_batch_sizes
from loraplex.engine.detokenizer import detokenize_step, find_stop, visible_text
from loraplex.engine.guided import GuidedDecoding, GuidedParams
from loraplex.engine.logprobs import record_sample_logprob
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import RequestOutput, Sequence, SequenceStatus
from loraplex.errors import (
    CapacityError,
    ConfigError,
    InvalidRequestError,
    TensorParallelError,
)
from loraplex.kvcache.block_manager import BlockManager
from loraplex.kvcache.kv_cache import allocate_kv_cache, bytes_per_block
from loraplex.kvcache.prefix_cache import root_hash
from loraplex.kvcache.profile import largest_step
from loraplex.kvcache.sizing import MemorySplit, cuda_graph_reserve, measure_peak, num_kv_blocks
from loraplex.layers.linear import LinearBase, can_prepack, prepack_linear_weights
from loraplex.lora.adapter import LoRAAdapter
from loraplex.lora.base_weights import CheckpointWeights
from loraplex.lora.batch import LoRABatchBuilder
from loraplex.lora.buffers import LoRABuffers
from loraplex.lora.full_module_layers import FullModuleBuffers, install_full_module_layers
from loraplex.lora.host_cache import HostCache, default_max_cpu_lora_bytes
from loraplex.lora.layers import install_lora_layers
from loraplex.lora.loader import AdapterLoader
from loraplex.lora.pool import LoRASlotPool
from loraplex.lora.registry import AdapterEntry, AdapterRegistry
from loraplex.models.hub import resolve_model_path
from loraplex.models.loader import load_model, load_model_config
from loraplex.ops.lora_ops import resolve_lora_backend
from loraplex.sampling_params import SamplingParams


class LLMEngine:
    def __init__(
        self,
        model_dir: str | Path,
        model_config: ModelConfig,
        model,
        tokenizer,
        sched: SchedulerConfig,
        cache: CacheConfig,
        lora: LoRAConfig,
        device: torch.device,
        dtype: torch.dtype,
        cuda_graphs: bool | None = None,
        tp_peer=None,
    ) -> None:
        """``tp_peer``: this rank's tensor-parallel side (``distributed/executor.py`` on rank
        0, ``distributed/worker.py`` on the others), None at tensor-parallel size 1."""
        self.model_dir = str(model_dir)
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.device, self.dtype = device, dtype
        self.max_model_len = sched.max_model_len
        weights = sum(t.nbytes for t in itertools.chain(model.parameters(), model.buffers()))
        # what torch held before this engine's weights: other engines in this process
        others = (max(0, torch.cuda.memory_allocated(device) - weights)
                  if device.type == "cuda" else 0)
        # The adapter subsystem, one owner per concern (see docs/architecture.md). Its device
        # buffers are allocated before the KV cache is sized, so the cache gets what is left.
        max_tokens = max(sched.max_num_batched_tokens, sched.max_model_len)  # one forward
        self.adapters = AdapterRegistry()
        self.lora_cache = HostCache(lora.max_cpu_loras,
                                    lora.max_cpu_lora_bytes or default_max_cpu_lora_bytes())
        self.lora_loader = AdapterLoader(model_config, lora, dtype, self.adapters, self.lora_cache,
                                         base_weight=CheckpointWeights(model_dir).get)
        buffers = LoRABuffers(model_config, lora.max_loras_per_batch, lora.max_lora_rank, dtype,
                              device, lm_head=lora.enable_lm_head_lora)
        # full embedding / lm_head copies (modules_to_save) and trainable tokens
        self.full_modules = FullModuleBuffers(
            model_config, lora.max_loras_per_batch, lora.max_full_module_adapters, dtype, device,
            prepack=any(isinstance(m, LinearBase) and m.packed is not None
                        for m in model.modules()))
        self.lora_pool = LoRASlotPool(buffers, self.full_modules)
        self.lora_batches = LoRABatchBuilder(max_tokens, lora.max_loras_per_batch, device)
        self.lora_backend = resolve_lora_backend(lora.backend, device)
        self.lora_layers = install_lora_layers(model, buffers, self.lora_backend, max_tokens,
                                               dtype, device)
        install_full_module_layers(model, self.full_modules)
        self.max_tokens = max_tokens
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        capture = cuda_graphs and self._can_capture()
        num_blocks = num_kv_blocks(
            cache, bytes_per_block(model_config, cache.block_size, dtype), sched.max_model_len,
            device, MemorySplit(weights, buffers.nbytes, full_modules=self.full_modules.nbytes),
            profile=lambda: measure_peak(
                largest_step(model, sched, self.lora_batches, lora.max_loras_per_batch, device),
                device, others),
            graph_reserve=(cuda_graph_reserve(graph_batch_sizes(sched.max_num_seqs),
                                              model_config.vocab_size) if capture else 0))
        if tp_peer is not None:  # every rank's KV cache gets the same block count
            num_blocks = tp_peer.agree_num_blocks(num_blocks)
        self.blocks = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        # one extra block that no sequence owns: CUDA-graph padding rows write there
        self.kv_caches = allocate_kv_cache(
            model_config, num_blocks + 1, cache.block_size, dtype, device
        )
        self.scheduler = Scheduler(sched, self.blocks, self.adapters, self.lora_pool,
                                   self.lora_loader)
        self.eos_ids = set(model_config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.runner = ModelRunner(model, self.kv_caches, self.blocks, device, self.lora_batches,
                                  eos_ids=sorted(self.eos_ids))
        self.runner.full_modules = self.full_modules
        if cuda_graphs:
            self.runner.enable_decode_graphs(sched.max_num_seqs, sched.max_model_len,
                                             dummy_block=num_blocks, capture=capture)
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.max_num_seqs = sched.max_num_seqs
        self._guided_lock = threading.Lock()
        self.tp_peer = tp_peer
        if tp_peer is not None:
            tp_peer.attach(self)

    @classmethod
    def from_args(
        cls,
        model: str,
        adapters: dict[str, str] | None = None,
        max_loras_per_batch: int = 8,
        max_lora_rank: int = 64,
        max_cpu_loras: int | None = None,
        max_cpu_lora_bytes: int | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        max_num_batched_tokens: int | None = None,
        num_kv_blocks: int | None = None,
        lora_backend: str = "auto",
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        cuda_graphs: bool | None = None,
        cpu_prepack: bool | None = None,
        revision: str | None = None,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        max_full_module_adapters: int = 0,
        enable_lm_head_lora: bool = False,
        tensor_parallel_size: int = 1,
        _tp_peer=None,
    ) -> LLMEngine:
        """Build an engine from a Hugging Face model directory.

        KV cache size, first given wins: ``num_kv_blocks``, ``kv_cache_memory_bytes``, else
        ``gpu_memory_utilization`` of the GPU minus the profiled peak of the largest step
        (CUDA) or 1 GiB (CPU); see ``kvcache/sizing.py``.
        ``cuda_graphs`` / ``cpu_prepack``: None picks the default for the device (graphs on
        CUDA; oneDNN-prepacked linear weights on CPU, see ``layers/linear.py``).
        ``model`` is a directory or a Hugging Face Hub id (``revision``: its branch, tag or
        commit), see ``models/hub.py``.
        ``enable_prefix_caching`` / ``enable_chunked_prefill``: see ``engine/scheduler.py``.
        ``max_full_module_adapters``: device slots for adapters with a full embedding /
        lm_head copy (PEFT ``modules_to_save``), each ``2 x vocab x hidden`` in the serving
        dtype; 0 (the default) reserves none and refuses such adapters at load.
        ``tensor_parallel_size`` > 1: this process is rank 0 (scheduler, sampling) and
        spawns the other ranks (``distributed/executor.py``); on CPU each rank gets an equal
        share of torch's threads. ``close()`` stops them. ``_tp_peer``: set by a worker
        process building its rank's engine (``distributed/worker.py``).
        ``enable_lm_head_lora``: serve adapters that target ``lm_head`` (``LoRAConfig``).
        """
        # tensor-parallel workers build their engine from these same arguments
        worker_args = {k: v for k, v in locals().items() if k not in ("cls", "_tp_peer")}

        # every argument is checked before the (slow) model load; 0 never means "default"
        check_int("max_model_len", max_model_len, optional=True)
        check_int("max_num_batched_tokens", max_num_batched_tokens, optional=True)
        check_adapter_map(adapters)
        cache_cfg = CacheConfig(num_blocks=num_kv_blocks,
                                kv_cache_memory_bytes=kv_cache_memory_bytes,
                                gpu_memory_utilization=gpu_memory_utilization,
                                enable_prefix_caching=enable_prefix_caching)
        lora_cfg = LoRAConfig(max_loras_per_batch, max_lora_rank, max_cpu_loras, lora_backend,
                              max_cpu_lora_bytes, enable_lm_head_lora=enable_lm_head_lora,
                              max_full_module_adapters=max_full_module_adapters)
        if max_full_module_adapters and tensor_parallel_size > 1:
            # each rank's lm_head gives its vocabulary shard; the copies are not sharded
            raise ConfigError(f"max_full_module_adapters={max_full_module_adapters}: full "
                              f"embedding / lm_head copies (modules_to_save) are not served "
                              f"with tensor_parallel_size={tensor_parallel_size} > 1")
        # validates them now; the real one is below
        SchedulerConfig(max_num_seqs=max_num_seqs, enable_chunked_prefill=enable_chunked_prefill)
        model = resolve_model_path(model, revision)
        cfg, _ = load_model_config(model)
        dev = resolve_device(device)
        check_tensor_parallel(tensor_parallel_size, cfg, dev)
        if dev.type == "cpu" and _tp_peer is None:  # a worker got its share from rank 0
            apply_cpu_threads()
        dt = resolve_dtype(dtype, dev, cfg.dtype)
        limit = cfg.max_position  # sliding windows are applied in attention: no cap here
        if max_model_len is not None and max_model_len > limit:
            raise ConfigError(f"max_model_len={max_model_len} exceeds the model's context "
                              f"({limit})")
        max_len = limit if max_model_len is None else max_model_len
        budget = (default_token_budget(cfg, dev, dt) if max_num_batched_tokens is None
                  else max_num_batched_tokens)
        sched = SchedulerConfig(
            max_num_seqs=max_num_seqs, max_model_len=max_len, max_num_batched_tokens=budget,
            enable_chunked_prefill=enable_chunked_prefill,
        )
        peer = _tp_peer
        if peer is None:
            _check_no_open_group(tensor_parallel_size)
            if tensor_parallel_size > 1:
                threads = max(1, torch.get_num_threads() // tensor_parallel_size)
                if dev.type == "cpu":
                    torch.set_num_threads(threads)
                peer = TPExecutor.launch(tensor_parallel_size,
                                         {**worker_args, "model": model, "adapters": None,
                                          "revision": None}, dev, threads)
        try:
            engine = cls._build(model, cfg, dev, dt, sched, cache_cfg, lora_cfg, cuda_graphs,
                                cpu_prepack, peer)
        except BaseException:
            if peer is not None and peer is not _tp_peer:
                peer.close(graceful=False)  # the workers may be inside a collective
            raise
        try:
            loads = [engine.submit_adapter_load(name, path)
                     for name, path in (adapters or {}).items()]
            for load in loads:  # parsed in parallel on the loader's threads
                load.result()
        except BaseException:
            engine.close()  # a bad adapter: no workers left behind
            raise
        return engine

    @classmethod
    def _build(cls, model: str, cfg: ModelConfig, dev: torch.device, dt: torch.dtype,
               sched: SchedulerConfig, cache_cfg: CacheConfig, lora_cfg: LoRAConfig,
               cuda_graphs: bool | None, cpu_prepack: bool | None, peer) -> LLMEngine:
        from transformers import AutoTokenizer

        net = load_model(model, cfg, dt, dev)
        if cpu_prepack is None:
            cpu_prepack = can_prepack(dev, dt)
        elif cpu_prepack and not can_prepack(dev, dt):
            raise ValueError(f"cpu_prepack needs a CPU device, float32 or bfloat16 and oneDNN "
                             f"(got device={dev.type}, dtype={dt})")
        if cpu_prepack:
            prepack_linear_weights(net)
        tokenizer = AutoTokenizer.from_pretrained(model)
        return cls(model, cfg, net, tokenizer, sched, cache_cfg, lora_cfg, dev, dt, cuda_graphs,
                   tp_peer=peer)

    def failure(self) -> str | None:
        """Why this engine cannot serve any more (a tensor-parallel worker died), or None.
        Only looks: safe from any thread (the server's health check)."""
        return None if self.tp_peer is None else self.tp_peer.failure()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (safe to call more than once). At
        tensor-parallel size 1 there is nothing to stop."""
        if self.tp_peer is not None:
            self.tp_peer.close()

    def _can_capture(self) -> bool:
        # The torch reference LoRA ops read host-side segment lists, which a graph would
        # freeze; the Triton ops read only device buffers.
        return self.device.type == "cuda" and self.lora_backend == "triton"

    # -- requests ------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            raise InvalidRequestError("prompt must be a string or a list of token ids")
        return list(prompt)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: str | None = None,
    ) -> None:
        if self.tp_peer is not None:
            self.tp_peer.check()  # a dead tensor-parallel engine takes no new requests
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams")
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        ids = self.tokenize(prompt)
        self.validate_prompt(ids)
        bad_words_ids = self.validate_params(params)
        generation = None
        if adapter is not None:
            entry = self.check_adapter(adapter)
            generation = entry.generation
            if self.lora_pool.lora_slot_of(entry.key) is None:
                self.lora_loader.prefetch(entry)  # cold: read it while the request queues
        seed = params.seed if params.seed is not None else self.runner.sampler.new_seed()
        seq = Sequence(next(self._ids), request_id, ids, params, adapter, generation, seed=seed,
                       bad_words_ids=bad_words_ids)
        if params.guided is not None:
            self._add_grammar(seq, params.guided)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequestError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len} "
                f"tokens (prompt plus at least one generated token)"
            )
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} out of range [0, {self.model_config.vocab_size})"
            )
        if self.blocks.blocks_needed(len(ids) + 1) > self.blocks.num_blocks:
            raise CapacityError(
                f"prompt of {len(ids)} tokens needs more KV blocks than the "
                f"cache has ({self.blocks.num_blocks} of {self.blocks.block_size})"
            )

    def validate_params(self, params: SamplingParams) -> list[list[int]]:
        """Checks that need the model (``logit_bias`` ids within the vocabulary); returns
        ``bad_words`` as token sequences, each word with and without a leading space (as
        vLLM does: the same word mid-text tokenizes differently)."""
        vocab = self.model_config.vocab_size
        bad = [t for t in params.logit_bias or {} if t >= vocab]
        if bad:
            raise InvalidRequestError(f"logit_bias token id {bad[0]} out of range [0, {vocab})")
        if not params.bad_words:
            return []
        if self.tokenizer is None:
            raise InvalidRequestError("bad_words needs an engine with a tokenizer")
        words: list[list[int]] = []
        for w in params.bad_words:
            for text in (w.lstrip(), " " + w.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in words:
                    words.append(ids)
        return words

    def abort_request(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.finished:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)
        if seq is not None:
            self._drop_grammar(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Schedule -> run -> finish. A request whose row fails (non-finite logits, or an
        error while finishing it) ends alone with finish_reason "error"; the step goes on.
        A tensor-parallel worker that died ends every request with finish_reason "error"
        and raises ``TensorParallelError``: the engine is shut down."""
        if self.tp_peer is None:
            return self._step()
        try:
            self.tp_peer.check()
            return self._step()
        except TensorParallelError as exc:
            self._fail_all(str(exc))
            raise

    def _fail_all(self, message: str) -> None:
        for seq in list(self.requests.values()):
            self._fail(seq, message)
            # the scheduler may be mid-step; its state no longer matters, the requests do
            with contextlib.suppress(Exception):
                self.scheduler.finish(seq)
            self._drop_grammar(seq)
        self.requests.clear()
        self.scheduler.waiting.clear()
        self.scheduler.running.clear()

    def _step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        outputs = [self._finish_failed(s) for s in self.scheduler.failed]
        self.scheduler.failed.clear()
        if not batch.seqs:
            if not outputs and self.lora_loader.busy():
                # only requests whose adapters are being read: wait for the reads, not spin
                self.lora_loader.wait(_LOAD_POLL_S)
            return outputs
        sampled = self.runner.run(batch)
        seqs = batch.sampling_seqs  # rows whose chunk completed their sequence
        self.scheduler.update_computed(batch)
        lps = sampled.logprobs or [None] * len(seqs)
        for seq, tok, ok, lp in zip(seqs, sampled.token_ids, sampled.finite, lps):
            if not ok:
                self._fail(seq, "the model produced non-finite logits (NaN or inf) for this "
                                f"request{_adapter_note(seq.adapter)}")
            elif seq.params.max_tokens == 0:  # prompt logprobs only: the token is not kept
                self._set_finished(seq, "length")
            else:
                try:
                    seq.output_token_ids.append(tok)
                    record_sample_logprob(seq, lp)
                    self._check_stop(seq, tok)
                    self._advance_grammar(seq, tok)
                except Exception as exc:  # e.g. the tokenizer cannot decode this id
                    self._fail(seq, f"finishing the step failed for this request: "
                                    f"{type(exc).__name__}: {exc}")
            if seq.finished:
                self.scheduler.finish(seq)  # frees its KV blocks and its adapter pin
                self.requests.pop(seq.request_id, None)
                self._drop_grammar(seq)
                outputs.append(seq.output())
            else:
                outputs.append(seq.output(visible_text(seq.text, seq.params.stop)))
        return outputs

    def _fail(self, seq: Sequence, message: str) -> None:
        seq.error = message
        self._set_finished(seq, "error")

    def _finish_failed(self, seq: Sequence) -> RequestOutput:
        self.requests.pop(seq.request_id, None)
        self._drop_grammar(seq)
        return seq.output()

    def _check_stop(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        prev = len(seq.text)
        stop_token = (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids
        length = len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len
        if self.tokenizer is not None:  # engines built without one (benchmarks) emit ids only
            detokenize_step(self.tokenizer, seq, final=stop_token or length)
        if p.stop and len(seq.output_token_ids) >= p.min_tokens:  # vLLM: none before min_tokens
            start = max(0, prev - max(len(s) for s in p.stop) + 1)
            cut = find_stop(seq.text, p.stop, start)
            if cut != -1:
                if p.include_stop_str_in_output:
                    cut += max(len(s) for s in p.stop if seq.text.startswith(s, cut))
                seq.text = seq.text[:cut]
                return self._set_finished(seq, "stop")
        if stop_token:
            return self._set_finished(seq, "stop")
        if length:
            return self._set_finished(seq, "length")

    @staticmethod
    def _set_finished(seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED

    # -- structured outputs (engine/guided.py) ------------------------------------------------
    def guided_decoding(self) -> GuidedDecoding:
        """The engine's grammar state, built on first use (imports xgrammar then). Safe to
        call from any thread: the server compiles grammars through it off the engine thread."""
        with self._guided_lock:
            if self.runner.guided is None:
                self.runner.guided = GuidedDecoding(
                    self.tokenizer, self.model_config.vocab_size, sorted(self.eos_ids),
                    self.max_num_seqs)
            return self.runner.guided

    def _add_grammar(self, seq: Sequence, guided: GuidedParams) -> None:
        try:  # a cache hit when the server compiled it already
            self.guided_decoding().add(seq.seq_id, guided)
        except (RuntimeError, ValueError) as exc:
            raise InvalidRequestError(f"the {guided.kind} grammar cannot be compiled for this "
                                      f"model's tokenizer: {exc}") from exc

    def _advance_grammar(self, seq: Sequence, tok: int) -> None:
        """Feed the sampled token to the row's matcher: a grammar that is complete ends the
        request with "stop"; a token the grammar rejects ends it alone with an error."""
        guided = self.runner.guided
        if guided is None or seq.seq_id not in guided.matchers:
            return
        accepted, terminated = guided.accept(seq.seq_id, tok)
        if not accepted:
            self._fail(seq, f"token {tok} does not match this request's {seq.params.guided.kind} "
                            "grammar")
        elif terminated and not seq.finished:
            self._set_finished(seq, "stop")

    def _drop_grammar(self, seq: Sequence) -> None:
        if self.runner.guided is not None:
            self.runner.guided.drop(seq.seq_id)

    # -- adapters ------------------------------------------------------------------------------
    def submit_adapter_load(self, name: str, path: str,
                            adapter: LoRAAdapter | None = None) -> Future[AdapterEntry]:
        """Start registering ``name`` (files parsed on the loader's threads, never this one).
        Raises at once for a bad or taken name; the future raises AdapterLoadError for bad
        files. Safe to call from any thread."""
        return self.lora_loader.register(name, path, adapter)

    def load_adapter(self, name: str, path: str, adapter: LoRAAdapter | None = None) -> None:
        """Register ``name`` and return once it is servable (``adapter``: prebuilt weights,
        e.g. in benchmarks, instead of parsing ``path``)."""
        self.submit_adapter_load(name, path, adapter).result()

    def unload_adapter(self, name: str) -> None:
        """Unregister ``name``: running requests finish on its weights, queued ones end with
        an error naming it, and a later load of the same name gets a new generation."""
        entry = self.adapters.remove(name)
        self.blocks.drop_root(root_hash(entry.key))  # its cached KV can never be read again
        self.lora_cache.drop_name(name)
        self.lora_loader.forget(name)
        self.lora_pool.retire(name)
        self.scheduler.drop_waiting(name)

    def list_adapters(self) -> list[str]:
        return self.adapters.names()

    def check_adapter(self, name: str) -> AdapterEntry:
        """The registered entry of ``name``; AdapterNotFoundError naming it if none."""
        return self.adapters.get(name)

    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_free_blocks": self.blocks.num_free,
            "num_total_blocks": self.blocks.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            **self._prefix_cache_stats(),
            **self.lora_pool.stats(),
            "adapter_disk_loads": self.lora_loader.num_disk_loads,
            "num_adapters": len(self.adapters),
            "adapter_host_cache_bytes": self.lora_cache.nbytes,
        }

    def _prefix_cache_stats(self) -> dict:
        """Prefix-cache counters (prompt tokens looked up / served from the cache) and the
        requests per adapter ("" = base model): {name: {"waiting": w, "running": r}}."""
        cache = self.blocks.cache
        stats: dict = {"adapter_requests": {
            name or "": {"waiting": w, "running": r}
            for name, (w, r) in self.scheduler.adapter_counts().items()}}
        if cache is not None:
            stats.update(prefix_cache_queries=cache.queries, prefix_cache_hits=cache.hits,
                         prefix_cache_blocks=len(cache))
        return stats

    def score(self, prompts: list[list[int]], adapters: list[str | None]) -> list[torch.Tensor]:
        if self.tp_peer is not None:
            self.tp_peer.check()
        for ids in prompts:
            self.validate_prompt(ids)
        entries = [None if a is None else self.check_adapter(a) for a in adapters]
        keys = [None if e is None else e.key for e in entries]
        out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
        full = [e is not None and e.needs_full_slot for e in entries]
        for idx in self.lora_pool.plan_groups(keys, [len(p) for p in prompts], self.max_tokens,
                                              full):
            group = {keys[i]: entries[i] for i in idx if keys[i] is not None}
            slots: dict = {}
            try:
                for key, entry in group.items():
                    slots[key] = self.lora_pool.pin(key, self._host_adapter(entry))
                res = self.runner.score([prompts[i] for i in idx],
                                        [slots.get(keys[i], -1) for i in idx])
            finally:
                for slot in slots.values():
                    self.lora_pool.unpin(slot)
            for i, r in zip(idx, res):
                out[i] = r
        return out

    def _host_adapter(self, entry: AdapterEntry) -> LoRAAdapter | None:
        """Host weights for a synchronous pin (score): None when it already has a slot."""
        if self.lora_pool.lora_slot_of(entry.key) is not None:
            return None
        while (adapter := self.lora_loader.fetch(entry)) is None:
            self.lora_loader.wait(_LOAD_POLL_S)
        return adapter


def _check_no_open_group(tensor_parallel_size: int) -> None:
    """The tensor-parallel group is per process: one tensor-parallel engine at a time, and
    none next to an engine of size 1 (its model would be built as a shard)."""
    if tp_size() > 1:
        raise ConfigError(f"tensor_parallel_size={tensor_parallel_size}: a tensor-parallel "
                          f"engine (size {tp_size()}) is open in this process; close() it "
                          f"first")


# How long an idle step waits for a background adapter read before returning.
_LOAD_POLL_S = 0.01

def _adapter_note(adapter: str | None) -> str:
    return f" (adapter {adapter!r})" if adapter is not None else " (base model, no adapter)"


# glibc serves allocations above 32 MiB with fresh mmap()ed pages every time (smaller ones
# are reused from the heap once freed), and a page fault is costly on CPU-bound hosts.
_MMAP_CEILING = 32 << 20


def default_token_budget(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> int:
    """Tokens per prefill step when the user sets none: 8192 on CUDA. On CPU the largest power
    of two in [512, 2048] whose widest activation (the [T, 2 * intermediate] gate/up output)
    stays under glibc's mmap ceiling, so a step's buffers can be reused heap memory (glibc
    still trims some of it between steps): fewer fresh pages per step, at about the same
    speed (``bench_cpu_parts.py`` (c) measures both step sizes; docs/benchmarks.md).
    A prompt longer than the budget still runs, alone in its step."""
    if device.type == "cuda":
        return 8192
    itemsize = torch.empty((), dtype=dtype).element_size()
    widest = max(2 * cfg.intermediate_size, cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size)
    budget = 2048
    while budget > 512 and budget * widest * itemsize > _MMAP_CEILING:
        budget //= 2
    return budget

