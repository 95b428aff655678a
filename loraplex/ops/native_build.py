"""Build and load the package's C sources (``ops/*.c``) as shared libraries, at first use.

A source is compiled once per machine with the system C compiler (``$CC``, else the one
Python was built with, else ``cc``/``gcc``) and OpenMP, into a cache directory
(``$LORAPLEX_CACHE_DIR``, else ``$XDG_CACHE_HOME/loraplex``, else ``~/.cache/loraplex``;
a private directory under the system temp dir when that one is not writable),
under a name that hashes the source, the flags and the compiler: a changed source or compiler
builds anew, an unchanged one loads in milliseconds. The build writes a temporary file and
renames it into place, so processes that build at once (tensor-parallel workers) never load
a half-written library. Failures raise ``NativeBuildError`` with the compiler's message; the
callers fall back to their torch code.

Why compile at run time rather than ship wheels: the sources are a few dozen lines of C with no
header beyond libc's, so any machine with a C compiler builds them in under a second, and
the package stays pure Python (``pip install -e .`` needs no build step).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

# -ffp-contract=off: a * b + c stays two roundings unless the source asks for an FMA, so
# kernels that promise torch's roundings (lora_cpu.c's rotary) keep them
FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")


class NativeBuildError(RuntimeError):
    """A C source could not be compiled or loaded (no compiler, no OpenMP, not Linux...)."""


def cache_dir() -> Path:
    if os.environ.get("LORAPLEX_CACHE_DIR"):
        return Path(os.environ["LORAPLEX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loraplex"


def _writable_dir() -> Path:
    """``cache_dir()``, or where it cannot be created (a read-only home), a directory of this
    user's own under the system temp dir (mode 0700: no other user can plant a library)."""
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        if os.access(cache_dir(), os.W_OK):
            return cache_dir()
    except OSError:
        pass
    tmp = Path(tempfile.gettempdir()) / f"loraplex-{os.getuid()}"
    tmp.mkdir(mode=0o700, exist_ok=True)
    if tmp.stat().st_uid != os.getuid() or tmp.stat().st_mode & 0o022:
        raise NativeBuildError(f"{cache_dir()} is not writable and {tmp} is not this user's own")
    return tmp


def find_compiler() -> str:
    for cand in (os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0],
                 "cc", "gcc"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    raise NativeBuildError("no C compiler found (set $CC, or install gcc)")


def build_library(source: Path) -> Path:
    """The compiled shared library of ``source`` (built now unless the cache holds it)."""
    cc = find_compiler()
    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join((cc, *FLAGS)).encode()).hexdigest()[:16]
    try:
        out_dir = _writable_dir()
    except OSError as e:
        raise NativeBuildError(f"no writable cache directory for {source.name}: {e}") from e
    lib = out_dir / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, str(source), "-o", tmp], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise NativeBuildError(f"{cc} failed on {source.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load_library(source: Path) -> ctypes.CDLL:
    """Build (if needed) and load ``source``; ``NativeBuildError`` when that cannot be done."""
    if os.name != "posix":
        raise NativeBuildError(f"native ops are built on POSIX systems only, not {os.name!r}")
    try:
        return ctypes.CDLL(str(build_library(source)))
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeBuildError(f"could not build or load {source.name}: {e}") from e
