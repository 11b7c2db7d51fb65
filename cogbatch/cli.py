"""The `cogbatch` command line: parses arguments and delegates; no work happens in this module.

Heavy libraries (torch, transformers, pyarrow) are imported inside the commands that need them so
that `cogbatch --help` answers at once.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import sys
from pathlib import Path

import click

from cogbatch import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


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


def _emit(summary: dict, as_json: bool, human: str, quiet: bool = False) -> None:
    """JSON on stdout as one line (a cron log of `--quiet --json` runs is one JSON line per run); the
    human summary on stderr unless quiet."""
    if as_json:
        click.echo(json.dumps(summary, default=str))  # no indent: one line
    if not quiet:
        click.echo(human, err=True)


def _stop_at_once_on_signals() -> dict:
    """Until the run installs its own handlers, Ctrl-C / SIGTERM stop at once and exit 130 / 143.

    Nothing has started then (config, imports, the lock), so stopping at once loses nothing; without
    this, SIGTERM would kill the process with no exit code of ours and Ctrl-C would exit 1. Returns
    the handlers it replaced (none when not called from the main thread, where Python allows none).
    """
    import contextlib

    from cogbatch.exits import Interrupted

    def stop(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):
            previous[s] = signal.signal(s, stop)
    return previous


def exits_on_signals(command):
    """Ctrl-C / SIGTERM end `command` with 130 / 143, never click's "Aborted!" (exit 1) or a silent kill.

    Before the run takes over the signals they stop at once; during the run the first one finishes the
    batch in flight and a second one stops at once (`runner._StopFlag`); every row written is kept.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        previous = _stop_at_once_on_signals()
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt as e:
            from cogbatch.exits import exit_code_for

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
@click.option(
    "--input", "input_path", type=click.Path(), help="A folder or Parquet manifest to use instead of the job's input."
)
@output_option
@click.option("--limit", type=click.IntRange(min=1), help="Process at most N new images in this run.")
@click.option("--device", help="cpu, cuda or cuda:N (overrides the job).")
@click.option("--vram-ceiling", help="Memory ceiling for batches, e.g. 11GiB (overrides the job).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Cap on sequences decoded together (default: planned).")
@click.option("--redo-changed", is_flag=True, help="Redo tasks whose settings changed since their rows were made.")
@click.option(
    "--retry-errors", is_flag=True, help="Redo image/task pairs whose current row is an error (an OOM, a fixed file)."
)
@click.option("--fail-on-error", is_flag=True, help="Exit with code 3 when any image ended as an error row.")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process; ray: a Ray cluster (RAY_ADDRESS, else a local one; needs cogbatch[ray]).",
)
@click.option(
    "--workers", type=click.IntRange(min=1), help="Ray actors, one model each (default: one per GPU, else 1-2)."
)
@click.option(
    "--gallery",
    "refresh_gallery",
    is_flag=True,
    help="Refresh the HTML gallery afterwards (as the job key gallery: true).",
)
@pipeline_option
@json_option
@quiet_option
@exits_on_signals
def run(
    job,
    input_path,
    output,
    limit,
    device,
    vram_ceiling,
    batch_size,
    redo_changed,
    retry_errors,
    fail_on_error,
    engine,
    workers,
    refresh_gallery,
    pipeline,
    as_json,
    quiet,
) -> None:
    """Run JOB (a YAML file) and write one result row per image and task to its Parquet dataset.

    Only images and tasks that are not in the output yet are done, so an interrupted run resumes
    where it stopped and a nightly re-run does just the new images.

    \b
    Exit codes: 0 done (error rows included), 2 configuration error or changed settings,
    1 aborted, 3 error rows with --fail-on-error, 75 another run of this output is going,
    130/143 interrupted (resumable).

    Example: cogbatch run jobs/caption.yaml --input ~/Pictures --output outputs/pictures
    """
    from cogbatch.runner import RunOptions
    from cogbatch.runner import run as run_job

    _setup_logging(quiet)
    if workers is not None and engine != "ray":
        raise click.UsageError("--workers applies to --engine ray only")
    overrides = {
        "input": input_path,
        "output": output,
        "limit": limit,
        "device": device,
        "vram_ceiling": vram_ceiling,
        "batch_size": batch_size,
        "workers": workers,
    }
    cfg = _load(job, overrides, pipeline)
    options = RunOptions(
        redo_changed=redo_changed, retry_errors=retry_errors, fail_on_error=fail_on_error, quiet=quiet
    )
    try:
        if engine == "ray":
            from cogbatch.engines.ray import run_ray

            summary = run_ray(cfg, options, workers=cfg.workers)  # checks the output after the extra
        else:
            summary = run_job(cfg, options)
    except Exception as e:
        _abort(e)
    if refresh_gallery or cfg.gallery:  # a gallery problem is a warning: the run's exit code stands
        from cogbatch.gallery import refresh_after_run

        summary["gallery"] = refresh_after_run(cfg, summary)
    _emit(summary, as_json, _describe_run(summary), quiet)
    sys.exit(summary["exit_code"])


