"""`python -m azllm.corpus build ...`: the corpus commands without the top-level `azllm`."""

from __future__ import annotations

import argparse
import sys

from azllm.errors import AzllmError

from .cli import add_subcommands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m azllm.corpus")
    sub = parser.add_subparsers(dest="corpus_command", required=True)
    add_subcommands(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except AzllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
