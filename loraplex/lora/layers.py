"""LoRA wrappers for the fused projections, put in by module swap.

``install_lora_layers`` replaces each layer's qkv_proj, o_proj, gate_up_proj and down_proj with a
``LoRALinear`` that computes ``y = base(x)`` and, when the step's ForwardBatch carries LoRA
metadata, adds ``scaling * (x @ A^T) @ B^T`` per segment in place (the shrink ``x @ A^T`` runs
before the base GEMM, the expand after it; a DoRA slot first rescales
its rows' base output by its column scales, inside the expand). The model classes never
mention LoRA. All wrappers share one scratch buffer for the shrink output (layers run one at a
time), allocated once. The input embedding gets ``LoRAEmbedding`` (PEFT's embedding LoRA:
a gather of A's columns, then the same expand). With lm_head LoRA enabled, ``lm_head`` gets
``LoRALMHead``: the same shrink/expand on the final hidden states, vocabulary-wide B; the
runner gives ``compute_logits`` a LoRA batch of exactly its rows (``logits_read_lora``).

Under tensor parallelism a row-parallel projection (o, down) shrinks its input shard with its
columns of A: each rank's ``[T, n*R]`` shrink output is a partial sum, all-reduced (r values per
token, cheap) before the expand with the whole B adds the same delta on every rank to the
already reduced output. Column kinds need no communication (B's rows match the output shard).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from loraplex.distributed.parallel_state import all_reduce_
from loraplex.layers.activation import silu_and_mul
from loraplex.layers.embedding import VocabParallelEmbedding
from loraplex.layers.forward_context import get_forward_batch
from loraplex.layers.linear import LinearBase, RowLinear
from loraplex.layers.norm import RMSNorm
from loraplex.layers.rotary import ApplyRotary
from loraplex.lora.buffers import FUSED_PROJECTIONS, LoRABuffers, SlotBuffers
from loraplex.ops.lora_embedding import lora_embedding_shrink
from loraplex.ops.lora_ops import LoRAOps, get_lora_ops


def logits_read_lora(model: nn.Module) -> bool:
    """Whether ``model.compute_logits`` reads the LoRA batch of its rows: a wrapper around
    ``lm_head`` says so with a ``reads_lora_batch = True`` attribute (lm_head LoRA). When
    False, callers may compute logits of a subset of a forward's rows without building that
    batch (no cost for models without one)."""
    return getattr(getattr(model, "lm_head", None), "reads_lora_batch", False)


class LoRALinear(nn.Module):
    def __init__(
        self,
        base: LinearBase,
        buffers: SlotBuffers,
        scratch: torch.Tensor,
        ops: LoRAOps,
    ) -> None:
        super().__init__()
        self.base = base
        self.buffers = buffers
        self.scratch = scratch  # [max_tokens, >= n * R], shared by all wrappers
        self.shrink, self.expand = ops.shrink, ops.expand
        self.expand_silu_mul = ops.expand_silu_mul  # None: the backend has no fused form
        self.output_sizes = base.output_sizes
        self.width = buffers.a.shape[1]  # n * R
        # row-parallel under TP: the shrink output is a partial sum over the input shards
        self.reduce_shrink = isinstance(base, RowLinear) and base.tp_size > 1
        # Set by install_lora_layers where an RMSNorm's residual add (``LoRANorm``) or the
        # rotary (``LoRARotary``) reads this projection's output: on the host the expand is
        # left to that pass (``_deferred``: (y, h) until it takes it).
        _link(self, "defer_to", None)
        self._deferred: tuple | None = None
        # (x, h): this projection's shrink of x, made by the norm that wrote x (``LoRANorm``)
        self._pre_shrunk: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pre_cols: slice | None = None  # the scratch columns the norm writes it to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = get_forward_batch().lora
        if lora is None:
            self._deferred = None  # one left by a step that failed half way is not this one's
            return self.base(x)
        h, y = self._shrink_and_base(x, lora)
        return self._expand(h, y, lora)

    def _expand(self, h: torch.Tensor, y: torch.Tensor, lora) -> torch.Tensor:
        """``y += delta`` from the shrink output ``h``, or on the host, where a norm reads
        ``y`` (``defer_to``), left to that norm's pass."""
        if self.defer_to is not None and not y.is_cuda and not self.reduce_shrink:
            self._deferred = (y, h)
            return y
        buf = self.buffers
        self.expand(h, buf.b, buf.ranks, buf.scalings, buf.offsets, lora, y, buf.col_scales)
        return y

    def take_deferred(self, seen: torch.Tensor) -> tuple[torch.Tensor, tuple] | None:
        """The expand this projection left to ``defer_to``, which was handed ``seen``: (the
        output ``y``, the expand as ``lora_add_rms_norm``'s / ``lora_rotary_``'s ``before``);
        None when it ran it itself. ``seen`` is ``y`` or a view of ``y``'s leading columns
        (the rotary's q/k heads). Raises if it is neither: the model changed the output on the
        way, and the delta would be lost."""
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            return None
        y = deferred[0]
        if seen is not y and not _leading_columns(seen, y):
            raise RuntimeError("a LoRA projection's output did not reach the layer it was wired "
                               "to unchanged (install_lora_layers's model structure is wrong)")
        buf = self.buffers
        return y, (deferred[1], buf.b, buf.ranks, buf.scalings, buf.offsets, buf.col_scales)

    def finish_deferred(self, y: torch.Tensor, before: tuple) -> None:
        """Run a taken expand (``take_deferred``) unfused, into ``y``."""
        h, b, ranks, scalings, offsets, col_scales = before
        self.expand(h, b, ranks, scalings, offsets, get_forward_batch().lora, y, col_scales)

    def shrink_target(self, t: int) -> tuple | None:
        """Where a norm may write this projection's shrink of its ``t`` output rows
        (``lora_add_rms_norm``'s ``then``), or None where it may not (under TP)."""
        if self.pre_cols is None or self.reduce_shrink:
            return None
        return self.buffers.a, self.buffers.ranks, self.scratch[:t, self.pre_cols]

    def give_shrunk(self, x: torch.Tensor, h: torch.Tensor) -> None:
        """The norm made this projection's shrink ``h`` of its next input ``x``."""
        self._pre_shrunk = (x, h)

    def silu_mul_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of this gate/up projection's output. With a fused backend op the
        delta is added inside the activation's pass over the output
        (``LoRAOps.expand_silu_mul``), which then is read once instead of being rewritten by
        the expand first; else the plain forward, then the activation."""
        return self._silu_mul(x, None)[0]

    def gated_mlp_forward(self, down: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``down(silu(gate) * up)`` for this gate/up projection (``layers/activation``'s
        ``gated_mlp`` hook). Where ``down`` is a ``LoRALinear`` too and the fused op runs, its
        shrink runs inside the activation's pass as well, on each block of rows the
        activation just wrote, still in cache (``expand_silu_mul``'s ``then``), and ``down``
        gets that shrink output (``forward_shrunk``)."""
        width = self.width + getattr(down, "width", 0)
        if (not isinstance(down, LoRALinear) or down.reduce_shrink
                or self.scratch.shape[1] < width):
            return down(self.silu_mul_forward(x))
        h2 = self.scratch[: x.shape[0], self.width : width]  # past this projection's own h
        out, shrunk = self._silu_mul(x, (down.buffers.a, down.buffers.ranks, h2))
        return down.forward_shrunk(out, h2) if shrunk else down(out)

    def forward_shrunk(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``forward(x)`` given its shrink output ``h`` (computed by the layer before)."""
        return self._expand(h, self.base(x), get_forward_batch().lora)

    def _silu_mul(self, x: torch.Tensor, then) -> tuple[torch.Tensor, bool]:
        """(``silu_mul_forward(x)``, whether the fused op also ran ``then``, the next
        projection's shrink: see ``lora_cpu.lora_expand_silu_mul``)."""
        lora = get_forward_batch().lora
        if lora is None or self.expand_silu_mul is None:
            return silu_and_mul(self.forward(x)), False
        h, y = self._shrink_and_base(x, lora)
        buf = self.buffers
        out = self.expand_silu_mul(h, buf.b, buf.ranks, buf.scalings, buf.offsets, lora, y,
                                   buf.col_scales, then)
        if out is None:  # not covered here (dtype, layout, CPU): unfused
            self.expand(h, buf.b, buf.ranks, buf.scalings, buf.offsets, lora, y, buf.col_scales)
            return silu_and_mul(y), False
        return out, then is not None

    def _shrink_and_base(self, x: torch.Tensor, lora) -> tuple[torch.Tensor, torch.Tensor]:
        """(the shrink output ``h`` [T, n*R], the base output ``y``)."""
        pre, self._pre_shrunk = self._pre_shrunk, None
        if pre is not None and pre[0] is x:  # shrunk by the norm that wrote x
            return pre[1], self.base(x)
        buf = self.buffers
        t = x.shape[0]
        # The shrink runs before the base GEMM: x was just written by the layer before, so it
        # is still in cache for the shrink (afterwards the GEMM's weights have evicted it:
        # measured on CPU, a shrink after the GEMM took twice as long as the same call again).
        if self.reduce_shrink:
            # contiguous (collectives need it) and zeroed: rows of base-model tokens and
            # columns past a slot's rank are summed too, and must not grow across layers
            h = self.scratch.view(-1)[: t * self.width].view(t, self.width).zero_()
            self.shrink(x, buf.a, buf.ranks, lora, h)
            all_reduce_(h)
        else:
            h = self.scratch[:t, : self.width]  # [T, n*R]
            self.shrink(x, buf.a, buf.ranks, lora, h)
        return h, self.base(x)


class LoRALMHead(LoRALinear):
    """``logits = lm_head(h)``, then per segment ``logits += scaling * (h @ A.T) @ B.T`` with
    ``B [vocab, r]`` (PEFT's LoRA on lm_head; on a tied model too: the delta goes to the
    logits only, the input embedding is untouched). The rows are ``compute_logits``' rows,
    segmented by the LoRA batch the runner installs for them."""

    def __init__(self, base: LinearBase, buffers: SlotBuffers, scratch: torch.Tensor,
                 ops: LoRAOps, live_slots: set[int]) -> None:
        super().__init__(base, buffers, scratch, ops)
        self.live_slots = live_slots  # LoRABuffers.lm_head_slots: slots with an lm_head LoRA

    @property
    def reads_lora_batch(self) -> bool:
        """See ``logits_read_lora``: only while some slot holds an lm_head LoRA, so serving
        with the flag on but no such adapter loaded builds no batch for the logits' rows.
        (A captured CUDA graph always holds the expand: its forward reads the batch as is.)"""
        return bool(self.live_slots)

    @property
    def weight(self) -> torch.Tensor:  # code that reads the output matrix keeps working
        return self.base.weight


class LoRANorm(nn.Module):
    """An RMSNorm between two LoRA projections (install_lora_layers wires it): the one before
    (``prev``, whose output the residual add reads: o or down) leaves its expand to this
    norm, and the one after (``next``: qkv or gate/up) gets its shrink from it. With the
    backend's fused op (``LoRAOps.add_rms_norm``, on the host) all three run in one pass over
    each block of rows, in cache: the expand's read and rewrite of the projection output and
    the shrink's read of the norm's output from memory are gone. Else the expand runs first,
    then the norm, and ``next`` shrinks its input itself. Same results either way."""

    def __init__(self, base: RMSNorm, prev: LoRALinear | None, next_: LoRALinear | None,
                 add_rms_norm: Callable | None) -> None:
        super().__init__()
        self.base = base
        _link(self, "prev", prev)
        _link(self, "next", next_)
        self.add_rms_norm = add_rms_norm
        if prev is not None:
            _link(prev, "defer_to", self)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, None)

    def add_forward(self, x: torch.Tensor,
                    residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``RMSNorm.add_forward``: (norm(x + residual), x + residual), the sum in ``x``."""
        return self._norm(x, residual), x

    def _norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        taken = self.prev.take_deferred(x) if self.prev is not None else None
        before = taken[1] if taken is not None else None
        lora = get_forward_batch().lora
        if lora is not None and self.add_rms_norm is not None:
            then = self.next.shrink_target(x.shape[0]) if self.next is not None else None
            out = self.add_rms_norm(x, residual, self.base.weight, self.base.eps, lora,
                                    before, then)
            if out is not None:
                if then is not None:
                    self.next.give_shrunk(out, then[2])
                return out
        if before is not None:
            self.prev.finish_deferred(x, before)
        if residual is None:
            return self.base(x)
        return self.base.add_forward(x, residual)[0]


class LoRARotary(nn.Module):
    """An attention layer's rotary (``layers/rotary.ApplyRotary``) after a LoRA qkv projection
    (``prev``; install_lora_layers wires it where ``LlamaModel.rotary_neighbours`` lists it):
    the projection leaves its expand to this pass. With the backend's fused op
    (``LoRAOps.rotary``, on the host) the expand runs a block of rows at a time, followed by
    the rotary on the same rows in cache: the expand's read and rewrite of all of qkv from
    memory is gone. Else the expand runs first, then the plain rotary. Same results either
    way."""

    def __init__(self, base: ApplyRotary, prev: LoRALinear, rotary: Callable | None) -> None:
        super().__init__()
        self.base, self.rotary = base, rotary
        _link(self, "prev", prev)
        _link(prev, "defer_to", self)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        taken = self.prev.take_deferred(x)
        if taken is None:
            return self.base(rope, x)
        y, before = taken
        lora = get_forward_batch().lora
        if lora is not None and self.rotary is not None:
            out = self.rotary(x, *rope, lora, before, y)
            if out is not None:
                return out
        self.prev.finish_deferred(y, before)
        return self.base(rope, x)


def _leading_columns(view: torch.Tensor, y: torch.Tensor) -> bool:
    """``view`` is a view of ``y``'s rows from their first column on (same rows and row
    stride, which a single row's view may report otherwise)."""
    return (view.dim() >= 2 and y.dim() == 2 and view.shape[0] == y.shape[0]
            and view.data_ptr() == y.data_ptr()
            and (view.shape[0] < 2 or view.stride(0) == y.stride(0))
            and view.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
            and view[0].numel() <= y.shape[1] and view.stride(-1) == 1)


def _link(module: nn.Module, name: str, target: nn.Module | None) -> None:
    """``module.name = target`` as a plain reference, not a child module: the wrappers that
    hand work to each other all sit in the model's tree already, and registering these links
    would make it cyclic (``repr`` recursing, modules listed under another's path)."""
    object.__setattr__(module, name, target)


class LoRAEmbedding(nn.Module):
    """The input embedding plus its per-slot LoRA: ``y = E[ids]``, then per segment
    ``y += scaling * A.T[ids] @ B.T`` (gather, then the backend's expand). Under tensor
    parallelism ``E[ids]`` is the vocab-parallel lookup, already all-reduced, and A and B are
    whole on every rank, so each rank adds the same delta: no further communication."""

    def __init__(self, base: VocabParallelEmbedding, buffers: SlotBuffers, scratch: torch.Tensor,
                 expand: Callable, live_slots: set[int]) -> None:
        super().__init__()
        self.base, self.buffers, self.scratch, self.expand = base, buffers, scratch, expand
        self.width = buffers.a.shape[1]  # R
        self.live_slots = live_slots  # LoRABuffers.embedding_slots: slots with an embedding LoRA

    @property
    def weight(self) -> torch.Tensor:  # code that reads the embedding matrix keeps working
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        lora = get_forward_batch().lora
        if lora is None:
            return y
        # On the host, a batch none of whose adapters has an embedding LoRA skips both ops
        # (on CUDA a captured graph holds them whatever the batch, so they always run).
        if not ids.is_cuda and not any(slot in self.live_slots for *_, slot in lora.host_segs):
            return y
        buf = self.buffers
        h = self.scratch[: ids.shape[0], : self.width]  # [T, R]
        lora_embedding_shrink(ids, buf.a, buf.ranks, lora, h)
        self.expand(h, buf.b, buf.ranks, buf.scalings, buf.offsets, lora, y)
        return y


def install_lora_layers(
    model: nn.Module,
    buffers: LoRABuffers,
    backend: str,
    max_tokens: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[LoRALinear]:
    ops = get_lora_ops(backend)
    # wide enough for the MLP's gate/up and down shrink outputs side by side as well
    # (``LoRALinear.gated_mlp_forward``)
    width = max([b.a.shape[1] for b in buffers.all_buffers()]
                + [buffers.buffers[(i, "gate_up_proj")].a.shape[1]
                   + buffers.buffers[(i, "down_proj")].a.shape[1]
                   for i in range(len(model.model.layers))])
    # The norms' fused op writes the next projection's shrink past those columns
    # (``LoRANorm``): its input there is the projection's own h or down's h2, still to be read.
    links = _norm_links(model, ops)
    pre = max((buffers.buffers[(i, f)].a.shape[1] for i in range(len(model.model.layers))
               for f in ("qkv_proj", "gate_up_proj")), default=0) if links else 0
    scratch = torch.zeros(max_tokens, width + pre, dtype=dtype, device=device)
    wrappers = []
    for layer_idx, layer in enumerate(model.model.layers):
        for fused in FUSED_PROJECTIONS:
            parent = layer.self_attn if fused in ("qkv_proj", "o_proj") else layer.mlp
            base = getattr(parent, fused)
            if isinstance(base, LoRALinear):
                base = base.base
            w = LoRALinear(base, buffers.buffers[(layer_idx, fused)], scratch, ops)
            setattr(parent, fused, w)
            wrappers.append(w)
    for norm_path, prev_path, next_path in links:
        norm = model.model.get_submodule(norm_path)
        prev = model.model.get_submodule(prev_path) if prev_path else None
        nxt = model.model.get_submodule(next_path) if next_path else None
        if nxt is not None:
            nxt.pre_cols = slice(width, width + nxt.width)
        parent, _, name = norm_path.rpartition(".")
        setattr(model.model.get_submodule(parent) if parent else model.model, name,
                LoRANorm(norm.base if isinstance(norm, LoRANorm) else norm, prev, nxt,
                         ops.add_rms_norm))
    for rotary_path, qkv_path in _rotary_links(model, ops):
        parent, _, name = rotary_path.rpartition(".")
        rotary = model.model.get_submodule(rotary_path)
        setattr(model.model.get_submodule(parent), name,
                LoRARotary(rotary.base if isinstance(rotary, LoRARotary) else rotary,
                           model.model.get_submodule(qkv_path), ops.rotary))
    embed = model.model.embed_tokens
    if isinstance(embed, LoRAEmbedding):
        embed = embed.base
    model.model.embed_tokens = LoRAEmbedding(embed, buffers.embedding, scratch, ops.expand,
                                             buffers.embedding_slots)
    if buffers.lm_head is not None:
        head = model.lm_head
        model.lm_head = LoRALMHead(head.base if isinstance(head, LoRALMHead) else head,
                                   buffers.lm_head, scratch, ops, buffers.lm_head_slots)
    return wrappers


def _norm_links(model: nn.Module, ops: LoRAOps) -> list[tuple[str, str | None, str | None]]:
    """The model's RMSNorms to wire as ``LoRANorm`` (``LlamaModel.norm_neighbours``): none
    where the backend has no fused norm op, or the model does not describe its norms."""
    describe = getattr(model.model, "norm_neighbours", None)
    if ops.add_rms_norm is None or describe is None:
        return []
    links = describe()
    if not all(isinstance(model.model.get_submodule(n), RMSNorm | LoRANorm) for n, _, _ in links):
        return []
    return links


def _rotary_links(model: nn.Module, ops: LoRAOps) -> list[tuple[str, str]]:
    """The rotaries to wire as ``LoRARotary`` (``LlamaModel.rotary_neighbours``): none where
    the backend has no fused rotary op, or the model does not describe its rotaries."""
    describe = getattr(model.model, "rotary_neighbours", None)
    if ops.rotary is None or describe is None:
        return []
    links = describe()
    if not all(isinstance(model.model.get_submodule(r), ApplyRotary | LoRARotary)
               and isinstance(model.model.get_submodule(q), LoRALinear) for r, q in links):
        return []
    return links