def _abort(e: Exception, what: str = "run aborted", resumable: bool = True):
    """The user's to fix (config, model source, ceiling, engine option): exit 2, nothing was done; another
    run holds the output: exit 75; anything else aborts the command (exit 1), with `what` it was. The
    codes come from `cogbatch.exits`, which the run history uses too."""
    import os
    import traceback

    from cogbatch.exits import EXIT_CONFIG, EXIT_LOCKED, exit_code_for

    code = exit_code_for(e)
    if code == EXIT_CONFIG:
        raise ConfigFailure(str(e)) from None
    if code == EXIT_LOCKED:  # EX_TEMPFAIL: cron and scripts can tell "busy" from "failed"
        busy = click.ClickException(f"{e}; this run did nothing (exit {code}: try again when that one ends)")
        busy.exit_code = code
        raise busy from None
    if os.environ.get("COGBATCH_DEBUG"):
        traceback.print_exc()
    resume = "; rerun the same command to resume" if resumable else ""
    raise click.ClickException(
        f"{what}: {type(e).__name__}: {e} (set COGBATCH_DEBUG=1 for the traceback{resume})"
    ) from None


def _describe_run(s: dict) -> str:
    """The human summary (stderr): counts and rates, memory, the model that was loaded."""
    if s.get("message"):
        if s.get("interrupted"):
            return f"{s['message']}; run the same command again."
        return f"{s['message']} ({s['images']} images, {s['requests_total']} requests)."
    line = (
        f"{s['done']} ok, {s['failed']} failed, {s['skipped']} already done; {s['wall_s']:.1f} s, "
        f"{s['images_per_s']:.2f} images/s, {s['tokens_per_s']:.1f} generated tokens/s -> {s['output']}"
    )
    if s.get("interrupted"):
        line += " (interrupted: run the same command again to resume)"
    memory = f"peak host memory {s['peak_host_rss_bytes'] / 2**30:.2f} GiB"
    if s.get("peak_device_bytes"):
        memory += f", peak device memory {s['peak_device_bytes'] / 2**30:.2f} GiB"
    lines = [line, memory]
    if s.get("model_load"):
        lines.append(_describe_model(s["model_load"], s))
    return "\n".join(lines)


def _describe_model(load: dict, s: dict) -> str:
    """One line from the load report's fields: what was loaded, where, how fast, and the batch plan."""
    line = f"model: {load.get('checkpoint', s.get('model'))} on {load.get('device', '?')} ({load.get('dtype', '?')}"
    line += f", {load['quantization']})" if load.get("quantization") else ")"
    if isinstance(load.get("total_s"), int | float):
        line += f", loaded in {load['total_s']:.1f} s"
    if load.get("total_weight_bytes"):
        line += f", weights {load['total_weight_bytes'] / 2**30:.2f} GiB"
    if load.get("cache_hit"):
        line += " (from the quantized-weights cache)"
    if s.get("execution_mode"):
        line += f"; {s['execution_mode']} mode, planned batch {s.get('planned_batch')}"
    return line


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
    from cogbatch.status import job_status

    cfg = _load(job, {"output": output}, pipeline)
    if history:
        from cogbatch.history import format_table, read_history

        warnings: list[str] = []
        records = read_history(cfg.output, warn=warnings.append)
        for warning in warnings:  # stderr: --json output stays parseable
            click.echo(f"warning: {warning}", err=True)
        if as_json:
            click.echo(json.dumps(records, indent=2))
        elif records:
            click.echo(format_table(records))
        else:
            click.echo(f"{cfg.output}: {'no readable runs' if warnings else 'no runs recorded yet'}", err=True)
        return
    from cogbatch.config import ConfigError
    from cogbatch.lock import current_holder, describe_holder

    try:
        report = job_status(cfg)
    except ConfigError as e:  # a part file that is not one (store.ResultFileError)
        raise ConfigFailure(str(e)) from None
    report["running"] = current_holder(cfg.output)  # a run holding the output's lock now, or None
    lines = [f"{report['output']}: {report['images']} images"]
    if report["running"] is not None:
        lines.append(f"  running now: {describe_holder(report['running'])}")
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
    from cogbatch.planner import job_plan

    cfg = _load(job, {"vram_ceiling": vram_ceiling, "device": device}, pipeline)
    try:
        report = job_plan(cfg)
    except Exception as e:
        _abort(e, "plan failed", resumable=False)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(_describe_plan(report))


