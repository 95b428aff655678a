"""DoRA (weight-decomposed LoRA) folded into a per-output-column scale, once per adapter.

PEFT's DoRA layer (``peft/tuners/lora/dora.py``) computes, for ``y_base = x @ W.T + bias``::

    norm = ||W + scaling * B @ A||  per output row of W (torch.linalg.norm(dim=1)), detached
    g = magnitude / norm                                      # [out]
    y = y_base + (g - 1) * (y_base - bias) + g * scaling * (x @ A.T) @ B.T
      = g * (y_base - bias) + bias + scaling * (x @ A.T) @ (g[:, None] * B).T

``norm`` depends on the base weight, the adapter and nothing else, so it is computed here when
the adapter is parsed (float32, against the checkpoint's weight, as PEFT does in float32), and
the per-token work is the map ``y * g + (1 - g) * bias`` on the adapter's own rows followed by
the usual expand with B pre-multiplied by g (``ColumnScales`` in ``ops/lora_meta.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from loraplex.errors import AdapterLoadError
from loraplex.lora.adapter import LoRAWeights

BaseWeightFn = Callable[[str], "torch.Tensor | None"]  # HF parameter name -> float32 or None


def fold_dora(file: Path, module: str, w: LoRAWeights, magnitude: torch.Tensor,
              base_weight: BaseWeightFn) -> LoRAWeights:
    """``w`` (plain A, B, scaling of ``module``) with DoRA's ``col_scale`` / ``col_shift`` and B
    pre-multiplied by ``col_scale``. ``magnitude [out]`` is PEFT's ``lora_magnitude_vector``."""
    weight = base_weight(f"{module}.weight")
    if weight is None:
        raise AdapterLoadError(f"{file}: use_dora=True needs the base weight '{module}.weight', "
                               f"which the base model's checkpoint does not hold under that name")
    out, d_in = w.b.shape[0], w.a.shape[1]
    if tuple(weight.shape) != (out, d_in):
        raise AdapterLoadError(f"{file}: use_dora=True: base weight '{module}.weight' has shape "
                               f"{tuple(weight.shape)}, expected {(out, d_in)}")
    a, b, m = w.a.float(), w.b.float(), magnitude.float()
    norm = torch.linalg.norm(weight + w.scaling * (b @ a), dim=1)  # [out], as PEFT
    g = m / norm
    if not torch.isfinite(g).all():
        raise AdapterLoadError(f"{file}: use_dora=True: {module} has a zero column norm "
                               f"||W + s*B@A|| (its DoRA scale is not finite)")
    bias = base_weight(f"{module}.bias")
    shift = None if bias is None else ((1 - g) * bias).contiguous()
    return LoRAWeights(a=w.a, b=(b * g[:, None]).to(w.b.dtype).contiguous(), scaling=w.scaling,
                       col_scale=g.contiguous(), col_shift=shift)
