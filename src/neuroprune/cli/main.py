"""`neuroprune` command line: one subcommand per job. Each subcommand lives in its own module
beside it in `neuroprune.cli` and provides `register(subparsers)`; the parser it adds sets
`func=run` where `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

from neuroprune.errors import NeuroPruneError

COMMANDS = ("train", "eval", "demo", "compact", "export", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuroprune", description="Neuro-inspired topological sparse fine-tuning of transformers."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"neuroprune.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"neuroprune.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NeuroPruneError as err:
        print(f"neuroprune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"neuroprune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
