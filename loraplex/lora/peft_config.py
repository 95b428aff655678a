"""``adapter_config.json``: parsing, refusal of unsupported features, and PEFT's matching rules.

The matching rules mirror peft 0.21 (``check_target_module_exists`` and ``get_pattern_key``)
so that an adapter touches exactly the modules, with exactly the ranks and alphas, that
``PeftModel.from_pretrained`` would give it. Module names are those of the Hugging Face
``*ForCausalLM`` the adapter was trained on, e.g. ``model.layers.3.self_attn.q_proj``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

from loraplex.errors import AdapterLoadError
from loraplex.lora.adapter import PROJ_NAMES
from loraplex.lora.module_match import ModuleMatcher, Pattern, check_pattern

CONFIG_NAME = "adapter_config.json"

# Fields that change what the adapter computes in ways loraplex does not implement; each is
# refused when set to anything but its neutral value, with the reason.
_REFUSED: dict[str, str] = {
    "lora_bias": "a bias on LoRA B (lora_bias) is not supported",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "layer_replication": "layer replication is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "use_qalora": "QALoRA is not supported",
    "velora_config": "the VeLoRA variant is not supported",
    "monteclora_config": "the MonteCLoRA variant is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "the KaSA variant is not supported",
    "megatron_config": "Megatron-sharded LoRA layers are not supported",
}
# Fields shaped like feature switches that are known not to change the forward pass
# (initialisation recipes, runtime options), or that are parsed below (use_rslora,
# use_dora). Unknown switches that are set are refused.
_HARMLESS_SWITCHES = frozenset({
    "use_rslora", "use_dora", "runtime_config", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config",
})
_ALL_LINEAR = "all-linear"
# PEFT's default layer-index pattern: the first numbered segment (lazy), not a nested index
_LAYER_INDEX = Pattern("layers_to_transform", "", r".*?\.[^.]*\.(?P<idx>\d+)\.", full=False)


# "all-linear": every projection, under either naming (Phi-3's checkpoint fuses q/k/v into
# qkv_proj and gate/up into gate_up_proj); the loader matches whichever the model has.
ALL_LINEAR = frozenset(PROJ_NAMES) | {"qkv_proj", "gate_up_proj"}


def _fail(file: Path, msg: str) -> AdapterLoadError:
    return AdapterLoadError(f"{file}: {msg}")


@dataclass(frozen=True)
class PeftLoRAConfig:
    """The fields of a PEFT LoRA config that decide which modules get which update."""

    file: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: frozenset[str] | str  # names/suffixes, or one regex (full match)
    exclude_modules: frozenset[str] | str | None
    layers_to_transform: int | tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    fan_in_fan_out: bool
    use_dora: bool  # DoRA: a magnitude vector per module (lora_magnitude_vector tensors)
    # fully trained modules (a full copy each; lora/full_modules.py), trainable tokens (a list
    # of ids, or {module: ids}, as in the file), PEFT's tying of them to a tied lm_head
    modules_to_save: frozenset[str]
    trainable_token_indices: list | dict | None
    ensure_weight_tying: bool
    # matches every regex above without letting one hang the process (see module_match)
    matcher: ModuleMatcher = dc_field(compare=False, repr=False)

    # -- PEFT's rules ------------------------------------------------------------------
    def patterns(self) -> list[Pattern]:
        """Every regex PEFT would match module names against, as PEFT composes it."""
        out = []
        if isinstance(self.exclude_modules, str):
            out.append(Pattern("exclude_modules", self.exclude_modules, self.exclude_modules,
                               full=True))
        if isinstance(self.target_modules, str):
            out.append(Pattern("target_modules", self.target_modules, self.target_modules,
                               full=True))
        elif self.layers_to_transform is not None:
            out += [_layers_regex(p) for p in self.layers_pattern or ()] or [_LAYER_INDEX]
        for name, table in (("rank_pattern", self.rank_pattern),
                            ("alpha_pattern", self.alpha_pattern)):
            out += [_suffix_regex(name, k) for k in table]
        return out

    def prepare(self, names: list[str]) -> None:
        """Match every pattern against ``names`` at once (the module names the loader will
        ask about); raises ``AdapterLoadError`` for a pattern too slow to match."""
        self.matcher.prepare(self.patterns(), names)

    def targets(self, key: str, *, check_layers: bool = True) -> bool:
        """Whether PEFT would put LoRA on the module named ``key``."""
        # PEFT never puts LoRA on a module that modules_to_save wraps (tuners_utils'
        # check_target_module_exists: an entry matching a dotted run of the name)
        if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in self.modules_to_save):
            return False
        ex = self.exclude_modules
        if isinstance(ex, str):
            if self.matcher.match(Pattern("exclude_modules", ex, ex, full=True), key) is not None:
                return False
        elif ex and (key in ex or any(key.endswith(f".{e}") for e in ex)):
            return False
        if isinstance(self.target_modules, str):
            # A regex target: PEFT ignores layers_to_transform here (and forbids setting it).
            t = self.target_modules
            return self.matcher.match(Pattern("target_modules", t, t, full=True), key) is not None
        if key in self.target_modules:
            return True  # an exact name is not filtered by layer (as in PEFT)
        if not any(key.endswith(f".{t}") for t in self.target_modules):
            return False
        wanted = self.layers_to_transform
        if not check_layers or wanted is None or wanted == ():
            return True
        index = self._layer_index(key)
        if index is None:
            return False
        return index == wanted if isinstance(wanted, int) else index in wanted

    def _layer_index(self, key: str) -> int | None:
        m = None
        for p in [_layers_regex(p) for p in self.layers_pattern or ()] or [_LAYER_INDEX]:
            m = self.matcher.match(p, key)
            if m is not None:
                break
        return int(m["idx"]) if m else None

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """``r`` and ``lora_alpha`` for one module after ``rank_pattern`` / ``alpha_pattern``."""
        return (self._pattern_lookup("rank_pattern", self.rank_pattern, key, self.r),
                self._pattern_lookup("alpha_pattern", self.alpha_pattern, key, self.lora_alpha))

    def _pattern_lookup(self, name: str, table: dict, key: str, default):
        # First key (in file order) whose regex matches a dotted suffix of the module name.
        for pat, value in table.items():
            if self.matcher.match(_suffix_regex(name, pat), key) is not None:
                return value
        return default

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _suffix_regex(name: str, key: str) -> Pattern:
    # PEFT's get_pattern_key: the key must match a dotted suffix of the module name
    return Pattern(f"{name} key", key, rf"(.*\.)?({key})$", full=False)


def _layers_regex(pattern: str) -> Pattern:
    # PEFT's layer index under layers_pattern: the first "<pattern>.<digits>." segment
    return Pattern("layers_pattern", pattern, rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.",
                   full=False)


# -- parsing --------------------------------------------------------------------------
def read_peft_config(adapter_dir: Path) -> PeftLoRAConfig:
    """Read and check ``adapter_dir/adapter_config.json``; raise ``AdapterLoadError`` naming
    the file (relative to the adapter directory) and field for anything missing, malformed
    or unsupported."""
    file = Path(CONFIG_NAME)
    path = resolve_inside(adapter_dir, CONFIG_NAME)
    if path is None:
        raise AdapterLoadError(f"{file}: missing (not a PEFT adapter directory?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:  # strerror: the message without the absolute path
        raise _fail(file, f"cannot read JSON: {e.strerror}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(file, f"cannot read JSON: {e}") from e
    if not isinstance(raw, dict):
        raise _fail(file, "expected a JSON object")
    return parse_peft_config(raw, file)


def resolve_inside(adapter_dir: Path, name: str) -> Path | None:
    """``adapter_dir / name`` with symlinks resolved, or None when it is not a file. A file
    that resolves outside the adapter directory is refused (a symlink would otherwise let an
    adapter directory read any file), except into the ``blobs/`` next to the directory when
    it is a Hugging Face hub cache snapshot (``<repo>/snapshots/<rev>``), whose files are
    symlinks into ``<repo>/blobs``. Errors name the file relative to the directory only."""
    path = adapter_dir / name
    if not path.is_symlink() and not path.exists():
        return None
    root, resolved = adapter_dir.resolve(), path.resolve()
    hub_blob = root.parent.name == "snapshots" and resolved.parent == root.parent.parent / "blobs"
    if not resolved.is_relative_to(root) and not hub_blob:
        raise AdapterLoadError(f"{name}: resolves to a file outside the adapter directory "
                               f"(a symbolic link out of it); refused")
    return resolved if resolved.is_file() else None


def parse_peft_config(raw: dict[str, Any], file: Path) -> PeftLoRAConfig:
    peft_type = raw.get("peft_type", "LORA")  # absent in some hand-made configs: assume LoRA
    if str(peft_type).upper() != "LORA":
        raise _fail(file, f"peft_type={peft_type!r} is not supported (only LORA)")
    _refuse_unsupported(raw, file)
    bias = raw.get("bias", "none")
    if bias != "none":
        raise _fail(file, f"bias={bias!r} is not supported (only 'none': biases would be trained)")

    r = raw.get("r", 8)
    if not _is_int(r) or r < 1:
        raise _fail(file, f"r={r!r} must be a positive integer")
    alpha = raw.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise _fail(file, f"lora_alpha={alpha!r} must be a number")
    use_rslora = _get_bool(raw, "use_rslora", file)
    use_dora = _get_bool(raw, "use_dora", file)
    fan_in_fan_out = _get_bool(raw, "fan_in_fan_out", file)

    target = raw.get("target_modules")
    if target is None:
        raise _fail(file, "target_modules is missing; loraplex needs the targeted modules named")
    if isinstance(target, str):
        if target.lower() == _ALL_LINEAR:
            target = ALL_LINEAR  # every linear layer except lm_head
        else:
            check_pattern(target, "target_modules", str(file))
    else:
        target = _str_set(target, "target_modules", file)
    exclude = raw.get("exclude_modules")
    if isinstance(exclude, str):
        check_pattern(exclude, "exclude_modules", str(file))
    elif exclude is not None:
        exclude = _str_set(exclude, "exclude_modules", file)

    layers = raw.get("layers_to_transform")
    if isinstance(layers, list):
        if not all(_is_int(i) for i in layers):
            raise _fail(file, f"layers_to_transform={layers!r} must be integers")
        layers = tuple(layers)
    elif layers is not None and not _is_int(layers):
        raise _fail(file, f"layers_to_transform={layers!r} must be an integer or a list")
    pattern = raw.get("layers_pattern")
    if isinstance(pattern, str):
        pattern = (pattern,)
    elif pattern is not None:
        pattern = tuple(sorted(_str_set(pattern, "layers_pattern", file)))
    for p in pattern or ():
        check_pattern(p, "layers_pattern", str(file))
    # PEFT's own consistency rules (LoraConfig.__post_init__)
    if isinstance(target, str) and (layers is not None or pattern is not None):
        raise _fail(file, "layers_to_transform / layers_pattern cannot be used with a regex "
                          "target_modules string")
    if pattern and layers is None:
        raise _fail(file, "layers_pattern is set but layers_to_transform is not")

    rank_pattern = _pattern_dict(raw, "rank_pattern", file, int_values=True)
    alpha_pattern = _pattern_dict(raw, "alpha_pattern", file, int_values=False)
    saved = raw.get("modules_to_save")
    saved = frozenset() if saved is None else _str_set(saved, "modules_to_save", file)
    tokens = raw.get("trainable_token_indices")
    if tokens is not None and not isinstance(tokens, (list, dict)):
        raise _fail(file, f"trainable_token_indices={tokens!r} must be a list of token ids or "
                          f"an object of module name -> token ids")
    return PeftLoRAConfig(
        file=file, r=int(r), lora_alpha=float(alpha), use_rslora=use_rslora,
        target_modules=target, exclude_modules=exclude, layers_to_transform=layers,
        layers_pattern=pattern, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        fan_in_fan_out=fan_in_fan_out, use_dora=use_dora, modules_to_save=saved,
        trainable_token_indices=tokens,
        ensure_weight_tying=_get_bool(raw, "ensure_weight_tying", file),
        matcher=ModuleMatcher(str(file)),
    )


def _refuse_unsupported(raw: dict[str, Any], file: Path) -> None:
    for field, reason in _REFUSED.items():
        if raw.get(field):
            raise _fail(file, f"{field}={raw[field]!r}: {reason}")
    for field, value in raw.items():
        switch = field.startswith("use_") or field.endswith("_config")
        if switch and value and field not in _HARMLESS_SWITCHES and field not in _REFUSED:
            raise _fail(file, f"{field}={value!r}: unknown LoRA feature, refused to be safe")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get_bool(raw: dict[str, Any], field: str, file: Path) -> bool:
    v = raw.get(field) or False
    if not isinstance(v, bool):
        raise _fail(file, f"{field}={v!r} must be true or false")
    return v


def _str_set(v: Any, field: str, file: Path) -> frozenset[str]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        raise _fail(file, f"{field}={v!r} must be a string or a list of strings")
    return frozenset(v)


def _pattern_dict(raw: dict[str, Any], field: str, file: Path, *, int_values: bool) -> dict:
    v = raw.get(field) or {}
    if not isinstance(v, dict):
        raise _fail(file, f"{field}={v!r} must be an object")
    for key, value in v.items():
        check_pattern(key, f"{field} key", str(file))
        ok = (_is_int(value) and value >= 1) if int_values else _is_number(value)
        if not ok:
            kind = "a positive integer" if int_values else "a number"
            raise _fail(file, f"{field}[{key!r}]={value!r} must be {kind}")
    return dict(v) if int_values else {k: float(x) for k, x in v.items()}