def _describe_plan(r: dict) -> str:
    gib = 2**30
    w = r["weights"]
    lines = [
        f"{r['model']} ({r['generation']}), {r['quantization']}, {r['dtype']} on {r['device']}, "
        f"ceiling {r['vram_ceiling'] / gib:.2f} GiB",
        f"weights on the device: {w['device'] / gib:.2f} GiB (vision {w['vision'] / gib:.2f}, language "
        f"{w['language'] / gib:.2f}, embeddings {w['embeddings'] / gib:.2f}, lm_head {w['lm_head'] / gib:.2f})",
        "  by dtype: " + ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in sorted(w["by_dtype"].items())),
        f"per request: KV cache {r['per_request']['kv_cache_bytes'] / gib:.3f} GiB (image prefix "
        f"{r['per_request']['image_prefix_bytes'] / gib:.3f}), vision activations "
        f"{r['per_request']['vision_activation_bytes_per_image'] / gib:.3f} GiB per image",
    ]
    for mode, m in r["modes"].items():
        verdict = f"largest batch {m['largest_batch']}" if m["fits"] else "does not fit"
        lines.append(f"{mode:>9}: batch 1 needs {m['peak_bytes_batch_1'] / gib:.2f} GiB -> {verdict}")
    p = r["plan"]
    lines.append(f"plan: {p['mode']} mode, batch {p['slots']}" if p.get("mode") else f"plan: {p['error']}")
    lines += [f"  note: {note}" for note in (*p.get("notes", ()), *r.get("notes", ()))]
    return "\n".join(lines)


