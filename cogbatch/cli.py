"""The `cogbatch` command line: parses arguments and delegates; no work happens in this module.

Heavy libraries (torch, transformers, pyarrow) are imported inside the commands that need them so
that `cogbatch --help` answers at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cogbatch import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class NotAvailableYet(click.ClickException):
    """A command whose implementation has not landed: say so plainly instead of pretending to work."""

    exit_code = 2

    def __init__(self, command: str, issue: int) -> None:
        super().__init__(f"`cogbatch {command}` is not available yet (tracked in issue #{issue}).")


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
    return click.option(
        "--output",
        "-o",
        type=click.Path(file_okay=False),
        help="Result dataset directory (overrides the job's output).",
    )(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON summary on stdout.")(f)


def quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar or log lines; errors only.")(f)


def pipeline_option(f):
    return click.option(
        "--pipeline",
        type=click.Path(dir_okay=False),
        help="Defaults file (default: the first pipeline.yaml in the current directory or above the job file).",
    )(f)


class ConfigFailure(click.ClickException):
    exit_code = 2


def _setup_logging(quiet: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="cogbatch: %(message)s", stream=sys.stderr
    )


def _load(job: str, overrides: dict, pipeline: str | None):
    from cogbatch.config import ConfigError, load_job

    try:
        return load_job(job, overrides, pipeline)
    except ConfigError as e:
        raise ConfigFailure(str(e)) from None


def _emit(summary: dict, as_json: bool, human: str) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    click.echo(human, err=True)


@cli.command(short_help="Run a job: caption / answer questions about a folder or a Parquet manifest.")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option(
    "--input", "input_path", type=click.Path(), help="A folder or Parquet manifest to use instead of the job's input."
)
@output_option
@click.option("--limit", type=click.IntRange(min=1), help="Process at most N new images in this run.")
@click.option("--device", help="cpu, cuda or cuda:N (overrides the job).")
@click.option("--vram-ceiling", help="Memory ceiling for batches, e.g. 11GiB (overrides the job).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Requests per batch (overrides the job).")
@click.option("--redo-changed", is_flag=True, help="Redo tasks whose settings changed since their rows were made.")
@click.option("--fail-on-error", is_flag=True, help="Exit with code 3 when any image ended as an error row.")
@pipeline_option
@json_option
@quiet_option
def run(
    job,
    input_path,
    output,
    limit,
    device,
    vram_ceiling,
    batch_size,
    redo_changed,
    fail_on_error,
    pipeline,
    as_json,
    quiet,
) -> None:
    """Run JOB (a YAML file) and write one result row per image and task to its Parquet dataset.

    Only images and tasks that are not in the output yet are done, so an interrupted run resumes
    where it stopped and a nightly re-run does just the new images.

    \b
    Exit codes: 0 done (error rows included), 2 configuration error or changed settings,
    1 aborted, 3 error rows with --fail-on-error, 130/143 interrupted (resumable).

    Example: cogbatch run jobs/caption.yaml --input ~/Pictures --output outputs/pictures
    """
    from cogbatch.runner import RunOptions, SettingsChanged
    from cogbatch.runner import run as run_job

    _setup_logging(quiet)
    overrides = {
        "input": input_path,
        "output": output,
        "limit": limit,
        "device": device,
        "vram_ceiling": vram_ceiling,
        "batch_size": batch_size,
    }
    cfg = _load(job, overrides, pipeline)
    try:
        summary = run_job(cfg, RunOptions(redo_changed=redo_changed, fail_on_error=fail_on_error, quiet=quiet))
    except SettingsChanged as e:
        raise ConfigFailure(str(e)) from None
    except Exception as e:
        _abort(e)
    _emit(summary, as_json, _describe_run(summary))
    sys.exit(summary["exit_code"])


def _abort(e: Exception):
    """A problem with the model source is the user's to fix (exit 2); anything else aborts the run (exit 1)."""
    import os
    import traceback

    from cogbatch.model.weights import CheckpointError

    if isinstance(e, CheckpointError):
        raise ConfigFailure(str(e)) from None
    if os.environ.get("COGBATCH_DEBUG"):
        traceback.print_exc()
    raise click.ClickException(
        f"run aborted: {type(e).__name__}: {e} (set COGBATCH_DEBUG=1 for the traceback; "
        "rerun the same command to resume)"
    ) from None


