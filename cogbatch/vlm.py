"""Planned, phase-swapped generation from Python: the pipeline's worker without a job file or an output.

    vlm = cogbatch.load("THUDM/cogvlm2-llama3-chat-19B", vram_ceiling="11GiB")   # int4 by default
    answers = vlm.generate([img, "b.jpg"], "Describe this image.", max_new_tokens=256)
    answers[0].text, answers[0].finish_reason, vlm.plan.mode, vlm.plan.slots

`model.generate` keeps every weight on the device (CogVLM2 INT4 at a batch of 4 needs about 13 GiB).
Here the settings become a `JobConfig` built in memory and validated as a job file's keys are; the
model is loaded by the pipeline's `load_model` (the vision tower parked in host memory when the plan
swaps phases) and every call runs `ModelWorker.process`, chunk by chunk: planned batches under
`vram_ceiling`, phase swapping, halving after an out-of-memory error. Nothing is written to disk but
the quantized-weights cache the loader keeps anyway.

Answers are rows turned into objects: an image that cannot be read or decoded is an answer with
`error` set (as the pipeline's error rows), never an exception, so one bad file in a list does not
lose the others' answers. Wrong arguments raise: TypeError for a wrong type or an unknown keyword,
`ConfigError` (a ValueError) for a value the job reader refuses, with the key in the message.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from cogbatch.errors import ConfigError, ImageError

if TYPE_CHECKING:
    from PIL import Image

    from cogbatch.job.config import JobConfig, TaskConfig
    from cogbatch.planning.batches import BatchPlan
    from cogbatch.worker.loading import LoadedImage
    from cogbatch.worker.worker import ModelWorker

DEFAULT_PROMPT = "Describe this image."
ONE_TASK = "prompt"  # the task's name when generate() is given one prompt, or one per image
GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
                   "no_repeat_ngram_size", "stop_on_repetition", "retry_on_repetition")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Answer:
    """One image's answer to one prompt: `text`, or `error` saying why there is none (an unreadable image).

    `finish_reason` is "eos" (the model ended), "length" (max_new_tokens), "stop" or "repetition" (a loop
    was cut); `tokens_in` counts the prompt with the image's tokens, `tokens_out` the tokens generated;
    `attempts` > 1 when a looping text was generated again (`retry_on_repetition`).
    """

    task: str
    prompt: str | None
    text: str | None = None
    finish_reason: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    error: str | None = None
    width: int | None = None
    height: int | None = None
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Answer:
        keys = ("text", "finish_reason", "tokens_in", "tokens_out", "error", "width", "height")
        return cls(row["task"], row["prompt"], **{k: row.get(k) for k in keys}, attempts=row.get("attempts") or 0)


def load(
    model: str,
    *,
    vram_ceiling: str | int = "11GiB",
    quantization: Any = "int4",
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: str | None = None,
    batch_size: int | None = None,
    cache_dir: str | Path | None = None,
    pipeline: str | Path | None = None,
    template: str = "chat",
    **generation: Any,
) -> VLM:
    """Load `model` for planned generation under `vram_ceiling`: a `VLM` whose `generate` answers images.

    `model` is what a job's `model:` takes (a pipeline.yaml alias, a hub id, a checkpoint path,
    `tiny-random:cogvlm2`); `quantization`, `dtype`, `device`, `tokenizer`, `batch_size` (the most
    sequences decoded together) and `cache_dir` mean what the job keys of those names mean, and default
    as in a job (pipeline.yaml's `cache_dir`, else ~/.cache/cogbatch). `template` and `generation` (the
    job's generation keys: max_new_tokens, do_sample, temperature, ...) are the defaults of every
    `generate` call; the load plans with their `max_new_tokens`, which decides whether the vision
    tower is loaded parked in host memory. DoesNotFit when not even one request fits the ceiling.
    """
    from cogbatch.engines.prologue import check_device
    from cogbatch.job import load_job
    from cogbatch.worker.placement import load_model
    from cogbatch.worker.worker import ModelWorker

    _check_generation("load", generation)
    job: dict[str, Any] = {
        "model": model, "input": {"folder": "."}, "output": ".", "device": device, "dtype": dtype,
        "quantization": quantization, "vram_ceiling": vram_ceiling, "generation": generation,
        "tasks": [{"name": ONE_TASK, "prompt": DEFAULT_PROMPT, "template": template}],
    }  # fmt: skip
    optional = {"tokenizer": tokenizer, "batch_size": batch_size, "cache_dir": cache_dir}
    job.update({k: str(v) if isinstance(v, Path) else v for k, v in optional.items() if v is not None})
    cfg = load_job(job, pipeline=pipeline, inputs=False)  # a user's pipeline.yaml gives aliases and cache_dir
    check_device(cfg)
    worker = ModelWorker(cfg, "python", model=load_model(cfg))
    return VLM(cfg, worker)


class VLM:
    """A loaded model and the pipeline's worker around it; `generate` answers images (see `load`)."""

    def __init__(self, cfg: JobConfig, worker: ModelWorker) -> None:
        self.config = cfg  # the settings as a JobConfig: what `cogbatch run` would run with
        self._worker = worker
        self._defaults = cfg.tasks[0]  # the load's template and generation settings

    @property
    def model(self) -> Any:
        """The `CogVLM` module itself (its own `generate` keeps every weight on the device)."""
        return self._worker.model

    @property
    def plan(self) -> BatchPlan:
        """The memory plan the next chunk runs by: `mode` (resident / swap), `slots`, `encode_batch`,
        `chunk_images`, `peak_bytes` (predicted) under `ceiling`; it follows each call's max_new_tokens
        and what the runs so far measured."""
        return self._worker.plan

    def __repr__(self) -> str:
        p = self.plan
        return (f"<VLM {self.config.model} on {self.model.device}: {p.mode}, {p.slots} slots, "
                f"planned peak {p.peak_bytes / 2**30:.2f} GiB of {p.ceiling / 2**30:.2f} GiB>")  # fmt: skip

    @overload
    def generate(
        self, images: Sequence[Any], prompt: str | Sequence[str] = ..., *, template: str | None = ..., **gen: Any
    ) -> list[Answer]: ...

    @overload
    def generate(
        self, images: Sequence[Any], prompt: Mapping[str, str], *, template: str | None = ..., **gen: Any
    ) -> list[dict[str, Answer]]: ...

    def generate(
        self,
        images: Sequence[Any],
        prompt: str | Sequence[str] | Mapping[str, str] = DEFAULT_PROMPT,
        *,
        template: str | None = None,
        **generation: Any,
    ) -> list[Answer] | list[dict[str, Answer]]:
        """Answers for `images` (PIL images or paths), in their order.

        `prompt`: one prompt for every image, a list of one prompt per image, or a mapping of task names
        to prompts (then each image's answers are a dict by task name). Prompts are literal text (no
        `{placeholders}`). `template` and `generation` override the load's defaults for this call.
        """
        from cogbatch.inputs.pending import Request

        if isinstance(images, str | os.PathLike) or not isinstance(images, Sequence):
            raise TypeError("generate() images must be a list of PIL images or paths (one image: [image])")
        _check_generation("generate", generation)
        tasks, questions = self._tasks(prompt, len(images), template, generation)
        items = [_item(image, i) for i, image in enumerate(images)]  # type errors before any work
        cfg = dataclasses.replace(self.config, tasks=tuple(tasks))
        worker = self._worker
        worker.use_tasks(cfg)  # DoesNotFit here leaves the worker as it was
        dtype = str(self.model.dtype).removeprefix("torch.")
        fingerprints = {t.name: cfg.fingerprint(t, dtype) for t in tasks}
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        start = 0
        while start < len(items):  # a chunk at a time, decoded just before it runs (host memory)
            part = items[start : start + worker.chunk_images]
            chunk = []
            for offset, (label, image) in enumerate(part):
                img = _loaded(label, image, cfg, worker.image_size, questions[start + offset])
                chunk.append((img, [Request(img.entry, t, _question(t, img), fingerprints[t.name]) for t in tasks]))
            rows.update({(r["path"], r["task"]): r for r in worker.process(chunk)})
            start += len(part)
        answers = [{t.name: Answer.from_row(rows[label, t.name]) for t in tasks} for label, _ in items]
        if isinstance(prompt, Mapping):
            return answers
        return [a[ONE_TASK] for a in answers]

    def _tasks(
        self, prompt: Any, n_images: int, template: str | None, generation: dict[str, Any]
    ) -> tuple[list[TaskConfig], list[str | None]]:
        """The call's tasks, read as a job's tasks are, and each image's own question (per-image prompts)."""
        from cogbatch.job.reader import read_task

        base = {"template": template or self._defaults.template, **generation}
        questions: list[str | None] = [None] * n_images
        if isinstance(prompt, str):
            specs = [{"name": ONE_TASK, "prompt": _literal(prompt, "prompt"), **base}]
        elif isinstance(prompt, Mapping):
            if not prompt:
                raise ConfigError("prompt: the mapping of task names to prompts is empty")
            specs = [{"name": _name(k), "prompt": _literal(v, f"prompt[{k!r}]"), **base} for k, v in prompt.items()]
        elif isinstance(prompt, Sequence):
            if len(prompt) != n_images:
                raise ConfigError(f"prompt: {len(prompt)} prompts for {n_images} images (give one per image, or one)")
            for i, text in enumerate(prompt):
                _literal(text, f"prompt[{i}]")
            questions = list(prompt)
            specs = [{"name": ONE_TASK, "question_column": ONE_TASK, **base}]
        else:
            what = type(prompt).__name__
            raise TypeError(f"generate() prompt must be a str, a list of str or a dict of str, got {what}")
        return [read_task(spec, "", self._defaults.generation) for spec in specs], questions


def _check_generation(what: str, generation: dict[str, Any]) -> None:
    unknown = sorted(set(generation) - set(GENERATION_KEYS))
    if unknown:
        raise TypeError(f"{what}() got unknown keyword(s) {', '.join(unknown)}; generation keys are "
                        f"{', '.join(GENERATION_KEYS)}")  # fmt: skip


def _literal(text: Any, key: str) -> str:
    """A prompt as a task's template whose only filling is the text itself: braces are literal here."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{key}: must be a non-empty string")
    return text.replace("{", "{{").replace("}", "}}")


def _name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"generate() task names must be str, got {type(name).__name__}")
    return name


def _item(image: Any, index: int) -> tuple[str, Any]:
    """(label, image): the label names the image in its rows, unique per position in the list."""
    from PIL import Image

    if not isinstance(image, Image.Image | str | os.PathLike):
        raise TypeError(f"generate() images[{index}] must be a PIL image or a path, got {type(image).__name__}")
    return f"images[{index}]", image


def _question(task: TaskConfig, img: LoadedImage) -> str | None:
    from cogbatch.inputs.pending import fill_prompt

    return fill_prompt(task, img.entry)[0]


def _loaded(
    label: str, image: Image.Image | str | os.PathLike, cfg: JobConfig, size: int, question: str | None
) -> LoadedImage:
    """The image read, decoded and preprocessed as the pipeline's loader does; a failure is the image's error."""
    from cogbatch.inputs.decode import decode_image, from_pil, read_image_bytes
    from cogbatch.inputs.entries import ImageEntry, builtin_values, sha256_hex, unreadable_id
    from cogbatch.model.preprocess import preprocess_image
    from cogbatch.worker.loading import LoadedImage

    values = {**builtin_values(label), **({ONE_TASK: question} if question is not None else {})}
    try:
        if isinstance(image, str | os.PathLike):
            data = read_image_bytes(image)
            image_id = sha256_hex(data)
            decoded = decode_image(data, max_pixels=cfg.max_pixels)
        else:
            decoded = from_pil(image, max_pixels=cfg.max_pixels)
            rgb = decoded.image
            image_id = sha256_hex(f"{rgb.width}x{rgb.height}\0".encode() + rgb.tobytes())
    except ImageError as e:
        entry = ImageEntry(unreadable_id(label), label, values=values, error=str(e))
        return LoadedImage(entry, error=str(e))
    entry = ImageEntry(image_id, label, values=values)
    return LoadedImage(entry, preprocess_image(decoded.image, size), decoded.width, decoded.height)
