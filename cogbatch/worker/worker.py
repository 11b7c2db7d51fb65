"""The per-process model worker: one loaded model turning chunks of images + requests into result rows.

The local engine and the Ray engine differ only in how they schedule; both hand a `ModelWorker` chunks
of decoded images with the requests about them (`process`), and both get back complete result rows.
The worker is the pipeline's only contact with the model (load, encode, decode).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cogbatch.errors import DoesNotFit
from cogbatch.inputs.pending import Request
from cogbatch.model.settings import SEED_LIMIT, GenerationConfig
from cogbatch.planning.batches import DEFAULT_MAX_TEXT, plan_batches
from cogbatch.planning.memory import calibrate, memory_model_for, shares_prefixes
from cogbatch.results import WorkerCounters, WorkerStats
from cogbatch.worker.loading import LoadedImage
from cogbatch.worker.placement import (
    AWQ_PINNED,
    DeviceMeter,
    PhasePlacement,
    load_model,
    usable_ceiling,
    weights_stay_on_device,
)
from cogbatch.worker.rows import error_row, ok_row

if TYPE_CHECKING:
    from cogbatch.job.config import JobConfig, TaskConfig

log = logging.getLogger("cogbatch")


def _ignore(row: dict) -> None:
    pass


def is_oom(e: BaseException) -> bool:
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


class ModelWorker:
    """One model, many chunks. `process` is what every engine calls per chunk of images.

    Per chunk: each image is decoded and encoded once (vision phase; the features wait in host
    memory on a GPU), then one continuous decoder runs every request of the chunk (language phase):
    an image's prefix goes through the language model when its first request enters a slot and is
    dropped when its last one has. Batch sizes come from the memory
    planner; an out-of-memory error halves the batch, retries what was not finished, down to one
    request, and lowers the plan for the rest of the run.
    """

    def __init__(
        self,
        cfg: JobConfig,
        run_id: str,
        model: Any = None,
        load_progress: Callable[[str, int, int], None] | None = None,
        on_result: Any = None,
    ) -> None:
        """`load_progress(what, bytes done, bytes total)` is called as the model's weights are read."""
        self.cfg, self.run_id = cfg, run_id
        self.model = model if model is not None else load_model(cfg, progress=load_progress)
        # Called with (request, DecodeResult) for every finished text: the token ids a row does not keep
        # (`cogbatch compare` scores them).
        self.on_result = on_result
        self.stats = WorkerCounters()
        self.memory = memory_model_for(self.model)
        self.memory.shared_prefixes = shares_prefixes(cfg.tasks)
        self.max_new = max(t.generation.max_new_tokens for t in cfg.tasks)
        self.max_text = DEFAULT_MAX_TEXT  # grows when longer prompts are seen
        overrun = self.memory.context_overrun(self.max_text, self.max_new)
        if overrun:
            log.warning("%s; text past it is unreliable", overrun)
        self.slot_limit = cfg.batch_size or 64  # lowered by out-of-memory errors
        self.encode_limit = self.slot_limit
        self.ceiling = usable_ceiling(cfg.vram_ceiling, self.model.device)
        self.modes = ("resident",) if weights_stay_on_device(self.model) else ("resident", "swap")
        # Raises DoesNotFit before any work when even one request cannot fit under the ceiling.
        self.plan = self._plan(self.max_new)
        self.calibrated = False
        self._measured: dict[str, tuple[int, int]] = {}  # phase -> (predicted, measured) device work bytes
        self._first_decoder: tuple[int, int, int] | None = None  # (slots, max_text, max_new) of a chunk's decoder
        self.placement = PhasePlacement(self.model, self.model.device)

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

    def use_tasks(self, cfg: JobConfig) -> None:
        """Run the next chunks for `cfg`'s tasks, with the model already loaded (a notebook's next call).

        The plan follows their `max_new_tokens`, and DoesNotFit is raised before any work when not even
        one request fits; what the worker has learnt (calibration, out-of-memory limits, the longest
        prompt seen) is kept.
        """
        max_new = max(t.generation.max_new_tokens for t in cfg.tasks)
        overrun = self.memory.context_overrun(self.max_text, max_new)
        if overrun and max_new != self.max_new:
            log.warning("%s; text past it is unreliable", overrun)
        shared, self.memory.shared_prefixes = self.memory.shared_prefixes, shares_prefixes(cfg.tasks)
        try:
            plan = self._plan(max_new)
        except DoesNotFit:
            self.memory.shared_prefixes = shared  # the plan stays as it was
            raise
        self.cfg, self.max_new, self.plan = cfg, max_new, plan

    def summary_stats(self) -> WorkerStats:
        return WorkerStats.of(self.stats, [self.plan.mode], [self.plan.slots])

    def process(
        self, chunk: list[tuple[LoadedImage, list[Request]]], on_row: Callable[[dict], None] | None = None
    ) -> list[dict]:
        """Result rows for every request of the chunk: error rows for images that failed to load.

        `on_row(row)` is called as each row is made, while the chunk is still being generated (progress
        that moves per request); the rows are returned all together, for the engine to write.
        """
        on_row = on_row or _ignore
        rows: list[dict] = []
        ok: list[tuple[LoadedImage, list[Request]]] = []

        def fail(requests: list[Request], reason: str, img: LoadedImage) -> None:
            for req in requests:
                rows.append(error_row(req, reason, self.cfg, self.run_id, img))
                on_row(rows[-1])

        for img, requests in chunk:
            if img.error:
                fail(requests, img.error, img)
            else:
                ok.append((img, requests))
        feats, failed = self._encode([img for img, _ in ok])
        items: list[tuple[Request, LoadedImage]] = []
        for img, requests in ok:
            reason = failed.get(img.entry.image_id)
            if reason:
                fail(requests, reason, img)
            else:
                items += [(req, img) for req in requests]
        if items:
            rows += self._generate(items, feats, on_row)
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

        meter = DeviceMeter(self.placement.device, peak=not self.calibrated)
        feats, largest = self._in_batches(images, encode, failed)
        seconds, measured = meter.stop()
        self.stats.model_compute_s += seconds
        self.stats.vision_encodes += len(feats)
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
                if not is_oom(e):
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

    def _generate(
        self, items: list[tuple[Request, LoadedImage]], feats: dict[str, Any], on_row: Callable[[dict], None]
    ) -> list[dict]:
        """Every request of the chunk through one continuous decoder, whatever its task; `on_row` as each ends."""
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
        self.stats.requests += len(requests)
        longest = max(len(r.text_ids) for r in requests)
        if longest > self.max_text:  # plan for the prompts really seen, not the default guess
            self.max_text = longest
            self._replan()

        self._place("language")
        store = PrefixStore(lambda image_id: prefill_prefixes(model, feats[image_id].unsqueeze(0))[0])
        ok_rows: list[dict] = []

        def finished(result: Any) -> None:  # called by the decoder as each sequence retires
            req, img = result.key
            ok_rows.append(ok_row(req, result, self.cfg, self.run_id, img))
            on_row(ok_rows[-1])
            if self.on_result is not None:
                self.on_result(req, result)

        meter = DeviceMeter(self.placement.device, peak=not self.calibrated)
        results, errors = self._run_decoder(_image_major(requests), store, finished)
        seconds, measured = meter.stop()
        self.stats.model_compute_s += seconds
        self.stats.prefix_prefills += store.prefills
        self.stats.prefix_reuses += store.reuses
        if measured is not None and self._first_decoder is not None:
            self._measured.setdefault("language", (self.memory.decode_work(*self._first_decoder), measured))

        rows = [error_row(req, reason, self.cfg, self.run_id, img) for (req, img), reason in errors]
        for row in rows:
            on_row(row)
        for result in results:
            self.stats.generated_tokens += len(result.token_ids)
            self.stats.repetition_retries += result.attempts - 1
        return rows + ok_rows  # the decoder's results, in the order it finished them

    @staticmethod
    def _generation_config(task: TaskConfig, attempt: int) -> GenerationConfig:
        """The settings of one attempt: the task's own, then, after a looping output, sampling retries."""
        base = task.generation
        if attempt == 0:
            return base
        # A retry after a loop: sample, a little warmer, with a penalty on what was already said.
        return dataclasses.replace(
            base,
            do_sample=True,
            temperature=max(base.temperature, 0.7),
            top_p=min(base.top_p, 0.9),
            repetition_penalty=max(base.repetition_penalty, 1.1),
            seed=(base.seed + attempt) % SEED_LIMIT,  # a seed near 2**64 must not overflow the generator
            stop_on_repetition=True,
        )

    def _run_decoder(
        self, requests: list[Any], store: Any, on_result: Callable[[Any], None] | None = None
    ) -> tuple[list[Any], list[tuple[Any, str]]]:
        """All requests through one continuous decoder; OOM halves the slots and retries what is unfinished.

        `on_result` is called with each result as its sequence finishes (once: a retry after an
        out-of-memory error only runs what had not finished).

        The decoder takes the requests in the order given; after an out-of-memory error the retry
        starts from the prefixes again (the failed decoder's are dropped to free their memory).
        """
        from cogbatch.model.decoding import ContinuousDecoder

        results, errors = [], []
        slots = self.plan.slots
        pending = requests
        self._first_decoder = None
        while pending:
            slots = max(1, min(slots, self.plan.slots, len(pending)))
            max_text = max(len(r.text_ids) for r in pending)
            max_new = max(c.max_new_tokens for r in pending for c in (r.cfg, *r.retries))
            if self._first_decoder is None:
                self._first_decoder = (slots, max_text, max_new)
            store.clear()
            decoder = None
            try:
                decoder = ContinuousDecoder(
                    self.model, pending[0].cfg, slots, max_text, max_new=max_new, prefixes=store
                )
                decoder.on_result = on_result
                decoder.run(pending)
                oom = False
            except Exception as e:
                if not is_oom(e):
                    raise
                oom = True  # recover outside the handler: the traceback pins the failed decoder's tensors
            if decoder is not None:
                self._count(decoder)
                results += decoder.results
            if not oom:
                break
            finished = {id(r.key) for r in decoder.results} if decoder is not None else set()
            # What was being computed when memory ran out (nothing when the slot cache itself did not
            # fit: then the request the decoder takes first), so that every retry makes progress.
            in_flight = [s.request for s in decoder.active] + decoder.admitting if decoder is not None else []
            in_flight = in_flight or [pending[0]]
            decoder = None
            store.clear()
            self._after_oom(slots=slots)
            if slots == 1:  # even alone it does not fit: an error row, never a lost request
                errors += [(r.key, self._oom_reason("generating")) for r in in_flight]
                finished |= {id(r.key) for r in in_flight}
            pending = [r for r in pending if id(r.key) not in finished]
            slots = max(1, slots // 2)
        return results, errors

    def _count(self, decoder: Any) -> None:
        st = decoder.stats
        self.stats.batches += st.admissions
        self.stats.decode_steps += st.decode_steps
        self.stats.decode_rows += st.decode_rows
        self.stats.prefill_tokens += st.prefill_tokens
        self.stats.prefill_padding += st.prefill_padding

    # -- memory ------------------------------------------------------------------------------------

    def _after_oom(self, slots: int | None = None, encode_batch: int | None = None) -> None:
        """Free what the failed attempt held, and plan smaller for the rest of the run.

        The estimates grow by a quarter, and later plans never exceed the half batch the split
        retries with (the batch that failed is known not to fit).
        """
        import gc

        import torch

        self.stats.oom_splits += 1
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
        try:
            self.plan = self._plan(self.max_new)
        except DoesNotFit as e:
            log.warning("%s; going on one request at a time", e)
            self.plan = dataclasses.replace(self.plan, slots=1, encode_batch=1, chunk_images=2, max_text=self.max_text)

    def _plan(self, max_new: int) -> Any:
        """The batch plan for what the worker knows now (DoesNotFit when not even one request fits)."""
        try:
            return plan_batches(self.memory, self.ceiling, self.max_text, max_new, cap=self.slot_limit,
                                encode_cap=self.encode_limit, modes=self.modes)  # fmt: skip
        except DoesNotFit as e:
            if self.modes == ("resident",):  # these weights cannot be swapped: say why, and the way out
                raise DoesNotFit(f"{e} ({AWQ_PINNED})") from None
            raise

    def _oom_reason(self, what: str) -> str:
        return f"out of memory {what} even as a batch of one under the {self.ceiling / 2**30:.1f} GiB vram_ceiling"

    def _calibrate(self) -> None:
        """On CUDA, after the first chunk: scale the estimates by the phase that outgrew its estimate most."""
        if self.calibrated or not self._measured:
            return
        self.calibrated = True
        predicted, measured = max(self._measured.values(), key=lambda pm: pm[1] / max(1, pm[0]))
        calibrate(self.memory, predicted, measured)
        self._replan()

    def _place(self, phase: str) -> None:
        """Phase-swapped execution: only the part of the model in use stays on the device (see `placement`)."""
        self.stats.phase_swap_s += self.placement.place(phase, self.plan.mode)
