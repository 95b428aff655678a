"""Training examples for the demo: random phrases and the prompt/answer batches built on them.

Only ``train.py`` uses this module (it imports torch).
"""

from __future__ import annotations

import random
import string

import torch

from loraplex.demo import expected, prompt

MAX_CHARS = 24
# Prefixes of the hidden base-model tasks; None is the public echo task (prefix "in").
TASK_PREFIX = {None: "in", "upper": "up", "reverse": "rv", "caesar": "cs"}
WORDS = (
    "hello world the quick brown fox jumps over lazy dog lora adapter model serve batch token "
    "apple river stone cloud green light night music water paper house table chair window "
    "garden yellow purple orange silver winter summer spring autumn happy little big small "
    "zebra quiz jazz kiwi yak box mix vex fizz buzz open close read write run walk talk sing"
).split()


def random_word(rng: random.Random, max_len: int) -> str:
    if rng.random() < 0.3:
        return rng.choice(WORDS)
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, max_len)))


def random_phrase(rng: random.Random) -> str:
    """Training phrase: 1-4 words (random letters or real words), <= MAX_CHARS characters.

    One in ten is an arbitrary string of letters and spaces (edge or double spaces), so the
    model learns the character maps rather than only well-formed phrases.
    """
    if rng.random() < 0.1:
        return "".join(rng.choices(string.ascii_lowercase + "   ", k=rng.randint(1, MAX_CHARS)))
    while True:
        n = rng.randint(1, 4)
        max_len = MAX_CHARS if n == 1 and rng.random() < 0.5 else 10
        phrase = " ".join(random_word(rng, max_len) for _ in range(n))
        if len(phrase) <= MAX_CHARS:
            return phrase


def test_phrase(rng: random.Random) -> str:
    """Held-out phrase shaped like the acceptance test's: 1-4 random-letter words, <= 24."""
    while True:
        words = [
            "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 8)))
            for _ in range(rng.randint(1, 4))
        ]
        if len(phrase := " ".join(words)) <= MAX_CHARS:
            return phrase


def encode_example(tok, phrase: str, task: str | None, prefix: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer + EOS, and the prompt length (answer loss starts there)."""
    text = prefix + prompt(phrase)[len("in") :]
    p_ids = tok.encode(text, add_special_tokens=False)
    a_ids = tok.encode(expected(phrase, task), add_special_tokens=False) + [tok.eos_token_id]
    return p_ids + a_ids, len(p_ids)


def make_batch(tok, rng, size: int, tasks: list[str | None], hidden_prefixes: bool):
    """Right-padded batch; labels are -100 except on answer tokens (incl. EOS).

    Returns ``input_ids`` [size, T], ``labels`` [size, T] and each row's index into ``tasks``
    [size]; causal attention makes the
    right padding invisible to the real tokens.
    """
    rows, picks = [], []
    for _ in range(size):
        picks.append(rng.randrange(len(tasks)))
        task = tasks[picks[-1]]
        prefix = TASK_PREFIX[task] if hidden_prefixes else "in"
        rows.append(encode_example(tok, random_phrase(rng), task, prefix))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((size, width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((size, width), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, labels, torch.tensor(picks)
