"""The repository stands alone: its text cites only files that exist in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = {".md", ".py", ".sh", ".toml"}
# a path from the repository root, or a module path inside the package (as the docs write them)
# (a path that runs on into a glob, e.g. tests/test_*.py, is a pattern, not a citation)
ROOTED = re.compile(r"(?<![\w/.-])((?:docs|benchmarks|tests|scripts|loraplex|\.ci)/[\w./-]*\w)"
                    r"(?![\w*])")
IN_PACKAGE = re.compile(r"`((?:engine|kvcache|models|layers|lora|ops|server|demo)/[\w/.-]+\.py)")
# files outside the repository that earlier text leaned on (spelled so this file has neither)
OUTSIDE = ["DESIGN" + ".md", "STYLE" + ".md", "../" + "shared"]


def _files() -> list[Path]:
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "data"}
    return [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in TEXT
            and not skip & set(p.relative_to(ROOT).parts)]


def test_no_file_cites_a_file_outside_the_repository():
    bad = [(str(p.relative_to(ROOT)), word) for p in _files() for word in OUTSIDE
           if word in p.read_text(errors="replace")]
    assert not bad, bad


def test_cited_paths_exist():
    missing = []
    for path in _files():
        text = path.read_text(errors="replace")
        for ref in ROOTED.findall(text):
            ref = ref.rstrip(".")
            if "*" in ref or "{" in ref or not (ROOT / ref).exists():
                missing.append((str(path.relative_to(ROOT)), ref))
        missing += [(str(path.relative_to(ROOT)), ref) for ref in IN_PACKAGE.findall(text)
                    if not (ROOT / "loraplex" / ref).exists()]
    assert not missing, missing
