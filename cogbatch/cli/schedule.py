"""`cogbatch schedule`: the cron line of a nightly job."""

from __future__ import annotations

from pathlib import Path

import click

from cogbatch.cli.app import (
    _emit,
    _reported,
    cli,
    json_option,
    output_option,
    pipeline_option,
)


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
