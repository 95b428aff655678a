"""The lora slot pool: which adapter generation each device slot holds, pins, and eviction.

A lora slot (an index into the adapter weight buffers, ``buffers.py``; not a KV-cache slot)
holds one adapter *generation*, keyed ``(name, generation)``, never by name alone: a name
unloaded and loaded again from other files gets a new generation and so a new slot, while
requests already running finish on the old one.

Contract:
- ``pin`` / ``unpin`` are the only pin counts in the engine; every ``pin`` is matched by
  exactly one ``unpin`` (the scheduler holds one pin per admitted sequence until it ends).
- A pinned slot is never evicted or overwritten. Unpinned slots are reused empty-first, then
  least recently used.
- ``retire(name)`` (an unload) frees the name's unpinned slots at once; a pinned one is
  retired for good and freed when its last pin drops, so it can never serve again.
- Full-module slots (``max_full_module_adapters``; ``full_module_layers.py``): an adapter
  with a full embedding / lm_head copy holds one together with its lora slot, from the write
  until the lora slot is overwritten or freed; so it is pinned exactly while the lora slot
  is. When none is free, the least recently used unpinned lora slot holding one gives both
  up; when every one is pinned, the adapter waits like one with no free lora slot.
"""

from __future__ import annotations

from loraplex.errors import CapacityError
from loraplex.lora.adapter import LoRAAdapter
from loraplex.lora.buffers import LoRABuffers
from loraplex.lora.full_module_layers import FullModuleBuffers
from loraplex.lora.registry import AdapterKey


class LoRASlotPool:
    def __init__(self, buffers: LoRABuffers, full: FullModuleBuffers | None = None) -> None:
        self.buffers, self.full = buffers, full
        n = buffers.num_slots
        self.num_full_slots = 0 if full is None else full.num_full_slots
        self.full_of: list[int | None] = [None] * n  # full-module slot held by each lora slot
        self.keys: list[AdapterKey | None] = [None] * n
        self.pins = [0] * n
        self.retired = [False] * n
        self.last_used = [0] * n
        self._clock = 0
        self.num_loads = self.num_evictions = 0

    @property
    def num_slots(self) -> int:
        return len(self.keys)

    def lora_slot_of(self, key: AdapterKey) -> int | None:
        """The live slot holding ``key``, or None."""
        for s, k in enumerate(self.keys):
            if k == key and not self.retired[s]:
                return s
        return None

    def can_pin(self, key: AdapterKey, needs_full_slot: bool = False) -> bool:
        """Whether ``pin(key)`` would succeed now: ``key`` already has a slot, or an unpinned
        slot exists to load it into (and, with ``needs_full_slot``, a full-module slot)."""
        return self.lora_slot_of(key) is not None or self._choose(needs_full_slot) is not None

    def _choose(self, needs_full_slot: bool) -> int | None:
        """The unpinned lora slot a new adapter goes into, or None when there is none."""
        free = [s for s in range(self.num_slots) if self.pins[s] == 0]
        if needs_full_slot and not self._free_full_slots():
            # only an unpinned lora slot holding a full-module slot can give one up: reuse both
            free = [s for s in free if self.full_of[s] is not None]
        if not free:
            return None
        return min(free, key=lambda s: (self.keys[s] is not None, self.last_used[s]))

    def _free_full_slots(self) -> list[int]:
        return sorted(set(range(self.num_full_slots)) - set(self.full_of))

    def pin(self, key: AdapterKey, adapter: LoRAAdapter | None) -> int:
        """Pin ``key`` in a lora slot and return the slot. ``adapter`` (the host weights) is
        needed only when ``key`` has no slot yet; then an unpinned slot is (re)written."""
        slot = self.lora_slot_of(key)
        if slot is None:
            assert adapter is not None, f"adapter {key} has no slot and no host weights"
            slot = self._choose(adapter.needs_full_slot)
            if slot is None:
                what = "full-module" if 0 in self.pins else "LoRA"
                raise CapacityError(f"every {what} slot is pinned by running requests")
            if self.keys[slot] is not None:
                self.num_evictions += 1
            self.full_of[slot] = None  # given up with the old adapter
            full_slot = self._free_full_slots()[0] if adapter.needs_full_slot else None
            self.buffers.write(slot, adapter)
            if self.full is not None:
                self.full.write(slot, full_slot, adapter.replaced)
            else:
                assert adapter.replaced is None, "replaced modules need FullModuleBuffers"
            self.full_of[slot] = full_slot
            self.keys[slot] = key
            self.num_loads += 1
        self.pins[slot] += 1
        self._touch(slot)
        return slot

    def unpin(self, lora_slot: int) -> None:
        assert self.pins[lora_slot] > 0, f"lora slot {lora_slot} is not pinned"
        self.pins[lora_slot] -= 1
        self._touch(lora_slot)
        if self.pins[lora_slot] == 0 and self.retired[lora_slot]:
            self._free(lora_slot)

    def retire(self, name: str) -> None:
        """Every slot of any generation of ``name`` stops serving (see the module docstring)."""
        for s, k in enumerate(self.keys):
            if k is not None and k[0] == name:
                if self.pins[s]:
                    self.retired[s] = True
                else:
                    self._free(s)

    def plan_groups(self, keys: list[AdapterKey | None], lengths: list[int],
                    max_tokens: int, needs_full: list[bool] | None = None) -> list[list[int]]:
        """Split requests (in order) into groups that can run at once: the adapters without
        a pinned slot fit the unpinned slots (those needing a full-module slot, per
        ``needs_full``, fit the full-module slots no pinned lora slot holds), and the tokens
        fit ``max_tokens``."""
        pinned = {k for k, p, r in zip(self.keys, self.pins, self.retired) if p and not r}
        free = self.pins.count(0)
        free_full = self.num_full_slots - sum(1 for s, f in enumerate(self.full_of)
                                              if f is not None and self.pins[s])
        needs_full = needs_full or [False] * len(keys)
        groups: list[list[int]] = []
        new: set[AdapterKey] = set()
        new_full = tokens = 0
        for i, (key, n, full) in enumerate(zip(keys, lengths, needs_full)):
            if n > max_tokens:
                raise CapacityError(f"prompt {i} has {n} tokens; at most {max_tokens} fit one "
                                    f"forward (max_num_batched_tokens)")
            needs_slot = key is not None and key not in pinned and key not in new
            if needs_slot and (free == 0 or (full and free_full == 0)):
                what = "full-module" if free else "LoRA"
                raise CapacityError(
                    f"every {what} slot is pinned by running requests; retry when they finish")
            if not groups or tokens + n > max_tokens or (needs_slot and (
                    len(new) == free or (full and new_full == free_full))):
                groups.append([])
                new, new_full, tokens = set(), 0, 0
                needs_slot = key is not None and key not in pinned
            groups[-1].append(i)
            tokens += n
            if needs_slot:
                new.add(key)
                new_full += full
        return groups

    def _touch(self, lora_slot: int) -> None:
        self._clock += 1
        self.last_used[lora_slot] = self._clock

    def _free(self, lora_slot: int) -> None:
        self.buffers.clear(lora_slot)
        if self.full is not None:
            self.full.clear(lora_slot)
        self.full_of[lora_slot] = None
        self.keys[lora_slot] = None
        self.retired[lora_slot] = False

    def stats(self) -> dict:
        return {
            "num_pinned_slots": sum(1 for p in self.pins if p > 0),
            "num_full_module_slots_held": sum(1 for f in self.full_of if f is not None),
            "adapter_loads": self.num_loads,
            "adapter_evictions": self.num_evictions,
        }
