"""Incremental detokenization and stop-string handling."""

from __future__ import annotations

from loraplex.engine.sequence import Sequence


def detokenize_step(tokenizer, seq: Sequence, final: bool = False) -> None:
    """Append the text of newly generated tokens to ``seq.text``.

    Decodes a short window (a few earlier tokens for context, so leading spaces and merged
    bytes come out right) instead of the whole output each step. A trailing U+FFFD is
    usually the first bytes of a character that the next token completes, so it waits for
    that token; on the ``final`` token nothing will complete it, and it is the text the model
    generated (a genuine U+FFFD, or a cut-off character), as ``tokenizer.decode`` of the whole
    output gives it.
    """
    window = seq.token_window(seq.prefix_offset)  # a few tokens, not prompt + output
    prefix = tokenizer.decode(window[: seq.read_offset - seq.prefix_offset],
                              skip_special_tokens=True)
    full = tokenizer.decode(window, skip_special_tokens=True)
    if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
        seq.text += full[len(prefix) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, seq.num_tokens


def find_stop(text: str, stops: list[str], start: int) -> int:
    """Index where the earliest stop string begins in ``text[start:]``, or -1."""
    best = -1
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def visible_text(text: str, stops: list[str]) -> str:
    """Text safe to stream: hold back a tail that is a prefix of some stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold] if hold else text
