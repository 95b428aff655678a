"""Regular expressions from ``adapter_config.json``, matched against module names so that no
pattern can hang the process.

PEFT matches module names with Python's ``re`` (``target_modules`` / ``exclude_modules``
strings with ``fullmatch``, ``rank_pattern`` / ``alpha_pattern`` keys and ``layers_pattern``
inside composed patterns with ``match``). ``re`` backtracks: a pattern like ``(.*.*)*X``
takes exponential time, holds the GIL while it does, and cannot be interrupted (not even by
SIGTERM). To keep PEFT's results exactly, every pattern is still matched by ``re``, but:

- a pattern longer than ``MAX_PATTERN_CHARS`` is refused;
- a pattern whose shape bounds the backtracking (no repeat inside a repeat, no alternation
  inside a repeat, no backreference, at most ``MAX_REPEATS`` repeats in all; module names are
  short, so the work is a small polynomial) is matched in this process;
- any other pattern is matched in a child process with a deadline of ``DEADLINE_S``; past it
  the child is killed and the pattern refused with an ``AdapterLoadError`` naming the field
  and the pattern.

All patterns of one adapter are matched against all the module names the loader will ask
about in one go (``prepare``), so a config costs at most one child process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field

from loraplex.errors import AdapterLoadError

MAX_PATTERN_CHARS = 2000
MAX_REPEATS = 3
DEADLINE_S = 2.0

Match = dict[str, str | None] | None  # the groupdict of a match, None for no match

_CHILD = """
import json, re, sys
jobs, names = json.load(sys.stdin)
for regex, full in jobs:
    rx = re.compile(regex)
    fn = rx.fullmatch if full else rx.match
    print(json.dumps([None if (m := fn(n)) is None else m.groupdict() for n in names]),
          flush=True)
"""


@dataclass(frozen=True)
class Pattern:
    """A regex from the config: ``field`` and ``pattern`` as the user wrote them (for errors),
    ``regex`` as matched (PEFT's composition around ``pattern``), full or prefix match."""

    field: str
    pattern: str
    regex: str
    full: bool


@dataclass
class ModuleMatcher:
    """Match results of a config's patterns, computed once per (pattern, module name)."""

    file: str  # how errors name the config file
    _results: dict[Pattern, dict[str, Match]] = field(default_factory=dict)

    def prepare(self, patterns: list[Pattern], names: list[str]) -> None:
        """Match every pattern against every name now (the slow ones in one child process)."""
        todo = [p for p in dict.fromkeys(patterns)
                if not set(names) <= self._results.get(p, {}).keys()]
        slow = [p for p in todo if not is_bounded(p.regex)]
        for p in todo:
            if p not in slow:
                self._store(p, names, [_match_here(p, n) for n in names])
        if slow:
            for p, results in zip(slow, self._match_in_child(slow, names), strict=True):
                self._store(p, names, results)

    def match(self, p: Pattern, name: str) -> Match:
        """``re.fullmatch`` / ``re.match`` of ``p.regex`` on ``name``, computed safely."""
        known = self._results.get(p)
        if known is None or name not in known:
            self.prepare([p], [name])
        return self._results[p][name]

    def _store(self, p: Pattern, names: list[str], results: list[Match]) -> None:
        self._results.setdefault(p, {}).update(zip(names, results, strict=True))

    def _match_in_child(self, patterns: list[Pattern], names: list[str]) -> list[list[Match]]:
        payload = json.dumps([[[p.regex, p.full] for p in patterns], names])
        # -I -S: no user site, no environment, no site-packages: a bare interpreter starts fast
        cmd = [sys.executable, "-I", "-S", "-c", _CHILD]
        try:
            done = subprocess.run(cmd, input=payload, capture_output=True, text=True,
                                  timeout=DEADLINE_S, check=False)
        except subprocess.TimeoutExpired as e:  # the child was killed at the deadline
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            culprit = patterns[min(len(out.splitlines()), len(patterns) - 1)]
            raise AdapterLoadError(
                f"{self.file}: {culprit.field} {culprit.pattern!r} takes more than "
                f"{DEADLINE_S:g} s to match module names (a regular expression that "
                f"backtracks catastrophically); refused") from None
        lines = done.stdout.splitlines()
        if done.returncode != 0 or len(lines) != len(patterns):
            raise AdapterLoadError(f"{self.file}: matching {patterns[len(lines) - 1].field} "
                                   f"failed: {done.stderr.strip()[-300:]}")
        return [json.loads(line) for line in lines]


def check_pattern(pattern: str, field_name: str, file: str) -> None:
    """Refuse a pattern that is too long or does not compile (at parse time)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterLoadError(f"{file}: {field_name} {pattern[:60]!r}... is {len(pattern)} "
                               f"characters long; at most {MAX_PATTERN_CHARS} are accepted")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise AdapterLoadError(f"{file}: {field_name}={pattern!r} is not a valid regular "
                               f"expression: {e}") from e


def is_bounded(regex: str) -> bool:
    """Whether ``regex``'s shape bounds backtracking to a small polynomial in the name's
    length: no repeat (``*``, ``+``, ``{m,n}`` with n > 1) inside a repeat, no alternation
    inside a repeat, no backreference, at most ``MAX_REPEATS`` repeats. Conservative: False
    sends a pattern to the child process; it never refuses one."""
    try:
        from re import _constants as c
        from re import _parser

        tree = _parser.parse(regex)
    except (ImportError, AttributeError, re.error, RecursionError, OverflowError):
        return False  # unknown shape: let the child process decide
    repeats = {c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", c.MAX_REPEAT)}
    count = 0

    def walk(items, in_repeat: bool) -> bool:
        nonlocal count
        for op, av in items:
            if op in (c.GROUPREF, c.GROUPREF_EXISTS):
                return False
            if op in repeats:
                lo, hi, body = av
                if hi > 1:
                    if in_repeat:
                        return False
                    count += 1
                if not walk(body, in_repeat or hi > 1):
                    return False
            elif op is c.BRANCH:
                if in_repeat:
                    return False
                if not all(walk(b, in_repeat) for b in av[1]):
                    return False
            elif op is c.SUBPATTERN:
                if not walk(av[-1], in_repeat):
                    return False
            elif op in (c.ASSERT, c.ASSERT_NOT):
                if not walk(av[1], in_repeat):
                    return False
            elif op is getattr(c, "ATOMIC_GROUP", None):
                if not walk(av, in_repeat):
                    return False
        return count <= MAX_REPEATS

    return walk(tree, False)


def _match_here(p: Pattern, name: str) -> Match:
    m = (re.fullmatch if p.full else re.match)(p.regex, name)
    return None if m is None else m.groupdict()
