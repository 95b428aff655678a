"""Continuous batching with adapter-aware admission and preemption by recompute.

Each step is either a prefill of newly admitted sequences or a decode of every running one.
Admission is in arrival order: the queue head waits (and everything behind it) when it does
not fit the token budget, the KV cache, or a free lora slot, so no request or adapter starves.
One exception: a request whose adapter is still being read into host memory (in the
background loader) is skipped for this step, so adapter I/O never holds up the requests
behind it.

Adapter pins live in the lora slot pool only: a sequence pins its adapter's slot when admitted
and unpins it when it ends (finish, abort, failure); preemption keeps the pin, so a preempted
request resumes on the same adapter generation even if its name was unloaded meanwhile. When
the KV cache runs out during decode, the most recently admitted sequence is preempted: its
blocks are freed and it is recomputed later.
"""

from __future__ import annotations

from collections import deque

from loraplex.config import SchedulerConfig
from loraplex.engine.sequence import Sequence, SequenceStatus
from loraplex.errors import AdapterLoadError, AdapterNotFoundError, LoraplexError
from loraplex.kvcache.block_manager import BlockManager
from loraplex.lora.adapter import LoRAAdapter
from loraplex.lora.loader import AdapterLoader
from loraplex.lora.pool import LoRASlotPool
from loraplex.lora.registry import AdapterRegistry


class Scheduler:
    def __init__(
        self,
        cfg: SchedulerConfig,
        blocks: BlockManager,
        registry: AdapterRegistry | None = None,
        pool: LoRASlotPool | None = None,
        loader: AdapterLoader | None = None,
    ) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.registry, self.pool, self.loader = registry, pool, loader
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # ended by the scheduler (adapter unloaded or unreadable, or outgrew the whole KV
        # cache); drained by the engine
        self.failed: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """-> (sequences to run this step, is_prefill)."""
        admitted = self._admit()
        if admitted:
            return admitted, True
        return self._decode_batch(), False

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        loading: list[Sequence] = []  # skipped this step: adapter still being read
        budget = self.cfg.max_num_batched_tokens
        while self.waiting and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            needs_pin = seq.adapter is not None and seq.lora_slot is None
            adapter: LoRAAdapter | None = None
            if needs_pin:
                try:
                    state, adapter = self._adapter_state(seq)
                except LoraplexError as e:  # unloaded since it was queued, or files gone
                    self.waiting.popleft()
                    self._fail(seq, str(e))
                    continue
                if state == "loading":
                    loading.append(self.waiting.popleft())
                    continue
                if state == "no_slot":
                    break
            n = seq.num_tokens
            if admitted and n > budget:
                break
            if not self.blocks.can_allocate(n):
                break
            self.waiting.popleft()
            if needs_pin:
                seq.lora_slot = self.pool.pin(self._key(seq), adapter)
            self.blocks.allocate(seq.seq_id, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            budget -= n
        self.waiting.extendleft(reversed(loading))  # back in arrival order
        return admitted

    @staticmethod
    def _key(seq: Sequence) -> tuple[str, int]:
        return (seq.adapter, seq.adapter_generation)

    def _adapter_state(self, seq: Sequence) -> tuple[str, LoRAAdapter | None]:
        """Whether ``seq``'s adapter can be pinned now: ("ready", its host weights, or None
        when it already has a slot), ("no_slot", None): every slot is pinned, or ("loading",
        None): its weights are still being read. Raises for a request whose adapter
        generation is gone or whose files can no longer be read."""
        key = self._key(seq)
        if not self.registry.is_current(key):
            raise AdapterNotFoundError(unloaded_message(seq.adapter))
        if self.pool.lora_slot_of(key) is not None:
            return "ready", None
        entry = self.registry.get(seq.adapter)
        if not self.pool.can_pin(key):
            self.loader.prefetch(entry)  # read it meanwhile; no weights taken that can't be used
            return "no_slot", None
        try:
            adapter = self.loader.fetch(entry)
        except AdapterLoadError as e:
            raise AdapterLoadError(f"adapter {seq.adapter!r} could not be read again: {e}") from e
        return ("loading", None) if adapter is None else ("ready", adapter)

    def drop_waiting(self, name: str) -> None:
        """End every queued request for adapter ``name`` that holds no pin (it was unloaded);
        preempted ones keep their pinned generation and finish on it."""
        for seq in [s for s in self.waiting if s.adapter == name and s.lora_slot is None]:
            self.waiting.remove(seq)
            self._fail(seq, unloaded_message(name))

    def _decode_batch(self) -> list[Sequence]:
        batch: list[Sequence] = []
        # Oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            while not self.blocks.can_append(seq.seq_id, seq.num_tokens):
                if len(self.running) == 1:  # alone and still no room: it can never grow
                    self._stop(seq)
                    self._unpin(seq)
                    seq.finish_reason, seq.status = "length", SequenceStatus.FINISHED
                    self.failed.append(seq)
                    break
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq.seq_id, seq.num_tokens)
                batch.append(seq)
                i += 1
                continue
            break  # seq itself was preempted: nothing after it remains
        return batch

    def _fail(self, seq: Sequence, error: str) -> None:
        self._unpin(seq)
        seq.error, seq.finish_reason, seq.status = error, "error", SequenceStatus.FINISHED
        self.failed.append(seq)

    def _stop(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq.seq_id)

    def _unpin(self, seq: Sequence) -> None:
        if seq.lora_slot is not None:
            self.pool.unpin(seq.lora_slot)
            seq.lora_slot = None

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it is recomputed when admitted again."""
        self._stop(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self._stop(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._unpin(seq)
        seq.status = SequenceStatus.FINISHED


def unloaded_message(name: str) -> str:
    return f"adapter {name!r} was unloaded before this request started"

