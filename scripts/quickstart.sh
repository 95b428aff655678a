#!/usr/bin/env bash
# First command of the README: install loraplex (and a torch build that fits this machine, see
# install.sh), then run the shipped demo: one batch, a tiny model and three LoRA adapters.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/python.sh"
PYTHON=$PY "$here/install.sh"
"$PY" -m loraplex.cli demo "$@"
