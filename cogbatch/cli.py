"""The `cogbatch` command line: each command parses its options, calls one `cogbatch.api` function and
prints the typed result it gets back, as text or, with `--json`, as one line of JSON on stdout.

Heavy libraries (torch, transformers, pyarrow) are imported inside the commands that need them so
that `cogbatch --help` answers at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
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
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar or log lines; errors only.")


def pipeline_option(f):
    help_ = "Defaults file (default: the first pipeline.yaml in the current directory or above the job file)."
    return click.option("--pipeline", type=click.Path(dir_okay=False), help=help_)(f)


class ConfigFailure(click.ClickException):
    exit_code = 2


def _setup_logging(quiet: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="cogbatch: %(message)s", stream=sys.stderr
    )


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


@cli.command(short_help="Run a job: caption / answer questions about a folder or a Parquet manifest.")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--input", "input_path", type=click.Path(),
              help="A folder or Parquet manifest to use instead of the job's input.")
@output_option
@click.option("--limit", type=click.IntRange(min=1), help="Process at most N new images in this run.")
@click.option("--device", help="cpu, cuda or cuda:N (overrides the job).")
@click.option("--vram-ceiling", help="Memory ceiling for batches, e.g. 11GiB (overrides the job).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Cap on sequences decoded together (default: planned).")
@click.option("--redo-changed", is_flag=True, help="Redo tasks whose settings changed since their rows were made.")
@click.option("--retry-errors", is_flag=True,
              help="Redo image/task pairs whose current row is an error (an OOM, a fixed file).")
@click.option("--fail-on-error", is_flag=True, help="Exit with code 3 when any image ended as an error row.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: a Ray cluster (RAY_ADDRESS, else a local one; needs cogbatch[ray]).")
@click.option("--workers", type=click.IntRange(min=1),
              help="Ray actors, one model each (default: one per GPU, else 1-2).")
@pipeline_option
@json_option
@quiet_option
@exits_on_signals
def run(job, input_path, output, limit, device, vram_ceiling, batch_size, redo_changed, retry_errors, fail_on_error,
        engine, workers, pipeline, as_json, quiet) -> None:  # fmt: skip
    """Run JOB (a YAML file) and write one result row per image and task to its Parquet dataset.

    Only images and tasks that are not in the output yet are done, so an interrupted run resumes
    where it stopped and a nightly re-run does just the new images.

    \b
    Exit codes: 0 done (error rows included), 2 configuration error or changed settings,
    1 aborted, 3 error rows with --fail-on-error, 75 another run of this output is going,
    130/143 interrupted (resumable).

    Example: cogbatch run jobs/caption.yaml --input ~/Pictures --output outputs/pictures
    """
    from cogbatch.api import run_job

    _setup_logging(quiet)
    if workers is not None and engine != "ray":
        raise click.UsageError("--workers applies to --engine ray only")
    with _reported("run aborted", resumable=True):
        summary = run_job(job, engine=engine, redo_changed=redo_changed, retry_errors=retry_errors,
                          fail_on_error=fail_on_error, quiet=quiet, pipeline=pipeline, input=input_path,
                          output=output, limit=limit, device=device, vram_ceiling=vram_ceiling,
                          batch_size=batch_size, workers=workers)  # fmt: skip
    _emit(summary.to_dict(), summary.describe(), as_json, quiet=quiet)
    sys.exit(summary.exit_code)


@cli.command(short_help="Show done / failed / pending counts of a job without loading the model.")
@click.argument("job", type=click.Path(dir_okay=False))
@output_option
@click.option("--history", is_flag=True, help="Show the past runs (from <output>/runs.jsonl) instead.")
@pipeline_option
@json_option
def status(job, output, history, pipeline, as_json) -> None:
    """Show what JOB has done, failed and still has pending, per task.

    With --history: one line per past run (start, wall time, exit code, counts, model).

    Example: cogbatch status jobs/caption.yaml
    """
    from cogbatch import api

    if history:
        from cogbatch.history import format_table, read_history
        from cogbatch.job import load_job

        with _reported():
            cfg = load_job(job, {"output": output}, pipeline)
        warnings: list[str] = []
        records = read_history(cfg.output, warn=warnings.append)
        for warning in warnings:  # stderr: --json output stays parseable
            click.echo(f"warning: {warning}", err=True)
        if as_json or records:
            _emit(records, format_table(records), as_json, human_on_stdout=True)
        else:
            click.echo(f"{cfg.output}: {'no readable runs' if warnings else 'no runs recorded yet'}", err=True)
        return
    with _reported():  # a part file that is not one (ResultFileError): exit 2
        report = api.job_status(job, pipeline=pipeline, output=output)
    _emit(report.to_dict(), report.describe(), as_json, human_on_stdout=True)


@cli.command(short_help="Predict memory use and the largest batch that fits, without loading weights.")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--vram-ceiling", help="Plan for this ceiling instead of the job's, e.g. 16GiB.")
@click.option("--device", help="Plan for cpu, cuda or cuda:N instead of the job's device (no GPU needed here).")
@pipeline_option
@json_option
def plan(job, vram_ceiling, device, pipeline, as_json) -> None:
    """Predict device memory for JOB's model and quantization, and the batch size that fits.

    Reads only the checkpoint's config.json: weight bytes follow from the tensor shapes and the
    quantization rules. Both execution modes are shown: all weights resident, and phase-swapped
    (vision tower and language model take turns on the device).

    Example: cogbatch plan jobs/caption.yaml --vram-ceiling 11GiB --device cuda
    """
    from cogbatch.api import plan_job

    with _reported("plan failed"):
        report = plan_job(job, pipeline=pipeline, vram_ceiling=vram_ceiling, device=device)
    _emit(report.to_dict(), report.describe(), as_json, human_on_stdout=True)


@cli.command(short_help="Quantize a checkpoint ahead of time into the quantized-weights cache.")
@click.argument("model")
@click.option("--out", type=click.Path(file_okay=False), help="Cache directory to fill (default: the pipeline's "
              "cache_dir, or $COGBATCH_CACHE_DIR). Point the runs' cache_dir at it.")
@click.option("--quantization", default="int4", show_default=True, help="int4, int4-g32, int4-g64, int8.")
@click.option("--rule", "rules", multiple=True, metavar="PATTERN=DTYPE",
              help="Mixed precision: module glob = int4 | int4-g32 | int4-g64 | int8 | none, first match wins "
              "(repeatable).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="Compute dtype of the runs that will use the cache (part of its key).")
@click.option("--device", default="cpu", show_default=True, help="Where to quantize (cpu or cuda).")
@click.option("--tokenizer", help="Tokenizer to load when the checkpoint has none.")
@pipeline_option
@json_option
def quantize(model, out, quantization, rules, dtype, device, tokenizer, pipeline, as_json) -> None:
    """Quantize MODEL (alias, hub id or local checkpoint) into the cache, e.g. on a bigger machine.

    The next load with the same checkpoint, rules and dtype reads the cache instead of quantizing.

    Example: cogbatch quantize cogvlm2 --rule "lm_head=none" --rule "*.vision_mlp.*=int8"
    """
    from cogbatch.api import quantize_checkpoint

    with _reported("quantize failed"):
        report = quantize_checkpoint(model, out=out, quantization=quantization, rules=rules, dtype=dtype,
                                     device=device, tokenizer=tokenizer, pipeline=pipeline)  # fmt: skip
    _emit(report.to_dict(), report.describe(), as_json)


@cli.command(short_help="Install, remove or list a nightly cron entry for a job.")
@click.argument("job", type=click.Path(dir_okay=False), required=False)
@click.option("--cron", "cron_expr", metavar="EXPR", help='When to run, e.g. "0 2 * * *" (02:00 daily) or @daily.')
@click.option("--install", is_flag=True, help="Add the line to your crontab (or replace it).")
@click.option("--remove", is_flag=True, help="Remove JOB's line from your crontab.")
@click.option("--list", "list_", is_flag=True, help="List cogbatch's crontab entries (JOB's only, if given).")
@output_option
@pipeline_option
@json_option
def schedule(job, cron_expr, install, remove, list_, output, pipeline, as_json) -> None:
    """Print or install a crontab line that runs JOB unattended, one run at a time.

    Without --install the line is only printed. The line runs the same cogbatch (absolute path of
    this environment) on the absolute JOB path from the current directory, under `flock -n`, with
    `--quiet --json` appended to <output>/cogbatch.log. A run that finds the job still running
    exits 75 and does nothing; each night only the new images are done.

    \b
    Examples:
      cogbatch schedule jobs/caption.yaml --cron "0 2 * * *"            print the line
      cogbatch schedule jobs/caption.yaml --cron "0 2 * * *" --install  add (or update) it
      cogbatch schedule jobs/caption.yaml --remove                      remove it
      cogbatch schedule --list                                          every cogbatch entry
    """
    from cogbatch import schedule as sched
    from cogbatch.errors import CronError, ScheduleError

    chosen = [name for name, given in (("install", install), ("remove", remove), ("list", list_)) if given]
    if len(chosen) > 1:  # one flag per call: `--list --remove` must not remove anything
        raise click.UsageError(f"--{' and --'.join(chosen)} cannot be combined: give one of them")
    action = chosen[0] if chosen else "print"
    if job is None and action != "list":
        raise click.UsageError("JOB is required (only --list works without it)")
    if action in ("print", "install") and not cron_expr:
        raise click.UsageError('--cron EXPR is required, e.g. --cron "0 2 * * *"')
    if action in ("remove", "list") and cron_expr:
        raise click.UsageError(f"--cron has no meaning with --{action}")
    try:
        if action == "list":
            entries = sched.list_entries(job)
            if as_json or entries:
                _emit(entries, sched.format_entries(entries), as_json, human_on_stdout=True)
            else:
                click.echo("no cogbatch entries in your crontab", err=True)
            return
        if action == "remove":
            n = sched.remove(job)
            noun = "entry" if n == 1 else "entries"
            human = f"removed {n} crontab {noun} for {job}" if n else f"no crontab entry for {job}: nothing removed"
            _emit({"removed": n, "job": str(Path(job).resolve())}, human, as_json)
            return
        try:
            expr = sched.validate_cron(cron_expr)
        except CronError as e:
            raise click.BadParameter(str(e), param_hint="--cron") from None
        from cogbatch.job import load_job

        with _reported():
            cfg = load_job(job, {"output": output}, pipeline)
        entry = sched.build_entry(job, expr, cfg.output, output_override=output is not None, pipeline=pipeline)
        if action == "print":
            _emit(entry.to_dict(), entry.line, as_json, human_on_stdout=True)
            if not as_json:
                click.echo(f"(not installed: add --install to put it in your crontab; log: {entry.log})", err=True)
            return
        result = sched.install(entry)
        _emit({**entry.to_dict(), "result": result}, f"crontab line {result}: {entry.line}\nlog: {entry.log}", as_json)
    except ScheduleError as e:
        err = click.ClickException(str(e))
        err.exit_code = e.exit_code  # 2 for a path the crontab cannot hold, 1 for a crontab failure
        raise err from None


@cli.command(short_help="Export results as .txt captions beside the images, JSONL or CSV.")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["txt", "jsonl", "csv"]), required=True, help="What to write.")
@click.option("--task", help="txt: the task whose text is written (required when the job has several). "
              "jsonl/csv: only this task's rows.")
@click.option("--dest", type=click.Path(file_okay=False), help="txt: mirror the input tree under DIR instead of "
              "writing beside the images. jsonl/csv: write DIR/<output name>.<format> instead of stdout.")
@click.option("--overwrite", is_flag=True, help="Replace existing files whose content differs.")
@output_option
@pipeline_option
@json_option
def export(job, fmt, task, dest, overwrite, output, pipeline, as_json) -> None:
    """Export JOB's results, e.g. one .txt caption per image for LoRA training.

    \b
    txt    one <image stem>.txt per image with TASK's text for the bytes the image holds now,
           beside the image (or under --dest, mirroring the input folder); error rows and
           images not done yet are skipped; an existing file with other text is kept unless
           --overwrite.
    jsonl  every column of the same row per (path, task), to stdout or --dest.
    csv    the same as CSV with a header line.

    The summary (written / unchanged / skipped / conflicts) goes to stderr, or stdout with --json.

    \b
    Examples:
      cogbatch export jobs/caption.yaml --format txt
      cogbatch export jobs/vqa.yaml --format txt --task colors --dest captions/
      cogbatch export jobs/caption.yaml --format jsonl > captions.jsonl
    """
    from cogbatch.api import export_job
    from cogbatch.errors import DestinationError, ExportError, UserError

    if fmt != "txt" and dest is None and as_json:
        raise click.UsageError(f"--json needs --dest with --format {fmt} (the rows themselves go to stdout)")
    try:
        report = export_job(job, fmt, task=task, dest=dest, overwrite=overwrite, pipeline=pipeline, output=output)
    except DestinationError as e:  # an unwritable DEST: exit 2 with the path and the system's reason
        raise ConfigFailure(str(e)) from None
    except ExportError as e:  # a request that cannot be exported as asked
        raise click.UsageError(str(e)) from None
    except UserError as e:  # the job itself; a part file that is not one
        raise ConfigFailure(str(e)) from None
    _emit(report.to_dict(), report.describe(), as_json)


@cli.command(short_help="Merge an output dataset's part files into fewer files.")
@click.argument("output", type=click.Path(file_okay=False, exists=True))
@json_option
def compact(output, as_json) -> None:
    """Merge the part files of OUTPUT without changing its rows (crash-safe).

    Example: cogbatch compact outputs/caption
    """
    from cogbatch.api import compact_output

    with _reported():  # a part file that is not one, or an output that cannot be written: nothing changed
        report = compact_output(output)
    _emit(report.to_dict(), report.describe(), as_json)


@cli.command(short_help="Smoke run on a tiny random model: no GPU, no download (its text is random).")
@click.option("--output", "-o", type=click.Path(file_okay=False), default="outputs/demo", show_default=True,
              help="Where the sample images and the result dataset go.")
@click.option("--images", "n_images", type=click.IntRange(1, 1000), default=8, show_default=True)
@json_option
@quiet_option
@exits_on_signals
def demo(output, n_images, as_json, quiet) -> None:
    """Caption a few generated images with a tiny random model, to check an installation.

    The model has random weights, so the text it writes is random: this checks the machinery
    (loading, batching, Parquet output, resume), not caption quality. Runs on a CPU in seconds.
    In a checkout, `cogbatch run jobs/demo.yaml` runs the same job from its YAML file.
    """
    from cogbatch.api import run_job
    from cogbatch.demo import demo_job

    _setup_logging(quiet)
    with _reported("run aborted", resumable=True):  # the run itself warns that its text is random, even if quiet
        summary = run_job(demo_job(Path(output), n_images), quiet=quiet)
    _emit(summary.to_dict(), summary.describe() + "\nNOTE: the text is random (random demo model).", as_json,
          quiet=quiet)  # fmt: skip
    sys.exit(summary.exit_code)


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
