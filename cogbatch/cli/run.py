"""`cogbatch run` and `cogbatch demo`: the commands that generate rows."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cogbatch.cli.app import (
    _emit,
    _reported,
    _setup_logging,
    cli,
    exits_on_signals,
    job_options,
    json_option,
    quiet_option,
    run_options,
    verbose_option,
)


@cli.command(short_help="Run a job: caption / answer questions about a folder or a Parquet manifest.")
@click.argument("job", type=click.Path(dir_okay=False))
@job_options
@run_options
@json_option
@quiet_option
@verbose_option
@exits_on_signals
def run(job, input_path, output, pipeline, limit, device, vram_ceiling, batch_size, redo_changed, retry_errors,
        fail_on_error, engine, workers, refresh_gallery, as_json, quiet, verbose) -> None:  # fmt: skip
    """Run JOB (a YAML file) and write one result row per file (or manifest row) and task to its Parquet dataset.

    Only items and tasks that are not in the output yet are done, so an interrupted run resumes
    where it stopped and a nightly re-run does just the new images. Byte-identical files are
    generated once and each gets its row. The input used is recorded beside the output: later
    commands without --input follow it.

    Progress and notes go to stderr; the summary (or, with --json, its JSON) to stdout, so
    `cogbatch run job.yaml > run.log` keeps it. Without a terminal a progress line comes every
    30 s ($COGBATCH_PROGRESS_INTERVAL).

    \b
    Exit codes: 0 done (error rows included), 2 configuration error or changed settings,
    1 aborted, 3 with --fail-on-error: the output holds error rows for the job's input,
    66 the input has no images, 75 another run of this output is going, 130/143 interrupted
    (resumable).

    Example: cogbatch run jobs/caption.yaml --input ~/Pictures --output outputs/pictures
    """
    from cogbatch.api import run_job

    _setup_logging(quiet, verbose)
    if workers is not None and engine != "ray":
        raise click.UsageError("--workers applies to --engine ray only")
    with _reported("run aborted", resumable=True):
        summary = run_job(job, engine=engine, redo_changed=redo_changed, retry_errors=retry_errors,
                          fail_on_error=fail_on_error, quiet=quiet, verbose=verbose, gallery=refresh_gallery,
                          pipeline=pipeline, input=input_path, output=output, limit=limit, device=device,
                          vram_ceiling=vram_ceiling, batch_size=batch_size, workers=workers)  # fmt: skip
    _emit(summary.to_dict(), summary.describe(), as_json, human_on_stdout=True)
    sys.exit(summary.exit_code)


@cli.command(short_help="Smoke run on a tiny random model: no GPU, no download (its text is random).")
@click.option("--output", "-o", type=click.Path(file_okay=False), default="outputs/demo", show_default=True,
              help="Where the sample images and the result dataset go.")
@click.option("--images", "n_images", type=click.IntRange(1, 1000), default=8, show_default=True)
@json_option
@quiet_option
@verbose_option
@exits_on_signals
def demo(output, n_images, as_json, quiet, verbose) -> None:
    """Caption a few generated images with a tiny random model, to check an installation.

    The model has random weights, so the text it writes is random: this checks the machinery
    (loading, batching, Parquet output, resume), not caption quality. Runs on a CPU in seconds.
    In a checkout, `cogbatch run jobs/demo.yaml` runs the same job from its YAML file.
    """
    from cogbatch.api import run_job
    from cogbatch.demo import demo_job

    _setup_logging(quiet, verbose)
    with _reported("run aborted", resumable=True):  # the run itself notes that its text is random
        summary = run_job(demo_job(Path(output), n_images), quiet=quiet, verbose=verbose)
    _emit(summary.to_dict(), summary.describe(), as_json, human_on_stdout=True)
    sys.exit(summary.exit_code)
