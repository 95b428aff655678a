"""Load a Hugging Face checkpoint directory into a loraplex model.

Reads ``config.json`` (through transformers' AutoConfig), then a single ``model.safetensors``
or the shards listed in ``model.safetensors.index.json``. Checkpoint names are mapped onto
fused parameters (q/k/v -> qkv_proj, gate/up -> gate_up_proj; Phi-3's checkpoint has them fused
already and they are split into the same shards); a tensor the model needs but the
checkpoint lacks is an error naming it.

Tensors are opened as lazy safetensors slices (``get_slice``): each layer's ``load_shard``
indexes out the rows or columns its tensor-parallel rank holds, so a rank reads only its shard
of a sharded tensor, never the whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from loraplex.config import ModelConfig
from loraplex.errors import ModelLoadError
from loraplex.layers.linear import tensor_shape
from loraplex.models.registry import get_model_class

# Checkpoint tensors that carry no parameters of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model_config(model_dir: str | Path) -> tuple[ModelConfig, object]:
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        hf = AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError, KeyError) as e:
        raise ModelLoadError(f"{path / 'config.json'}: cannot be read: {e}") from e
    cfg = ModelConfig.from_hf(hf)
    get_model_class(cfg.architecture)  # refuse unsupported architectures early
    return cfg, hf


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index}: malformed index ({e})") from e
        files = sorted({model_dir / f for f in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights found")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{f}: shard listed in the index is missing")
    return files


def load_model(
    model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    model_dir = Path(model_dir)
    cls = get_model_class(cfg.architecture)
    with torch.device(device):
        model = cls(cfg)
    # Keep the rotary tables in float32; cast everything else.
    for p in model.parameters():
        p.data = p.data.to(dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for file in checkpoint_files(model_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    _load_tensor(model, params, key, f.get_slice(key), loaded, file)
        except ModelLoadError:
            raise
        except Exception as e:  # corrupt file: safetensors raises several error types
            raise ModelLoadError(f"{file}: cannot be read as safetensors ({e})") from e
    missing = _missing_tensors(model, params, loaded)
    if missing:
        raise ModelLoadError(f"{model_dir}: checkpoint lacks tensor(s) {', '.join(missing[:5])}")
    model.eval()
    return model


def _load_tensor(model, params, key: str, tensor, loaded: set[str], file) -> None:
    """``tensor``: a torch tensor or a lazy safetensors slice of checkpoint tensor ``key``."""
    if key.endswith(_IGNORED_SUFFIXES):
        return
    module_path, _, pname = key.rpartition(".")
    prefix, _, leaf = module_path.rpartition(".")
    shard = None
    if leaf in model.packed_modules:
        fused, shard = model.packed_modules[leaf]
        module_path = f"{prefix}.{fused}"
    target = f"{module_path}.{pname}"
    if target not in params:
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            return
        raise ModelLoadError(
            f"{file}: unexpected tensor {key!r} (no such parameter in {model.config.architecture})"
        )
    module = model.get_submodule(module_path)
    if leaf in getattr(model, "fused_in_checkpoint", ()):  # Phi-3: q|k|v rows in one tensor
        sizes = module.full_output_sizes
        rows = tensor_shape(tensor)[0]
        if rows != sum(sizes):
            raise ModelLoadError(f"{file}: tensor {key!r}: {rows} rows != "
                                 f"{'+'.join(map(str, sizes))} ({'|'.join(module.shard_names)})")
        for i, shard in enumerate(module.shard_names):
            part = _Rows(tensor, sum(sizes[:i]), sizes[i])
            _load_tensor(model, params, f"{prefix}.{_unfused(model, leaf, shard)}.{pname}",
                         part, loaded, file)
        return
    try:
        if hasattr(module, "load_shard"):
            module.load_shard(pname, shard, tensor)
        else:
            param = params[target]  # replicated on every rank (norms)
            if tuple(param.shape) != tensor_shape(tensor):
                raise ValueError(f"shape {tensor_shape(tensor)} != expected {tuple(param.shape)}")
            param.data.copy_(tensor[:])
    except ValueError as e:
        raise ModelLoadError(f"{file}: tensor {key!r}: {e}") from e
    loaded.add(target if shard is None else f"{target}:{shard}")
    if shard is not None and all(f"{target}:{s}" in loaded for s in module.shard_names):
        loaded.add(target)


class _Rows:
    """Rows ``start : start + n`` of a tensor or safetensors slice, itself indexed lazily by
    row ranges (one projection's rows of a checkpoint tensor that fuses several)."""

    def __init__(self, tensor, start: int, n: int) -> None:
        self.tensor, self.start, self.n = tensor, start, n

    def get_shape(self) -> list[int]:
        return [self.n, *tensor_shape(self.tensor)[1:]]

    def __getitem__(self, rows: slice):
        lo, hi, step = rows.indices(self.n)
        assert step == 1
        return self.tensor[self.start + lo : self.start + hi]


def _unfused(model, fused: str, shard: str) -> str:
    """The checkpoint name packed into (fused, shard): ("qkv_proj", "q") -> "q_proj"."""
    return next(k for k, v in model.packed_modules.items() if v == (fused, shard))


def _missing_tensors(model, params, loaded: set[str]) -> list[str]:
    """Checkpoint names (q_proj, not qkv_proj) of the tensors nothing filled."""
    out = []
    unfused = {v: k for k, v in model.packed_modules.items()}  # (fused, shard) -> hf name
    for target in params:
        if target in loaded or (target == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        module_path, _, pname = target.rpartition(".")
        module = model.get_submodule(module_path)
        prefix, _, fused = module_path.rpartition(".")
        for shard in getattr(module, "shard_names", [None]):
            if shard is None:
                out.append(target)
            elif f"{target}:{shard}" not in loaded:
                out.append(f"{prefix}.{unfused[(fused, shard)]}.{pname}")
    return out