@cli.command(short_help="Quantize a checkpoint ahead of time into the quantized-weights cache.")
@click.argument("model")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Cache directory to fill (default: the pipeline's "
    "cache_dir, or $COGBATCH_CACHE_DIR). Point the runs' cache_dir at it.",
)
@click.option("--quantization", "-q", default="int4", show_default=True, help="int4, int4-g32, int4-g64, int8.")
@click.option(
    "--rule",
    "rules",
    multiple=True,
    metavar="PATTERN=DTYPE",
    help="Mixed precision: module glob = int4 | int4-g32 | int4-g64 | int8 | none, first match wins (repeatable).",
)
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp16", "fp32"]),
    default="bf16",
    show_default=True,
    help="Compute dtype of the runs that will use the cache (part of its key).",
)
@click.option("--device", default="cpu", show_default=True, help="Where to quantize (cpu or cuda).")
@click.option("--tokenizer", help="Tokenizer to load when the checkpoint has none.")
@pipeline_option
@json_option
def quantize(model, out, quantization, rules, dtype, device, tokenizer, pipeline, as_json) -> None:
    """Quantize MODEL (alias, hub id or local checkpoint) into the cache, e.g. on a bigger machine.

    The next load with the same checkpoint, rules and dtype reads the cache instead of quantizing.

    Example: cogbatch quantize cogvlm2 --rule "lm_head=none" --rule "*.vision_mlp.*=int8"
    """
    import os

    from cogbatch.config import (
        BUILTIN_PIPELINE,
        ConfigError,
        _name_map,
        _quantization,
        find_pipeline_file,
        read_yaml,
    )

    try:
        pipe_path = Path(pipeline) if pipeline else find_pipeline_file(None)
        pipe = {**BUILTIN_PIPELINE, **(read_yaml(pipe_path, "pipeline file") if pipe_path else {})}
        aliases = _name_map(pipe, "models", pipe_path, "a hub id or a checkpoint path")
        tokenizers = _name_map(pipe, "tokenizers", pipe_path, "a tokenizer's hub id or path")
        parsed = []
        for r in rules:
            pattern, sep, qtype = r.rpartition("=")
            if not sep or not pattern:
                raise ConfigError(f"--rule {r!r}: expected PATTERN=DTYPE, e.g. lm_head=none")
            parsed.append({"pattern": pattern, "dtype": qtype})
        base = _quantization(quantization, "--quantization")
        if base.default == "none":
            raise ConfigError("--quantization: none has nothing to cache; use int4, int4-g32, int4-g64 or int8")
        spec = _quantization({"default": base.default, "group_size": base.group_size, "rules": parsed}, "--rule")
        _check_quantize_device(device)
        cache = Path(out or os.environ.get("COGBATCH_CACHE_DIR") or pipe.get("cache_dir") or "~/.cache/cogbatch")
        try:  # before minutes of quantizing: the entry is this command's only output
            cache.expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cache directory {cache}: cannot create it ({e.strerror or e})") from None
        if not os.access(cache.expanduser(), os.W_OK | os.X_OK):
            raise ConfigError(f"cache directory {cache}: not writable")
    except ConfigError as e:
        raise ConfigFailure(str(e)) from None
    source = aliases.get(model, model)
    try:
        from cogbatch.model.cogvlm import CogVLM

        loaded = CogVLM.from_pretrained(
            source,
            dtype=dtype,
            device=device,
            quantization=spec.to_model_arg(),
            tokenizer=tokenizer or tokenizers.get(source),
            cache_dir=cache.expanduser(),
        )
    except Exception as e:
        _abort(e, "quantize failed", resumable=False)
    report = loaded.load_report.to_dict()
    if report["cache_status"] not in ("hit", "written"):  # writing the entry is this command's only job
        raise ConfigFailure(f"the quantized-weights cache was not written under {cache}: {report['cache_status']}")
    _emit(report, as_json, f"{source}: {loaded.load_report.summary()}\ncache: {report['cache_path']}")


def _check_quantize_device(device: str) -> None:
    from cogbatch.config import ConfigError

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"--device: must be cpu, cuda or cuda:N (got {device!r})")
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__}); use cpu")
    if int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


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
            if as_json:
                click.echo(json.dumps(entries, indent=2))
            elif entries:
                click.echo(sched.format_entries(entries))
            else:
                click.echo("no cogbatch entries in your crontab", err=True)
            return
        if action == "remove":
            n = sched.remove(job)
            human = (
                f"removed {n} crontab entr{'y' if n == 1 else 'ies'} for {job}"
                if n
                else (f"no crontab entry for {job}: nothing removed")
            )
            _emit({"removed": n, "job": str(Path(job).resolve())}, as_json, human)
            return
        try:
            expr = sched.validate_cron(cron_expr)
        except sched.CronError as e:
            raise click.BadParameter(str(e), param_hint="--cron") from None
        cfg = _load(job, {"output": output}, pipeline)
        entry = sched.build_entry(job, expr, cfg.output, output_override=output is not None, pipeline=pipeline)
        if action == "print":
            if as_json:
                click.echo(json.dumps(entry.to_dict(), indent=2))
            else:
                click.echo(entry.line)
                click.echo(f"(not installed: add --install to put it in your crontab; log: {entry.log})", err=True)
            return
        result = sched.install(entry)
        _emit({**entry.to_dict(), "result": result}, as_json, f"crontab line {result}: {entry.line}\nlog: {entry.log}")
    except sched.ScheduleError as e:
        err = click.ClickException(str(e))
        err.exit_code = e.exit_code  # 2 for a path the crontab cannot hold, 1 for a crontab failure
        raise err from None


