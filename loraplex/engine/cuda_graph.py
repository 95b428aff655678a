"""Decode steps replayed from CUDA graphs, one per padded batch size.

Every input of a decode forward lives in a static buffer that is updated in place: token ids,
positions, KV slot mapping, block tables, context lengths, and the LoRA metadata (the
manager's reused ``token_slots``). A graph captured for batch size ``bs`` therefore replays for
any sequences and any adapter mix; switching adapters never recaptures. Graphs are captured
twice per size, with and without the LoRA path, so base-only batches skip LoRA entirely.

Padding rows (batch padded up to a captured size) read token 0 at position 0, write their
key/value into a dummy KV block that no sequence owns, attend over that one slot, and have
LoRA slot -1. With ``capture=False`` the same static-buffer path runs eagerly (CPU tests).
"""

from __future__ import annotations

import torch

from loraplex.layers.forward_context import ForwardBatch, forward_context


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 16))
    sizes = [s for s in sizes if s <= max_num_seqs]
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches, lora_manager, max_num_seqs: int,
                 max_blocks_per_seq: int, block_size: int, dummy_block: int,
                 device: torch.device, capture: bool = True) -> None:
        self.model, self.kv_caches, self.lora = model, kv_caches, lora_manager
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.block_size, self.dummy_block, self.capture = block_size, dummy_block, capture
        n, i64 = max_num_seqs, dict(dtype=torch.int64, device=device)
        self.ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.slot_mapping = torch.zeros(n, **i64)
        self.context_lens = torch.ones(n, **i64)
        self.block_tables = torch.full((n, max_blocks_per_seq), dummy_block, **i64)
        self.logits: dict[tuple[int, bool], torch.Tensor] = {}
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _forward(self, bs: int, use_lora: bool) -> torch.Tensor:
        batch = ForwardBatch(
            is_prefill=False, num_tokens=bs, slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs], context_lens=self.context_lens[:bs],
            max_context_len=self.block_tables.shape[1] * self.block_size,
            kv_caches=self.kv_caches, lora=self.lora.batch if use_lora else None)
        with forward_context(batch):
            hidden = self.model(self.ids[:bs], self.positions[:bs])
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every (size, lora) graph, largest first so smaller ones share its pool."""
        if not self.capture:
            return
        self._reset_padding(0, max(self.sizes))
        for bs in reversed(self.sizes):
            for use_lora in (False, True):
                if use_lora:
                    self.lora.prepare([-1] * bs, [1] * bs, is_decode=True, pad_to=bs)
                # warm up on a side stream (Triton compiles, cuBLAS workspaces), as capture does
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._forward(bs, use_lora)
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.logits[(bs, use_lora)] = self._forward(bs, use_lora)
                self.pool = graph.pool()
                self.graphs[(bs, use_lora)] = graph
        torch.cuda.synchronize()

    def padded_size(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    def _reset_padding(self, n: int, bs: int) -> None:
        self.ids[n:bs].zero_()
        self.positions[n:bs].zero_()
        self.slot_mapping[n:bs].fill_(self.dummy_block * self.block_size)
        self.context_lens[n:bs].fill_(1)
        self.block_tables[n:bs].fill_(self.dummy_block)

    def run(self, ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, context_lens: torch.Tensor, lora_slots: list[int] | None
            ) -> torch.Tensor:
        """Inputs for ``n`` sequences (already on the device) -> logits [n, vocab] float32."""
        n = ids.shape[0]
        bs = self.padded_size(n)
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.context_lens[:n].copy_(context_lens)
        self.block_tables[:n, : block_tables.shape[1]].copy_(block_tables)
        self.block_tables[:n, block_tables.shape[1]:].fill_(self.dummy_block)
        self._reset_padding(n, bs)
        use_lora = lora_slots is not None
        if use_lora:
            self.lora.prepare(lora_slots, [1] * n, is_decode=True, pad_to=bs)
        if self.capture:
            self.graphs[(bs, use_lora)].replay()
            return self.logits[(bs, use_lora)][:n]
        with torch.inference_mode():
            return self._forward(bs, use_lora)[:n]
