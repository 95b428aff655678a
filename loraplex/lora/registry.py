"""The adapter registry: name -> (path, generation, shape facts); the only list of names.

Every registration gets a new *generation*, a process-wide increasing id, so ``(name,
generation)`` (an ``AdapterKey``) names one set of weights for good: the host cache and the
lora slot pool key on it, and so may a prefix cache. Loading ``X`` again after an unload gives
a new generation; nothing keyed on the old one can serve the new registration.

Thread-safe: the engine thread reads it while the server and the background loader add and
remove entries.
"""

from __future__ import annotations

import itertools
import re
import threading
from dataclasses import dataclass

from loraplex.errors import AdapterExistsError, AdapterNotFoundError, InvalidRequestError

AdapterKey = tuple[str, int]  # (name, generation)

# Names travel in URLs, logs and metric labels: short and printable, no whitespace.
_NAME = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


def validate_adapter_name(name: object) -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise InvalidRequestError(
            f"adapter name {shown} must be 1-128 characters of A-Z a-z 0-9 . _ : / -"
        )
    return name


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    path: str
    generation: int
    max_rank: int
    nbytes: int  # host bytes of its weights in the serving dtype
    target_modules: frozenset[str]
    needs_full_slot: bool = False  # a full embedding / lm_head copy (lora/full_modules.py)

    @property
    def key(self) -> AdapterKey:
        return (self.name, self.generation)


class AdapterRegistry:
    def __init__(self) -> None:
        self._entries: dict[str, AdapterEntry] = {}
        self._lock = threading.Lock()
        self._generations = itertools.count(1)

    def new_generation(self) -> int:
        with self._lock:
            return next(self._generations)

    def check_new(self, name: str) -> None:
        """Raise unless ``name`` is a valid name that is not registered."""
        validate_adapter_name(name)
        if name in self._entries:
            raise AdapterExistsError(f"adapter {name!r} is already loaded; unload it first")

    def add(self, entry: AdapterEntry) -> None:
        with self._lock:
            self.check_new(entry.name)
            self._entries[entry.name] = entry

    def remove(self, name: str) -> AdapterEntry:
        with self._lock:
            if name not in self._entries:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
            return self._entries.pop(name)

    def get(self, name: str) -> AdapterEntry:
        """The current entry of ``name``; AdapterNotFoundError (naming only ``name``) if none."""
        entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        return entry

    def is_current(self, key: AdapterKey) -> bool:
        entry = self._entries.get(key[0])
        return entry is not None and entry.generation == key[1]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return list(self._entries.values())
