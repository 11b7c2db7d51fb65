"""The `cogbatch` command line: parses arguments and delegates; no work happens in this module.

Heavy libraries (torch, transformers, pyarrow) are imported inside the commands that need them so
that `cogbatch --help` answers at once.
"""

from __future__ import annotations

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


@cli.command(short_help="Run a job: caption / answer questions about a folder or a Parquet manifest.")
@click.argument("job", type=click.Path(dir_okay=False))
def run(job: str) -> None:
    """Run JOB (a YAML file) and write one result row per image and task to its Parquet dataset.

    Example: cogbatch run jobs/caption.yaml
    """
    raise NotAvailableYet("run", 4)


@cli.command(short_help="Show done / failed / pending counts of a job without loading the model.")
@click.argument("job", type=click.Path(dir_okay=False))
def status(job: str) -> None:
    """Show what JOB has done, failed and still has pending.

    Example: cogbatch status jobs/caption.yaml
    """
    raise NotAvailableYet("status", 4)


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
@click.argument("output", type=click.Path(file_okay=False))
def compact(output: str) -> None:
    """Merge the part files of OUTPUT without changing its rows.

    Example: cogbatch compact outputs/caption
    """
    raise NotAvailableYet("compact", 4)


@cli.command(short_help="Smoke run on a tiny random model: no GPU, no download (its text is random).")
def demo() -> None:
    """Build a tiny random model and run a small job with it, to check an installation.

    The text it writes is random: the model has random weights.
    """
    raise NotAvailableYet("demo", 4)


def main() -> None:
    cli()
