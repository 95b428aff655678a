"""Adapter I/O off the engine thread: parse and validate adapters in a small thread pool.

Two kinds of work run here. ``register`` parses a new adapter, puts it in the host cache and
only then adds it to the registry, so a bad directory fails the caller's future with an
``AdapterLoadError`` and never becomes servable. ``fetch`` is the scheduler's cold path: an
adapter dropped from the host cache and holding no lora slot is read again in the background
while the scheduler admits other requests; the request waits until its weights are in host
memory. Nothing here touches the device or the scheduler's state.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from pathlib import Path

import torch

from loraplex.config import LoRAConfig, ModelConfig
from loraplex.distributed.parallel_state import tp_size
from loraplex.errors import AdapterLoadError
from loraplex.lora.adapter import LoRAAdapter
from loraplex.lora.dora import BaseWeightFn
from loraplex.lora.host_cache import HostCache
from loraplex.lora.peft_loader import load_peft_adapter
from loraplex.lora.registry import AdapterEntry, AdapterKey, AdapterRegistry
from loraplex.models.hub import resolve_adapter_path


class AdapterLoader:
    def __init__(self, cfg: ModelConfig, lora: LoRAConfig, dtype: torch.dtype,
                 registry: AdapterRegistry, cache: HostCache, workers: int = 2,
                 base_weight: BaseWeightFn | None = None) -> None:
        """``base_weight``: the base model's weights by HF name (``CheckpointWeights.get``),
        needed by DoRA adapters only."""
        self.cfg, self.max_rank, self.dtype = cfg, lora.max_lora_rank, dtype
        self.max_full = lora.max_full_module_adapters
        self.lm_head_lora = lora.enable_lm_head_lora
        self.base_weight = base_weight
        self.registry, self.cache = registry, cache
        self._pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="loraplex-adapter-io")
        self._fetches: dict[AdapterKey, cf.Future[LoRAAdapter]] = {}
        self._lock = threading.Lock()
        self.num_disk_loads = 0  # parses for requests (cold cache), not registrations

    def parse(self, name: str, path: str | Path) -> LoRAAdapter:
        """Read, validate and convert one adapter (runs on a worker thread)."""
        adapter = load_peft_adapter(path, self.cfg, self.max_rank, name=name,
                                    base_weight=self.base_weight, lm_head_lora=self.lm_head_lora)
        return self._checked(adapter)

    def _checked(self, adapter: LoRAAdapter) -> LoRAAdapter:
        if adapter.max_rank > self.max_rank:
            raise AdapterLoadError(f"adapter {adapter.name!r} has rank {adapter.max_rank} > "
                                   f"max_lora_rank={self.max_rank}")
        if adapter.needs_full_slot and self.max_full == 0:
            raise AdapterLoadError(
                f"adapter {adapter.name!r}: modules_to_save holds a full copy of "
                f"{_full_copies(adapter)} ({self.cfg.vocab_size} x {self.cfg.hidden_size}), "
                f"which needs a full-module slot, but max_full_module_adapters=0; start the "
                f"engine with max_full_module_adapters >= 1 (--max-full-module-adapters)")
        if adapter.replaced is not None and tp_size() > 1:
            # each rank's lm_head gives its vocabulary shard; replaced rows are not sharded
            raise AdapterLoadError(
                f"adapter {adapter.name!r}: modules_to_save / trainable_token_indices are not "
                f"served with tensor parallelism (tensor_parallel_size={tp_size()})")
        adapter = adapter.to(self.dtype)
        if adapter.nbytes > self.cache.max_bytes:
            raise AdapterLoadError(
                f"adapter {adapter.name!r} needs {adapter.nbytes} bytes of host memory, more "
                f"than max_cpu_lora_bytes={self.cache.max_bytes}")
        return adapter

    def register(self, name: str, path: str | Path,
                 adapter: LoRAAdapter | None = None) -> cf.Future[AdapterEntry]:
        """Parse ``path`` (or take the built ``adapter``, e.g. in benchmarks) in the background
        and register it as ``name`` with a new generation. Raises at once for a bad or taken
        name; the future raises AdapterLoadError for bad files."""
        self.registry.check_new(name)
        generation = self.registry.new_generation()
        return self._pool.submit(self._register, name, str(path), generation, adapter)

    def _register(self, name: str, path: str, generation: int,
                  adapter: LoRAAdapter | None) -> AdapterEntry:
        if adapter is None:
            path = resolve_adapter_path(path)  # a hub id: its snapshot, once per registration
        adapter = self.parse(name, path) if adapter is None else self._checked(adapter)
        entry = AdapterEntry(name, path, generation, adapter.max_rank, adapter.nbytes,
                             frozenset(adapter.target_modules()), adapter.needs_full_slot)
        self.cache.put(entry.key, adapter)
        try:
            self.registry.add(entry)
        except Exception:  # a concurrent load of the same name won: leave no trace
            self.cache.discard(entry.key)
            raise
        return entry

    def fetch(self, entry: AdapterEntry) -> LoRAAdapter | None:
        """The adapter's host weights if ready; else start reading them in the background and
        return None (ask again later). Raises the parse error of a finished failed read."""
        adapter = self.cache.get(entry.key)
        if adapter is not None:
            return adapter
        with self._lock:
            fut = self._fetches.get(entry.key)
            if fut is None:
                self.num_disk_loads += 1
                self._fetches[entry.key] = self._pool.submit(self._reread, entry)
                return None
            if not fut.done():
                return None
            del self._fetches[entry.key]
        return fut.result()  # raises AdapterLoadError when the files went bad since

    def prefetch(self, entry: AdapterEntry) -> None:
        """Start reading ``entry`` if it is neither cached nor being read (requests call this
        when added, so the read overlaps their wait in the queue)."""
        if entry.key in self.cache:
            return
        with self._lock:
            if entry.key not in self._fetches:
                self.num_disk_loads += 1
                self._fetches[entry.key] = self._pool.submit(self._reread, entry)

    def _reread(self, entry: AdapterEntry) -> LoRAAdapter:
        adapter = self.parse(entry.name, entry.path)
        self.cache.put(entry.key, adapter)
        if not self.registry.is_current(entry.key):  # unloaded meanwhile: don't keep it
            self.cache.discard(entry.key)
        return adapter

    def forget(self, name: str) -> None:
        """Drop the pending reads of ``name`` (an unload): nobody will ask for them."""
        with self._lock:
            for key in [k for k in self._fetches if k[0] == name]:
                self._fetches.pop(key).cancel()

    def busy(self) -> bool:
        """Whether a background read for the scheduler is in flight."""
        with self._lock:
            return any(not f.done() for f in self._fetches.values())

    def wait(self, timeout_s: float) -> None:
        """Block until a background read finishes, at most ``timeout_s``."""
        with self._lock:
            pending = [f for f in self._fetches.values() if not f.done()]
        if pending:
            cf.wait(pending, timeout_s, return_when=cf.FIRST_COMPLETED)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _full_copies(adapter: LoRAAdapter) -> str:
    rep = adapter.replaced
    names = [n for n, t in (("embed_tokens", rep.embed), ("lm_head", rep.lm_head))
             if t is not None]
    return " and ".join(names)
