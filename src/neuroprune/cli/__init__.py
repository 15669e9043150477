"""The `neuroprune` command line: `main` parses the subcommands of the modules beside it."""

from neuroprune.cli.main import main

__all__ = ["main"]
