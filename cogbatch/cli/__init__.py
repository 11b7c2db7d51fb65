"""The `cogbatch` command line: the Click group of `cli.app` with the commands of the modules beside it."""

from __future__ import annotations

import sys

import click

from cogbatch.cli import compare, model, results, run, schedule  # noqa: F401  (each registers its commands)
from cogbatch.cli.app import _PROGRAM, _emit, cli

__all__ = ["_PROGRAM", "_emit", "cli", "main"]


def main() -> None:
    """The `cogbatch` executable. An exception no command turned into a message (a bug, or a failure
    nobody foresaw) still ends in one line with an exit code, not a traceback; COGBATCH_DEBUG=1 shows it."""
    import os

    try:
        cli(obj=_PROGRAM)
    except Exception as e:
        if os.environ.get("COGBATCH_DEBUG"):
            raise
        from cogbatch.errors import exit_code_for

        click.echo(f"Error: {type(e).__name__}: {e} (set COGBATCH_DEBUG=1 for the traceback)", err=True)
        sys.exit(exit_code_for(e))
