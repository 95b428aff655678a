"""Models and adapters named by Hugging Face Hub id (``org/name``), resolved to a local
snapshot directory through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``, revisions).

A path that exists locally always wins; only a string shaped like a repo id
(``name`` or ``org/name``, optionally ``@revision`` for adapters) that is not a local path goes
to the hub. ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and ``HF_HOME`` are read at each call (the
library reads them once, at import), so a process can switch them, as tests do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loraplex.errors import AdapterLoadError, ModelLoadError

_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")
_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # no .bin/.gguf/.onnx
_ADAPTER_FILES = ["*.json", "*.safetensors", "adapter_model.bin", "*.model", "*.txt", "*.jinja"]
_TRUE = {"1", "on", "yes", "true"}


def resolve_model_path(model: str | os.PathLike, revision: str | None = None) -> str:
    """``model`` as a local directory: itself when it exists (``revision`` must then be None),
    else the hub snapshot of repo ``model`` at ``revision``. Raises ``ModelLoadError``."""
    return _resolve(str(model), revision, _MODEL_FILES, "model", ModelLoadError)


def resolve_adapter_path(path: str | os.PathLike) -> str:
    """An adapter directory, or ``org/adapter[@revision]`` from the hub. Raises
    ``AdapterLoadError``."""
    path = str(path)
    if Path(path).exists() or "@" not in path:
        return _resolve(path, None, _ADAPTER_FILES, "adapter", AdapterLoadError)
    repo, _, revision = path.rpartition("@")
    return _resolve(repo, revision or None, _ADAPTER_FILES, "adapter", AdapterLoadError)


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> str | None:
    """The hub cache as the environment names it now (None: the library's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _resolve(name: str, revision: str | None, patterns: list[str], what: str,
             error: type[Exception]) -> str:
    if Path(name).exists():
        if revision is not None:
            raise error(f"{what} {name!r} is a local path; revision={revision!r} applies only "
                        f"to a Hugging Face Hub id")
        return name
    if not _REPO_ID.match(name):
        return name  # a missing local path: the loader reports it
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    offline = is_offline()
    try:
        return snapshot_download(name, revision=revision, cache_dir=hub_cache_dir(),
                                 local_files_only=offline, allow_patterns=patterns)
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError, OSError,
            ValueError) as e:
        at = f" at revision {revision!r}" if revision else ""
        where = ("not in the Hugging Face cache (HF_HUB_OFFLINE is set)" if offline
                 else "could not be downloaded from the Hugging Face Hub")
        raise error(f"{what} {name!r}{at} is not a local path and {where}: "
                    f"{type(e).__name__}: {e}") from e
