"""`compare`: a sample of the job's images answered by a reference setting (a) and by the job's quantization (b).

The two models are never loaded together. Side a is loaded first, generates every sampled request
with the job's own worker (the run's batching, phase swapping and out-of-memory handling, so its
images/s are a run's), then runs each of its answers back through itself in one forward pass and
keeps the next-token distributions at the generated positions on the host (`scores.reference_dist`).
It is freed before side b is loaded, which generates the same requests and runs a's tokens through
itself (teacher forcing): the KL and top-1 agreement it gets do not depend on where two greedy paths
first fork. Both sides compute in the job's compute dtype, decode greedily (no sampling retries) with
the tasks' prompts and max_new_tokens. `--per-layer` then loads the job's quantization one layer
group at a time and teacher-forces a's answers only (no generation).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cogbatch.compare.groups import LAYER_GROUPS, advice, only_group, quantized_layers
from cogbatch.compare.report import Answer, CompareReport, GroupKL, Pair, SideStats, default_pairs_path, summarize
from cogbatch.compare.report import write_pairs as write_pairs_file
from cogbatch.compare.scores import ForcedScore, ReferenceDist, reference_dist, teacher_forced
from cogbatch.errors import ConfigError, UserError
from cogbatch.inputs.entries import ImageEntry
from cogbatch.inputs.pending import Request, build_entries, expand_requests
from cogbatch.job.config import JobConfig
from cogbatch.model.quant.spec import QuantConfig

if TYPE_CHECKING:
    from cogbatch.worker.loading import LoadedImage

log = logging.getLogger("cogbatch")

DEFAULT_TOPK = 256  # reference log-probabilities kept per position: ~2 KB per token on the host
Key = tuple[str, str]  # (image_id, task)


@dataclass
class SideRun:
    """What one side produced: its costs, its answers, and the distributions or scores of the forced pass."""

    stats: SideStats
    answers: dict[Key, Answer] = field(default_factory=dict)
    dists: dict[Key, ReferenceDist] = field(default_factory=dict)  # side a: its own tokens' distributions
    forced: dict[Key, ForcedScore] = field(default_factory=dict)  # other sides: a's tokens scored under them
    forced_oom: int = 0


def compare(
    cfg: JobConfig,
    *,
    sample: int,
    against: Any = "none",
    seed: int = 0,
    per_layer: bool = False,
    pairs: str | Path | None = None,
    against_device: str | None = None,
    topk: int | None = DEFAULT_TOPK,
) -> CompareReport:
    """Compare `cfg`'s quantization (b) with `against` (a) on `sample` images of its input; write the pairs file.

    ConfigError (exit 2) before any model is loaded for a bad `--against`, `--sample`, a pairs file
    inside the output, an input without readable images, or `per_layer` on a job that quantizes nothing.
    """
    from cogbatch.job.reader import read_quantization

    started = time.perf_counter()
    if sample < 1:
        raise ConfigError(f"--sample: must be at least 1, got {sample}")
    if topk is not None and topk < 1:
        raise ConfigError(f"topk: must be at least 1 or None (every log-probability), got {topk}")
    ref_quant = against if isinstance(against, QuantConfig) else read_quantization(against, "--against")
    if per_layer and cfg.quantization.effective() is None:
        raise ConfigError("--per-layer: the job quantizes nothing (quantization: none), so no group can be measured")
    pairs_path = _pairs_path(cfg, pairs)
    job = _greedy(cfg)
    dtype = job.source.compute_dtype()  # both sides: the difference measured is the quantization's alone
    b_cfg = dataclasses.replace(job, dtype=dtype)
    a_cfg, notes = _reference_placement(dataclasses.replace(job, quantization=ref_quant, dtype=dtype), against_device)

    entries = build_entries(cfg, persist=False)  # reads the hash cache, writes nothing into the output
    chosen, readable = sample_entries(entries, sample, seed)
    if not chosen:
        raise UserError(f"the input has no readable image to compare ({len(entries)} entries, none readable)")
    if readable < sample:
        notes.append(f"the input has {readable} readable images: all of them are compared")
    if job.source.is_tiny:
        notes.append(f"{cfg.model} has random weights: the figures check the machinery, not caption quality")
    requests = expand_requests(chosen, job, {t.name: "compare" for t in job.tasks})
    pair_list = [Pair(r.image.path, r.image.image_id, r.task.name, r.prompt or "", Answer(error=r.error))
                 for r in requests]  # fmt: skip
    runnable = [r for r in requests if r.error is None]
    run_id = f"compare-{int(time.time())}"

    a = run_side(a_cfg, runnable, "a", run_id=run_id, topk=topk)
    b = run_side(b_cfg, runnable, "b", run_id=run_id, reference=a)
    by_key = {(p.image_id, p.task): p for p in pair_list}
    for key, p in by_key.items():
        if p.a.error is None:
            p.a = a.answers.get(key, Answer(error="not answered"))
            p.b = b.answers.get(key, Answer(error="not answered"))
            p.forced = b.forced.get(key)
    for side in (a, b):
        if side.forced_oom:
            notes.append(f"{side.stats.role}: {side.forced_oom} teacher-forced passes ran out of memory (not scored)")

    groups = advice_rules = None
    if per_layer:
        groups = layer_groups(job, a_cfg, runnable, a, run_id)
        advice_rules = _advice(groups, job)

    meta = {"model": cfg.model, "a": a.stats.quantization, "b": b.stats.quantization, "dtype": dtype,
            "seed": str(seed), "topk": str(topk)}  # fmt: skip
    try:
        write_pairs_file(pairs_path, pair_list, meta)
    except OSError as e:
        raise UserError(f"cannot write the pairs file {e.filename or pairs_path}: {e.strerror or e}") from None
    positions = sum(d.positions for d in a.dists.values())
    kept = sum(d.kept_mass() * d.positions for d in a.dists.values()) / positions if positions else None
    task_names = [t.name for t in job.tasks]
    return CompareReport(
        job=str(cfg.path) if cfg.path else None,
        model=cfg.model,
        a=a.stats,
        b=b.stats,
        seed=seed,
        requested_images=sample,
        images=len(chosen),
        input_images=readable,
        topk=topk,
        overall=summarize(pair_list),
        tasks={t: summarize([p for p in pair_list if p.task == t]) for t in task_names},
        pairs_file=str(pairs_path),
        kept_mass=kept,
        per_layer=groups,
        advice=advice_rules,
        notes=notes,
        seconds=round(time.perf_counter() - started, 3),
    )


def sample_entries(entries: list[ImageEntry], n: int, seed: int) -> tuple[list[ImageEntry], int]:
    """`n` readable images chosen by `seed` from the input sorted by path (the same images for the same input).

    Returns the chosen entries in path order and how many readable images there were.
    """
    seen: dict[str, ImageEntry] = {}
    for e in sorted(entries, key=lambda e: e.path):
        if e.error is None and e.image_id not in seen:
            seen[e.image_id] = e
    readable = list(seen.values())
    if n >= len(readable):
        return readable, len(readable)
    picked = set(random.Random(seed).sample(range(len(readable)), n))
    return [e for i, e in enumerate(readable) if i in picked], len(readable)


def _greedy(cfg: JobConfig) -> JobConfig:
    """The job with greedy decoding and no sampling retries: the same prompts, the same max_new_tokens."""
    tasks = tuple(
        dataclasses.replace(t, generation=dataclasses.replace(t.generation, do_sample=False, retry_on_repetition=0))
        for t in cfg.tasks
    )
    return dataclasses.replace(cfg, tasks=tasks)


def _pairs_path(cfg: JobConfig, pairs: str | Path | None) -> Path:
    """Where the pairs go: `pairs`, else beside the output; never inside the output folder (result parts only)."""
    import os

    path = Path(pairs) if pairs is not None else default_pairs_path(cfg.output)
    if path.is_dir():
        raise ConfigError(f"--pairs {path} is a directory; name the Parquet file, e.g. {path}/compare.parquet")
    inside, output = os.path.realpath(path), os.path.realpath(cfg.output)
    if inside.startswith(output.rstrip(os.sep) + os.sep):
        raise ConfigError(f"--pairs {path}: inside the output {cfg.output}, which holds result parts only")
    return path


def _reference_placement(a_cfg: JobConfig, against_device: str | None) -> tuple[JobConfig, list[str]]:
    """Side a on `against_device`, else the job's device; on the CPU (said so) when it cannot fit on the GPU."""
    if against_device is not None:
        return dataclasses.replace(a_cfg, device=against_device), []
    device = a_cfg.source.torch_device()
    if device.type != "cuda":
        return a_cfg, []
    from cogbatch.planning.report import plan_report

    plan = plan_report(a_cfg).plan
    if plan.get("mode") is not None:
        return a_cfg, []
    label = a_cfg.quantization.label()
    note = f"a ({label}) does not fit on {device}: {plan.get('error')}; it runs on the CPU (slow)"
    return dataclasses.replace(a_cfg, device="cpu"), [note]


