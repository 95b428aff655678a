"""The base model's weights as the adapter loader sees them: read from the checkpoint files.

DoRA needs each targeted module's dense base weight once, when the adapter is parsed (its
column norm, ``lora/dora.py``). The serving copy cannot give it: on CPU the linear layers keep
only oneDNN's blocked layout, and on a GPU it lives on the device, which the loader's threads
never touch. The checkpoint holds exactly the weights PEFT computes against, so they are read
from there, one tensor at a time (memory-mapped safetensors), as float32 host tensors.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from safetensors import safe_open

from loraplex.errors import ModelLoadError
from loraplex.models.loader import checkpoint_files


class CheckpointWeights:
    """``get(name)``: the checkpoint tensor ``name`` (a Hugging Face parameter name, e.g.
    ``model.layers.0.self_attn.q_proj.weight``) as a float32 CPU tensor, or None when the
    checkpoint has no such tensor (or the directory holds no checkpoint). Thread-safe."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self._where: dict[str, Path] | None = None  # tensor name -> file, built on first use
        self._lock = threading.Lock()

    def _index(self) -> dict[str, Path]:
        with self._lock:
            if self._where is None:
                where: dict[str, Path] = {}
                try:
                    files = checkpoint_files(self.model_dir)
                except ModelLoadError:
                    files = []  # no checkpoint here (e.g. a model built in memory)
                for file in files:
                    with safe_open(str(file), framework="pt") as f:
                        where.update(dict.fromkeys(f.keys(), file))
                self._where = where
            return self._where

    def get(self, name: str) -> torch.Tensor | None:
        file = self._index().get(name)
        if file is None:
            return None
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name).to(torch.float32)
