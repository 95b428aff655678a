"""Continuous batching: one token budget per step, adapter-aware fair admission, prefix
caching and preemption by recompute.

A step is a ``ScheduledBatch``: rows of (sequence, tokens to compute). ``num_computed_tokens``
tracks each sequence's progress; a row whose chunk reaches the end of its sequence samples a
token. With chunked prefill (the default) a step spends ``max_num_batched_tokens`` on the
running decodes first (one token each), then on the next chunks of partially prefilled
sequences, then on admissions from the queue; a prompt longer than what is left is split over
steps, so no prompt stalls the running streams for more than a step's worth of tokens.
Without it a step is either a prefill of whole prompts (one longer than the budget runs alone)
or a decode of every running sequence.

Admission is in arrival order, with two exceptions. A request whose adapter is still being
read into host memory is passed over for this step, so adapter I/O never holds up the queue.
And when the head cannot get an adapter slot (every slot pinned), later requests whose adapter
is resident, or that use none, are admitted past it, at most ``MAX_HEAD_BYPASS`` of them: then
nothing passes it until it gets the next free slot, so it never starves. A head blocked by the
token budget or the KV cache blocks everything behind it.

With prefix caching a sequence starts from the longest cached prefix of full blocks under its
adapter generation (``kvcache/prefix_cache.py``); at least its last token is always computed,
for the logits. A request whose next uncached block another running sequence is computing
right now (e.g. the other choices of an ``n > 1`` request) waits for it instead of computing
it twice.

Adapter pins live in the lora slot pool only: a sequence pins its adapter's slot when admitted
and unpins it when it ends (finish, abort, failure); preemption keeps the pin, so a preempted
request resumes on the same adapter generation even if its name was unloaded meanwhile. When
the KV cache runs out, the most recently admitted sequence is preempted: its blocks are
released (cached ones stay cached) and it is recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from loraplex.config import SchedulerConfig
from loraplex.engine.sequence import Sequence, SequenceStatus
from loraplex.errors import AdapterLoadError, AdapterNotFoundError, LoraplexError
from loraplex.kvcache.block_manager import BlockManager
from loraplex.kvcache.prefix_cache import BlockHash, Root, extend_block_hashes, root_hash
from loraplex.lora.adapter import LoRAAdapter
from loraplex.lora.loader import AdapterLoader
from loraplex.lora.pool import LoRASlotPool
from loraplex.lora.registry import AdapterRegistry

# Admissions that may pass a queue head waiting for an adapter slot before it blocks the
# queue (aging): bounds its wait to this many admissions plus the time a slot takes to free.
MAX_HEAD_BYPASS = 16


@dataclass
class ScheduledBatch:
    """One step's rows: ``seqs[i]`` computes ``num_new_tokens[i]`` tokens from its
    ``num_computed_tokens`` on, and samples a token when ``samples[i]`` (its chunk reaches
    the end of the sequence)."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    samples: list[bool]

    @property
    def is_decode(self) -> bool:
        """Every row computes one token: the decode path (and CUDA graphs) serve it."""
        return all(n == 1 for n in self.num_new_tokens)

    @property
    def sampling_seqs(self) -> list[Sequence]:
        return [s for s, x in zip(self.seqs, self.samples) if x]


