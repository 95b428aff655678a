"""``python -m loraplex.server --model DIR ...``: the same as ``loraplex serve``."""

import argparse

from loraplex.server.api import add_serve_args, run_server


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loraplex.server",
                                     description="Serve a model and its LoRA adapters over an "
                                                 "OpenAI-compatible HTTP API.")
    run_server(add_serve_args(parser).parse_args())


if __name__ == "__main__":
    main()
