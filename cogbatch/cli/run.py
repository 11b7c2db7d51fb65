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
    json_option,
    output_option,
    pipeline_option,
    quiet_option,
    verbose_option,
)


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
@click.option("--gallery", "refresh_gallery", is_flag=True,
              help="Refresh the HTML gallery afterwards (as the job key gallery: true).")
@pipeline_option
@json_option
@quiet_option
@verbose_option
@exits_on_signals
def run(job, input_path, output, limit, device, vram_ceiling, batch_size, redo_changed, retry_errors, fail_on_error,
        engine, workers, refresh_gallery, pipeline, as_json, quiet, verbose) -> None:  # fmt: skip
    """Run JOB (a YAML file) and write one result row per image and task to its Parquet dataset.

    Only images and tasks that are not in the output yet are done, so an interrupted run resumes
    where it stopped and a nightly re-run does just the new images.

    Progress and notes go to stderr; the summary (or, with --json, its JSON) to stdout, so
    `cogbatch run job.yaml > run.log` keeps it. Without a terminal a progress line comes every
    30 s ($COGBATCH_PROGRESS_INTERVAL).

    \b
    Exit codes: 0 done (error rows included), 2 configuration error or changed settings,
    1 aborted, 3 error rows with --fail-on-error, 75 another run of this output is going,
    130/143 interrupted (resumable).

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
