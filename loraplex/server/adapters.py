"""Which model names the server answers to, and the rules for loading adapters at runtime.

The names themselves live in the engine's adapter registry (``lora/registry.py``); this
module keeps only what is HTTP-specific.

A request's ``model`` is either the served model name (the base model, no adapter) or a
registered adapter's name. Runtime loading is off unless ``--allow-runtime-adapters``; with
``--adapter-root`` a path must resolve (``realpath``: symlinks and ``..`` followed) to a
location inside the root, so a client cannot make the server read arbitrary files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from loraplex.lora.registry import AdapterRegistry
from loraplex.server.protocol import APIError, bad_request, not_found


@dataclass
class ServedModels:
    """Request ``model`` names -> adapters, read from the engine's adapter registry (the only
    list of adapter names), plus the HTTP-side policy for runtime loads."""

    served_model_name: str
    model_path: str
    adapters: AdapterRegistry
    allow_runtime: bool = False
    adapter_root: str | None = None

    def resolve_model(self, model: str) -> str | None:
        """The adapter a request's ``model`` selects (None = base); 404 if unknown."""
        if model == self.served_model_name:
            return None
        if model in self.adapters:
            return model
        # only the name the client sent: other tenants' adapter names are not disclosed
        raise not_found(f"The model '{model}' does not exist.")

    def check_load(self, name: str, path: str) -> str:
        """Validate a runtime load request; return the real path to hand to the engine."""
        if not self.allow_runtime:
            raise APIError(403, "Loading adapters at runtime is disabled; start the server "
                           "with --allow-runtime-adapters to enable it.",
                           "PermissionDeniedError", "runtime_adapters_disabled")
        if name == self.served_model_name:
            raise bad_request(f"lora_name '{name}' is the served base model's name",
                              param="lora_name", code="adapter_name_taken")
        if name in self.adapters:
            raise bad_request(f"an adapter named '{name}' is already loaded; unload it first",
                              param="lora_name", code="adapter_name_taken")
        if self.adapter_root is None:
            return os.path.realpath(path)
        root = os.path.realpath(self.adapter_root)
        real = os.path.realpath(os.path.join(root, path))  # absolute paths replace root
        if os.path.commonpath([root, real]) != root:
            raise APIError(403, f"lora_path '{path}' is outside the adapter root",
                           "PermissionDeniedError",
                           "adapter_path_forbidden", param="lora_path")
        return real

    def check_unload(self, name: str) -> None:
        if not self.allow_runtime:
            raise APIError(403, "Unloading adapters at runtime is disabled; start the server "
                           "with --allow-runtime-adapters to enable it.",
                           "PermissionDeniedError", "runtime_adapters_disabled")
        if name == self.served_model_name:
            raise bad_request(f"'{name}' is the base model and cannot be unloaded",
                              param="lora_name")
        if name not in self.adapters:
            raise not_found(f"no adapter named '{name}' is loaded", code="adapter_not_found")
