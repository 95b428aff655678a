"""Request fields -> ``GuidedParams``, and compiling the grammar before the engine sees it.

A request constrains its output with at most one of: ``response_format`` (OpenAI:
``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name", "schema",
"strict"}}``; ``{"type": "text"}`` constrains nothing), or vLLM's ``guided_json``,
``guided_regex``, ``guided_choice``, ``guided_grammar`` (xgrammar's EBNF). Two at once, a
``json_schema`` format without a schema, or a spec that does not parse is a 400 naming the
field. Checking the spec (which imports xgrammar, seconds the first time) and compiling
the grammar both run in worker threads, never on the event loop; the compiled grammar lands
in the engine's shared, thread-safe cache, so the engine thread only meets cache hits and a
slow compile never stalls other requests' steps.
"""

from __future__ import annotations

import asyncio
from typing import Any

from loraplex.engine.guided import GuidedParams
from loraplex.server.protocol import _GuidedFields, bad_request


def guided_params(req: _GuidedFields) -> GuidedParams | None:
    """The request's output constraint, or None; APIError 400 when it is malformed."""
    given: dict[str, dict[str, Any]] = {}
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        given["response_format"] = {"json_object": True}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request("response_format of type 'json_schema' needs "
                              "'json_schema': {'name': ..., 'schema': {...}}",
                              param="response_format")
        given["response_format"] = {"json_schema": fmt.json_schema.schema_}
    if fmt is not None and fmt.type != "json_schema" and fmt.json_schema is not None:
        raise bad_request(f"response_format.json_schema is only allowed with type "
                          f"'json_schema' (got type '{fmt.type}')", param="response_format")
    for name, key in (("guided_json", "json_schema"), ("guided_regex", "regex"),
                      ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        value = getattr(req, name)
        if value is not None:
            given[name] = {key: value}
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(f"only one output constraint may be given; got {sorted(given)}",
                          param=sorted(given)[1])
    (name, kwargs), = given.items()
    try:
        return GuidedParams(**kwargs)
    except ValueError as exc:
        raise bad_request(f"'{name}' is invalid: {exc}", param=name) from None


async def request_guided(req: _GuidedFields) -> GuidedParams | None:
    """``guided_params`` off the event loop; None at once when no constraint field is set."""
    if req.guided_json is None and req.guided_regex is None and req.guided_choice is None \
            and req.guided_grammar is None \
            and (req.response_format is None or req.response_format.type == "text"):
        return None
    return await asyncio.to_thread(guided_params, req)


async def prepare_guided(engine: Any, guided: GuidedParams | None) -> None:
    """Compile ``guided`` into ``engine``'s grammar cache on a worker thread (no-op for None).
    ``engine`` is the synchronous LLMEngine."""
    if guided is None:
        return
    loop = asyncio.get_running_loop()
    backend = await loop.run_in_executor(None, engine.guided_decoding)
    try:
        await loop.run_in_executor(None, backend.compile, guided)
    except (RuntimeError, ValueError) as exc:
        raise bad_request(f"the {guided.kind} grammar cannot be compiled for this model's "
                          f"tokenizer: {exc}", param=guided.kind) from None
