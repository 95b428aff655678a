"""Structured outputs: a request's grammar masks its logits every step (xgrammar).

``GuidedParams`` says what the output must match (one of a JSON schema, any JSON object, a
regex, a choice of strings, or an EBNF grammar) and is checked when built: a bad schema,
regex or grammar raises ``ValueError`` naming the field, so the server answers 400 and the
engine never sees it. ``GuidedDecoding`` (one per engine) owns xgrammar's tokenizer info
and compiler, and one ``GrammarMatcher`` per guided sequence. Per step, for the rows of the
batch that have a grammar only::

    bitmask[row] = bits of the tokens the grammar allows next       # [batch, ceil(V / 32)]
    logits[row, t] = -inf  where bit t of bitmask[row] is 0         # on the logits' device

then each sampled token advances its row's matcher. A batch without guided rows costs one
dict check. xgrammar is imported only when a request uses a grammar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `import loraplex` (SamplingParams) must not import torch
    import torch

# JSON is generated without free whitespace (a single space after ':' and ','): a grammar
# that allows any run of whitespace lets a sampled model pad forever instead of closing.
_SEPARATORS = (", ", ": ")
# xgrammar keeps compiled grammars in its own cache keyed by the spec; this bounds it.
_CACHE_LIMIT_BYTES = 256 << 20
# json_object: any JSON object (xgrammar's built-in JSON grammar also allows arrays, strings...)
_ANY_OBJECT = '{"type": "object"}'


@dataclass
class GuidedParams:
    """Exactly one constraint on the generated text.

    ``json_schema``: a JSON schema (dict or its JSON text); ``json_object``: any JSON
    object; ``regex``: the whole output matches it; ``choice``: the output is one of these
    strings; ``grammar``: an EBNF grammar (xgrammar's dialect, root rule ``root``).
    """

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    kind: str = field(init=False, repr=False)  # which of the five is set
    spec: str = field(init=False, repr=False)  # the constraint as canonical text (cache key)

    def __post_init__(self) -> None:
        given = [n for n in ("json_schema", "regex", "choice", "grammar")
                 if getattr(self, n) is not None]
        if not isinstance(self.json_object, bool):
            _fail("json_object", self.json_object, "a bool")
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ValueError("GuidedParams needs exactly one of json_schema, json_object, "
                             f"regex, choice, grammar (got {given or 'none'})")
        self.kind = given[0]
        self.spec = self._canonical()
        self.to_grammar()  # parses it now: a bad spec fails here, not on the engine thread

    def _canonical(self) -> str:
        """The spec as text: the compiled-grammar cache key together with ``kind``."""
        if self.kind == "json_schema":
            schema = self.json_schema
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as exc:
                    _fail("json_schema", self.json_schema, f"valid JSON ({exc})")
            if not isinstance(schema, dict):
                _fail("json_schema", self.json_schema, "a JSON object")
            return json.dumps(schema, sort_keys=True)
        if self.kind == "json_object":
            return _ANY_OBJECT
        if self.kind == "choice":
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                _fail("choice", self.choice, "a non-empty list of non-empty strings")
            self.choice = list(self.choice)
            return " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice)
        value = getattr(self, self.kind)
        if not isinstance(value, str) or not value:
            _fail(self.kind, value, "a non-empty string")
        return value

    def to_grammar(self) -> Any:
        """The xgrammar ``Grammar`` (tokenizer-independent); ValueError if it does not parse."""
        import xgrammar as xgr

        try:
            if self.kind in ("json_schema", "json_object"):
                return json_grammar(self.spec)
            if self.kind == "regex":
                return xgr.Grammar.from_regex(self.spec)
            return xgr.Grammar.from_ebnf(_choice_ebnf(self.spec) if self.kind == "choice"
                                         else self.spec)
        except RuntimeError as exc:  # xgrammar reports parse errors as RuntimeError
            _fail(self.kind, getattr(self, self.kind), f"valid: {_xgr_message(exc)}")


def json_grammar(schema: str) -> Any:
    """The xgrammar ``Grammar`` of JSON text matching ``schema`` (JSON text), in the
    whitespace layout every JSON grammar here uses."""
    import xgrammar as xgr

    return xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=_SEPARATORS)


def _choice_ebnf(alternatives: str) -> str:
    # JSON string literals are also EBNF string literals (same escapes)
    return f"root ::= {alternatives}"


def _xgr_message(exc: Exception) -> str:
    # "[time] /project/cpp/file.cc:94: Regex parsing error ..." -> the part after the location
    text = str(exc).strip()
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


def _fail(name: str, value: object, want: str) -> None:
    shown = repr(value) if len(repr(value)) <= 200 else repr(value)[:200] + "..."
    raise ValueError(f"GuidedParams.{name}={shown} is invalid: must be {want}")


class GuidedDecoding:
    """One engine's grammar state: tokenizer info (built once, ``vocab_size`` = the logits'
    width, which may exceed the tokenizer's), the compiler and its cache, and a matcher per
    guided sequence (by ``seq_id``).

    ``compile`` is thread-safe and may run on any thread (the server compiles in its thread
    pool before adding a request, so the engine thread only meets cache hits); the rest
    runs on the engine thread.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                 max_batch: int) -> None:
        import xgrammar as xgr

        if tokenizer is None:
            raise ValueError("structured outputs need the model's tokenizer")
        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=stop_token_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2,
                                            cache_limit_bytes=_CACHE_LIMIT_BYTES)
        self.vocab_size = vocab_size
        self.matchers: dict[int, Any] = {}
        # host bitmask for the largest batch, reused every step (xgrammar fills it on CPU)
        self._bitmask = xgr.allocate_token_bitmask(max_batch, vocab_size)
        self._device_bitmask: torch.Tensor | None = None

    def compile(self, params: GuidedParams) -> Any:
        c = self.compiler
        if params.kind in ("json_schema", "json_object"):
            return c.compile_json_schema(params.spec, any_whitespace=False,
                                         separators=_SEPARATORS)
        if params.kind == "regex":
            return c.compile_regex(params.spec)
        if params.kind == "choice":
            return c.compile_grammar(_choice_ebnf(params.spec))
        return c.compile_grammar(params.spec)

    def add(self, seq_id: int, params: GuidedParams) -> None:
        self.matchers[seq_id] = self._xgr.GrammarMatcher(self.compile(params))

    def drop(self, seq_id: int) -> None:
        self.matchers.pop(seq_id, None)

    def apply(self, logits: torch.Tensor, seq_ids: list[int]) -> None:
        """Mask ``logits`` [batch, V] in place: row i keeps only what seq_ids[i]'s grammar
        allows next; rows without a grammar are untouched."""
        rows = [i for i, s in enumerate(seq_ids) if s in self.matchers]
        if not rows:
            return
        if len(seq_ids) > self._bitmask.shape[0]:  # a batch wider than max_num_seqs
            self._bitmask = self._xgr.allocate_token_bitmask(len(seq_ids), self.vocab_size)
            self._device_bitmask = None
        bitmask = self._bitmask[: len(seq_ids)]
        for i in rows:
            self.matchers[seq_ids[i]].fill_next_token_bitmask(bitmask, i)
        if logits.device.type != "cpu":
            bitmask = self._on_device(bitmask, logits.device)
        self._xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size,
                                              indices=rows)

    def _on_device(self, bitmask: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self._device_bitmask is None:
            self._device_bitmask = self._bitmask.to(device)
        out = self._device_bitmask[: bitmask.shape[0]]
        out.copy_(bitmask)  # blocking: the host buffer is refilled next step
        return out

    def accept(self, seq_id: int, token: int) -> tuple[bool, bool]:
        """Advance ``seq_id``'s matcher by ``token``: (accepted, grammar terminated)."""
        m = self.matchers.get(seq_id)
        if m is None:
            return True, False
        ok = m.accept_token(token)
        return ok, ok and m.is_terminated()
