"""Parsed adapters in host memory: an LRU cache keyed by adapter generation, bounded in count
(``max_cpu_loras``) and in bytes (``max_cpu_lora_bytes``).

Adapters are kept in the serving dtype (a bfloat16 adapter costs half of a float32 copy). One
dropped from here is parsed again from its files, in the background loader, when a request
needs it and it holds no lora slot. Thread-safe: the loader fills it while the engine reads.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from loraplex.lora.adapter import LoRAAdapter
from loraplex.lora.registry import AdapterKey

_MAX_DEFAULT_BYTES = 32 << 30


def default_max_cpu_lora_bytes() -> int:
    """min(1/8 of physical RAM, 32 GiB): room for hundreds of typical adapters without
    letting the cache crowd out the model and the KV cache on the host."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a 16 GiB host
        ram = 16 << 30
    return min(ram // 8, _MAX_DEFAULT_BYTES)


class HostCache:
    def __init__(self, max_count: int | None, max_bytes: int) -> None:
        self.max_count, self.max_bytes = max_count, max_bytes
        self._items: OrderedDict[AdapterKey, LoRAAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.num_evictions = 0

    def get(self, key: AdapterKey) -> LoRAAdapter | None:
        """The adapter (marked most recently used), or None when not cached."""
        with self._lock:
            adapter = self._items.get(key)
            if adapter is not None:
                self._items.move_to_end(key)
            return adapter

    def put(self, key: AdapterKey, adapter: LoRAAdapter) -> None:
        """Cache ``adapter``, dropping least recently used ones until both bounds hold. An
        adapter larger than ``max_bytes`` on its own is the caller's to refuse."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._items[key] = adapter
            self.nbytes += adapter.nbytes
            while len(self._items) > 1 and (
                self.nbytes > self.max_bytes
                or (self.max_count is not None and len(self._items) > self.max_count)
            ):
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= dropped.nbytes
                self.num_evictions += 1

    def discard(self, key: AdapterKey) -> None:
        with self._lock:
            adapter = self._items.pop(key, None)
            if adapter is not None:
                self.nbytes -= adapter.nbytes

    def drop_name(self, name: str) -> None:
        """Forget every generation of ``name`` (an unload)."""
        with self._lock:
            for key in [k for k in self._items if k[0] == name]:
                self.nbytes -= self._items.pop(key).nbytes

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