def run_side(
    cfg: JobConfig,
    requests: list[Request],
    role: str,
    *,
    run_id: str,
    reference: SideRun | None = None,
    generate: bool = True,
    topk: int | None = DEFAULT_TOPK,
    use_cache: bool = True,
) -> SideRun:
    """Load `cfg`'s model, answer `requests` (`generate`), teacher-force a's tokens (or its own), free it.

    Without `reference` this is side a: it keeps the distributions at its own tokens. With one, it
    scores the reference's tokens under this model.
    """
    import gc

    import torch

    from cogbatch.worker.loading import prefetch
    from cogbatch.worker.worker import ModelWorker

    source = cfg.source
    side = SideRun(SideStats(role, cfg.quantization.label(), str(source.torch_device()), source.compute_dtype()))
    stats = side.stats
    log.info("compare %s: loading %s (%s, %s)", role, stats.quantization, stats.device, stats.dtype)
    t0 = time.perf_counter()
    model = source.load(use_cache=use_cache)
    stats.load_s = round(time.perf_counter() - t0, 3)
    report = getattr(model, "load_report", None)
    if report is not None:
        stats.load_peak_host_rss_bytes = report.peak_host_rss_bytes
        stats.load_peak_device_bytes = report.peak_device_bytes
        stats.cache = report.cache_status
    results: dict[Key, Any] = {}  # DecodeResults by key: their token ids

    def keep(req: Request, result: Any) -> None:
        results[(req.image.image_id, req.task.name)] = result

    worker = ModelWorker(cfg, run_id, model=model, on_result=keep)
    stats.mode = worker.plan.mode
    if worker.plan.mode == "swap":
        stats.notes.append("phase-swapped: the vision tower and the language model take turns on the device")
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    by_image: dict[str, list[Request]] = {}
    for r in requests:
        by_image.setdefault(r.image.image_id, []).append(r)
    images = [reqs[0].image for reqs in by_image.values()]
    stats.images, stats.requests = len(images), len(requests)
    window = worker.chunk_images + 2 * cfg.loader_threads
    for chunk in _chunks(prefetch(images, cfg, worker.image_size, window), worker.chunk_images):
        work = [(img, by_image[img.entry.image_id]) for img in chunk]
        if generate:
            t = time.perf_counter()
            rows = worker.process(work)
            stats.generate_s += time.perf_counter() - t
            for row in rows:
                key = (row["image_id"], row["task"])
                res = results.get(key)
                side.answers[key] = Answer(row["text"], list(res.token_ids) if res else [], row["finish_reason"],
                                           row["error"] if row["status"] != "ok" else None)  # fmt: skip
        t = time.perf_counter()
        _forced_chunk(side, worker, work, reference, topk)
        stats.forced_s += time.perf_counter() - t
    stats.generate_s = round(stats.generate_s, 3)
    stats.forced_s = round(stats.forced_s, 3)
    stats.generated_tokens = int(worker.stats.generated_tokens)
    if device.type == "cuda":
        stats.run_peak_device_bytes = int(torch.cuda.max_memory_allocated(device))
    log.info("compare %s: %d images in %.1f s (+ %.1f s teacher forcing)", role, stats.images, stats.generate_s,
             stats.forced_s)  # fmt: skip
    del worker, model  # never two models at once: free this one before the next side loads
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return side


