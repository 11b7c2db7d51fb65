"""The job loop of one process: pending work, image prefetch, batches, result rows, progress, signals.

    cfg = load_job("jobs/caption.yaml")
    summary = run(cfg)          # also: cogbatch.run_job(path, **overrides)

Nothing is lost on a crash: rows reach the output only as complete part files, and the next run
recomputes what is pending from those files. Bad images become error rows; only a bug or an
unusable model aborts the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from cogbatch.config import TINY_PREFIX, JobConfig
from cogbatch.images import ImageError, decode_image, read_image_bytes
from cogbatch.manifest import (
    ImageEntry,
    ManifestBytes,
    Request,
    build_entries,
    changed_settings,
    expand_requests,
    limit_images,
    pending,
    sha256_hex,
)
from cogbatch.store import PartWriter, done_keys, make_row, prepare_output

log = logging.getLogger("cogbatch")

EXIT_OK, EXIT_ABORTED, EXIT_CONFIG, EXIT_ROW_ERRORS = 0, 1, 2, 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class SettingsChanged(Exception):
    """Existing rows were made with other settings and the user did not ask to redo them."""


@dataclass
class LoadedImage:
    entry: ImageEntry
    pixels: Any = None  # (3, S, S) float tensor
    width: int | None = None
    height: int | None = None
    error: str | None = None


@dataclass
class RunOptions:
    redo_changed: bool = False
    fail_on_error: bool = False
    quiet: bool = False


# -- model ---------------------------------------------------------------------------------------


def tiny_model_dir(cfg: JobConfig) -> Path:
    """Build (once) the random model that `tiny-random:<arch>` names; its text is meaningless."""
    from filelock import FileLock

    from cogbatch.model.tiny import write_tiny_checkpoint

    arch = cfg.model[len(TINY_PREFIX) :] or "cogvlm2"
    target = cfg.cache_dir / "tiny-random" / arch
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            sizes = {"hidden_size": 32, "heads": 4, "kv_heads": 2} if arch == "cogvlm2" else {}
            write_tiny_checkpoint(target, arch=arch, seed=0, overwrite=True, **sizes)
    return target


def load_model(cfg: JobConfig):
    """The model for a job: hub id, local checkpoint or tiny random model, with the job's settings."""
    from cogbatch.model.cogvlm import CogVLM

    source = tiny_model_dir(cfg) if cfg.model.startswith(TINY_PREFIX) else cfg.model
    return CogVLM.from_pretrained(
        source,
        dtype=cfg.dtype,
        device=None if cfg.device == "auto" else cfg.device,
        quantization=cfg.quantization.to_model_arg(),
        tokenizer=cfg.tokenizer,
    )


def resolved_dtype(cfg: JobConfig) -> str:
    """The compute dtype a run will use, without loading the model (it enters the fingerprint)."""
    import torch

    from cogbatch.model.cogvlm import resolve_dtype

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return str(resolve_dtype(cfg.dtype, torch.device(device))).removeprefix("torch.")


# -- images --------------------------------------------------------------------------------------


def _load(entry: ImageEntry, cfg: JobConfig, image_size: int, inline: ManifestBytes | None) -> LoadedImage:
    """Read, verify, decode and preprocess one image; every failure is a reason, never an exception."""
    from cogbatch.model.preprocess import preprocess_image

    if entry.error:
        return LoadedImage(entry, error=entry.error)
    try:
        data = inline.get(entry.row) if entry.row is not None else read_image_bytes(entry.file)
        if sha256_hex(data) != entry.image_id:
            raise ImageError("file changed during the run (it will be done on the next run)")
        decoded = decode_image(data, max_pixels=cfg.max_pixels)
        pixels = preprocess_image(decoded.image, image_size)
        return LoadedImage(entry, pixels, decoded.width, decoded.height)
    except ImageError as e:
        return LoadedImage(entry, error=str(e))


def prefetch(entries: list[ImageEntry], cfg: JobConfig, image_size: int) -> Iterator[LoadedImage]:
    """Images in order, decoded by background threads at most `window` images ahead of the model."""
    inline = ManifestBytes(cfg.input.manifest, cfg.input.bytes_column) if cfg.input.bytes_column else None
    window = max(2 * cfg.batch_size, 2 * cfg.loader_threads)
    with ThreadPoolExecutor(cfg.loader_threads, thread_name_prefix="cogbatch-load") as pool:
        queue: list[Future] = []
        it = iter(entries)
        for e in it:
            queue.append(pool.submit(_load, e, cfg, image_size, inline))
            if len(queue) >= window:
                break
        while queue:
            result = queue.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                queue.append(pool.submit(_load, nxt, cfg, image_size, inline))
            yield result


# -- batches -------------------------------------------------------------------------------------


