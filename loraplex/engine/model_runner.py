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
from loraplex.engine.penalties import Penalties
from loraplex.engine.sampler import Sampler, SamplerOutput
from loraplex.engine.sequence import Sequence
from loraplex.kvcache.block_manager import BlockManager
from loraplex.layers.forward_context import ForwardBatch, forward_context
from loraplex.layers.prefill_groups import plan_prefill
from loraplex.lora.batch import LoRABatchBuilder


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

    def enable_decode_graphs(self, max_num_seqs: int, max_model_len: int, dummy_block: int,
                             capture: bool) -> None:
        """Run decode steps through static buffers (and CUDA graphs when ``capture``)."""
        bs = self.blocks.block_size
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.lora, max_num_seqs,
                                   -(-max_model_len // bs), bs, dummy_block, self.device, capture)
        self.graphs.capture_all()

    @staticmethod
    def _lora_slot(seq: Sequence) -> int:
        return -1 if seq.lora_slot is None else seq.lora_slot

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> SamplerOutput:
        """One forward over ``seqs``; one sampled token and finiteness flag per sequence
        (input order)."""
        seq_slots = [self._lora_slot(s) for s in seqs]
        order = sorted(range(len(seqs)), key=seq_slots.__getitem__)
        ordered = [seqs[i] for i in order]
        slots = [seq_slots[i] for i in order]
        if is_prefill:
            ids, positions, batch = self._prepare_prefill(ordered, slots)
            last = torch.tensor([e - 1 for e in batch.cu_seqlens[1:]], device=self.device)
            with forward_context(batch):
                hidden = self.model(ids, positions)
                logits = self.model.compute_logits(hidden[last])
            self._prompt_logprobs(hidden, batch.cu_seqlens, ordered)
        else:
            logits = self._decode(ordered, slots)
        return self._sample(logits, ordered, order)

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

    def _prompt_logprobs(self, hidden: torch.Tensor, cu: list[int],
                         seqs: list[Sequence]) -> None:
        """Prompt logprobs of the prefill's sequences that asked (each chunk starts at
        position 0 here: this prefill runs whole prompts)."""
        if any(s.wants_prompt_logprobs for s in seqs):
            lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
            record_prompt_logprobs(self.model.compute_logits, hidden, seqs, cu[:-1],
                                   [0] * len(seqs), lengths)

    def _apply_grammars(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Structured outputs: mask the logits of rows that have a grammar (engine/guided.py),
        after every other logits stage and right before sampling. Free without guided rows."""
        if self.guided is not None and self.guided.matchers:
            self.guided.apply(logits, [s.seq_id for s in seqs])

    def _lora_batch(self, lora_slots: list[int], lengths: list[int], is_decode: bool = False):
        if self.lora is None or all(s < 0 for s in lora_slots):
            return None  # base-model-only batch: skip the LoRA path entirely
        return self.lora.prepare(lora_slots, lengths, is_decode=is_decode)

    def _prepare_prefill(self, seqs: list[Sequence], slots: list[int]):
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        cu = [0]
        for seq in seqs:
            toks = seq.all_token_ids
            ids += toks
            positions += range(len(toks))
            table = self.blocks.tables[seq.seq_id]
            bs = self.blocks.block_size
            slot_mapping += [table[p // bs] * bs + p % bs for p in range(len(toks))]
            cu.append(cu[-1] + len(toks))
        batch = self._prefill_batch(cu, self._tensor(slot_mapping), slots)
        return self._tensor(ids), self._tensor(positions), batch

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
        if self.graphs is None:
            ids, positions, batch = self._prepare_decode(seqs, slots)
            with forward_context(batch):
                return self.model.compute_logits(self.model(ids, positions))
        use_lora = self.lora is not None and any(s >= 0 for s in slots)
        return self.graphs.run(*self._decode_lists(seqs), slots if use_lora else None)

    def _decode_lists(self, seqs: list[Sequence]):
        """Host lists of a decode step: ids, positions, slot_mapping, block tables, lengths."""
        ids = [s.output_token_ids[-1] if s.output_token_ids else s.prompt_token_ids[-1]
               for s in seqs]
        positions = [s.num_tokens - 1 for s in seqs]
        slot_mapping = [self.blocks.slot(s.seq_id, s.num_tokens - 1) for s in seqs]
        tables = [self.blocks.tables[s.seq_id] for s in seqs]
        return ids, positions, slot_mapping, tables, [s.num_tokens for s in seqs]

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
            max_context_len=max(s.num_tokens for s in seqs), kv_caches=self.kv_caches,
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
        with forward_context(batch):
            hidden = self.model(self._tensor(ids), self._tensor(positions))
        logits = self.model.compute_logits(hidden).cpu()
        out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
        for k, i in enumerate(order):
            out[i] = logits[cu[k] : cu[k + 1]]
        return out