def _chunks(loaded: Iterator[LoadedImage], size: int) -> Iterator[list[LoadedImage]]:
    chunk: list[LoadedImage] = []
    for img in loaded:
        chunk.append(img)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _forced_chunk(side: SideRun, worker: Any, work: list[tuple[LoadedImage, list[Request]]],
                  reference: SideRun | None, topk: int | None) -> None:  # fmt: skip
    """Teacher-force one chunk: each image encoded once, then one forward pass per answer of the reference."""
    import torch

    model, mode = worker.model, worker.plan.mode
    answers = reference.answers if reference is not None else side.answers
    for img, requests in work:
        todo = [(r, (r.image.image_id, r.task.name)) for r in requests]
        todo = [(r, key, answers[key].token_ids) for r, key in todo if key in answers and answers[key].token_ids]
        if reference is not None:
            todo = [(r, key, tokens) for r, key, tokens in todo if key in reference.dists]
        if img.error or not todo:
            continue
        try:
            worker.placement.place("vision", mode)
            feats = model.encode_images(img.pixels.unsqueeze(0)).to(model.device)
            worker.placement.place("language", mode)
            for r, key, tokens in todo:
                logits = _forced_logits(model, r, img, feats, tokens)
                if reference is None:
                    side.dists[key] = reference_dist(logits, topk)
                else:
                    side.forced[key] = teacher_forced(reference.dists[key], logits)
        except torch.OutOfMemoryError:
            side.forced_oom += len(todo)


