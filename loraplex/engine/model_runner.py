"""Builds the ForwardBatch for a step, runs the model, and samples.

Sequences are ordered by lora slot (the adapter weight slot the scheduler pinned for them; not
a KV-cache slot) before the batch is built, so each adapter's tokens are one contiguous segment
and the LoRA ops do work per distinct adapter.
"""

from __future__ import annotations

import torch

from loraplex.engine.cuda_graph import DecodeGraphs
from loraplex.engine.guided import GuidedDecoding
from loraplex.engine.logprobs import SampleLogprobs, record_prompt_logprobs
from loraplex.engine.mixed_step import build_mixed_step
from loraplex.engine.penalties import Penalties
from loraplex.engine.sampler import Sampler, SamplerOutput
from loraplex.engine.scheduler import ScheduledBatch
from loraplex.engine.sequence import Sequence
from loraplex.kvcache.block_manager import BlockManager
from loraplex.layers.forward_context import ForwardBatch, forward_context
from loraplex.layers.prefill_groups import plan_prefill
from loraplex.lora.batch import LoRABatchBuilder
from loraplex.lora.full_module_layers import FullModuleBuffers
from loraplex.lora.layers import logits_read_lora


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches,
        blocks: BlockManager,
        device: torch.device,
        lora_batches: LoRABatchBuilder | None = None,
        seed: int = 0,
        eos_ids: list[int] | tuple[int, ...] = (),
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.blocks = blocks
        self.device = device
        self.lora = lora_batches
        self.sampler = Sampler(seed)
        self.penalties = Penalties(eos_ids)
        self.graphs: DecodeGraphs | None = None
        self.guided: GuidedDecoding | None = None  # set by the engine on the first grammar
        # replaced embedding / lm_head rows (set by the engine): their steps run eagerly
        self.full_modules: FullModuleBuffers | None = None
        # the context of logits nobody reads a LoRA batch for (reused: no per-step object)
        self._rows_without_lora = ForwardBatch(is_prefill=False, num_tokens=0, slot_mapping=None)

    def enable_decode_graphs(self, max_num_seqs: int, max_model_len: int, dummy_block: int,
                             capture: bool) -> None:
        """Run decode steps through static buffers (and CUDA graphs when ``capture``)."""
        bs = self.blocks.block_size
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.lora, max_num_seqs,
                                   -(-max_model_len // bs), bs, dummy_block, self.device, capture)
        self.graphs.capture_all()

    def _logits(self, hidden: torch.Tensor, lora_slots: list[int]) -> torch.Tensor:
        """``compute_logits`` of ``hidden`` [n, H] whose row ``i`` belongs to lora slot
        ``lora_slots[i]`` (sorted; -1 = no adapter), under a forward context whose LoRA batch
        segments exactly these rows. Built after the forward, in the builder's reused batch
        (the forward has read it by then: its host fields at launch, its device copy in
        stream order)."""
        if not logits_read_lora(self.model):
            with forward_context(self._rows_without_lora):
                return self.model.compute_logits(hidden)
        batch = ForwardBatch(is_prefill=False, num_tokens=len(lora_slots), slot_mapping=None,
                             lora=self._lora_batch(lora_slots, [1] * len(lora_slots)))
        with forward_context(batch):
            return self.model.compute_logits(hidden)

    @staticmethod
    def _lora_slot(seq: Sequence) -> int:
        return -1 if seq.lora_slot is None else seq.lora_slot

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> SamplerOutput:
        """One forward over the step's rows; a sampled token and finiteness flag per row
        that samples (``batch.sampling_seqs`` order)."""
        seq_slots = [self._lora_slot(s) for s in batch.seqs]
        order = sorted(range(len(batch.seqs)), key=seq_slots.__getitem__)
        ordered = [batch.seqs[i] for i in order]
        slots = [seq_slots[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        sampling = [k for k, i in enumerate(order) if batch.samples[i]]
        # a row still owed prompt logprobs needs every position's logits: the mixed path
        if batch.is_decode and not any(s.wants_prompt_logprobs for s in ordered):
            if not sampling:  # one-token budget walking through prompts
                self._decode(ordered, slots)
                return SamplerOutput([], [])
            logits = self._decode(ordered, slots)
            if len(sampling) < len(ordered):
                logits = logits[sampling]
        else:
            logits = self._forward_mixed(ordered, counts, slots, sampling)
            if logits is None:  # only prompt chunks that do not reach their prompt's end
                return SamplerOutput([], [])
        # back to batch.sampling_seqs order (the batch's order, sampling rows only)
        dest = [0] * len(sampling)
        for j, pos in enumerate(sorted(range(len(sampling)), key=lambda j: order[sampling[j]])):
            dest[pos] = j
        return self._sample(logits, [ordered[k] for k in sampling], dest)

    # -- sampling: logprobs (raw logits) -> penalties -> sampler; see engine/logprobs.py --
    def _sample(self, logits: torch.Tensor, ordered: list[Sequence],
                order: list[int]) -> SamplerOutput:
        """Sample ``ordered``'s rows of ``logits``; the result in input order (``order[pos]``
        is the input index of row ``pos``)."""
        logprobs = SampleLogprobs.start(logits, ordered)  # None: no row asked
        logits = self.penalties(logits, ordered)  # untouched when no row has any
        self._apply_grammars(logits, ordered)  # last logits stage, right before sampling
        sampled = self.sampler(logits, ordered)
        self.penalties.record(ordered, sampled.token_ids)
        lps = logprobs.finish(sampled.token_ids) if logprobs is not None else None
        n = len(order)
        tokens, finite = [0] * n, [True] * n
        per_seq = [None] * n if lps is not None else None
        for pos, i in enumerate(order):
            tokens[i], finite[i] = sampled.token_ids[pos], sampled.finite[pos]
            if per_seq is not None:
                per_seq[i] = lps[pos]
        return SamplerOutput(tokens, finite, per_seq)

    def _prompt_logprobs(self, hidden: torch.Tensor, cu: list[int], seqs: list[Sequence],
                         counts: list[int], slots: list[int]) -> None:
        """Prompt logprobs of the step's rows that asked: row ``k`` holds positions
        ``num_computed_tokens ..`` of its sequence (a prompt chunk, or a decode token)."""
        if any(s.wants_prompt_logprobs for s in seqs):
            record_prompt_logprobs(self._logits, hidden, seqs, cu[:-1],
                                   [s.num_computed_tokens for s in seqs], counts, slots)

    def _apply_grammars(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Structured outputs: mask the logits of rows that have a grammar (engine/guided.py),
        after every other logits stage and right before sampling. Free without guided rows."""
        if self.guided is not None and self.guided.matchers:
            self.guided.apply(logits, [s.seq_id for s in seqs])

    def _forward_mixed(self, seqs: list[Sequence], counts: list[int], slots: list[int],
                       sampling: list[int]) -> torch.Tensor | None:
        """A step with prefill chunks (see mixed_step.py) -> logits of the ``sampling`` rows'
        last tokens."""
        step = build_mixed_step(seqs, counts, self.blocks, self.device)
        batch = ForwardBatch(
            is_prefill=True, num_tokens=step.cu_seqlens[-1], cu_seqlens=step.cu_seqlens,
            prefill_groups=step.prefill_groups, extend=step.extend,
            slot_mapping=step.slot_mapping, kv_caches=self.kv_caches,
            lora=self._lora_batch(slots, counts))
        with forward_context(batch):
            hidden = self.model(step.ids, step.positions)
        self._prompt_logprobs(hidden, step.cu_seqlens, seqs, counts, slots)
        if not sampling:
            return None
        last = self._tensor([step.cu_seqlens[k + 1] - 1 for k in sampling])
        return self._logits(hidden[last], [slots[k] for k in sampling])

    def _lora_batch(self, lora_slots: list[int], lengths: list[int], is_decode: bool = False):
        if self.lora is None or all(s < 0 for s in lora_slots):
            return None  # base-model-only batch: skip the LoRA path entirely
        return self.lora.prepare(lora_slots, lengths, is_decode=is_decode)

    def _prefill_batch(self, cu: list[int], slot_mapping: torch.Tensor | None,
                       slots: list[int]) -> ForwardBatch:
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        return ForwardBatch(
            is_prefill=True,
            num_tokens=cu[-1],
            cu_seqlens=cu,
            prefill_groups=plan_prefill(cu, self.device),
            slot_mapping=slot_mapping,
            kv_caches=self.kv_caches,
            lora=self._lora_batch(slots, lengths),
        )

    def _decode(self, seqs: list[Sequence], slots: list[int]) -> torch.Tensor:
        # rows with a replaced embedding / lm_head are served per host segment: no graph
        full = self.full_modules
        if self.graphs is None or (full is not None and any(map(full.active, slots))):
            ids, positions, batch = self._prepare_decode(seqs, slots)
            with forward_context(batch):
                return self.model.compute_logits(self.model(ids, positions))
        use_lora = self.lora is not None and any(s >= 0 for s in slots)
        return self.graphs.run(*self._decode_lists(seqs), slots if use_lora else None)

    def _decode_lists(self, seqs: list[Sequence]):
        """Host lists of a decode step: ids, positions, slot_mapping, block tables, lengths.
        Each row computes the token at its ``num_computed_tokens`` (its last token, unless
        a one-token budget is walking through its prompt)."""
        positions = [s.num_computed_tokens for s in seqs]
        ids = [s.token_window(p, p + 1)[0] for s, p in zip(seqs, positions)]
        slot_mapping = [self.blocks.slot(s.seq_id, p) for s, p in zip(seqs, positions)]
        tables = [self.blocks.tables[s.seq_id] for s in seqs]
        return ids, positions, slot_mapping, tables, [p + 1 for p in positions]

    def _decode_inputs(self, seqs: list[Sequence]):
        ids, positions, slot_mapping, tables, context_lens = self._decode_lists(seqs)
        width = max(len(t) for t in tables)
        tables = [t + [0] * (width - len(t)) for t in tables]
        return tuple(self._tensor(v) for v in (ids, positions, slot_mapping, tables, context_lens))

    def _prepare_decode(self, seqs: list[Sequence], slots: list[int]):
        ids, positions, slot_mapping, tables, context_lens = self._decode_inputs(seqs)
        batch = ForwardBatch(
            is_prefill=False, num_tokens=len(seqs), slot_mapping=slot_mapping,
            block_tables=tables, context_lens=context_lens,
            max_context_len=max(s.num_computed_tokens + 1 for s in seqs),
            kv_caches=self.kv_caches,
            lora=self._lora_batch(slots, [1] * len(seqs), is_decode=True))
        return ids, positions, batch

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    @torch.inference_mode()
    def score(self, prompts: list[list[int]], lora_slots: list[int]) -> list[torch.Tensor]:
        """Next-token logits at every position of each prompt (no KV cache written).
        ``lora_slots``: one per prompt, pinned by the caller (-1 = no adapter)."""
        order = sorted(range(len(prompts)), key=lora_slots.__getitem__)
        ids: list[int] = []
        positions: list[int] = []
        cu = [0]
        for i in order:
            ids += prompts[i]
            positions += range(len(prompts[i]))
            cu.append(cu[-1] + len(prompts[i]))
        batch = self._prefill_batch(cu, None, [lora_slots[i] for i in order])
        with forward_context(batch):  # the logits' rows are the forward's rows
            logits = self.model.compute_logits(
                self.model(self._tensor(ids), self._tensor(positions))).cpu()
        out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
        for k, i in enumerate(order):
            out[i] = logits[cu[k] : cu[k + 1]]
        return out
