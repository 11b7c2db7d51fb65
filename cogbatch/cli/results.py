"""Commands that read an output: `status`, `export`, `compact`, `gallery`."""

from __future__ import annotations

import click

from cogbatch.cli.app import (
    ConfigFailure,
    _emit,
    _reported,
    _setup_logging,
    cli,
    json_option,
    output_option,
    pipeline_option,
    quiet_option,
)


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


@cli.command(short_help="Write an HTML page that shows each image beside its captions.")
@click.argument("job", type=click.Path(dir_okay=False))
@output_option
@click.option("--dest", type=click.Path(dir_okay=False),
              help="The page to write (default: <output>.cogbatch/gallery/index.html); thumbnails go beside it.")
@click.option("--task", help="Only this task's rows.")
@click.option("--status", type=click.Choice(["ok", "error", "all"]), default="all", show_default=True,
              help="Only rows of this status.")
@click.option("--limit", type=click.IntRange(min=1), help="At most N images (in path order).")
@pipeline_option
@json_option
@quiet_option
def gallery(job, output, dest, task, status, limit, pipeline, as_json, quiet) -> None:
    """Write a static HTML page of JOB's results: each image's thumbnail beside its text for every task.

    The page opens from the local disk in any browser (no server, no network) and pages through
    the images with filters by text, task, status and finish reason. Thumbnails are made once
    per image and reused by later builds; an image that cannot be shown gets the reason instead.

    Example: cogbatch gallery jobs/caption.yaml --status error
    """
    from cogbatch.api import gallery_job

    _setup_logging(quiet)
    with _reported():  # no results, an unknown task, an unwritable destination, a bad part file: exit 2
        result = gallery_job(job, dest, task=task, status=status, limit=limit, pipeline=pipeline, output=output)
    _emit(result.to_dict(), result.describe(), as_json, quiet=quiet)