@cli.command(short_help="Export results as .txt captions beside the images, JSONL or CSV.")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["txt", "jsonl", "csv"]), required=True, help="What to write.")
@click.option(
    "--task",
    help="txt: the task whose text is written (required when the job has several). jsonl/csv: only this task's rows.",
)
@click.option(
    "--dest",
    type=click.Path(file_okay=False),
    help="txt: mirror the input tree under DIR instead of writing beside the images. "
    "jsonl/csv: write DIR/<output name>.<format> instead of stdout.",
)
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
    from cogbatch.config import ConfigError
    from cogbatch.export import DestinationError, ExportError, export_rows, export_txt

    if fmt != "txt" and dest is None and as_json:
        raise click.UsageError(f"--json needs --dest with --format {fmt} (the rows themselves go to stdout)")
    cfg = _load(job, {"output": output}, pipeline)
    try:
        if fmt == "txt":
            report = export_txt(cfg, task, Path(dest) if dest else None, overwrite)
        else:
            report = export_rows(cfg, fmt, task, Path(dest) if dest else None, overwrite)
    except (DestinationError, ConfigError) as e:  # an unwritable DEST; a part file that is not one
        raise ConfigFailure(str(e)) from None
    except ExportError as e:
        raise click.UsageError(str(e)) from None
    _emit(report.to_dict(), as_json, report.describe())


@cli.command(short_help="Write an HTML page that shows each image beside its captions.")
@click.argument("job", type=click.Path(dir_okay=False))
@output_option
@click.option(
    "--dest",
    type=click.Path(dir_okay=False),
    help="The page to write (default: <output>.cogbatch/gallery/index.html); thumbnails go in thumbs/ beside it.",
)
@click.option("--task", help="Only this task's rows.")
@click.option(
    "--status",
    type=click.Choice(["ok", "error", "all"]),
    default="all",
    show_default=True,
    help="Only rows of this status.",
)
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
    from cogbatch.config import ConfigError
    from cogbatch.gallery import build_gallery

    _setup_logging(quiet)
    cfg = _load(job, {"output": output}, pipeline)
    try:
        result = build_gallery(cfg, dest, task=task, status=status, limit=limit)
    except ConfigError as e:  # no results, an unknown task, an unwritable destination, a bad part file
        raise ConfigFailure(str(e)) from None
    _emit(result.to_dict(), as_json, result.describe(), quiet)


@cli.command(short_help="Merge an output dataset's part files into fewer files.")
@click.argument("output", type=click.Path(file_okay=False, exists=True))
@json_option
def compact(output, as_json) -> None:
    """Merge the part files of OUTPUT without changing its rows (crash-safe).

    Example: cogbatch compact outputs/caption
    """
    from cogbatch.config import ConfigError
    from cogbatch.store import compact as compact_parts
    from cogbatch.store import prepare_output

    try:
        prepare_output(Path(output))
        before, after = compact_parts(Path(output))
    except ConfigError as e:  # a part file that is not one: nothing was changed
        raise ConfigFailure(str(e)) from None
    except OSError as e:  # a read-only output (even its .compact.lock), a full disk: rolled back
        raise ConfigFailure(f"cannot write {e.filename or output}: {e.strerror or e}") from None
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
@exits_on_signals
def demo(output, n_images, as_json, quiet) -> None:
    """Caption a few generated images with a tiny random model, to check an installation.

    The model has random weights, so the text it writes is random: this checks the machinery
    (loading, batching, Parquet output, resume), not caption quality. Runs on a CPU in seconds.
    In a checkout, `cogbatch run jobs/demo.yaml` runs the same job from its YAML file.
    """
    from cogbatch.demo import demo_job
    from cogbatch.runner import RunOptions
    from cogbatch.runner import run as run_job

    _setup_logging(quiet)
    try:  # the run itself warns that the text is random, also with --quiet
        summary = run_job(demo_job(Path(output), n_images), RunOptions(quiet=quiet))
    except Exception as e:
        _abort(e)
    _emit(summary, as_json, _describe_run(summary) + "\nNOTE: the text is random (random demo model).", quiet)
    sys.exit(summary["exit_code"])


_PROGRAM = "cogbatch-program"  # the root context's obj when running as the `cogbatch` executable


def main() -> None:
    """The `cogbatch` executable. An exception no command turned into a message (a bug, or a failure
    nobody foresaw) still ends in one line with an exit code, not a traceback; COGBATCH_DEBUG=1 shows it."""
    import os

    try:
        cli(obj=_PROGRAM)
    except Exception as e:
        if os.environ.get("COGBATCH_DEBUG"):
            raise
        from cogbatch.exits import exit_code_for

        click.echo(f"Error: {type(e).__name__}: {e} (set COGBATCH_DEBUG=1 for the traceback)", err=True)
        sys.exit(exit_code_for(e))
