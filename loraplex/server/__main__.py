"""``python -m loraplex.server --model DIR ...``: the same as ``loraplex serve``."""

import argparse
import sys

from loraplex.errors import LoraplexError
from loraplex.server.api import add_serve_args, run_server


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m loraplex.server",
                                     description="Serve a model and its LoRA adapters over an "
                                                 "OpenAI-compatible HTTP API.")
    args = add_serve_args(parser).parse_args()
    try:
        run_server(args)
    except (LoraplexError, ValueError) as e:  # bad flags, model or device: no traceback
        print(f"loraplex serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
