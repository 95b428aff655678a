#!/usr/bin/env bash
# The README's two commands, run as written in a copy of this working tree, as a new user
# would (tests/test_quickstart.py runs this; it is marked slow). One MODE per run:
#
#   system    (default) inside a fresh `python -m venv --system-site-packages`, activated:
#             torch and the other dependencies come from this machine's site-packages, so
#             nothing is downloaded; checks "keep an installed torch", the editable install,
#             the demo and the quick test selection (`scripts/test.sh -m "not slow"`).
#   fallback  a bare venv (no torch) whose pip fails every --index-url install, as where
#             PyTorch's CPU index cannot be reached: torch must come from the default index
#             (here: the configured mirror). Runs the first command only; installs torch
#             and every dependency into the venv (a few minutes, ~1 GB of disk).
#   bare      no environment at all: the scripts create ./.venv themselves and install
#             everything into it (both commands; several minutes, ~2 GB of disk).
#
# Usage: tests/test_quickstart.sh [MODE]   (needs bash, python3 with venv, pip access)
set -euo pipefail
MODE=${1:-system}
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/loraplex-quickstart.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# The working tree as a user's clone would have it (no build outputs, no local .venv).
tar -C "$root" --exclude=.git --exclude=.venv --exclude='*.egg-info' --exclude=__pycache__ \
  --exclude=.pytest_cache --exclude=.ruff_cache -cf - . | (mkdir -p "$work/repo" && tar -C "$work/repo" -xf -)
cd "$work/repo"
unset PYTHON VIRTUAL_ENV CONDA_PREFIX PYTHONPATH
log() { echo "test_quickstart[$MODE]: $*"; }

case "$MODE" in
  system)
    python3 -m venv --system-site-packages "$work/venv"
    # shellcheck disable=SC1091
    source "$work/venv/bin/activate"
    scripts/quickstart.sh | tee "$work/demo.txt"
    scripts/test.sh -m "not slow" -x -p no:cacheprovider
    # the editable install is this copy, not another checkout on the machine
    python -c "import loraplex, sys; sys.exit(not loraplex.__file__.startswith('$work/repo'))"
    ;;
  fallback)
    python3 -m venv "$work/venv"
    real="$work/venv/bin/python"
    if "$real" -c "import torch" 2>/dev/null; then log "venv already has torch"; exit 1; fi
    # A python whose pip cannot reach any --index-url (PyTorch's CPU index, here).
    cat > "$work/python" <<EOF
#!/usr/bin/env bash
if [ "\${1:-}" = -m ] && [ "\${2:-}" = pip ] && [[ " \$* " == *" --index-url "* ]]; then
  echo "test_quickstart: simulated: the --index-url index cannot be reached" >&2
  exit 1
fi
exec "$real" "\$@"
EOF
    chmod +x "$work/python"
    PYTHON="$work/python" scripts/quickstart.sh 2>&1 | tee "$work/demo.txt"
    grep -q "from the default index" "$work/demo.txt"
    "$real" -c "import torch; print('torch', torch.__version__)"
    ;;
  bare)
    scripts/quickstart.sh | tee "$work/demo.txt"
    test -x .venv/bin/python
    scripts/test.sh -m "not slow" -x -p no:cacheprovider
    ;;
  *)
    echo "usage: $0 [system|fallback|bare]" >&2
    exit 2
    ;;
esac
# The demo ran and every output was as expected (demo/run.py ends with "; N/N as expected").
grep -E "; ([0-9]+)/\1 as expected$" "$work/demo.txt"
log "ok"
