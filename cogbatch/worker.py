"""The unit of work every engine shares: one loaded model turning images + requests into result rows.

The local runner and the Ray engine differ only in how they schedule; both hand a `Worker` chunks
of decoded images with the requests about them, and both get back complete result rows. The
worker is the pipeline's only contact with the model (load, preprocess, generate).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogbatch.config import TINY_PREFIX, JobConfig
from cogbatch.images import ImageError, decode_image, read_image_bytes
from cogbatch.manifest import ImageEntry, ManifestBytes, Request, sha256_hex
from cogbatch.model.settings import SEED_LIMIT
from cogbatch.store import make_row

log = logging.getLogger("cogbatch")


@dataclass
class LoadedImage:
    entry: ImageEntry
    pixels: Any = None  # (3, S, S) float tensor
    width: int | None = None
    height: int | None = None
    error: str | None = None


# -- model ---------------------------------------------------------------------------------------


def tiny_model_dir(cfg: JobConfig) -> Path:
    """Build (once) the random model that `tiny-random:<arch>` names; its text is meaningless."""
    from filelock import FileLock

    from cogbatch.testing.tiny import write_tiny_checkpoint

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
        dtype=resolved_dtype(cfg),
        device=None if cfg.device == "auto" else cfg.device,
        quantization=cfg.quantization.effective(),
        tokenizer=cfg.tokenizer,
        cache_dir=cfg.cache_dir,
        dequant_threshold=cfg.quantization.dequant_threshold,
    )


def resolved_dtype(cfg: JobConfig) -> str:
    """The compute dtype a run will use, without loading the model (it enters the fingerprint)."""
    import torch

    from cogbatch.model.cogvlm import resolve_dtype

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype == "auto" and device == "cpu" and cfg.quantization.effective() is not None:
        return "bfloat16"  # quantized on CPU: bf16 is what gets the fused int4 kernel (TinyGemm)
    return str(resolve_dtype(cfg.dtype, torch.device(device))).removeprefix("torch.")


# -- images --------------------------------------------------------------------------------------


def load_entry(entry: ImageEntry, cfg: JobConfig, image_size: int, inline: ManifestBytes | None) -> LoadedImage:
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


# -- rows ----------------------------------------------------------------------------------------


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
        quant=cfg.quantization.label(),
        fingerprint=req.fingerprint,
        run_id=run_id,
    )


# -- the worker ----------------------------------------------------------------------------------

STAT_KEYS = (
    "requests",
    "batches",
    "decode_steps",
    "decode_rows",
    "prefill_tokens",
    "prefill_padding",
    "vision_encodes",
    "prefix_prefills",
    "prefix_reuses",
    "oom_splits",
    "repetition_retries",
    "generated_tokens",
    "model_compute_s",
    "phase_swap_s",
)
DEFAULT_MAX_TEXT = 128  # prompt tokens assumed when planning, before the prompts are seen


def _on_host(module: Any, device: Any) -> bool:
    """A module whose own parameters the loader left on the CPU while the model runs on a GPU."""
    params = list(module.parameters(recurse=False))
    return device.type != "cpu" and bool(params) and all(p.device.type == "cpu" for p in params)


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError)


def _image_major(requests: list[Any]) -> list[Any]:
    """Engine order: image by image (so one image prefix is held at a time), shorter prompts first.

    Images whose prompts are shorter come first, and within an image shorter prompts first, so the
    requests entering the engine together have similar lengths; ties keep the input order.
    """
    by_image: dict[str, list[Any]] = {}
    for r in requests:
        by_image.setdefault(r.prefix, []).append(r)
    groups = sorted(by_image.values(), key=lambda g: max(len(r.text_ids) for r in g))
    return [r for g in groups for r in sorted(g, key=lambda r: len(r.text_ids))]


class _DeviceMeter:
    """Wall time of one phase, and with `peak` its device memory; on CUDA it synchronises at the phase's ends only.

    Measuring the peak resets CUDA's peak statistics at the phase start (the load's own peak, or
    the other phase's, must not count), so the worker measures only until it has calibrated.
    """

    def __init__(self, device: Any, peak: bool) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.device = device
        self.peak = peak and self.cuda
        if self.cuda:
            torch.cuda.synchronize(device)
        if self.peak:
            self.base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        self.t = time.perf_counter()

    def stop(self) -> tuple[float, int | None]:
        """(seconds, device bytes allocated beyond what the phase started with, or None)."""
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.t
        return seconds, torch.cuda.max_memory_allocated(self.device) - self.base if self.peak else None


def usable_ceiling(ceiling: int, device: Any) -> int:
    """The ceiling the planner may use on `device`: `vram_ceiling`, or what the GPU can still give if less.

    `vram_ceiling` is 11 GiB by default whatever the card; on an 8 GiB card, or one another process
    shares, a plan for 11 GiB would run out of memory batch after batch. Called with the weights
    loaded: what this process holds (torch's reserved memory) plus what is free is the most it can reach.
    """
    import torch

    if device.type != "cuda":
        return ceiling
    free, total = torch.cuda.mem_get_info(device)
    reachable = free + torch.cuda.memory_reserved(device)
    if ceiling <= reachable:
        return ceiling
    gib = 2**30
    log.warning(
        "vram_ceiling %.2f GiB is more than this process can use on %s (%.2f GiB: %.2f free + %.2f held by "
        "cogbatch, of %.2f GiB); planning for %.2f GiB",
        ceiling / gib, device, reachable / gib, free / gib, (reachable - free) / gib, total / gib, reachable / gib,
    )  # fmt: skip
    return reachable


class Worker:
    """One model, many chunks. `process` is what every engine calls per chunk of images.

    Per chunk: each image is decoded and encoded once (vision phase; the features wait in host
    memory on a GPU), then one decode engine runs every request of the chunk with continuous
    batching (language phase): an image's prefix goes through the language model when its first
    request enters a slot and is dropped when its last one has. Batch sizes come from the memory
    planner; an out-of-memory error halves the batch, retries what was not finished, down to one
    request, and lowers the plan for the rest of the run.
    """

    def __init__(self, cfg: JobConfig, run_id: str, model: Any = None) -> None:
        from cogbatch.planner import memory_model_for, plan_batches

        self.cfg, self.run_id = cfg, run_id
        self.model = model if model is not None else load_model(cfg)
        self.stats: dict[str, float] = dict.fromkeys(STAT_KEYS, 0)
        self.memory = memory_model_for(self.model)
        self.max_new = max(t.generation.max_new_tokens for t in cfg.tasks)
        self.max_text = DEFAULT_MAX_TEXT  # grows when longer prompts are seen
        overrun = self.memory.context_overrun(self.max_text, self.max_new)
        if overrun:
            log.warning("%s; text past it is unreliable", overrun)
        self.slot_limit = cfg.batch_size or 64  # lowered by out-of-memory errors
        self.encode_limit = self.slot_limit
        self.ceiling = usable_ceiling(cfg.vram_ceiling, self.model.device)
        # Raises DoesNotFit before any work when even one request cannot fit under the ceiling.
        self.plan = plan_batches(self.memory, self.ceiling, self.max_text, self.max_new, cap=self.slot_limit)
        self.calibrated = False
        self._measured: dict[str, tuple[int, int]] = {}  # phase -> (predicted, measured) device work bytes
        self._first_engine: tuple[int, int, int] | None = None  # (slots, max_text, max_new) of a chunk's engine
        self._placement = "resident"
        self._device = self.model.device
        self._host_modules = {id(m) for m in self.model.modules() if _on_host(m, self._device)}

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size

    @property
    def chunk_images(self) -> int:
        """Images per chunk: more requests than decode slots, so finished sequences have successors."""
        return max(1, self.plan.chunk_images)

    def load_report(self) -> dict[str, Any]:
        report = getattr(self.model, "load_report", None)
        base = (
            report.to_dict()
            if hasattr(report, "to_dict")
            else {"dtype": str(self.model.dtype), "device": str(self.model.device)}
        )
        return {**base, "plan": self.plan.to_dict()}

    def summary_stats(self) -> dict[str, Any]:
        s = self.stats
        return {
            "requests": int(s["requests"]),
            "batches": int(s["batches"]),
            "mean_batch_size": round(s["decode_rows"] / s["decode_steps"], 2) if s["decode_steps"] else 0.0,
            "padding_fraction": round(s["prefill_padding"] / s["prefill_tokens"], 4) if s["prefill_tokens"] else 0.0,
            "vision_encodes": int(s["vision_encodes"]),
            "prefix_reuses": int(s["prefix_reuses"]),
            "oom_splits": int(s["oom_splits"]),
            "repetition_retries": int(s["repetition_retries"]),
            "model_compute_s": round(s["model_compute_s"], 3),
            "phase_swap_s": round(s["phase_swap_s"], 3),
            "execution_mode": self.plan.mode,
            "planned_batch": self.plan.slots,
        }

    def process(self, chunk: list[tuple[LoadedImage, list[Request]]]) -> list[dict]:
        """Result rows for every request of the chunk: error rows for images that failed to load."""
        rows: list[dict] = []
        ok: list[tuple[LoadedImage, list[Request]]] = []
        for img, requests in chunk:
            if img.error:
                rows += [error_row(req, img.error, self.cfg, self.run_id, img) for req in requests]
            else:
                ok.append((img, requests))
        feats, failed = self._encode([img for img, _ in ok])
        items: list[tuple[Request, LoadedImage]] = []
        for img, requests in ok:
            reason = failed.get(img.entry.image_id)
            if reason:
                rows += [error_row(req, reason, self.cfg, self.run_id, img) for req in requests]
            else:
                items += [(req, img) for req in requests]
        if items:
            rows += self._generate(items, feats)
        self._calibrate()
        return rows

    # -- vision phase ------------------------------------------------------------------------------

    def _encode(self, images: list[LoadedImage]) -> tuple[dict[str, Any], dict[str, str]]:
        """Vision features of the chunk's images (on the host when the model runs on a GPU), and failures."""
        import torch

        failed: dict[str, str] = {}
        if not images:
            return {}, failed
        self._place("vision")
        host = torch.device("cpu")

        def encode(part: list[LoadedImage]) -> list[Any]:
            return list(self.model.encode_images(torch.stack([img.pixels for img in part])).to(host))

        meter = _DeviceMeter(self._device, peak=not self.calibrated)
        feats, largest = self._in_batches(images, encode, failed)
        seconds, measured = meter.stop()
        self.stats["model_compute_s"] += seconds
        self.stats["vision_encodes"] += len(feats)
        if measured is not None and largest:
            self._measured.setdefault("vision", (self.memory.encode_work(largest), measured))
        return feats, failed

    def _in_batches(self, images: list[LoadedImage], fn, failed: dict[str, str]) -> tuple[dict[str, Any], int]:
        """`fn` over `plan.encode_batch` images at a time, halving the batch after an out-of-memory error.

        Returns the values by image id and the largest batch that ran.
        """
        out: dict[str, Any] = {}
        todo, batch, largest = list(images), self.plan.encode_batch, 0
        while todo:
            part = todo[:batch]
            try:
                values = fn(part)
            except Exception as e:
                if not _is_oom(e):
                    raise
                values = None  # recover outside the handler: the traceback pins the failed batch's tensors
            if values is None:
                self._after_oom(encode_batch=batch)
                if batch == 1:
                    failed[part[0].entry.image_id] = self._oom_reason("encoding this image")
                    todo = todo[1:]
                batch = max(1, min(batch // 2, self.plan.encode_batch))
                continue
            for img, value in zip(part, values, strict=True):
                out[img.entry.image_id] = value
            todo = todo[len(part) :]
            largest = max(largest, len(part))
        return out, largest

    # -- language phase ----------------------------------------------------------------------------

    def _generate(self, items: list[tuple[Request, LoadedImage]], feats: dict[str, Any]) -> list[dict]:
        """Every request of the chunk through one decode engine, whatever its task."""
        from cogbatch.model.decoding import DecodeRequest, PrefixStore, prefill_prefixes

        model = self.model
        settings = {}
        requests = []
        for req, img in items:
            task = req.task
            if task.name not in settings:
                attempts = [self._generation_config(task, a) for a in range(task.generation.retry_on_repetition + 1)]
                settings[task.name] = (attempts[0], tuple(attempts[1:]))
            text_ids = model.build_inputs(None, req.prompt, None, task.template).input_ids[1:]  # no bos
            cfg, retries = settings[task.name]
            requests.append(DecodeRequest((req, img), img.entry.image_id, text_ids, cfg, retries))
        self.stats["requests"] += len(requests)
        longest = max(len(r.text_ids) for r in requests)
        if longest > self.max_text:  # plan for the prompts really seen, not the default guess
            self.max_text = longest
            self._replan()

        self._place("language")
        store = PrefixStore(lambda image_id: prefill_prefixes(model, feats[image_id].unsqueeze(0))[0])
        meter = _DeviceMeter(self._device, peak=not self.calibrated)
        results, errors = self._run_engine(_image_major(requests), store)
        seconds, measured = meter.stop()
        self.stats["model_compute_s"] += seconds
        self.stats["prefix_prefills"] += store.prefills
        self.stats["prefix_reuses"] += store.reuses
        if measured is not None and self._first_engine is not None:
            self._measured.setdefault("language", (self.memory.engine_work(*self._first_engine), measured))

        rows = [error_row(req, reason, self.cfg, self.run_id, img) for (req, img), reason in errors]
        for result in results:
            req, img = result.key
            self.stats["generated_tokens"] += len(result.token_ids)
            self.stats["repetition_retries"] += result.attempts - 1
            rows.append(
                make_row(
                    image_id=req.image.image_id,
                    path=req.image.path,
                    task=req.task.name,
                    prompt=req.prompt,
                    text=postprocess(result.text, req.task.strip_prefixes),
                    status="ok",
                    finish_reason=result.finish_reason,
                    tokens_in=result.prompt_tokens,
                    tokens_out=len(result.token_ids),
                    width=img.width,
                    height=img.height,
                    model=self.cfg.model,
                    quant=self.cfg.quantization.label(),
                    fingerprint=req.fingerprint,
                    run_id=self.run_id,
                    attempts=result.attempts,
                )
            )
        return rows

    @staticmethod
    def _generation_config(task, attempt: int):
        from dataclasses import replace

        base = task.generation
        if attempt == 0:
            return base
        # A retry after a loop: sample, a little warmer, with a penalty on what was already said.
        return replace(
            base,
            do_sample=True,
            temperature=max(base.temperature, 0.7),
            top_p=min(base.top_p, 0.9),
            repetition_penalty=max(base.repetition_penalty, 1.1),
            seed=(base.seed + attempt) % SEED_LIMIT,  # a seed near 2**64 must not overflow the generator
            stop_on_repetition=True,
        )

    def _run_engine(self, requests: list[Any], store: Any) -> tuple[list[Any], list[tuple[Any, str]]]:
        """All requests through one decode engine; OOM halves the slots and retries what is unfinished.

        The engine takes the requests in the order given; after an out-of-memory error the retry
        starts from the prefixes again (the failed engine's are dropped to free their memory).
        """
        from cogbatch.model.decoding import ContinuousDecoder

        results, errors = [], []
        slots = self.plan.slots
        pending = requests
        self._first_engine = None
        while pending:
            slots = max(1, min(slots, self.plan.slots, len(pending)))
            max_text = max(len(r.text_ids) for r in pending)
            max_new = max(c.max_new_tokens for r in pending for c in (r.cfg, *r.retries))
            if self._first_engine is None:
                self._first_engine = (slots, max_text, max_new)
            store.clear()
            engine = None
            try:
                engine = ContinuousDecoder(
                    self.model, pending[0].cfg, slots, max_text, max_new=max_new, prefixes=store
                )
                engine.run(pending)
                oom = False
            except Exception as e:
                if not _is_oom(e):
                    raise
                oom = True  # recover outside the handler: the traceback pins the failed engine's tensors
            if engine is not None:
                self._count(engine)
                results += engine.results
            if not oom:
                break
            finished = {id(r.key) for r in engine.results} if engine is not None else set()
            # What was being computed when memory ran out (nothing when the slot cache itself did not
            # fit: then the request the engine takes first), so that every retry makes progress.
            in_flight = [s.request for s in engine.active] + engine.admitting if engine is not None else []
            in_flight = in_flight or [pending[0]]
            engine = None
            store.clear()
            self._after_oom(slots=slots)
            if slots == 1:  # even alone it does not fit: an error row, never a lost request
                errors += [(r.key, self._oom_reason("generating")) for r in in_flight]
                finished |= {id(r.key) for r in in_flight}
            pending = [r for r in pending if id(r.key) not in finished]
            slots = max(1, slots // 2)
        return results, errors

    def _count(self, engine) -> None:
        st = engine.stats
        self.stats["batches"] += st.admissions
        self.stats["decode_steps"] += st.decode_steps
        self.stats["decode_rows"] += st.decode_rows
        self.stats["prefill_tokens"] += st.prefill_tokens
        self.stats["prefill_padding"] += st.prefill_padding

    # -- memory ------------------------------------------------------------------------------------

    def _after_oom(self, slots: int | None = None, encode_batch: int | None = None) -> None:
        """Free what the failed attempt held, and plan smaller for the rest of the run.

        The estimates grow by a quarter, and later plans never exceed the half batch the split
        retries with (the batch that failed is known not to fit).
        """
        import gc

        import torch

        self.stats["oom_splits"] += 1
        self.memory.correction *= 1.25
        if slots is not None:
            self.slot_limit = max(1, min(self.slot_limit, slots // 2))
        if encode_batch is not None:
            self.encode_limit = max(1, min(self.encode_limit, encode_batch // 2))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._replan()

    def _replan(self) -> None:
        """Plan again with what the run has learnt (longer prompts, out-of-memory errors, calibration).

        Mid-run, a plan that no longer fits by the estimate falls back to one request at a time:
        the out-of-memory handling still guards the real limit, and no request is dropped.
        """
        from dataclasses import replace

        from cogbatch.planner import DoesNotFit, plan_batches

        try:
            self.plan = plan_batches(
                self.memory,
                self.ceiling,
                self.max_text,
                self.max_new,
                cap=self.slot_limit,
                encode_cap=self.encode_limit,
            )
        except DoesNotFit as e:
            log.warning("%s; going on one request at a time", e)
            self.plan = replace(self.plan, slots=1, encode_batch=1, chunk_images=2, max_text=self.max_text)

    def _oom_reason(self, what: str) -> str:
        return f"out of memory {what} even as a batch of one under the {self.ceiling / 2**30:.1f} GiB vram_ceiling"

    def _calibrate(self) -> None:
        """On CUDA, after the first chunk: scale the estimates by the phase that outgrew its estimate most."""
        from cogbatch.planner import calibrate

        if self.calibrated or not self._measured:
            return
        self.calibrated = True
        predicted, measured = max(self._measured.values(), key=lambda pm: pm[1] / max(1, pm[0]))
        calibrate(self.memory, predicted, measured)
        self._replan()

    def _place(self, phase: str) -> None:
        """Phase-swapped execution: only the part of the model in use stays on the device.

        `phase` is "vision" or "language"; outside swap mode every part stays (or comes back) on
        the device. Modules the loader placed on the CPU on purpose (the token embeddings with
        `embeddings_on_cpu`) stay there.
        """
        import torch

        want = phase if self.plan.mode == "swap" else "resident"
        if self._device.type == "cpu" or want == self._placement:
            return
        vision = self.model.model.vision
        language = [m for name, m in self.model.named_children() if name != "model"]
        language += [m for name, m in self.model.model.named_children() if name != "vision"]
        language = [m for m in language if id(m) not in self._host_modules]
        off = {"vision": language, "language": [vision], "resident": []}[want]
        on = {"vision": [vision], "language": language, "resident": [vision, *language]}[want]
        # Packed quantized weights are copied as they are: `Module.to` would repack them (seconds per layer).
        from cogbatch.model.quant.linear import move_module

        t0 = time.perf_counter()
        for m in off:
            move_module(m, "cpu")
        for m in on:
            move_module(m, self._device)
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        self.stats["phase_swap_s"] += time.perf_counter() - t0
        self._placement = want
