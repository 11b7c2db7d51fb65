"""Commands about the model, not an output: `plan` (memory, from config.json) and `quantize` (the cache)."""

from __future__ import annotations

import click

from cogbatch.cli.app import (
    _emit,
    _reported,
    _setup_logging,
    cli,
    job_options,
    json_option,
    pipeline_option,
    verbose_option,
)


@cli.command(short_help="What fits a GPU (this one or one named), before any download.")
@click.argument("job", type=click.Path(dir_okay=False), required=False)
@click.option("--model", help="Plan for this model (alias, hub id, path, tiny-random:<arch>); without JOB: "
              "with pipeline.yaml's defaults.")
@click.option("--gpu", help='Plan for this card, e.g. "RTX 3060 12GB", 3090, T4, "A100 80GB".')
@click.option("--vram", help="Plan for a card with this much memory, e.g. 12GiB (with --capability).")
@click.option("--capability", help="The card's compute capability, e.g. 8.6 (with --vram): sets dtype and kernel.")
@click.option("--vram-ceiling", help="Plan for this ceiling instead of the job's (or the card's), e.g. 16GiB.")
@click.option("--device", help="Plan for cpu, cuda or cuda:N instead of the job's device (no GPU needed here).")
@job_options
@json_option
@click.option("--verbose", "-v", is_flag=True, help="Also what the planned peak is made of, per phase, and the "
              "fake-CUDA dry run's figures nearest to the plan.")
def plan(job, model, gpu, vram, capability, vram_ceiling, device, input_path, output, pipeline, as_json,
         verbose) -> None:  # fmt: skip
    """Predict device memory for JOB's model (or --model's) and the batch size that fits.

    Reads only config.json and downloads nothing: a local checkpoint's, the hub cache's, else the one
    cogbatch ships for the official CogVLM / CogVLM2 checkpoints. No image is read. Both execution
    modes are shown (all weights resident; phase-swapped: vision tower and language model take turns
    on the device), with and without embeddings_on_cpu.

    \b
    Examples:
      cogbatch plan jobs/caption.yaml --device cuda
      cogbatch plan --model cogvlm2 --gpu "RTX 3060 12GB"
      cogbatch plan --model cogvlm --vram 16GiB --capability 7.5 --json
    """
    from cogbatch.api import plan_job

    if job is None and model is None:
        raise click.UsageError("give a JOB file or --model NAME (e.g. cogbatch plan --model cogvlm2 --gpu 3090)")
    with _reported("plan failed"):
        report = plan_job(job, model=model, gpu=gpu, vram=vram, capability=capability, pipeline=pipeline,
                          vram_ceiling=vram_ceiling, device=device, input=input_path, output=output)  # fmt: skip
    _emit(report.to_dict(), report.describe(verbose), as_json, human_on_stdout=True)


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
@click.option("--verify", is_flag=True, help="Check every checksum of an existing entry (rebuilt if damaged).")
@pipeline_option
@json_option
@verbose_option
def quantize(model, out, quantization, rules, dtype, device, tokenizer, verify, pipeline, as_json, verbose) -> None:
    """Quantize MODEL (alias, hub id or local checkpoint) into the cache, e.g. on a bigger machine.

    The next load with the same checkpoint, rules and dtype reads the cache instead of quantizing.

    Example: cogbatch quantize cogvlm2 --rule "lm_head=none" --rule "*.vision_mlp.*=int8"
    """
    from cogbatch.api import quantize_checkpoint

    _setup_logging(False, verbose)
    with _reported("quantize failed"):
        report = quantize_checkpoint(model, out=out, quantization=quantization, rules=rules, dtype=dtype,
                                     device=device, tokenizer=tokenizer, pipeline=pipeline,
                                     verify=verify)  # fmt: skip
    _emit(report.to_dict(), report.describe(), as_json)
