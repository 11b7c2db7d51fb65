"""The unit of work every engine shares: one loaded model turning images + requests into result rows.

The local runner and the Ray engine differ only in how they schedule; both hand a `Worker` chunks
of decoded images with the requests about them, and both get back complete result rows. The
worker is the pipeline's only contact with the model (load, preprocess, generate).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogbatch.config import TINY_PREFIX, JobConfig
from cogbatch.images import ImageError, decode_image, read_image_bytes
from cogbatch.manifest import ImageEntry, ManifestBytes, Request, sha256_hex
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
        dtype=resolved_dtype(cfg),
        device=None if cfg.device == "auto" else cfg.device,
        quantization=cfg.quantization.to_model_arg(),
        tokenizer=cfg.tokenizer,
        cache_dir=cfg.cache_dir,
    )


def resolved_dtype(cfg: JobConfig) -> str:
    """The compute dtype a run will use, without loading the model (it enters the fingerprint)."""
    import torch

    from cogbatch.model.cogvlm import resolve_dtype

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype == "auto" and device == "cpu" and cfg.quantization.to_model_arg() is not None:
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
        quant=cfg.quantization.describe(),
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
    "prefix_reuses",
    "oom_splits",
    "repetition_retries",
    "generated_tokens",
)
DEFAULT_MAX_TEXT = 128  # prompt tokens assumed when planning, before the prompts are seen


def _on_host(module: Any, device: Any) -> bool:
    """A module whose own parameters the loader left on the CPU while the model runs on a GPU."""
    params = list(module.parameters(recurse=False))
    return device.type != "cpu" and bool(params) and all(p.device.type == "cpu" for p in params)


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError)


class Worker:
    """One model, many chunks. `process` is what every engine calls per chunk of images.

    Per chunk: each image is decoded and encoded once (vision tower, then its prefix through the
    language model); then, per task, every prompt about those images is generated with continuous
    batching, starting from its image's prefix. Batch sizes come from the memory planner; an
    out-of-memory error halves the batch and retries what was not finished, down to one request.
    """

    def __init__(self, cfg: JobConfig, run_id: str, model: Any = None) -> None:
        from cogbatch.planner import memory_model_for, plan_batches

        self.cfg, self.run_id = cfg, run_id
        self.model = model if model is not None else load_model(cfg)
        self.stats: dict[str, float] = dict.fromkeys(STAT_KEYS, 0)
        self.memory = memory_model_for(self.model)
        self.max_new = max(t.generation.max_new_tokens for t in cfg.tasks)
        # Raises DoesNotFit before any work when even one request cannot fit under the ceiling.
        self.plan = plan_batches(
            self.memory, cfg.vram_ceiling, DEFAULT_MAX_TEXT, self.max_new, cap=cfg.batch_size or 64
        )
        self.calibrated = False
        self._placement = "resident"
        self._device = self.model.device
        self._host_modules = {id(m) for m in self.model.modules() if _on_host(m, self._device)}

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size

    @property
    def chunk_images(self) -> int:
        """Images per chunk: enough prefixes to keep every decode slot busy."""
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
        store, failed = self._encode([img for img, _ in ok])
        by_task: dict[str, list[tuple[Request, LoadedImage]]] = {}
        for img, requests in ok:
            key = img.entry.image_id
            for req in requests:
                if key in failed:
                    rows.append(error_row(req, failed[key], self.cfg, self.run_id, img))
                else:
                    by_task.setdefault(req.task.name, []).append((req, img))
        for items in by_task.values():
            rows += self._generate(items, store)
        self.stats["prefix_reuses"] += store.reuses
        self._calibrate()
        return rows

    # -- vision phase ------------------------------------------------------------------------------

    def _encode(self, images: list[LoadedImage]):
        """Prefixes of the chunk's images: vision tower, then the prefix through the language model.

        The two passes run one after the other over the whole chunk so that, in swap mode, each
        part of the model is on the device only for its own pass.
        """
        import torch

        from cogbatch.model.engine import PrefixStore, prefill_prefixes

        failed: dict[str, str] = {}
        self._place("vision")
        feats = self._in_batches(
            images,
            lambda part: list(self.model.encode_images(torch.stack([img.pixels for img in part]))),
            failed,
            "encoding this image",
        )
        self.stats["vision_encodes"] += len(feats)
        self._place("language")
        encoded = [img for img in images if img.entry.image_id in feats]
        prefixes = self._in_batches(
            encoded,
            lambda part: prefill_prefixes(self.model, torch.stack([feats[img.entry.image_id] for img in part])),
            failed,
            "prefilling this image",
        )
        return PrefixStore(prefixes), failed

    def _in_batches(self, images: list[LoadedImage], fn, failed: dict[str, str], what: str) -> dict[str, Any]:
        """`fn` over `plan.encode_batch` images at a time, halving the batch after an out-of-memory error."""
        out: dict[str, Any] = {}
        todo, batch = list(images), self.plan.encode_batch
        while todo:
            part = todo[:batch]
            try:
                values = fn(part)
            except Exception as e:
                if not _is_oom(e):
                    raise
                self._after_oom()
                if batch == 1:
                    failed[part[0].entry.image_id] = self._oom_reason(what)
                    todo = todo[1:]
                batch = max(1, batch // 2)
                continue
            for img, value in zip(part, values, strict=True):
                out[img.entry.image_id] = value
            todo = todo[len(part) :]
        return out

    # -- language phase ----------------------------------------------------------------------------

    def _generate(self, items: list[tuple[Request, LoadedImage]], store) -> list[dict]:
        from cogbatch.model.engine import EngineRequest

        task = items[0][0].task
        model = self.model
        requests = []
        for req, img in items:
            text_ids = model.build_inputs(None, req.prompt, None, task.template).input_ids[1:]  # no bos
            requests.append(EngineRequest((req, img), store.get(img.entry.image_id), text_ids))
        results, errors = self._run_engine(self._generation_config(task, 0), requests)
        results = self._retry_loops(task, requests, results)
        rows = [error_row(req, reason, self.cfg, self.run_id, img) for (req, img), reason in errors]
        for result, attempts in results:
            req, img = result.key
            self.stats["generated_tokens"] += len(result.token_ids)
            rows.append(
                make_row(
                    image_id=req.image.image_id,
                    path=req.image.path,
                    task=task.name,
                    prompt=req.prompt,
                    text=postprocess(result.text, task.strip_prefixes),
                    status="ok",
                    finish_reason=result.finish_reason,
                    tokens_in=result.prompt_tokens,
                    tokens_out=len(result.token_ids),
                    width=img.width,
                    height=img.height,
                    model=self.cfg.model,
                    quant=self.cfg.quantization.describe(),
                    fingerprint=req.fingerprint,
                    run_id=self.run_id,
                    attempts=attempts,
                )
            )
        return rows

    def _generation_config(self, task, attempt: int):
        from dataclasses import asdict, replace

        from cogbatch.model.generate import GenerationConfig

        g = asdict(task.generation)
        g.pop("retry_on_repetition")
        base = GenerationConfig(**g)
        if attempt == 0:
            return base
        # A retry after a loop: sample, a little warmer, with a penalty on what was already said.
        return replace(
            base,
            do_sample=True,
            temperature=max(base.temperature, 0.7),
            top_p=min(base.top_p, 0.9),
            repetition_penalty=max(base.repetition_penalty, 1.1),
            seed=base.seed + attempt,
            stop_on_repetition=True,
        )

    def _retry_loops(self, task, requests, results):
        """Results paired with their attempt count; looping outputs are retried with sampling."""
        final = {id(r.key): (r, 1) for r in results}
        by_key = {id(r.key): r for r in requests}
        for attempt in range(1, task.generation.retry_on_repetition + 1):
            looping = [by_key[k] for k, (r, _) in final.items() if r.finish_reason == "repetition"]
            if not looping:
                break
            self.stats["repetition_retries"] += len(looping)
            again, _ = self._run_engine(self._generation_config(task, attempt), looping)
            for r in again:
                final[id(r.key)] = (r, attempt + 1)
        return list(final.values())

    def _run_engine(self, gen_cfg, requests):
        """All requests through the decode engine; OOM halves the slots and retries what is unfinished."""
        from cogbatch.model.engine import DecodeEngine

        results, errors = [], []
        slots = min(self.plan.slots, len(requests))
        pending = requests
        while pending:
            max_text = max(len(r.text_ids) for r in pending)
            engine = DecodeEngine(self.model, gen_cfg, min(slots, len(pending)), max_text)
            try:
                engine.run(pending)
            except Exception as e:
                if not _is_oom(e):
                    raise
                self._count(engine)
                results += engine.results
                finished = {id(r.key) for r in engine.results}
                # What was being computed when memory ran out; with nothing identifiable, the request the
                # engine takes first (shortest prompt), so that every retry makes progress.
                in_flight = [s.request for s in engine.active] + engine.admitting
                in_flight = in_flight or [min(pending, key=lambda r: len(r.text_ids))]
                del engine
                self._after_oom()
                if slots == 1:  # even alone it does not fit: an error row, never a lost request
                    errors += [(r.key, self._oom_reason("generating")) for r in in_flight]
                    finished |= {id(r.key) for r in in_flight}
                pending = [r for r in pending if id(r.key) not in finished]
                slots = max(1, slots // 2)
                continue
            self._count(engine)
            results += engine.results
            pending = []
        return results, errors

    def _count(self, engine) -> None:
        if engine is None:
            return
        st = engine.stats
        self.stats["batches"] += st.admissions
        self.stats["decode_steps"] += st.decode_steps
        self.stats["decode_rows"] += st.decode_rows
        self.stats["prefill_tokens"] += st.prefill_tokens
        self.stats["prefill_padding"] += st.prefill_padding
        self.stats["requests"] += len(engine.results)

    # -- memory ------------------------------------------------------------------------------------

    def _after_oom(self) -> None:
        """Free what the failed attempt held and plan smaller from now on."""
        import gc

        import torch

        self.stats["oom_splits"] += 1
        self.memory.correction *= 1.25
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _oom_reason(self, what: str) -> str:
        return (
            f"out of memory {what} even as a batch of one under the {self.cfg.vram_ceiling / 2**30:.1f} GiB "
            "vram_ceiling"
        )

    def _calibrate(self) -> None:
        """On CUDA, after the first chunk: scale the estimates by the measured peak and re-plan."""
        import torch

        from cogbatch.planner import calibrate, plan_batches

        if self.calibrated or self.model.device.type != "cuda":
            return
        self.calibrated = True
        calibrate(self.memory, self.plan.peak_bytes, torch.cuda.max_memory_allocated(self.model.device))
        self.plan = plan_batches(
            self.memory, self.cfg.vram_ceiling, DEFAULT_MAX_TEXT, self.max_new, cap=self.cfg.batch_size or 64
        )

    def _place(self, phase: str) -> None:
        """Phase-swapped execution: only the part of the model in use stays on the device.

        Modules the loader placed on the CPU on purpose (the token embeddings with
        `embeddings_on_cpu`) stay there.
        """
        if self.plan.mode != "swap" or self._device.type == "cpu" or phase == self._placement:
            return
        device = self._device
        vision = self.model.model.vision
        language = [m for name, m in self.model.named_children() if name != "model"]
        language += [m for name, m in self.model.model.named_children() if name != "vision"]
        language = [m for m in language if id(m) not in self._host_modules]
        off, on = (language, [vision]) if phase == "vision" else ([vision], language)
        # Packed quantized weights are copied as they are: `Module.to` would repack them (seconds per layer).
        from cogbatch.model.quantize import move_module

        for m in off:
            move_module(m, "cpu")
        for m in on:
            move_module(m, device)
        self._placement = phase
