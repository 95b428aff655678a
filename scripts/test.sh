#!/usr/bin/env bash
# Second command of the README: install what the tests need (the dev extra, and the triton
# extra that runs the Triton kernels in its CPU interpreter), then run pytest. Arguments go to
# pytest: `scripts/test.sh` is the full suite (CI), `scripts/test.sh -m "not slow"` the fast
# selection for development. Set LORAPLEX_SKIP_INSTALL=1 to run pytest only.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/python.sh"
if [ -z "${LORAPLEX_SKIP_INSTALL:-}" ]; then
  PYTHON=$PY "$here/install.sh" dev,triton
fi
cd "$here/.."
# pytest exits 5 when it collects nothing: a failure here too.
"$PY" -m pytest -q "$@"
