"""Per-rank sizes of a tensor-parallel model: which heads, kv heads, MLP columns and vocabulary
rows each rank holds. One definition, read by the linear layers, the checkpoint loader, the
LoRA buffers and the KV-cache allocator, so their shards always agree.

Query heads split evenly: rank r holds heads ``[r * H/tp, (r+1) * H/tp)``. KV heads split the
same way when ``num_kv_heads >= tp``; with fewer kv heads than ranks each kv head is replicated
on ``tp / kv`` ranks and rank r holds kv head ``r * kv // tp``, the one its query heads read
(query head h reads kv head ``h // (H/kv)``). The vocabulary splits into ``ceil(V / tp)`` rows
per rank; the last ranks' rows past ``V`` are zero padding, cut off after the gather.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.config import ModelConfig
from loraplex.errors import ConfigError


def divide(n: int, tp: int, what: str) -> int:
    """``n / tp``; a ConfigError naming ``what`` when ``tp`` does not divide it."""
    if n % tp:
        raise ConfigError(f"tensor_parallel_size={tp} must divide {what} ({n})")
    return n // tp


def even_range(n: int, tp: int, rank: int, what: str) -> tuple[int, int]:
    """Rank ``rank``'s rows ``[lo, hi)`` of ``n`` split evenly over ``tp`` ranks."""
    k = divide(n, tp, what)
    return rank * k, (rank + 1) * k


def kv_heads_per_rank(num_kv_heads: int, num_heads: int, tp: int) -> int:
    """KV heads each rank holds: ``kv / tp``, or 1 (replicated) when ``kv < tp``."""
    divide(num_heads, tp, "num_attention_heads")
    if num_kv_heads >= tp:
        return divide(num_kv_heads, tp, "num_key_value_heads")
    if tp % num_kv_heads:
        raise ConfigError(f"num_key_value_heads ({num_kv_heads}) must divide "
                          f"tensor_parallel_size={tp} when it is smaller")
    return 1


def kv_head_range(num_kv_heads: int, num_heads: int, tp: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s kv heads ``[lo, hi)`` of the checkpoint's ``num_kv_heads``."""
    k = kv_heads_per_rank(num_kv_heads, num_heads, tp)
    lo = rank * k if num_kv_heads >= tp else rank * num_kv_heads // tp
    return lo, lo + k


def vocab_per_rank(vocab: int, tp: int) -> int:
    """Rows of the vocabulary each rank holds (padded: ``ceil(vocab / tp)``)."""
    return -(-vocab // tp)


def vocab_range(vocab: int, tp: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s real vocabulary rows ``[lo, hi)`` (``hi - lo`` may be short of
    ``vocab_per_rank`` on the last ranks, or 0)."""
    k = vocab_per_rank(vocab, tp)
    return min(rank * k, vocab), min((rank + 1) * k, vocab)


@dataclass(frozen=True)
class ProjShard:
    """One projection's slice on one rank, in the full (checkpoint) coordinates: weight rows
    ``out_lo:out_hi`` and columns ``in_lo:in_hi`` (a LoRA A keeps columns ``in_lo:in_hi``, a B
    rows ``out_lo:out_hi``)."""

    in_lo: int
    in_hi: int
    out_lo: int
    out_hi: int

    @property
    def shape(self) -> tuple[int, int]:
        """(in, out) on this rank, as ``ModelConfig.proj_shapes``."""
        return self.in_hi - self.in_lo, self.out_hi - self.out_lo


def proj_shards(cfg: ModelConfig, tp: int, rank: int) -> dict[str, ProjShard]:
    """Each decoder projection's slice on ``rank``: column kinds (q/k/v, gate/up) split their
    outputs (q by heads, k/v by kv heads), row kinds (o, down) their inputs."""
    shapes = cfg.proj_shapes()
    d = cfg.head_dim
    q_lo, q_hi = even_range(cfg.num_heads, tp, rank, "num_attention_heads")
    kv_lo, kv_hi = kv_head_range(cfg.num_kv_heads, cfg.num_heads, tp, rank)
    i_lo, i_hi = even_range(cfg.intermediate_size, tp, rank, "intermediate_size")
    h = cfg.hidden_size
    out = {
        "q_proj": ProjShard(0, h, q_lo * d, q_hi * d),
        "k_proj": ProjShard(0, h, kv_lo * d, kv_hi * d),
        "v_proj": ProjShard(0, h, kv_lo * d, kv_hi * d),
        "o_proj": ProjShard(q_lo * d, q_hi * d, 0, h),
        "gate_proj": ProjShard(0, h, i_lo, i_hi),
        "up_proj": ProjShard(0, h, i_lo, i_hi),
        "down_proj": ProjShard(i_lo, i_hi, 0, h),
    }
    assert set(out) == set(shapes), (set(out), set(shapes))
    return out


@dataclass(frozen=True)
class RankShape:
    """The model's sizes on one rank."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_rows: int  # padded

    @classmethod
    def of(cls, cfg: ModelConfig, tp: int) -> RankShape:
        return cls(num_heads=divide(cfg.num_heads, tp, "num_attention_heads"),
                   num_kv_heads=kv_heads_per_rank(cfg.num_kv_heads, cfg.num_heads, tp),
                   intermediate_size=divide(cfg.intermediate_size, tp, "intermediate_size"),
                   vocab_rows=vocab_per_rank(cfg.vocab_size, tp))


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, itemsize: int, tp: int) -> int:
    """Bytes of one KV-cache block (K and V, every layer) on one rank."""
    kv = kv_heads_per_rank(cfg.num_kv_heads, cfg.num_heads, tp)
    return 2 * cfg.num_layers * block_size * kv * cfg.head_dim * itemsize
