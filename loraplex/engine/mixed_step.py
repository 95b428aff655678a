"""The inputs of a step that is not a pure decode: prefill chunks, possibly after a cached
prefix, mixed with decode tokens.

Each row computes tokens ``num_computed_tokens .. + n`` of its sequence. A row with nothing
cached before its chunk (a prompt's first chunk, no prefix-cache hit) attends causally over its
own tokens on the grouped SDPA path (``layers/prefill_groups.py``); every other row, decode
tokens included, reads its context through its block table (``ExtendRows``). When no row has
a cached prefix the step is exactly a classic prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.engine.sequence import Sequence
from loraplex.kvcache.block_manager import BlockManager
from loraplex.layers.forward_context import ExtendRows
from loraplex.layers.prefill_groups import PrefillGroup, plan_prefill, plan_prefill_rows


@dataclass
class MixedStep:
    ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64 KV cache slot per token
    cu_seqlens: list[int]  # [B + 1] rows' token ranges
    prefill_groups: list[PrefillGroup]  # rows without a cached prefix
    extend: ExtendRows | None  # rows with one


def build_mixed_step(seqs: list[Sequence], counts: list[int], blocks: BlockManager,
                     device: torch.device) -> MixedStep:
    bs = blocks.block_size
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    cu = [0]
    fresh_starts: list[int] = []
    fresh_lens: list[int] = []
    ext_tokens: list[int] = []
    ext_cu = [0]
    ext_tables: list[list[int]] = []
    ext_lens: list[int] = []
    for seq, n in zip(seqs, counts):
        start, t0 = seq.num_computed_tokens, cu[-1]
        ids += seq.token_window(start, start + n)
        positions += range(start, start + n)
        table = blocks.tables[seq.seq_id]
        slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
        if start == 0:
            fresh_starts.append(t0)
            fresh_lens.append(n)
        else:
            ext_tokens += range(t0, t0 + n)
            ext_cu.append(ext_cu[-1] + n)
            ext_tables.append(table[: blocks.blocks_needed(start + n)])
            ext_lens.append(start + n)
        cu.append(t0 + n)

    def tensor(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    extend = None
    if ext_lens:
        width = max(len(t) for t in ext_tables)
        extend = ExtendRows(
            tokens=None if len(ext_tokens) == cu[-1] else tensor(ext_tokens),
            cu_seqlens_q=tensor(ext_cu), cu_seqlens_q_host=ext_cu,
            block_tables=tensor([t + [0] * (width - len(t)) for t in ext_tables]),
            context_lens=tensor(ext_lens),
            max_query_len=max(b - a for a, b in zip(ext_cu[:-1], ext_cu[1:])),
            max_context_len=max(ext_lens), context_lens_host=ext_lens)
        groups = plan_prefill_rows(fresh_starts, fresh_lens, device) if fresh_lens else []
    else:
        groups = plan_prefill(cu, device)
    return MixedStep(tensor(ids), tensor(positions), tensor(slots), cu, groups, extend)