def _describe_run(s: dict) -> str:
    if s.get("message"):
        return f"{s['message']} ({s['images']} images, {s['requests_total']} requests)."
    line = (
        f"{s['done']} ok, {s['failed']} failed, {s['skipped']} already done; {s['wall_s']:.1f} s, "
        f"{s['images_per_s']:.2f} images/s, {s['tokens_per_s']:.1f} generated tokens/s -> {s['output']}"
    )
    if s.get("interrupted"):
        line += " (interrupted: run the same command again to resume)"
    lines = [line, f"peak host memory {s['peak_host_rss_bytes'] / 2**30:.2f} GiB"]
    load = s.get("model_load") or {}
    if "summary" in load:
        lines.append(f"model: {load['summary']}")
    elif load:
        lines.append("model: " + ", ".join(f"{k} {v}" for k, v in load.items()))
    return "\n".join(lines)


@cli.command(short_help="Show done / failed / pending counts of a job without loading the model.")
@click.argument("job", type=click.Path(dir_okay=False))
@output_option
@pipeline_option
@json_option
def status(job, output, pipeline, as_json) -> None:
    """Show what JOB has done, failed and still has pending, per task.

    Example: cogbatch status jobs/caption.yaml
    """
    from cogbatch.status import job_status

    cfg = _load(job, {"output": output}, pipeline)
    report = job_status(cfg)
    lines = [f"{report['output']}: {report['images']} images"]
    for name, t in report["tasks"].items():
        lines.append(
            f"  {name}: {t['ok']} ok, {t['error']} failed, {t['pending']} pending"
            + (f", {t['stale']} made with other settings" if t["stale"] else "")
        )
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo("\n".join(lines))


@cli.command(short_help="Predict memory use and the largest batch that fits, without loading weights.")
@click.argument("job", type=click.Path(dir_okay=False))
def plan(job: str) -> None:
    """Predict device memory for JOB's model and quantization, and the batch size that fits.

    Example: cogbatch plan jobs/caption.yaml
    """
    raise NotAvailableYet("plan", 8)


@cli.command(short_help="Quantize a checkpoint ahead of time into the quantized-weights cache.")
@click.argument("model")
def quantize(model: str) -> None:
    """Quantize MODEL (hub id or local checkpoint directory) and store it in the cache.

    Example: cogbatch quantize THUDM/cogvlm2-llama3-chat-19B
    """
    raise NotAvailableYet("quantize", 8)


@cli.command(short_help="Install, remove or list a nightly cron entry for a job.")
@click.argument("job", type=click.Path(dir_okay=False))
def schedule(job: str) -> None:
    """Print or install a crontab line that runs JOB unattended, one run at a time.

    Example: cogbatch schedule jobs/caption.yaml --cron "0 2 * * *"
    """
    raise NotAvailableYet("schedule", 6)


@cli.command(short_help="Export results as .txt captions beside the images, JSONL or CSV.")
@click.argument("job", type=click.Path(dir_okay=False))
def export(job: str) -> None:
    """Export JOB's results, e.g. one .txt caption per image for LoRA training.

    Example: cogbatch export jobs/caption.yaml --format txt
    """
    raise NotAvailableYet("export", 6)


@cli.command(short_help="Merge an output dataset's part files into fewer files.")
@click.argument("output", type=click.Path(file_okay=False, exists=True))
@json_option
def compact(output, as_json) -> None:
    """Merge the part files of OUTPUT without changing its rows (crash-safe).

    Example: cogbatch compact outputs/caption
    """
    from cogbatch.store import compact as compact_parts
    from cogbatch.store import prepare_output

    prepare_output(Path(output))
    before, after = compact_parts(Path(output))
    _emit({"parts_before": before, "parts_after": after}, as_json, f"{output}: {before} part files -> {after}")


@cli.command(short_help="Smoke run on a tiny random model: no GPU, no download (its text is random).")
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    default="outputs/demo",
    show_default=True,
    help="Where the sample images and the result dataset go.",
)
@click.option("--images", "n_images", type=click.IntRange(1, 1000), default=8, show_default=True)
@json_option
@quiet_option
def demo(output, n_images, as_json, quiet) -> None:
    """Caption a few generated images with a tiny random model, to check an installation.

    The model has random weights, so the text it writes is random: this checks the machinery
    (loading, batching, Parquet output, resume), not caption quality. Runs on a CPU in seconds.
    Afterwards `cogbatch run jobs/demo.yaml` runs the same job from its YAML file.
    """
    from cogbatch.demo import demo_job
    from cogbatch.runner import RunOptions
    from cogbatch.runner import run as run_job

    _setup_logging(quiet)
    click.echo("NOTE: the demo model has random weights: its text is random.", err=True)
    cfg = demo_job(Path(output), n_images)
    try:
        summary = run_job(cfg, RunOptions(quiet=quiet))
    except Exception as e:
        _abort(e)
    _emit(summary, as_json, _describe_run(summary) + "\nNOTE: the text is random (random demo model).")
    sys.exit(summary["exit_code"])


def main() -> None:
    cli()
