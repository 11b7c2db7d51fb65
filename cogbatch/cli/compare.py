"""`cogbatch compare`: the job's quantization against a reference setting, on a sample of its images."""

from __future__ import annotations

import click

from cogbatch.cli.app import (
    _emit,
    _reported,
    _setup_logging,
    cli,
    json_option,
    output_option,
    pipeline_option,
    quiet_option,
)


@cli.command(short_help="Measure how much the job's quantization changes its answers, on a sample of its images.")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--sample", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images to compare, chosen reproducibly from the job's input.")
@click.option("--against", default="none", show_default=True,
              help="The reference: none (the compute dtype), int8, int4, int4-g32, int4-g64; +kv8 adds an "
              "8-bit KV cache (int4+kv8).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Which images are sampled.")
@click.option("--per-layer", is_flag=True,
              help="Also quantize one layer group at a time and name the group that moves the answers most.")
@click.option("--pairs", type=click.Path(dir_okay=False),
              help="Parquet file for the pairs (default: <output>.cogbatch/compare-<time>.parquet).")
@click.option("--against-device", help="Run the reference on cpu, cuda or cuda:N (default: the job's device; "
              "the CPU when the reference does not fit on the GPU).")
@click.option("--input", "input_path", type=click.Path(),
              help="A folder or Parquet manifest instead of the job's input.")
@output_option
@click.option("--vram-ceiling", help="Memory ceiling for both sides, e.g. 70GiB (overrides the job's).")
@pipeline_option
@json_option
@quiet_option
def compare(job, sample, against, seed, per_layer, pairs, against_device, input_path, output, vram_ceiling, pipeline,
            as_json, quiet) -> None:  # fmt: skip
    """Answer every task of JOB for a sample of its images twice: with the reference setting (a,
    --against) and with the job's quantization (b), one model loaded after the other, greedily, with
    the same prompts; print how far apart the answers are, per task.

    \b
    exact     share of identical texts
    prefix    share of tokens that agree before the two greedy paths first fork
    1st fork  mean token position of that fork (over the pairs that fork)
    TF top-1  a's tokens forced through b: how often b's most likely next token is a's
    TF KL     the same pass: mean KL(a || b) per token, in nats (0: the same distributions)
    chrF      character n-gram F-score of b's text against a's (0-100), ROUGE-L: word LCS F1 (0-1)

    Writes every pair (image, task, both texts, the scores) to a Parquet file beside the output;
    the output itself is not touched.

    Example: cogbatch compare jobs/caption.yaml --sample 20 --against int8 --per-layer
    """
    from cogbatch.api import compare_job
    from cogbatch.errors import exit_code_for

    _setup_logging(quiet)
    try:
        with _reported("compare failed"):  # a bad --against, an input without images, a model that cannot fit: 2
            report = compare_job(job, sample=sample, against=against, seed=seed, per_layer=per_layer, pairs=pairs,
                                 against_device=against_device, pipeline=pipeline, input=input_path,
                                 output=output, vram_ceiling=vram_ceiling)  # fmt: skip
    except KeyboardInterrupt as e:
        stopped = click.ClickException("interrupted: nothing was written")
        stopped.exit_code = exit_code_for(e)
        raise stopped from None
    _emit(report.to_dict(), report.describe(), as_json, human_on_stdout=not as_json)
