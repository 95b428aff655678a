# Sourced by the scripts here: sets PY, the Python that loraplex is installed into.
#   - $PYTHON when set (CI sets it);
#   - the active virtual or conda environment's python3;
#   - otherwise ./.venv, created on first use (a system Python may refuse `pip install`).
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  PY=$VIRTUAL_ENV/bin/python
elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
  PY=$CONDA_PREFIX/bin/python
else
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [ ! -x "$root/.venv/bin/python" ]; then
    echo "scripts: creating $root/.venv (set PYTHON=... to install elsewhere)"
    python3 -m venv "$root/.venv"
  fi
  PY=$root/.venv/bin/python
fi
