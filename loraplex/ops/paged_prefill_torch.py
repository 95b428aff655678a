"""Extend attention (prefill chunks over their cached prefix) in plain torch: the CPU backend.

Same contract as ``paged_attention_ref.paged_prefill_attention_ref``. Chunks are padded to a
common length and attended in one SDPA call per group of query rows: contexts are gathered
through the block table narrowed to the blocks ``max_context_len`` tokens span (never the
table's full, possibly max_model_len, width), and a boolean mask applies each chunk's causal
offset, its sequence's length and the sliding window. No per-token Python loop, no host sync.

Two things keep the work near the real causal work when the host knows the chunk lengths
(``cu_seqlens_q_host``):
- Sequences are grouped by chunk length (``plan_groups``), so a step mixing decodes with a
  long chunk does not pad every decode to the chunk's length.
- Within a group, query rows go in blocks of ``ROW_BLOCK``; a block reads only the keys its
  last row can see (``max_context_len - shortest chunk + block end``), so a chunk over no
  prefix costs about half a full square, like ``is_causal``.
Without the host offsets the whole batch is one padded group (the layout is derived on the
device). The layout and masks depend only on the step's metadata, so with an ``ExtendPlan``
they are built by a forward's first layer and shared by the rest. Grouped-query attention
without repeating k/v: SDPA's ``enable_gqa`` (torch >= 2.5; older torch repeats them), and for
softcap a matmul broadcast over each kv head's group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ROW_BLOCK = 128  # chunk rows per SDPA call within a group
# torch >= 2.5: scaled_dot_product_attention reads grouped kv heads itself (enable_gqa)
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class ExtendPlan:
    """One step's layout of the extend rows for this backend, built by the first layer that
    attends and reused by the others (every layer sees the same chunks, contexts and block
    tables): per group of chunks its token and padded-row indices, block tables and lengths,
    and its visibility mask per sliding window (layers may differ in window). Valid for one
    forward only: the owner (``ExtendRows.torch_plan``) lives as long as the step's metadata.
    """

    groups: list[_Group] | None = None
    masks: dict[tuple[int, int | None], torch.Tensor] = field(default_factory=dict)
    num_tokens: int = -1  # the q rows it was built for (checked by every layer)


@dataclass
class _Group:
    tokens: torch.Tensor | None  # the group's q rows; None: all of q, in order
    index: torch.Tensor | None  # padded row of each of them; None: q is padded already
    tables: torch.Tensor  # [Bg, width] block tables, cut to the group's longest context
    lens: torch.Tensor  # [Bg] chunk lengths
    context_lens: torch.Tensor  # [Bg]
    rows: int  # chunks padded to this many rows
    shortest: int  # a lower bound on the chunk lengths
    max_context_len: int


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    max_context_len: int,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seqlens_q_host: list[int] | None = None,
    context_lens_host: list[int] | None = None,
    out: torch.Tensor | None = None,
    plan: ExtendPlan | None = None,
) -> torch.Tensor:
    """``q [T, H, d]`` -> ``out [T, H, d]`` (written and returned; allocated when None).
    ``plan``: the step's ``ExtendPlan``, filled by the first call and read by later ones with
    the same metadata (None: built for this call alone)."""
    if out is None:
        out = q.new_empty(q.shape)
    if plan is None:
        plan = ExtendPlan()
    if plan.groups is None:
        plan.groups = _plan(q.shape[0], block_tables, cu_seqlens_q, context_lens,
                            k_cache.shape[1], max_query_len, max_context_len,
                            cu_seqlens_q_host, context_lens_host)
        plan.num_tokens = q.shape[0]
    assert plan.num_tokens == q.shape[0], "an ExtendPlan serves one step's metadata only"
    block_size = k_cache.shape[1]
    for i, g in enumerate(plan.groups):
        mask = plan.masks.get((i, sliding_window))
        if mask is None:  # [Bg, 1, rows, L]
            mask = plan.masks[(i, sliding_window)] = prefill_attention_mask(
                g.lens, g.context_lens, g.rows, g.tables.shape[1] * block_size, sliding_window)
        opts = dict(scale=scale, max_context_len=g.max_context_len, softcap=softcap)
        if g.index is None:  # the whole batch, every chunk the longest: q in place
            _attend(q, None, k_cache, v_cache, g.tables, mask, g.rows, g.shortest, dest=out,
                    **opts)
        elif g.tokens is None:  # the whole batch padded to max_query_len
            o = _attend(q, g.index, k_cache, v_cache, g.tables, mask, g.rows, g.shortest, **opts)
            out.copy_(o.index_select(0, g.index))
        else:
            o = _attend(q.index_select(0, g.tokens), g.index, k_cache, v_cache, g.tables, mask,
                        g.rows, g.shortest, **opts)
            out.index_copy_(0, g.tokens, o.index_select(0, g.index))
    return out


def _plan(num_tokens: int, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
          context_lens: torch.Tensor, block_size: int, max_query_len: int,
          max_context_len: int, cu: list[int] | None,
          context_lens_host: list[int] | None) -> list[_Group]:
    """The groups of chunks one SDPA pass each (see the module docstring)."""
    width = min(block_tables.shape[1], -(-max_context_len // block_size))
    tables = block_tables[:, :width]
    host_lens = None if cu is None else [hi - lo for lo, hi in zip(cu[:-1], cu[1:], strict=True)]
    groups = [None] if host_lens is None else plan_groups(host_lens)
    if len(groups) == 1:  # the whole batch padded to max_query_len, q in place
        # without host lengths, the other chunks hold at most (B - 1) * max_query_len tokens
        bsz = len(context_lens)
        shortest = min(host_lens or [max(1, num_tokens - (bsz - 1) * max_query_len)])
        lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        index = None
        if num_tokens != bsz * max_query_len:  # not every chunk is the longest
            index = _padded_rows(cu_seqlens_q, num_tokens, max_query_len)
        return [_Group(None, index, tables, lens, context_lens, max_query_len, shortest,
                       max_context_len)]
    out = []
    for group in groups:
        rows = max(host_lens[b] for b in group)
        # token t of the group's i-th sequence b goes to padded row i * rows + t - cu[b]
        tokens = torch.cat([torch.arange(cu[b], cu[b + 1]) for b in group])
        index = torch.cat([torch.arange(host_lens[b]) + i * rows for i, b in enumerate(group)])
        sel = torch.tensor(group, device=context_lens.device)
        lens = torch.tensor([host_lens[b] for b in group], device=context_lens.device)
        longest, group_tables = max_context_len, tables.index_select(0, sel)
        if context_lens_host is not None:  # gather only as far as this group's contexts
            longest = max(context_lens_host[b] for b in group)
            group_tables = group_tables[:, : -(-longest // block_size)]
        out.append(_Group(tokens.to(block_tables.device), index.to(block_tables.device),
                          group_tables, lens, context_lens.index_select(0, sel), rows,
                          min(host_lens[b] for b in group), longest))
    return out


def plan_groups(lens: list[int]) -> list[list[int]]:
    """Sequences (by index) grouped so that padding each group's chunks to its longest never
    more than doubles its rows: sorted by chunk length, a group closes when the next chunk
    would make ``count x longest > 2 x total``. Equal lengths stay one group."""
    groups: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for b in sorted(range(len(lens)), key=lens.__getitem__):
        if cur and (len(cur) + 1) * lens[b] > 2 * (total + lens[b]):
            groups.append(cur)
            cur, total = [], 0
        cur.append(b)
        total += lens[b]
    if cur:
        groups.append(cur)
    return groups


def _attend(q, index, k_cache, v_cache, tables, mask, rows, shortest, *,
            scale, max_context_len, softcap, dest=None) -> torch.Tensor:
    """One group of ``B`` chunks over their gathered contexts -> ``[B * rows, H, d]``, the
    chunks padded to ``rows`` (written into ``dest`` when given). ``q``: the group's tokens,
    placed at padded rows ``index`` (already ``[B * rows]`` when None); ``mask``: the group's
    ``prefill_attention_mask``; ``shortest``: a lower bound on the chunk lengths."""
    heads, d = q.shape[1], q.shape[2]
    bsz = tables.shape[0]
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    length = tables.shape[1] * block_size
    flat = tables.reshape(-1)
    # [B * width, block_size, KVH, d] -> [B, KVH, L, d]
    keys = k_cache.index_select(0, flat).view(bsz, length, kv_heads, d).transpose(1, 2)
    values = v_cache.index_select(0, flat).view(bsz, length, kv_heads, d).transpose(1, 2)
    if index is not None:
        q = q.new_zeros(bsz * rows, heads, d).index_copy_(0, index, q)
    qs = q.view(bsz, rows, heads, d).transpose(1, 2)  # [B, H, rows, d], a view
    o = q.new_empty(bsz * rows, heads, d) if dest is None else dest
    os = o.view(bsz, rows, heads, d).transpose(1, 2)
    for r0 in range(0, rows, ROW_BLOCK):
        r1 = min(rows, r0 + ROW_BLOCK)
        # the last row of this block sits at most at max_context_len - shortest + r1 - 1
        seen = min(length, max_context_len - shortest + r1)
        os[:, :, r0:r1] = _scores_softmax_v(
            qs[:, :, r0:r1], keys[:, :, :seen], values[:, :, :seen],
            mask[:, :, r0:r1, :seen], scale, softcap)
    return o


def _scores_softmax_v(q, k, v, mask, scale, softcap) -> torch.Tensor:
    """``q [B, H, r, d]``, ``k``/``v`` ``[B, KVH, n, d]``, ``mask [B, 1, r, n]`` ->
    ``[B, H, r, d]``; query head h reads kv head ``h // (H // KVH)``, k/v never repeated where
    torch allows."""
    bsz, heads, r, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    if softcap is None and (_SDPA_GQA or group == 1):
        gqa = dict(enable_gqa=True) if group > 1 else {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)
    if softcap is None:  # torch < 2.5: SDPA needs as many kv heads as query heads
        k, v = (x.repeat_interleave(group, 1) for x in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # SDPA has no softcap: explicit scores ([B, KVH, G, r, n], k/v broadcast over the group),
    # softmax in float32
    qg = q.view(bsz, kv_heads, group, r, d)
    s = torch.matmul(qg, k[:, :, None].transpose(-1, -2)).float() * scale
    s = torch.tanh(s / softcap) * softcap
    p = s.masked_fill_(~mask[:, :, None], float("-inf")).softmax(-1)
    return torch.matmul(p.to(v.dtype), v[:, :, None]).view(bsz, heads, r, d)


def prefill_attention_mask(query_lens: torch.Tensor, context_lens: torch.Tensor, rows: int,
                           length: int, sliding_window: int | None = None) -> torch.Tensor:
    """``[B, 1, rows, length]`` boolean, True where chunk row ``j`` of sequence ``b`` sees key
    ``i``: ``i <= p`` and, with a window, ``i > p - window``, for the query position
    ``p = context_lens[b] - query_lens[b] + j``. Padding rows (``j >= query_lens[b]``) take the
    last real position, so no row is empty (an all-False row would make the softmax NaN)."""
    device = context_lens.device
    j = torch.arange(rows, device=device)
    pos = (context_lens - query_lens.to(device))[:, None] + j[None, :]  # [B, rows]
    pos = torch.minimum(pos, (context_lens - 1)[:, None])
    key = torch.arange(length, device=device)[None, None, :]
    visible = key <= pos[:, :, None]
    if sliding_window is not None:
        visible &= key > (pos - sliding_window)[:, :, None]
    return visible[:, None]


def _padded_rows(cu_seqlens_q: torch.Tensor, tokens: int, rows: int) -> torch.Tensor:
    """``[T]`` int64: token ``t`` of chunk ``b`` (``cu[b] <= t < cu[b + 1]``) goes to padded row
    ``b * rows + t - cu[b]``."""
    t = torch.arange(tokens, device=cu_seqlens_q.device)
    seq = torch.searchsorted(cu_seqlens_q[1:], t, right=True)  # chunk of each token
    return seq * rows + t - cu_seqlens_q[seq]