def remaining(seq: Sequence) -> int:
    return seq.num_tokens - seq.num_computed_tokens


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
        # the queue head that could not get an adapter slot, and how many passed it since
        self.blocked_head: int | None = None
        self.head_bypassed = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.cfg.max_num_batched_tokens
        if self.cfg.enable_chunked_prefill:
            rows = self._schedule_running(budget)
            rows.update(self._admit(budget - sum(n for _, n in rows.values()), chunked=True))
        else:
            rows = self._admit(budget, chunked=False) or self._schedule_running(None)
        seqs = [s for s, _ in rows.values()]
        counts = [n for _, n in rows.values()]
        return ScheduledBatch(seqs, counts, [n == remaining(s) for s, n in zip(seqs, counts)])

    # -- running sequences ---------------------------------------------------------------------
    def _schedule_running(self, budget: int | None) -> dict[int, tuple[Sequence, int]]:
        """Decodes first, then the next chunks of partial prefills, each oldest first;
        ``budget`` None: no token limit (every running sequence is a decode then)."""
        rows: dict[int, tuple[Sequence, int]] = {}
        order = sorted(self.running, key=lambda s: remaining(s) > 1)  # stable: oldest first
        for seq in order:
            left = None if budget is None else budget - sum(n for _, n in rows.values())
            if left is not None and left <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an older one
                continue
            n = remaining(seq) if left is None else min(remaining(seq), left)
            if self._reserve(seq, seq.num_computed_tokens + n, rows):
                rows[seq.seq_id] = (seq, n)
        return rows

    def _reserve(self, seq: Sequence, num_tokens: int, rows: dict) -> bool:
        """Blocks for ``seq``'s first ``num_tokens`` tokens, preempting the newest sequences
        (dropping their rows) until they fit. False when ``seq`` itself could not stay."""
        while not self.blocks.can_append(seq.seq_id, num_tokens):
            if len(self.running) == 1:  # alone and still no room: it can never grow
                self._stop(seq)
                self._unpin(seq)
                seq.finish_reason, seq.status = "length", SequenceStatus.FINISHED
                self.failed.append(seq)
                return False
            victim = self.running[-1]
            self.preempt(victim)
            rows.pop(victim.seq_id, None)
            if victim is seq:
                return False
        self.blocks.append(seq.seq_id, num_tokens)
        return True

    def update_computed(self, batch: ScheduledBatch) -> None:
        """After the forward: the rows' tokens are in the KV cache; newly full blocks become
        shareable."""
        bs = self.blocks.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.seq_id not in self.blocks.tables:
                continue
            seq.num_computed_tokens += n
            full = seq.num_computed_tokens // bs
            if self.blocks.cache is None or full == 0:
                continue
            hashes = seq.block_hashes
            if len(hashes) < full:
                extend_block_hashes(self._root(seq), hashes,
                                    seq.token_window(len(hashes) * bs, full * bs), bs)
            self.blocks.commit(seq.seq_id, hashes, full, self._root(seq))

    # -- admission -----------------------------------------------------------------------------
    def _admit(self, budget: int, chunked: bool) -> dict[int, tuple[Sequence, int]]:
        rows: dict[int, tuple[Sequence, int]] = {}
        passed: list[Sequence] = []  # stay queued, in arrival order
        head_blocked = False  # the first request not passed for loading waits for a slot
        in_flight = self._in_flight_hashes()
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            if head_blocked and self.head_bypassed >= MAX_HEAD_BYPASS:
                break  # aged: it takes the next free slot before anyone else passes
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
                    passed.append(self.waiting.popleft())
                    continue
                if state == "no_slot":
                    if not head_blocked:
                        if self.blocked_head != seq.seq_id:
                            self.blocked_head, self.head_bypassed = seq.seq_id, 0
                        head_blocked = True
                    passed.append(self.waiting.popleft())
                    continue
            hits = self._prefix_hits(seq)
            if self._computing_elsewhere(seq, len(hits), in_flight):
                passed.append(self.waiting.popleft())
                continue
            cached = len(hits) * self.blocks.block_size
            n = remaining_after = seq.num_tokens - cached
            if chunked:
                n = min(remaining_after, budget)
            elif rows and n > budget:
                break
            if not self.blocks.can_allocate(cached + n, hits):
                break
            self.waiting.popleft()
            if needs_pin:
                seq.lora_slot = self.pool.pin(self._key(seq), adapter)
            self._start(seq, hits, cached, cached + n)
            rows[seq.seq_id] = (seq, n)
            budget -= n
            in_flight.update(seq.block_hashes[cached // self.blocks.block_size :])
            if head_blocked:
                self.head_bypassed += 1
            elif self.blocked_head == seq.seq_id:
                self.blocked_head = None
        self.waiting.extendleft(reversed(passed))  # back in arrival order
        return rows

    def _start(self, seq: Sequence, hits: list[int], cached: int, num_tokens: int) -> None:
        self.blocks.allocate(seq.seq_id, num_tokens, hits)
        seq.num_computed_tokens = cached
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = cached
        if self.blocks.cache is not None:
            self.blocks.cache.queries += seq.num_tokens
            self.blocks.cache.hits += cached
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks ``seq`` can start from: full blocks before its last token."""
        if self.blocks.cache is None:
            return []
        bs = self.blocks.block_size
        hashes = seq.block_hashes
        extend_block_hashes(self._root(seq), hashes, seq.token_window(len(hashes) * bs), bs)
        if seq.wants_prompt_logprobs:  # needs logits at every prompt position: no reuse
            return []
        return self.blocks.match(hashes[: (seq.num_tokens - 1) // bs])

    def _in_flight_hashes(self) -> set[BlockHash]:
        """Hashes of the blocks running sequences have yet to compute."""
        if self.blocks.cache is None:
            return set()
        bs = self.blocks.block_size
        return {h for s in self.running if remaining(s) > 1
                for h in s.block_hashes[s.num_computed_tokens // bs :]}

    def _computing_elsewhere(self, seq: Sequence, num_hits: int, in_flight: set) -> bool:
        """Whether the first block ``seq`` would compute is being computed by another
        sequence: then it waits a step or a few and shares it."""
        if not in_flight or seq.wants_prompt_logprobs:  # (no hashes; or it cannot share)
            return False
        usable = (seq.num_tokens - 1) // self.blocks.block_size
        return num_hits < usable and seq.block_hashes[num_hits] in in_flight

    def _root(self, seq: Sequence) -> Root:
        return root_hash(None if seq.adapter is None else self._key(seq))

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
        if not self.pool.can_pin(key, entry.needs_full_slot):
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

    def adapter_counts(self) -> dict[str | None, tuple[int, int]]:
        """adapter name (None: base model) -> (waiting, running) requests."""
        counts: dict[str | None, list[int]] = {}
        for i, queue in enumerate((self.waiting, self.running)):
            for seq in queue:
                counts.setdefault(seq.adapter, [0, 0])[i] += 1
        return {name: (w, r) for name, (w, r) in counts.items()}

    # -- ending --------------------------------------------------------------------------------
    def _fail(self, seq: Sequence, error: str) -> None:
        self._unpin(seq)
        seq.error, seq.finish_reason, seq.status = error, "error", SequenceStatus.FINISHED
        self.failed.append(seq)

    def _stop(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq.seq_id)
        seq.num_computed_tokens = 0

    def _unpin(self, seq: Sequence) -> None:
        if seq.lora_slot is not None:
            self.pool.unpin(seq.lora_slot)
            seq.lora_slot = None

    def preempt(self, seq: Sequence) -> None:
        """Release a running sequence's blocks; it is recomputed when admitted again (from
        its own cached blocks, when prefix caching kept them)."""
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
