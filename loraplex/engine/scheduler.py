"""Continuous batching with adapter-aware admission and preemption by recompute.

Each step is either a prefill of newly admitted sequences or a decode of every running one.
Admission is in arrival order: the queue head waits (and everything behind it) when it does
not fit the token budget, the KV cache, or the adapter limit, so no request or adapter starves.
The running set never uses more distinct adapters than ``max_loras_per_batch``, so every
running adapter can hold a pinned device slot. When the KV cache runs out during decode, the
most recently admitted sequence is preempted: its blocks are freed and it is recomputed later.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Protocol

from loraplex.config import SchedulerConfig
from loraplex.engine.sequence import Sequence, SequenceStatus
from loraplex.errors import LoraplexError
from loraplex.kvcache.block_manager import BlockManager


class AdapterSlots(Protocol):
    """What the scheduler needs of the LoRA manager: pin an adapter while it runs."""

    def acquire(self, name: str) -> int: ...

    def release(self, name: str) -> None: ...


class Scheduler:
    def __init__(
        self,
        cfg: SchedulerConfig,
        blocks: BlockManager,
        max_loras_per_batch: int,
        adapters: AdapterSlots | None = None,
    ) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.max_loras = max_loras_per_batch
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.running_adapters: Counter[str] = Counter()
        self.num_preemptions = 0
        # ended by the scheduler (adapter failed to load, or outgrew the whole KV cache);
        # drained by the engine
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
        budget = self.cfg.max_num_batched_tokens
        while self.waiting and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens
            if admitted and n > budget:
                break
            if not self.blocks.can_allocate(n):
                break
            if (
                seq.adapter is not None
                and seq.adapter not in self.running_adapters
                and len(self.running_adapters) >= self.max_loras
            ):
                break
            self.waiting.popleft()
            if not self._pin_adapter(seq):
                continue
            self.blocks.allocate(seq.seq_id, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            budget -= n
        return admitted

    def _decode_batch(self) -> list[Sequence]:
        batch: list[Sequence] = []
        # Oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            while not self.blocks.can_append(seq.seq_id, seq.num_tokens):
                if len(self.running) == 1:  # alone and still no room: it can never grow
                    self._stop(seq)
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

    def _pin_adapter(self, seq: Sequence) -> bool:
        if seq.adapter is None:
            return True
        if self.running_adapters[seq.adapter] == 0 and self.adapters is not None:
            try:
                self.adapters.acquire(seq.adapter)
            except LoraplexError as e:  # e.g. evicted from host memory, files gone since
                del self.running_adapters[seq.adapter]
                seq.error = str(e)
                seq.finish_reason = "abort"
                seq.status = SequenceStatus.FINISHED
                self.failed.append(seq)
                return False
        self.running_adapters[seq.adapter] += 1
        return True

    def _stop(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq.seq_id)
        if seq.adapter is not None:
            self.running_adapters[seq.adapter] -= 1
            if self.running_adapters[seq.adapter] == 0:
                del self.running_adapters[seq.adapter]
                if self.adapters is not None:
                    self.adapters.release(seq.adapter)

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
        seq.status = SequenceStatus.FINISHED