def postprocess(text: str, strip_prefixes: tuple[str, ...]) -> str:
    """Trim, and drop a configured boilerplate opening such as 'The image shows'."""
    text = text.strip()
    for prefix in strip_prefixes:
        if text.lower().startswith(prefix.lower()):
            rest = text[len(prefix) :].lstrip(" ,:;-")
            text = rest[:1].upper() + rest[1:]
            break
    return text


def error_row(req: Request, reason: str, cfg: JobConfig, run_id: str, img: LoadedImage | None = None) -> dict:
    return make_row(
        image_id=req.image.image_id,
        path=req.image.path,
        task=req.task.name,
        prompt=req.prompt,
        status="error",
        error=reason,
        width=img.width if img else None,
        height=img.height if img else None,
        model=cfg.model,
        quant=cfg.quantization.describe(),
        fingerprint=req.fingerprint,
        run_id=run_id,
    )


def run_batch(model, items: list[tuple[Request, LoadedImage]], cfg: JobConfig, run_id: str) -> list[dict]:
    """Generate for requests of one task and return their result rows (shared by every engine)."""
    from cogbatch.model.generate import GenerationConfig

    task = items[0][0].task
    g = task.generation
    gen = GenerationConfig(
        max_new_tokens=g.max_new_tokens,
        do_sample=g.do_sample,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        repetition_penalty=g.repetition_penalty,
        seed=g.seed,
    )
    samples = [model.build_inputs(None, req.prompt, img.pixels, task.template) for req, img in items]
    out = model.generate(model.collate(samples), gen)
    rows = []
    for i, (req, img) in enumerate(items):
        rows.append(
            make_row(
                image_id=req.image.image_id,
                path=req.image.path,
                task=task.name,
                prompt=req.prompt,
                text=postprocess(out.texts[i], task.strip_prefixes),
                status="ok",
                finish_reason=out.finish_reasons[i],
                tokens_in=out.prompt_tokens[i],
                tokens_out=len(out.token_ids[i]),
                width=img.width,
                height=img.height,
                model=cfg.model,
                quant=cfg.quantization.describe(),
                fingerprint=req.fingerprint,
                run_id=run_id,
            )
        )
    return rows


# -- the run -------------------------------------------------------------------------------------


