"""`python -m azllm.export hf|gguf|ollama ...`: the export commands without the main CLI."""

import argparse
import sys

from azllm.errors import AzllmError
from azllm.export.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m azllm.export")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except AzllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
