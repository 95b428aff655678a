"""Adapter registry, host cache, device slots, and the per-forward LoRA metadata.

Adapters are registered by name -> directory and parsed (validated) at registration. Parsed
adapters live in a host-memory LRU cache (``max_cpu_loras``); one evicted from it is parsed again
from disk when next needed. Device slots hold what running requests use: a running adapter's
slot is pinned; unpinned slots are reused least-recently-used first.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from loraplex.config import LoRAConfig, ModelConfig
from loraplex.errors import AdapterLoadError, AdapterNotFoundError, CapacityError
from loraplex.lora.adapter import LoRAAdapter
from loraplex.lora.layers import install_lora_layers
from loraplex.lora.peft_loader import load_peft_adapter
from loraplex.lora.pool import LoRAPool
from loraplex.ops.lora_meta import LoRABatch
from loraplex.ops.lora_ops import resolve_lora_backend


class LoRAManager:
    def __init__(
        self,
        model: torch.nn.Module,
        cfg: ModelConfig,
        lora: LoRAConfig,
        device: torch.device,
        dtype: torch.dtype,
        max_tokens: int,
    ) -> None:
        self.cfg, self.lora_cfg, self.device = cfg, lora, device
        self.paths: dict[str, str] = {}
        self.host: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self.unloading: set[str] = set()  # unregistered while requests still use them
        S = lora.max_loras_per_batch
        self.pool = LoRAPool(cfg, S, lora.max_lora_rank, dtype, device)
        self.slot_names: list[str | None] = [None] * S
        self.pins = [0] * S
        self.last_used = [0] * S
        self._clock = 0
        self.num_loads = self.num_evictions = self.num_disk_loads = 0
        # Metadata lives in one int32 buffer (host staging, pinned on CUDA) copied to the device
        # in one transfer; the LoRABatch fields are views of it, reused every step.
        self.max_tokens, max_segs = max_tokens, S + 1  # batches are sorted by slot
        n = 3 * max_segs + max_tokens
        self._host_meta = torch.empty(n, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._dev_meta = (
            self._host_meta
            if device.type == "cpu"
            else torch.empty(n, dtype=torch.int32, device=device)
        )
        h, d = self._host_meta, self._dev_meta
        self._views = [
            (h[i * max_segs : (i + 1) * max_segs], d[i * max_segs : (i + 1) * max_segs])
            for i in range(3)
        ] + [(h[3 * max_segs :], d[3 * max_segs :])]
        self._np_views = [v[0].numpy() for v in self._views]  # host views, fast to fill
        self.batch = LoRABatch(
            self._views[0][1], self._views[1][1], self._views[2][1], self._views[3][1], 0, 0, 0, []
        )
        self.backend = backend = resolve_lora_backend(lora.backend, device)
        self.layers = install_lora_layers(model, self.pool, backend, max_tokens, dtype, device)

    # -- registry ------------------------------------------------------------------------------
    def register(self, name: str, path: str, adapter: LoRAAdapter | None = None) -> None:
        """Parse and validate the PEFT directory ``path`` (or take an already built
        ``adapter``, e.g. in benchmarks) and make it servable as ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name {name!r} must be a non-empty string")
        if name in self.paths:
            raise ValueError(f"adapter {name!r} is already loaded")
        if adapter is None:
            adapter = load_peft_adapter(path, self.cfg, self.lora_cfg.max_lora_rank, name=name)
        elif adapter.max_rank > self.lora_cfg.max_lora_rank:
            raise AdapterLoadError(f"adapter {name!r} has rank {adapter.max_rank} > "
                                   f"max_lora_rank={self.lora_cfg.max_lora_rank}")
        self.unloading.discard(name)
        self.paths[name] = str(path)
        self._cache(name, adapter)

    def unregister(self, name: str) -> None:
        if name not in self.paths:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        del self.paths[name]
        self.host.pop(name, None)
        if name in self.slot_names:
            slot = self.slot_names.index(name)
            if self.pins[slot]:
                self.unloading.add(name)  # in-flight requests finish; release() frees the slot
            else:
                self._free_slot(slot)

    def names(self) -> list[str]:
        return list(self.paths)

    def check_servable(self, name: str) -> None:
        if name not in self.paths:
            raise AdapterNotFoundError(
                f"adapter {name!r} is not loaded (loaded: {', '.join(self.paths) or 'none'})"
            )

    def _cache(self, name: str, adapter: LoRAAdapter) -> None:
        self.host[name] = adapter
        self.host.move_to_end(name)
        limit = self.lora_cfg.max_cpu_loras
        while limit is not None and len(self.host) > limit:
            self.host.popitem(last=False)

    def _host_adapter(self, name: str) -> LoRAAdapter:
        if name in self.host:
            self.host.move_to_end(name)
            return self.host[name]
        self.num_disk_loads += 1
        adapter = load_peft_adapter(self.paths[name], self.cfg, self.lora_cfg.max_lora_rank, name)
        self._cache(name, adapter)
        return adapter

    # -- slots ---------------------------------------------------------------------------------
    def acquire(self, name: str) -> int:
        """Pin ``name`` in a device slot, loading it if needed. The scheduler guarantees a free
        (unpinned) slot exists when a new adapter is admitted."""
        self._clock += 1
        if name in self.slot_names:
            slot = self.slot_names.index(name)
        else:
            self.check_servable(name)
            free = [s for s in range(len(self.pins)) if self.pins[s] == 0]
            assert free, "no unpinned LoRA slot: scheduler admitted too many adapters"
            # empty slots first, then least recently used
            slot = min(free, key=lambda s: (self.slot_names[s] is not None, self.last_used[s]))
            adapter = self._host_adapter(name)
            if self.slot_names[slot] is not None:
                self.num_evictions += 1
            self.pool.write(slot, adapter)
            self.slot_names[slot] = name
            self.num_loads += 1
        self.pins[slot] += 1
        self.last_used[slot] = self._clock
        return slot

    def release(self, name: str) -> None:
        slot = self.slot_names.index(name)
        assert self.pins[slot] > 0
        self.pins[slot] -= 1
        self._clock += 1
        self.last_used[slot] = self._clock
        if self.pins[slot] == 0 and name in self.unloading:
            self.unloading.discard(name)
            self._free_slot(slot)

    def _free_slot(self, slot: int) -> None:
        self.pool.clear(slot)
        self.slot_names[slot] = None

    def slot_of(self, name: str) -> int:
        return self.slot_names.index(name)

    def plan_groups(self, adapters: list[str | None], lengths: list[int]) -> list[list[int]]:
        """Split requests (in order) into groups that fit at once: the adapters not already
        in a pinned slot fit the unpinned slots, and the tokens fit ``max_tokens``."""
        pinned = {n for n, p in zip(self.slot_names, self.pins) if p > 0}
        free = sum(1 for p in self.pins if p == 0)
        groups: list[list[int]] = []
        new: set[str] = set()
        tokens = 0
        for i, (a, n) in enumerate(zip(adapters, lengths)):
            needs_slot = a is not None and a not in pinned and a not in new
            if n > self.max_tokens:
                raise CapacityError(
                    f"prompt {i} has {n} tokens; at most {self.max_tokens} "
                    f"fit one forward (max_num_batched_tokens)"
                )
            if needs_slot and free == 0:
                raise CapacityError(
                    "every LoRA slot is pinned by running requests; retry when they finish"
                )
            if not groups or tokens + n > self.max_tokens or (needs_slot and len(new) == free):
                groups.append([])
                new, tokens = set(), 0
                needs_slot = a is not None and a not in pinned
            groups[-1].append(i)
            tokens += n
            if needs_slot:
                new.add(a)
        return groups

    # -- per-forward metadata ------------------------------------------------------------------
    def prepare(self, slots: list[int], lengths: list[int], is_decode: bool = False,
                pad_to: int = 0) -> LoRABatch:
        """Fill the reused LoRABatch for sequences already sorted by slot (-1 = no adapter).
        ``pad_to``: token rows past the batch up to this count get slot -1 (CUDA-graph
        padding). Host work is a few numpy slice writes, then one host->device copy."""
        segs: list[tuple[int, int, int]] = []
        pos = 0
        for slot, n in zip(slots, lengths):
            if segs and segs[-1][2] == slot:
                s, m, _ = segs[-1]
                segs[-1] = (s, m + n, slot)
            else:
                segs.append((pos, n, slot))
            pos += n
        starts, lens, seg_slots, tok = self._np_views
        k = len(segs)
        assert pos <= self.max_tokens and k <= len(starts)
        table = np.asarray(segs, dtype=np.int32)  # [k, 3]
        starts[:k], lens[:k], seg_slots[:k] = table[:, 0], table[:, 1], table[:, 2]
        tok[:pos] = np.repeat(table[:, 2], table[:, 1])
        if pad_to > pos:
            tok[pos:pad_to] = -1
        if self._dev_meta is not self._host_meta:
            self._dev_meta.copy_(self._host_meta, non_blocking=True)
        b = self.batch
        b.num_segs, b.num_tokens, b.is_decode = k, pos, is_decode
        b.max_seg_len = int(table[:, 1].max())
        b.host_segs = [seg for seg in segs if seg[2] >= 0]
        return b

    def stats(self) -> dict:
        return {
            "num_pinned_slots": sum(1 for p in self.pins if p > 0),
            "adapter_loads": self.num_loads,
            "adapter_evictions": self.num_evictions,
            "adapter_disk_loads": self.num_disk_loads,
            "num_adapters": len(self.paths),
        }