class _StopFlag:
    """First Ctrl-C / SIGTERM: finish the batch in flight, flush, exit. A second one: stop at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. a notebook worker): no handlers
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("stopping after the batch in flight (signal %d); press Ctrl-C again to stop at once", signum)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


class _Progress:
    """A tqdm bar on a terminal; periodic log lines otherwise (cron logs stay readable)."""

    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.tty = sys.stderr.isatty() and not quiet
        self.quiet = quiet
        self.bar = tqdm(total=total, unit="req", desc="cogbatch", file=sys.stderr, disable=not self.tty)
        self.total, self.done, self.errors = total, 0, 0
        self.last_log = time.monotonic()

    def update(self, n: int, errors: int) -> None:
        self.done += n
        self.errors += errors
        self.bar.update(n)
        self.bar.set_postfix(errors=self.errors, refresh=False)
        if not self.tty and not self.quiet and time.monotonic() - self.last_log > 30:
            self.last_log = time.monotonic()
            log.info("%d/%d requests done, %d errors", self.done, self.total, self.errors)

    def close(self) -> None:
        self.bar.close()


def _peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def write_resolved_config(cfg: JobConfig) -> None:
    target = cfg.output / "config.resolved.yaml"
    tmp = target.with_name(f".tmp-{os.getpid()}-config.resolved.yaml")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, target)


def run(cfg: JobConfig, options: RunOptions | None = None) -> dict[str, Any]:
    """Run a validated job and return its summary (`exit_code` says how it ended)."""
    opts = options or RunOptions()
    started = time.time()
    # Pillow warns once per process about odd EXIF blocks; such an image still decodes fine.
    warnings.filterwarnings("ignore", message="(Possibly )?[Cc]orrupt EXIF", category=UserWarning)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    prepare_output(cfg.output)
    dtype = resolved_dtype(cfg)
    fingerprints = {t.name: cfg.fingerprint(t, dtype) for t in cfg.tasks}
    done = done_keys(cfg.output)
    changed = changed_settings(done, fingerprints)
    registry = SettingsRegistry(cfg.output)
    if changed and not opts.redo_changed:
        raise SettingsChanged(_changed_message(cfg, changed, registry, fingerprints, dtype))
    registry.record({fingerprints[t.name]: {**cfg.fingerprint_fields(t), "dtype": dtype} for t in cfg.tasks})
    write_resolved_config(cfg)

    entries = build_entries(cfg)
    requests = expand_requests(entries, cfg, fingerprints)
    open_requests = pending(requests, done, opts.redo_changed)
    todo = limit_images(open_requests, cfg.limit)
    summary: dict[str, Any] = {
        "run_id": run_id,
        "output": str(cfg.output),
        "model": cfg.model,
        "quant": cfg.quantization.describe(),
        "images": len({e.image_id for e in entries}),
        "requests_total": len(requests),
        "skipped": len(requests) - len(open_requests),
        "pending": len(todo),
        "done": 0,
        "failed": 0,
        "generated_tokens": 0,
        "model_loaded": False,
    }

    stop = _StopFlag()
    progress = _Progress(len(todo), opts.quiet)
    writer = PartWriter(cfg.output, run_id, flush_rows=cfg.flush_rows, flush_seconds=cfg.flush_seconds)
    try:
        with stop, writer:
            _process(cfg, todo, writer, progress, summary, stop, run_id)
    finally:
        progress.close()
    wall = time.time() - started
    summary.update(
        {
            "wall_s": round(wall, 3),
            "images_per_s": round(len({r.image.image_id for r in todo}) / wall, 3) if wall else 0.0,
            "tokens_per_s": round(summary["generated_tokens"] / wall, 2) if wall else 0.0,
            "peak_host_rss_bytes": _peak_rss_bytes(),
            "parts_written": len(writer.parts_written),
        }
    )
    if stop.signum is not None:
        summary["exit_code"] = EXIT_SIGNAL[stop.signum]
        summary["interrupted"] = True
    elif opts.fail_on_error and summary["failed"]:
        summary["exit_code"] = EXIT_ROW_ERRORS
    else:
        summary["exit_code"] = EXIT_OK
    return summary


def _process(cfg, todo, writer, progress, summary, stop, run_id) -> None:
    """Error rows for what cannot run; batches through the model for the rest."""
    runnable = []
    for r in todo:
        reason = r.image.error or r.error
        if reason:
            writer.add(error_row(r, reason, cfg, run_id))
            summary["failed"] += 1
            progress.update(1, 1)
        else:
            runnable.append(r)
    if not runnable or stop.signum is not None:
        if not todo:
            summary["message"] = "nothing to do: every image and task is already in the output"
        return

    model = load_model(cfg)
    summary["model_loaded"] = True
    summary["model_load"] = _load_report(model)
    by_image: dict[str, list[Request]] = {}
    for r in runnable:
        by_image.setdefault(r.image.image_id, []).append(r)
    images = [reqs[0].image for reqs in by_image.values()]
    buffers: dict[str, list[tuple[Request, LoadedImage]]] = {t.name: [] for t in cfg.tasks}

    def flush(task_name: str) -> None:
        items = buffers[task_name]
        if items:
            rows = run_batch(model, items, cfg, run_id)
            for row in rows:
                writer.add(row)
            summary["done"] += len(rows)
            summary["generated_tokens"] += sum(row["tokens_out"] or 0 for row in rows)
            progress.update(len(rows), 0)
            buffers[task_name] = []

    for img in prefetch(images, cfg, model.config.vision.image_size):
        if stop.signum is not None:
            break
        for req in by_image[img.entry.image_id]:
            if img.error:
                writer.add(error_row(req, img.error, cfg, run_id, img))
                summary["failed"] += 1
                progress.update(1, 1)
                continue
            buffers[req.task.name].append((req, img))
            if len(buffers[req.task.name]) >= cfg.batch_size:
                flush(req.task.name)
    if stop.signum is None:
        for name in list(buffers):
            flush(name)


def _load_report(model) -> dict[str, Any]:
    report = getattr(model, "load_report", None)
    if report is None:
        return {"dtype": str(model.dtype), "device": str(model.device)}
    return report.to_dict() if hasattr(report, "to_dict") else dict(report)


class SettingsRegistry:
    """fingerprint -> the settings behind it, kept beside the output so a change can be named."""

    def __init__(self, output: Path) -> None:
        self.file = output / ".cogbatch" / "settings.json"
        try:
            self.known: dict[str, dict[str, Any]] = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.known = {}

    def record(self, settings: dict[str, dict[str, Any]]) -> None:
        if all(fp in self.known for fp in settings):
            return
        self.known.update(settings)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".tmp-{os.getpid()}-settings.json")
        tmp.write_text(json.dumps(self.known, indent=1, sort_keys=True))
        os.replace(tmp, self.file)


def _changed_message(
    cfg: JobConfig, changed: dict[str, int], registry: SettingsRegistry, fingerprints: dict[str, str], dtype: str
) -> str:
    done = {(task, fp) for (_, task), fp in done_keys(cfg.output).items()}
    lines = []
    for task in cfg.tasks:
        if task.name not in changed:
            continue
        new = {**cfg.fingerprint_fields(task), "dtype": dtype}
        diffs = set()
        for t, fp in done:
            old = registry.known.get(fp) if t == task.name and fp != fingerprints[task.name] else None
            if old:
                diffs |= {f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k)}
        what = "; ".join(sorted(diffs)) or "settings not recorded"
        lines.append(f"task {task.name!r} ({changed[task.name]} rows): {what}")
    return (
        f"the output {cfg.output} holds rows made with other settings - "
        + " | ".join(lines)
        + ". Run with --redo-changed to redo them with the new settings, or write to another --output."
    )
