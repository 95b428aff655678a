"""Strict loading of a PEFT LoRA directory into a validated, normalized ``LoRAAdapter``.

Everything is checked on the host before any tensor reaches a device: the config's fields
(unsupported features are refused by name), which modules it targets in this base model,
each module's rank against ``max_lora_rank``, and every tensor's name, layer, rank and
shape (including grouped-query k/v widths). Errors are ``AdapterLoadError`` naming the file
and the field or tensor at fault.

Steps: ``read_peft_config`` -> ``_expected_modules`` (what PEFT would create in this model)
-> ``_read_tensors`` -> ``_collect`` (match tensors to modules, check shapes).
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loraplex.config import ModelConfig
from loraplex.errors import AdapterLoadError
from loraplex.lora.adapter import (
    EMBED,
    EMBED_LAYER,
    LM_HEAD,
    PROJ_NAMES,
    LoRAAdapter,
    LoRAWeights,
    hf_module_name,
)
from loraplex.lora.dora import BaseWeightFn, fold_dora
from loraplex.lora.full_modules import (
    EMBED_MODULE,
    HEAD_MODULE,
    ReplacedModules,
    module_names_selected,
    pop_replaced_modules,
    resolve_trainable_tokens,
)
from loraplex.lora.peft_config import (
    ALL_LINEAR,
    PeftLoRAConfig,
    read_peft_config,
    resolve_inside,
)

SAFETENSORS_NAME = "adapter_model.safetensors"
_KIND_NAMES = {"A": "lora_A", "B": "lora_B", "M": "lora_magnitude_vector",
               "W": "base_layer.weight"}
BIN_NAME = "adapter_model.bin"

# base_model.model.<module>.lora_A[.<adapter name>].weight; <module> as in the HF model.
# DoRA adds base_model.model.<module>.lora_magnitude_vector[.weight] (kind "M").
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?:lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight"
                     r"|lora_magnitude_vector(?:\.weight)?|lora_embedding_(?P<eab>[AB])"
                     r"|(?P<base>base_layer\.weight))$")
_MODULE_RE = re.compile(r"^(?:model\.)?layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<proj>\w+)$")


def load_peft_adapter(
    path: str | os.PathLike,
    model_config: ModelConfig,
    max_lora_rank: int,
    name: str | None = None,
    base_weight: BaseWeightFn | None = None,
    lm_head_lora: bool = False,
) -> LoRAAdapter:
    """Load the PEFT LoRA adapter in directory ``path`` for the base model ``model_config``.

    Returns a ``LoRAAdapter`` whose ``weights[(layer, proj)]`` hold float32, contiguous CPU
    tensors ``a: [r, in]`` and ``b: [out, r]`` with ``(in, out) = model_config.proj_shapes()
    [proj]``, and PEFT's scaling (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA, per
    module after ``rank_pattern`` / ``alpha_pattern``). ``name`` defaults to the directory
    name. DoRA adapters (``use_dora``) need ``base_weight`` (HF parameter name -> the base
    model's float32 tensor, e.g. ``CheckpointWeights.get``) and come back folded
    (``lora/dora.py``). Raises ``AdapterLoadError`` for anything PEFT would not load into
    this model the same way, or that loraplex cannot serve (e.g. ``modules_to_save`` of a
    module other than the embedding or lm_head, rank above ``max_lora_rank``, an ``lm_head``
    target unless ``lm_head_lora``: the engine's ``enable_lm_head_lora``). Replaced
    embedding / lm_head weights come back in ``adapter.replaced`` (lora/full_modules.py).
    Errors start with the adapter's name, then name the file relative to
    ``path`` (never an absolute path); a file that resolves outside ``path`` (a symlink out
    of it) is refused.
    """
    adapter_dir = Path(path)
    label = name or adapter_dir.name
    if not adapter_dir.is_dir():
        what = "is not a directory" if adapter_dir.exists() else "does not exist"
        raise AdapterLoadError(f"adapter {label!r}: adapter directory {str(path)!r} {what}")
    try:
        return _load(adapter_dir, model_config, max_lora_rank, name, base_weight, lm_head_lora)
    except AdapterLoadError as e:
        raise AdapterLoadError(f"adapter {label!r}: {e}") from e.__cause__


def _load(adapter_dir: Path, model_config: ModelConfig, max_lora_rank: int,
          name: str | None, base_weight: BaseWeightFn | None,
          lm_head_lora: bool = False) -> LoRAAdapter:
    cfg = read_peft_config(adapter_dir)
    if cfg.use_dora and base_weight is None:
        raise AdapterLoadError(f"{cfg.file}: use_dora=True: DoRA needs the base model's weights "
                               f"(load it through the engine, or pass base_weight)")
    expected = _expected_modules(cfg, model_config, max_lora_rank, lm_head_lora)
    file, tensors = _read_tensors(adapter_dir)
    replaced = _replaced_modules(file, tensors, cfg, model_config)  # takes its tensors out
    weights, magnitudes = _collect(file, tensors, cfg, expected, model_config, base_weight)
    for key, m in magnitudes.items():
        weights[key] = fold_dora(file, _module_name(*key), weights[key], m, base_weight)
    weights = _unfuse(weights, model_config)
    return LoRAAdapter(name=name or adapter_dir.resolve().name, path=str(adapter_dir),
                       weights=weights, replaced=replaced)


def _replaced_modules(file: Path, tensors: dict[str, torch.Tensor], cfg: PeftLoRAConfig,
                      mc: ModelConfig) -> ReplacedModules | None:
    """``modules_to_save`` and ``trainable_token_indices`` (lora/full_modules.py): which
    modules PEFT would wrap in this model, refused where loraplex cannot serve them."""
    names = (_other_module_names(mc.num_layers) + [EMBED_MODULE]
             + [_module_name(layer, p) for layer in range(mc.num_layers)
                for p in mc.checkpoint_projs()])
    saved = module_names_selected(cfg.modules_to_save, names)
    other = sorted(saved - {EMBED_MODULE, HEAD_MODULE})
    if other:
        raise AdapterLoadError(
            f"{cfg.file}: modules_to_save={sorted(cfg.modules_to_save)!r} selects {other[0]}; "
            f"loraplex serves fully trained {EMBED} and lm_head only")
    trainable = resolve_trainable_tokens(cfg.file, cfg.trainable_token_indices, mc)
    for module in trainable:
        if module in saved:  # PEFT refuses this combination too
            raise AdapterLoadError(
                f"{cfg.file}: {module} is in both modules_to_save and trainable_token_indices "
                f"(fully trained, or some tokens trained: not both)")
        if cfg.targets(module):
            raise AdapterLoadError(
                f"{cfg.file}: trainable_token_indices on {module}, which target_modules also "
                f"puts LoRA on: PEFT cannot combine them either")
    return pop_replaced_modules(file, tensors, saved, trainable, mc, cfg.ensure_weight_tying)


def _expected_modules(
    cfg: PeftLoRAConfig, mc: ModelConfig, max_lora_rank: int, lm_head_lora: bool = False,
) -> dict[tuple[int, str], tuple[int, float]]:
    """``(layer, proj) -> (r, scaling)`` for every module PEFT would wrap in this model."""
    file = cfg.file
    # every regex of the config against every name asked about below, at once and safely
    cfg.prepare(_other_module_names(mc.num_layers) + [hf_module_name(EMBED_LAYER, EMBED)] + [
        _module_name(layer, p) for layer in range(mc.num_layers) for p in mc.checkpoint_projs()])
    _check_targets_applicable(cfg, mc)
    wanted = cfg.layers_to_transform
    for index in (wanted,) if isinstance(wanted, int) else (wanted or ()):
        if not 0 <= index < mc.num_layers:
            raise AdapterLoadError(f"{file}: layers_to_transform has layer {index}, but the base "
                                   f"model has {mc.num_layers} layers (0..{mc.num_layers - 1})")
    expected = {}
    for layer in range(mc.num_layers):
        for proj in mc.checkpoint_projs():
            key = _module_name(layer, proj)
            if not cfg.targets(key):
                continue
            expected[(layer, proj)] = _rank_and_scaling(cfg, key, max_lora_rank)
    embed = hf_module_name(EMBED_LAYER, EMBED)
    if cfg.targets(embed):
        expected[(EMBED_LAYER, EMBED)] = _rank_and_scaling(cfg, embed, max_lora_rank,
                                                           dora="the embedding")
    if cfg.targets(LM_HEAD):
        expected[(EMBED_LAYER, LM_HEAD)] = _lm_head_target(cfg, max_lora_rank, lm_head_lora)
    if not expected:
        raise AdapterLoadError(f"{file}: target_modules={_show(cfg.target_modules)} selects no "
                               f"projection of the base model")
    return expected


def _lm_head_target(cfg: PeftLoRAConfig, max_lora_rank: int,
                    lm_head_lora: bool) -> tuple[int, float]:
    """``(r, scaling)`` of an lm_head LoRA, or the reason it cannot be served."""
    file = cfg.file
    if not lm_head_lora:
        raise AdapterLoadError(
            f"{file}: target_modules={_show(cfg.target_modules)} targets {LM_HEAD}; serving "
            f"lm_head LoRA needs enable_lm_head_lora=True (--enable-lm-head-lora), which "
            f"allocates vocab x max_lora_rank x max_loras_per_batch more device memory")
    return _rank_and_scaling(cfg, LM_HEAD, max_lora_rank, dora="the lm_head")


def _rank_and_scaling(cfg: PeftLoRAConfig, module: str, max_lora_rank: int,
                      dora: str | None = None) -> tuple[int, float]:
    """``module``'s ``(r, scaling)``, refused when its rank exceeds ``max_lora_rank``, or when
    ``dora`` (the module's name in the message) is given and the adapter uses DoRA."""
    r, alpha = cfg.rank_and_alpha(module)
    if r > max_lora_rank:
        raise AdapterLoadError(
            f"{cfg.file}: rank {r} of {module} exceeds max_lora_rank={max_lora_rank} "
            f"(raise max_lora_rank to at least {r} to serve this adapter)")
    if dora is not None and cfg.use_dora:
        raise AdapterLoadError(f"{cfg.file}: use_dora=True on {module}: DoRA on {dora} is "
                               f"not supported (only on the seven projections)")
    return r, cfg.scaling(r, alpha)


def _check_targets_applicable(cfg: PeftLoRAConfig, mc: ModelConfig) -> None:
    """Refuse targets outside the seven projections, the input embedding and lm_head (norms,
    blocks)."""
    file, shown = cfg.file, _show(cfg.target_modules)
    for key in _other_module_names(mc.num_layers):
        if key != LM_HEAD and cfg.targets(key, check_layers=False):
            raise AdapterLoadError(
                f"{file}: target_modules={shown} targets {key}; loraplex applies LoRA only to "
                f"{', '.join(PROJ_NAMES)}, {EMBED} and {LM_HEAD}")
    if isinstance(cfg.target_modules, str) or cfg.target_modules == ALL_LINEAR:
        return
    projs = mc.checkpoint_projs()
    names = [_module_name(layer, p) for layer in range(mc.num_layers) for p in projs]
    names += [hf_module_name(EMBED_LAYER, EMBED), LM_HEAD]
    for entry in sorted(cfg.target_modules):
        if not any(n == entry or n.endswith(f".{entry}") for n in names):
            raise AdapterLoadError(
                f"{file}: target_modules entry {entry!r} matches no module loraplex can apply "
                f"LoRA to (supported: {', '.join(projs)}, {EMBED}, {LM_HEAD})")


def _other_module_names(num_layers: int) -> list[str]:
    """Modules of a Llama-family ``*ForCausalLM`` other than the seven projections."""
    names = ["model", "model.layers", "model.norm", "model.rotary_emb", "lm_head"]
    for i in range(num_layers):
        p = f"model.layers.{i}"
        names += [p, f"{p}.self_attn", f"{p}.mlp", f"{p}.mlp.act_fn", f"{p}.input_layernorm",
                  f"{p}.post_attention_layernorm"]
    return names


def _read_tensors(adapter_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file's name (relative, for errors) and its tensors."""
    st, pt = Path(SAFETENSORS_NAME), Path(BIN_NAME)
    if (path := resolve_inside(adapter_dir, SAFETENSORS_NAME)) is not None:
        try:
            return st, load_file(path, device="cpu")
        except OSError as e:  # strerror: the message without the absolute path
            raise AdapterLoadError(f"{st}: cannot read safetensors file: {e.strerror}") from e
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise AdapterLoadError(f"{st}: cannot read safetensors file: {e}") from e
    if (path := resolve_inside(adapter_dir, BIN_NAME)) is not None:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except OSError as e:
            raise AdapterLoadError(f"{pt}: cannot read PyTorch weights file: {e.strerror}") from e
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            raise AdapterLoadError(f"{pt}: cannot read PyTorch weights file: {e}") from e
        if not isinstance(tensors, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            raise AdapterLoadError(f"{pt}: expected a dict of name -> tensor")
        return pt, tensors
    raise AdapterLoadError(f"no adapter weights in the adapter directory ({SAFETENSORS_NAME} or "
                           f"{BIN_NAME})")


def _collect(
    file: Path,
    tensors: dict[str, torch.Tensor],
    cfg: PeftLoRAConfig,
    expected: dict[tuple[int, str], tuple[int, float]],
    mc: ModelConfig,
    base_weight: BaseWeightFn | None = None,
) -> tuple[dict[tuple[int, str], LoRAWeights], dict[tuple[int, str], torch.Tensor]]:
    """Match every tensor to an expected module's A or B (and DoRA magnitude) and check it;
    nothing left over. Returns the weights and, for DoRA, the magnitudes per module."""
    found: dict[tuple[int, str, str], tuple[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise AdapterLoadError(f"{file}: unexpected tensor {key!r} (not a LoRA A/B weight of "
                                   f"a supported module)")
        if m["module"] == LM_HEAD:  # a linear kind; PEFT saves its base weight too
            layer, proj = EMBED_LAYER, LM_HEAD
            kind = m["ab"] or ("W" if m["base"] else None if m["eab"] else "M")
            if kind is None:
                raise AdapterLoadError(f"{file}: unexpected tensor {key!r} ({LM_HEAD}'s LoRA is "
                                       f"lora_A / lora_B)")
        elif m["module"] == hf_module_name(EMBED_LAYER, EMBED):
            layer, proj, kind = EMBED_LAYER, EMBED, m["eab"] or ("W" if m["base"] else None)
            if kind is None:
                raise AdapterLoadError(f"{file}: unexpected tensor {key!r} (an embedding's LoRA "
                                       f"is lora_embedding_A / lora_embedding_B)")
        else:
            mm = _MODULE_RE.match(m["module"])
            projs = mc.checkpoint_projs()
            if mm is None or mm["proj"] not in projs or m["eab"] or m["base"]:
                raise AdapterLoadError(f"{file}: tensor {key!r} is for module {m['module']!r}; "
                                       f"loraplex applies LoRA only to {', '.join(projs)} "
                                       f"and {EMBED}")
            layer, proj = int(mm["layer"]), mm["proj"]
            kind = m["ab"] or "M"
        if kind == "M" and not cfg.use_dora:
            raise AdapterLoadError(f"{file}: tensor {key!r} is a DoRA magnitude, but "
                                   f"adapter_config.json has use_dora=false")
        if layer >= mc.num_layers:
            raise AdapterLoadError(f"{file}: tensor {key!r} is for layer {layer}, but the base "
                                   f"model has {mc.num_layers} layers")
        if (layer, proj) not in expected:
            raise AdapterLoadError(f"{file}: tensor {key!r} is for {_module_name(layer, proj)}, "
                                   f"which adapter_config.json does not target")
        slot = (layer, proj, kind)
        if slot in found:
            raise AdapterLoadError(f"{file}: tensors {found[slot][0]!r} and {key!r} are both "
                                   f"{_KIND_NAMES[kind]} of {_module_name(layer, proj)}")
        found[slot] = (key, t)

    shapes = _checkpoint_shapes(mc) | {EMBED: (mc.vocab_size, mc.hidden_size),
                                       LM_HEAD: (mc.hidden_size, mc.vocab_size)}
    weights, magnitudes = {}, {}
    for (layer, proj), (r, scaling) in expected.items():
        module = _module_name(layer, proj)
        d_in, d_out = shapes[proj]
        pair = []
        for ab, want in (("A", (r, d_in)), ("B", (d_out, r))):
            name = f"lora_embedding_{ab}" if proj == EMBED else f"lora_{ab}.weight"
            if (layer, proj, ab) not in found:
                raise AdapterLoadError(f"{file}: missing tensor 'base_model.model.{module}.{name}'")
            key, t = found[(layer, proj, ab)]
            if proj == EMBED and ab == "A" and t.dim() == 2 and t.shape[1] != mc.vocab_size:
                raise AdapterLoadError(
                    f"{file}: tensor {key!r} has shape {tuple(t.shape)}: the adapter's vocabulary "
                    f"has {t.shape[1]} tokens, the base model's {mc.vocab_size}; adapters that "
                    f"resize the embeddings (added tokens) are not supported")
            pair.append(_check_tensor(file, key, t, want, module, proj, r))
        weights[(layer, proj)] = LoRAWeights(a=pair[0], b=pair[1], scaling=scaling)
        if cfg.use_dora:
            if (layer, proj, "M") not in found:
                raise AdapterLoadError(f"{file}: use_dora=True but tensor 'base_model.model."
                                       f"{module}.lora_magnitude_vector' is missing")
            key, t = found[(layer, proj, "M")]
            magnitudes[(layer, proj)] = _check_magnitude(file, key, t, d_out)
    if (EMBED_LAYER, EMBED, "W") in found:
        _check_embedding_copy(file, *found[(EMBED_LAYER, EMBED, "W")], mc, base_weight)
    if (EMBED_LAYER, LM_HEAD, "W") in found:
        _check_lm_head_copy(file, *found[(EMBED_LAYER, LM_HEAD, "W")], mc, base_weight)
    return weights, magnitudes


def _check_lm_head_copy(file: Path, key: str, t: torch.Tensor, mc: ModelConfig,
                        base_weight: BaseWeightFn | None) -> None:
    """PEFT saves lm_head's own weight next to its LoRA (``save_embedding_layers``): serve
    the adapter only when it is the base model's (the embedding's, when tied)."""
    names = [f"{LM_HEAD}.weight"] + (["model.embed_tokens.weight"]
                                     if mc.tie_word_embeddings else [])
    _check_base_copy(file, key, t, mc, base_weight, names, LM_HEAD)


def _check_embedding_copy(file: Path, key: str, t: torch.Tensor, mc: ModelConfig,
                          base_weight: BaseWeightFn | None) -> None:
    """PEFT saves the embedding matrix itself next to an embedding LoRA and loads it over the
    base model's: serve the adapter only when that copy is the base model's own matrix."""
    _check_base_copy(file, key, t, mc, base_weight, ["model.embed_tokens.weight"],
                     "model.embed_tokens")


def _check_base_copy(file: Path, key: str, t: torch.Tensor, mc: ModelConfig,
                     base_weight: BaseWeightFn | None, names: list[str], module: str) -> None:
    """``t``, PEFT's copy of the vocabulary-sized ``module``, must be the base model's own
    matrix (the first of ``names`` the checkpoint has)."""
    want = (mc.vocab_size, mc.hidden_size)
    if tuple(t.shape) != want:
        raise AdapterLoadError(
            f"{file}: tensor {key!r} has shape {tuple(t.shape)}, the base model's {module} "
            f"{want}: the adapter's vocabulary has {t.shape[0]} tokens, the base model's "
            f"{mc.vocab_size}; adapters that resize the vocabulary (added tokens) are not "
            f"supported")
    base = None
    for name in names if base_weight is not None else []:
        if (base := base_weight(name)) is not None:
            break
    if base is None:
        raise AdapterLoadError(f"{file}: tensor {key!r} (PEFT's copy of {module}) needs the "
                               f"base model's weights to be checked against")
    if not torch.equal(t.to(torch.float32), base):
        raise AdapterLoadError(
            f"{file}: tensor {key!r} differs from the base model's {module} weight: the "
            f"adapter was saved against another base model, or with a {module} trained "
            f"outside modules_to_save")


def _check_magnitude(file: Path, key: str, t: torch.Tensor, d_out: int) -> torch.Tensor:
    if not t.is_floating_point() or tuple(t.shape) != (d_out,):
        raise AdapterLoadError(f"{file}: tensor {key!r} has shape {tuple(t.shape)} and dtype "
                               f"{t.dtype}, expected a floating ({d_out},) DoRA magnitude")
    return _finite_f32(file, key, t)


def _finite_f32(file: Path, key: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as contiguous float32, refused when it holds NaN or infinite values."""
    t = t.to(torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise AdapterLoadError(f"{file}: tensor {key!r} contains NaN or infinite values")
    return t


def _module_name(layer: int, proj: str) -> str:
    """``hf_module_name`` for checkpoint names too (Phi-3's fused qkv_proj, gate_up_proj)."""
    if proj == "qkv_proj":
        return f"model.layers.{layer}.self_attn.{proj}"
    return hf_module_name(layer, proj)


def _checkpoint_shapes(mc: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) per checkpoint projection: a fused one's out is its parts' outs summed."""
    shapes = mc.proj_shapes()
    return {name: (shapes[parts[0]][0], sum(shapes[p][1] for p in parts))
            for name, parts in mc.checkpoint_projs().items()}


def _unfuse(weights: dict[tuple[int, str], LoRAWeights],
            mc: ModelConfig) -> dict[tuple[int, str], LoRAWeights]:
    """A LoRA on a fused projection (Phi-3's qkv_proj: one A, a B spanning q|k|v) as one
    LoRA per part: the same A and scaling, B's rows of that part, so each part's output
    ``s * B_part @ (A @ x)`` is its rows of the fused output."""
    shapes = mc.proj_shapes()
    out = {}
    for (layer, proj), w in weights.items():
        parts = mc.checkpoint_projs().get(proj)
        if parts is None or parts == (proj,):  # the embedding, or a projection as served
            out[(layer, proj)] = w
            continue
        widths = [shapes[p][1] for p in parts]

        def split(t: torch.Tensor | None, widths=widths) -> list:
            # DoRA's per-output-row scale and shift split with B's rows
            return [None] * len(widths) if t is None else list(t.split(widths))

        for part, b, scale, shift in zip(parts, w.b.split(widths), split(w.col_scale),
                                         split(w.col_shift), strict=True):
            out[(layer, part)] = LoRAWeights(a=w.a, b=b.contiguous(), scaling=w.scaling,
                                             col_scale=scale, col_shift=shift)
    return out


def _check_tensor(file: Path, key: str, t: torch.Tensor, want: tuple[int, int], module: str,
                  proj: str, r: int) -> torch.Tensor:
    # LoRA A/B keep nn.Linear layout ([r, in], [out, r]) whatever fan_in_fan_out says: that
    # flag describes the base weight's layout, and PEFT forces it off for nn.Linear targets.
    if not t.is_floating_point():
        raise AdapterLoadError(f"{file}: tensor {key!r} has dtype {t.dtype}, expected floating")
    if tuple(t.shape) != want:
        ab = key.split(".lora_")[1][0]
        rank_dim = t.shape[0 if ab == "A" else -1] if t.dim() == 2 else None
        hint = (f"rank {rank_dim} but adapter_config.json gives r={r} for {module}"
                if t.dim() == 2 and rank_dim != r else
                f"the base model's {proj} is {want[1] if ab == 'A' else want[0]} wide on this side")
        raise AdapterLoadError(f"{file}: tensor {key!r} has shape {tuple(t.shape)}, expected "
                               f"{want} ({hint})")
    return _finite_f32(file, key, t)


def _show(target: frozenset[str] | str) -> str:
    return repr(target) if isinstance(target, str) else repr(sorted(target))
