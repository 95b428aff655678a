"""Decode steps replayed from CUDA graphs, one per padded batch size.

Every input of a decode forward lives in a static buffer that is updated in place: token ids,
positions, KV slot mapping, block tables, context lengths, and the LoRA metadata (the
manager's reused ``token_lora_slots``). A graph captured for batch size ``bs`` therefore replays for
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
                 device: torch.device, capture: bool = True, stage: bool | None = None
                 ) -> None:
        self.model, self.kv_caches, self.lora = model, kv_caches, lora_manager
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_bs = max_num_seqs
        self.block_size, self.dummy_block, self.capture = block_size, dummy_block, capture
        n, w = max_num_seqs, max_blocks_per_seq
        # The per-row inputs in one int64 buffer (pinned, numpy views), sent with one copy per
        # step: ids, positions, slot_mapping, context_lens. Block tables are [n, w] with w =
        # max_model_len / block_size, but a step fills and sends only [bs, used], used = its
        # longest table: on CUDA through a contiguous staging buffer (one host -> device copy
        # of bs * used ids, then one device-side copy into the strided view), so the host work
        # and the bytes sent follow the real contexts, not max_model_len (131072 tokens and
        # 256 rows would be 16 MB a step). Columns past a row's own blocks keep stale but valid
        # block ids: attention never reads past a row's length (the torch path masks them).
        cuda = device.type == "cuda"
        self._host = torch.zeros(4 * n, dtype=torch.int64, pin_memory=cuda)
        self._dev = self._host if not cuda else torch.zeros_like(self._host, device=device)
        self._np = self._host.numpy()
        self.ids, self.positions, self.slot_mapping, self.context_lens = (
            self._dev[k * n:(k + 1) * n] for k in range(4))
        self.block_tables = torch.full((n, w), dummy_block, dtype=torch.int64, device=device)
        stage = cuda if stage is None else stage  # (CPU tests can force the CUDA layout)
        self._stage_host = (torch.empty(n * w, dtype=torch.int64, pin_memory=cuda) if stage
                            else None)
        self._stage_dev = torch.empty(n * w, dtype=torch.int64, device=device) if stage else None
        self._fill_padding(0, n)
        if self._dev is not self._host:
            self._dev.copy_(self._host)
        self.logits: dict[tuple[int, bool], torch.Tensor] = {}
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _forward(self, bs: int, use_lora: bool, max_context_len: int | None = None
                 ) -> torch.Tensor:
        """``max_context_len``: this step's longest context when run eagerly, so attention
        reads only the table columns it needs; None when capturing (any later step replays)."""
        batch = ForwardBatch(
            is_prefill=False, num_tokens=bs, slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs], context_lens=self.context_lens[:bs],
            max_context_len=max_context_len, kv_caches=self.kv_caches,
            lora=self.lora.batch if use_lora else None)
        with forward_context(batch):  # logits too: their rows are the forward's (lm_head LoRA)
            return self.model.compute_logits(self.model(self.ids[:bs], self.positions[:bs]))

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every (size, lora) graph, largest first so smaller ones share its pool."""
        if not self.capture:
            return
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

    def _fill_padding(self, n: int, bs: int) -> None:
        rows = self._np.reshape(4, self.max_bs)
        rows[0, n:bs] = 0
        rows[1, n:bs] = 0
        rows[2, n:bs] = self.dummy_block * self.block_size
        rows[3, n:bs] = 1

    def run(self, ids: list[int], positions: list[int], slot_mapping: list[int],
            block_tables: list[list[int]], context_lens: list[int], lora_slots: list[int] | None
            ) -> torch.Tensor:
        """Host inputs for ``n`` sequences -> logits [n, vocab] float32 (static graph output)."""
        n = len(ids)
        bs = self.padded_size(n)
        rows = self._np.reshape(4, self.max_bs)
        rows[0, :n], rows[1, :n], rows[2, :n], rows[3, :n] = ids, positions, slot_mapping, \
            context_lens
        self._fill_padding(n, bs)
        used = max(len(t) for t in block_tables)
        if self._stage_host is None:  # CPU: the tables are host memory, filled in place
            tables = self.block_tables.numpy()[:bs, :used]
        else:
            tables = self._stage_host.numpy()[: bs * used].reshape(bs, used)
        tables[:] = self.dummy_block  # padding rows read column 0: the dummy block
        for i, t in enumerate(block_tables):
            tables[i, : len(t)] = t
        if self._dev is not self._host:
            self._dev.copy_(self._host, non_blocking=True)
        if self._stage_host is not None:
            staged = self._stage_dev[: bs * used]
            staged.copy_(self._stage_host[: bs * used], non_blocking=True)
            self.block_tables[:bs, :used].copy_(staged.view(bs, used))
        use_lora = lora_slots is not None
        if use_lora:
            self.lora.prepare(lora_slots, [1] * n, is_decode=True, pad_to=bs)
        if self.capture:
            self.graphs[(bs, use_lora)].replay()
            return self.logits[(bs, use_lora)][:n]
        with torch.inference_mode():  # padding rows have context 1, never the longest
            return self._forward(bs, use_lora, max(context_lens))[:n]
