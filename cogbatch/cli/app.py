"""The `cogbatch` group and what every command shares: options, the one output style, error and signal handling.

Each command module (`run`, `results`, `model`, `schedule`) parses its options, calls one `cogbatch.api`
function and prints the typed result it gets back, as text or, with `--json`, as one line of JSON on
stdout. Heavy libraries (torch, transformers, pyarrow) are imported inside the commands that need
them so that `cogbatch --help` answers at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
from collections.abc import Iterator
from typing import Any

import click

from cogbatch import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_PROGRAM = "cogbatch-program"  # the root context's obj when running as the `cogbatch` executable


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="cogbatch")
def cli() -> None:
    """Caption images and answer questions about them with CogVLM / CogVLM2, in batches.

    \b
    Typical use:
      cogbatch run jobs/caption.yaml          caption every image of a folder into Parquet
      cogbatch status jobs/caption.yaml       what is done, failed and pending
    """


def output_option(f):
    help_ = "Result dataset directory (overrides the job's output)."
    return click.option("--output", "-o", type=click.Path(file_okay=False), help=help_)(f)


json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as one line of JSON on stdout.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress, notes or warnings; errors only.")
verbose_option = click.option("--verbose", "-v", is_flag=True, help="Also the model load's internals (times, "
                              "bytes, peak memory, kernels) and Ray's own logs and warnings.")


def pipeline_option(f):
    help_ = "Defaults file (default: the first pipeline.yaml in the current directory or above the job file)."
    return click.option("--pipeline", type=click.Path(dir_okay=False), help=help_)(f)


class ConfigFailure(click.ClickException):
    exit_code = 2


def _setup_logging(quiet: bool, verbose: bool = False) -> None:
    """stderr for logs and progress at the level asked (see `cogbatch.logs`); stdout stays for results."""
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose exclude each other")
    from cogbatch.logs import configure_logging

    configure_logging(quiet, verbose)


def _emit(data: Any, human: str, as_json: bool, *, human_on_stdout: bool = False, quiet: bool = False) -> None:
    """The one output style: `--json` prints one line of JSON on stdout (a cron log of `--quiet --json` runs is
    one JSON line per run); the human text goes where the command keeps it (stdout, or stderr beside data)."""
    if as_json:
        click.echo(json.dumps(data, default=str))  # no indent: one line
    elif human_on_stdout:
        click.echo(human)
    if not human_on_stdout and not quiet:
        click.echo(human, err=True)


@contextlib.contextmanager
def _reported(what: str | None = None, resumable: bool = False) -> Iterator[None]:
    """The user's to fix (config, model source, ceiling, engine option): exit 2, nothing was done; another run
    holds the output: exit 75; anything else aborts the command (exit 1) saying `what` it was, or, without
    `what`, is left to `main`. The codes come from `cogbatch.errors`, which the run history uses too."""
    from cogbatch.errors import EXIT_CONFIG, EXIT_LOCKED, exit_code_for

    try:
        yield
    except Exception as e:
        code = exit_code_for(e)
        if code == EXIT_CONFIG:
            raise ConfigFailure(str(e)) from None
        if code == EXIT_LOCKED:  # EX_TEMPFAIL: cron and scripts can tell "busy" from "failed"
            busy = click.ClickException(f"{e}; this run did nothing (exit {code}: try again when that one ends)")
            busy.exit_code = code
            raise busy from None
        if what is None:
            raise
        import os
        import traceback

        if os.environ.get("COGBATCH_DEBUG"):
            traceback.print_exc()
        resume = "; rerun the same command to resume" if resumable else ""
        raise click.ClickException(
            f"{what}: {type(e).__name__}: {e} (set COGBATCH_DEBUG=1 for the traceback{resume})"
        ) from None


def exits_on_signals(command):
    """Ctrl-C / SIGTERM end `command` with 130 / 143, never click's "Aborted!" (exit 1) or a silent kill.

    Before the run takes over the signals they stop at once; during the run the first one finishes the
    batch in flight and a second one stops at once (`engines.progress.StopFlag`); every row written is kept.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from cogbatch.engines.progress import stop_at_once_on_signals

        previous = stop_at_once_on_signals()
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt as e:
            from cogbatch.errors import exit_code_for

            stopped = click.ClickException(
                "interrupted: stopped at once; every row already written is kept "
                "(run the same command again to resume)"
            )
            stopped.exit_code = exit_code_for(e)
            raise stopped from None
        finally:
            # Called in-process (tests, a notebook): leave the caller's handlers as they were. As the
            # `cogbatch` program the work is over and the process is exiting (interpreter shutdown
            # with torch loaded takes a while): a late signal must not turn the exit code into a kill.
            ctx = click.get_current_context(silent=True)
            program = ctx is not None and ctx.find_root().obj == _PROGRAM
            for s, handler in previous.items():
                signal.signal(s, signal.SIG_IGN if program else handler)

    return wrapper
