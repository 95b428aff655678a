"""Replaced embedding / lm_head weights of an adapter: PEFT's ``modules_to_save`` and
``trainable_token_indices``, in host form, and their parsing from the adapter's tensors.

Semantics (peft 0.21, checked against ``PeftModel`` in tests/test_full_modules.py):

- ``modules_to_save`` with ``embed_tokens`` / ``lm_head``: PEFT trains a full copy of the
  module and saves it (``base_model.model.model.embed_tokens.weight``,
  ``base_model.model.lm_head.weight``); the adapter's rows use that copy instead of the base
  matrix. LoRA never applies to a module in ``modules_to_save`` (PEFT excludes it from the
  targets), so there is nothing to compose with. With tied embeddings the copy of
  ``embed_tokens`` does NOT reach the lm_head (the head stays tied to the base matrix),
  unless ``ensure_weight_tying`` is set, in which case PEFT saves the lm_head copy too and
  this file reads it like any other saved lm_head.
- ``trainable_token_indices`` (a list: the input embedding; or a dict ``{module: ids}``):
  only the listed rows are replaced, by the saved values
  (``...token_adapter.trainable_tokens_delta [n, hidden]``: despite the name these are the
  new rows, not differences: PEFT ``index_copy``s them over the base matrix). With tied
  embeddings the lm_head follows the embedding's rows (one saved tensor, as PEFT ties them),
  unless the dict gives the lm_head other indices. Trainable tokens cannot combine with an
  embedding LoRA or a full copy of the same module (PEFT refuses both).

A full copy is ``vocab x hidden``: on the device it needs a full-module slot
(``max_full_module_adapters``); trainable tokens are kept sparse (ids + rows) and need none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.config import ModelConfig
from loraplex.errors import AdapterLoadError

EMBED_MODULE, HEAD_MODULE = "model.embed_tokens", "lm_head"
# tensor name (after base_model.model.) -> (module, kind): "full" copy or trainable "rows"
_TENSORS = {
    f"{EMBED_MODULE}.weight": (EMBED_MODULE, "full"),
    f"{HEAD_MODULE}.weight": (HEAD_MODULE, "full"),
    f"{EMBED_MODULE}.token_adapter.trainable_tokens_delta": (EMBED_MODULE, "rows"),
    f"{HEAD_MODULE}.token_adapter.trainable_tokens_delta": (HEAD_MODULE, "rows"),
}
_PREFIX = "base_model.model."


@dataclass
class TokenRows:
    """Trainable tokens of one module: row ``ids[i]`` of the matrix is ``rows[i]``."""

    ids: torch.Tensor  # [n] int64, distinct, in [0, vocab)
    rows: torch.Tensor  # [n, hidden]


@dataclass
class ReplacedModules:
    """What an adapter replaces in the embedding and the lm_head (each None when nothing).
    ``embed`` / ``lm_head``: a full ``[vocab, hidden]`` copy; ``*_rows``: trainable tokens."""

    embed: torch.Tensor | None = None
    lm_head: torch.Tensor | None = None
    embed_rows: TokenRows | None = None
    lm_head_rows: TokenRows | None = None

    @property
    def needs_full_slot(self) -> bool:
        return self.embed is not None or self.lm_head is not None

    @property
    def nbytes(self) -> int:
        rows = [r.rows for r in (self.embed_rows, self.lm_head_rows) if r is not None]
        tensors = {id(t): t for t in (self.embed, self.lm_head, *rows) if t is not None}
        return sum(t.nbytes for t in tensors.values())  # a tied head shares the embedding's

    def dtype_is(self, dtype: torch.dtype) -> bool:
        rows = [r.rows for r in (self.embed_rows, self.lm_head_rows) if r is not None]
        return all(t.dtype == dtype for t in (self.embed, self.lm_head, *rows) if t is not None)

    def to(self, dtype: torch.dtype) -> ReplacedModules:
        done: dict[int, torch.Tensor] = {}  # tied modules share one tensor: keep it shared

        def cast(t):
            if t is None:
                return None
            if id(t) not in done:
                done[id(t)] = t.to(dtype).contiguous()
            return done[id(t)]

        def cast_rows(r):
            return None if r is None else TokenRows(r.ids, cast(r.rows))

        return ReplacedModules(cast(self.embed), cast(self.lm_head), cast_rows(self.embed_rows),
                               cast_rows(self.lm_head_rows))


def module_names_selected(entries: frozenset[str], names: list[str]) -> set[str]:
    """The module names ``modules_to_save`` selects: PEFT's ``_set_trainable`` wraps every
    module whose name ends with an entry (a plain suffix test, not a dotted one)."""
    return {n for n in names if any(n.endswith(e) for e in entries)}


def pop_replaced_modules(
    file: Path,
    tensors: dict[str, torch.Tensor],
    saved: set[str],
    trainable: dict[str, tuple[int, ...]],
    mc: ModelConfig,
    tie_weights: bool = False,
) -> ReplacedModules | None:
    """Take the replaced-module tensors out of ``tensors`` and check them.

    ``saved``: the modules of ``modules_to_save`` (``EMBED_MODULE`` / ``HEAD_MODULE``);
    ``trainable``: module -> token ids of ``trainable_token_indices``, as PEFT resolves them
    (a bare list means the input embedding). Every module named must have its tensor, and no
    other replaced-module tensor may be present. ``tie_weights``: the config's
    ``ensure_weight_tying`` on a tied model: the lm_head follows the embedding's copy (PEFT
    ties them; the lm_head copy it also saves is the same matrix)."""
    found: dict[tuple[str, str], tuple[str, torch.Tensor]] = {}
    for key in [k for k in tensors if k.startswith(_PREFIX) and k[len(_PREFIX):] in _TENSORS]:
        found[_TENSORS[key[len(_PREFIX):]]] = (key, tensors.pop(key))
    want = {(m, "full") for m in saved} | {(m, "rows") for m in trainable}
    tie_full = tie_weights and mc.tie_word_embeddings and EMBED_MODULE in saved
    if tie_full:
        found.pop((HEAD_MODULE, "full"), None)
        want.discard((HEAD_MODULE, "full"))
    for (module, kind), (key, _) in found.items():
        if (module, kind) not in want:
            field = "modules_to_save" if kind == "full" else "trainable_token_indices"
            raise AdapterLoadError(f"{file}: unexpected tensor {key!r}: adapter_config.json's "
                                   f"{field} does not name {module}")
    if not want:
        return None
    out = ReplacedModules()
    shape = (mc.vocab_size, mc.hidden_size)
    for module, kind in sorted(want):
        attr = "embed" if module == EMBED_MODULE else "lm_head"
        if (module, kind) not in found:
            name = (f"{module}.weight" if kind == "full"
                    else f"{module}.token_adapter.trainable_tokens_delta")
            field = "modules_to_save" if kind == "full" else "trainable_token_indices"
            raise AdapterLoadError(f"{file}: missing tensor '{_PREFIX}{name}' "
                                   f"(adapter_config.json's {field} names {module})")
        key, t = found[(module, kind)]
        if kind == "full":
            if tuple(t.shape) != shape:
                raise AdapterLoadError(
                    f"{file}: tensor {key!r} has shape {tuple(t.shape)}, the base model's "
                    f"{module} is {shape}; adapters that resize the embeddings (added tokens) "
                    f"are not supported")
            setattr(out, attr, _finite(file, key, t))
        else:
            ids = trainable[module]
            if tuple(t.shape) != (len(ids), mc.hidden_size):
                raise AdapterLoadError(
                    f"{file}: tensor {key!r} has shape {tuple(t.shape)}, expected "
                    f"({len(ids)}, {mc.hidden_size}): one row per trainable_token_indices "
                    f"entry of {module}")
            setattr(out, f"{attr}_rows",
                    TokenRows(torch.tensor(ids, dtype=torch.int64), _finite(file, key, t)))
    if tie_full:
        out.lm_head = out.embed
    # PEFT ties a tied model's lm_head to the embedding's trainable tokens (same rows, one
    # saved tensor) unless the lm_head has its own, different indices
    if mc.tie_word_embeddings and out.embed_rows is not None and HEAD_MODULE not in trainable:
        out.lm_head_rows = out.embed_rows
    return out


def resolve_trainable_tokens(file: Path, raw, mc: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``trainable_token_indices`` as ``{EMBED_MODULE or HEAD_MODULE: ids}`` (PEFT's rules:
    a list is the input embedding; dict keys are module-name suffixes)."""
    if raw is None:
        return {}
    table = raw if isinstance(raw, dict) else {"embed_tokens": raw}
    out: dict[str, tuple[int, ...]] = {}
    for name, ids in table.items():
        module = next((m for m in (EMBED_MODULE, HEAD_MODULE)
                       if isinstance(name, str) and m.endswith(name)), None)
        if module is None:
            raise AdapterLoadError(f"{file}: trainable_token_indices names {name!r}; loraplex "
                                   f"serves trainable tokens of embed_tokens and lm_head only")
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
            raise AdapterLoadError(f"{file}: trainable_token_indices[{name!r}]={ids!r} must be "
                                   f"a non-empty list of token ids")
        bad = [i for i in ids if not 0 <= i < mc.vocab_size]
        if bad:
            raise AdapterLoadError(
                f"{file}: trainable_token_indices[{name!r}] has token id {bad[0]}, outside the "
                f"base model's vocabulary (0..{mc.vocab_size - 1}); adapters that add tokens "
                f"are not supported")
        if len(set(ids)) != len(ids):
            raise AdapterLoadError(f"{file}: trainable_token_indices[{name!r}] repeats a token "
                                   f"id")
        out[module] = tuple(ids)
    if mc.tie_word_embeddings and out.get(HEAD_MODULE) == out.get(EMBED_MODULE):
        out.pop(HEAD_MODULE)  # PEFT skips the tied head: it follows the embedding's rows
    return out


def _finite(file: Path, key: str, t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        raise AdapterLoadError(f"{file}: tensor {key!r} has dtype {t.dtype}, expected floating")
    t = t.to(torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise AdapterLoadError(f"{file}: tensor {key!r} contains NaN or infinite values")
    return t
