"""The shipped demo: a tiny Llama that echoes a phrase, and three LoRA adapters that change it.

The base model completes ``prompt("hello world")`` (``"in: hello world\\nout: "``) with
``"hello world"`` and EOS. The adapters answer the same prompt differently:

- ``upper``:   ``"HELLO WORLD"``
- ``reverse``: ``"dlrow olleh"``
- ``caesar``:  ``"ifmmp xpsme"`` (each lowercase letter shifted by one, ``z`` -> ``a``)

Phrases are lowercase letters and single spaces, 1-4 words, at most 24 characters. The model
uses a character-level tokenizer (one token per character, no BOS added), so decoding the
generated ids gives back the exact characters. Its chat template (``CHAT_TEMPLATE``) turns
a single user message ``phrase`` into ``prompt(phrase)``, so ``/v1/chat/completions`` works
too. The files are trained by
``python -m loraplex.demo.train``; this module only locates them (no heavy imports).
"""

from __future__ import annotations

from pathlib import Path

ADAPTERS = ("upper", "reverse", "caesar")

# The chat template shipped in the model's tokenizer_config.json: one user message (the
# phrase) becomes ``prompt(phrase)``, the only format the model was trained on; anything else
# (a system turn, a conversation) is refused rather than formatted into text it never saw.
CHAT_TEMPLATE = (
    "{%- if messages | length != 1 or messages[0]['role'] != 'user' -%}"
    "{{ raise_exception('the demo model answers exactly one user message (a phrase)') }}"
    "{%- endif -%}"
    "{{ 'in: ' + messages[0]['content'] + '\\n' }}"
    "{%- if add_generation_prompt %}{{ 'out: ' }}{% endif -%}"
)

_DATA = Path(__file__).resolve().parent / "data"


def paths() -> tuple[str, dict[str, str]]:
    """Return ``(model_dir, {adapter_name: adapter_dir})`` of the shipped demo files."""
    return str(_DATA / "model"), {name: str(_DATA / name) for name in ADAPTERS}


def prompt(phrase: str) -> str:
    """The prompt the demo model answers: ``f"in: {phrase}\\nout: "``."""
    return f"in: {phrase}\nout: "


def _caesar(text: str) -> str:
    return "".join(
        chr((ord(c) - ord("a") + 1) % 26 + ord("a")) if "a" <= c <= "z" else c for c in text
    )


def expected(phrase: str, adapter: str | None) -> str:
    """The correct completion (without EOS) of ``prompt(phrase)`` under ``adapter``.

    ``adapter`` is ``None`` for the base model (echo) or one of ``ADAPTERS``.
    Raises ``ValueError`` for any other adapter name.
    """
    if adapter is None:
        return phrase
    if adapter == "upper":
        return phrase.upper()
    if adapter == "reverse":
        return phrase[::-1]
    if adapter == "caesar":
        return _caesar(phrase)
    raise ValueError(f"unknown demo adapter {adapter!r}; expected None or one of {ADAPTERS}")