def _forced_logits(model: Any, req: Request, img: LoadedImage, feats: Any, tokens: list[int]) -> Any:
    """The model's logits (T, V) at the positions that predicted `tokens`, in one pass over prompt + tokens."""
    import torch

    from cogbatch.model.language import LANGUAGE

    inputs = model.build_inputs(None, req.prompt, img.pixels, req.task.template)
    ids = inputs.input_ids + tokens[:-1]
    types = inputs.token_type_ids + [LANGUAGE] * (len(tokens) - 1)
    input_ids = torch.tensor([ids], dtype=torch.long)
    token_types = torch.tensor([types], dtype=torch.long)
    mask = torch.ones_like(input_ids)
    return model.logits(input_ids, token_types, mask, image_features=feats, last=len(tokens))[0]


def layer_groups(job: JobConfig, a_cfg: JobConfig, requests: list[Request], a: SideRun, run_id: str) -> list[GroupKL]:
    """The job's quantization in one group of layers at a time, a's answers teacher-forced through each.

    Each model is mostly in the compute dtype, about as large as side a, so it runs where a ran; the
    quantized-weights cache is not used (one-off entries nobody would read again).
    """
    model_config = job.source.config()
    out = []
    for group in LAYER_GROUPS:
        layers = quantized_layers(model_config, job.quantization.effective(), group)
        result = GroupKL(group.name, list(group.patterns), len(layers))
        if not layers:
            result.skipped = "the job does not quantize it"
            out.append(result)
            continue
        cfg = dataclasses.replace(a_cfg, quantization=only_group(job.quantization, group))
        side = run_side(cfg, requests, f"group {group.name}", run_id=run_id, reference=a, generate=False,
                        use_cache=False)  # fmt: skip
        forced = list(side.forced.values())
        result.tf_positions = sum(f.positions for f in forced)
        if result.tf_positions:
            result.tf_kl = sum(f.kl_sum for f in forced) / result.tf_positions
            result.tf_top1 = sum(f.top1_agree for f in forced) / result.tf_positions
        else:
            result.skipped = "no reference token to score"
        out.append(result)
    return sorted(out, key=lambda g: (g.tf_kl is None, -(g.tf_kl or 0.0)))


def _advice(groups: list[GroupKL], job: JobConfig) -> list[dict[str, str]] | None:
    """The rules that keep the group moving the KL most one step more precise; None when nothing moved."""
    top = groups[0] if groups else None
    if top is None or not top.tf_kl:
        return None
    group = next(g for g in LAYER_GROUPS if g.name == top.group)
    return advice(group, job.quantization.effective(), job.source.config())
