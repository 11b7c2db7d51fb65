"""What each command returns: typed results, each with `to_dict()` (`--json`) and `describe()` (for humans).

The Python API (`cogbatch.run_job`, `plan_job`, `export_job`, ...) returns these and the CLI prints them,
so a notebook and a terminal see the same numbers. Cheap to import: no torch, no pyarrow.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

GIB = 2**30


@dataclass
class WorkerCounters:
    """What a model worker has done so far; the Ray engine adds up the counters of its actors."""

    requests: int = 0
    batches: int = 0  # prompt prefills that brought new requests into free decode slots
    decode_steps: int = 0
    decode_rows: int = 0  # sequences in flight, summed over steps
    prefill_tokens: int = 0
    prefill_padding: int = 0
    vision_encodes: int = 0
    prefix_prefills: int = 0
    prefix_reuses: int = 0
    oom_splits: int = 0
    repetition_retries: int = 0
    generated_tokens: int = 0
    model_compute_s: float = 0.0
    phase_swap_s: float = 0.0

    def add(self, other: dict[str, float]) -> None:
        """Add counters given as a mapping (what a Ray actor reports for one batch)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + other.get(f.name, 0))


@dataclass
class WorkerStats:
    """The summary of a worker's counters: rates, and the plan it ran by."""

    requests: int = 0
    batches: int = 0
    mean_batch_size: float = 0.0
    padding_fraction: float = 0.0
    vision_encodes: int = 0
    prefix_reuses: int = 0
    oom_splits: int = 0
    repetition_retries: int = 0
    model_compute_s: float = 0.0
    phase_swap_s: float = 0.0
    execution_mode: str | None = None  # resident | swap
    planned_batch: int | None = None

    @classmethod
    def of(cls, c: WorkerCounters, modes: list[str | None], planned: list[int | None]) -> WorkerStats:
        """From counters (one worker's, or the sum of several) and each worker's plan (the common one is kept)."""
        return cls(
            requests=int(c.requests),
            batches=int(c.batches),
            mean_batch_size=round(c.decode_rows / c.decode_steps, 2) if c.decode_steps else 0.0,
            padding_fraction=round(c.prefill_padding / c.prefill_tokens, 4) if c.prefill_tokens else 0.0,
            vision_encodes=int(c.vision_encodes),
            prefix_reuses=int(c.prefix_reuses),
            oom_splits=int(c.oom_splits),
            repetition_retries=int(c.repetition_retries),
            model_compute_s=round(c.model_compute_s, 3),
            phase_swap_s=round(c.phase_swap_s, 3),
            execution_mode=_most_common(modes),
            planned_batch=_most_common(planned),
        )


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0] if values else None


@dataclass
class RunSummary:
    """What a run did; `exit_code` says how it ended. `cogbatch run --json` prints `to_dict()` as one line."""

    run_id: str
    output: str
    model: str
    quant: str
    input: str | None = None  # the folder or manifest the run read
    input_kind: str | None = None  # "folder" | "manifest"
    items: int = 0  # files of the folder, or manifest rows: one result row each per task
    distinct_images: int = 0  # distinct image bytes among them: what is generated
    requests_total: int = 0  # items x tasks
    skipped: int = 0  # requests whose rows were already in the output
    pending: int = 0  # requests this run took on (after --limit)
    done: int = 0  # ok rows written
    failed: int = 0  # error rows written
    reused: int = 0  # of those, rows whose text a byte-identical item's generation gave (no generation of their own)
    generated_tokens: int = 0
    model_loaded: bool = False
    message: str | None = None  # why nothing was done
    engine: str | None = None  # "ray"; None for the local engine
    plan_s: float | None = None  # input scan, hashing, done set
    ray_startup_s: float | None = None
    workers: int | None = None  # Ray actors
    model_load_s: float | None = None  # imports, weights, tokenizer, plan
    model_load: dict[str, Any] | None = None  # the load report, with the batch plan
    worker: WorkerStats | None = None
    peak_device_bytes: int | None = None
    parts_written: int = 0
    wall_s: float = 0.0
    images_per_s: float = 0.0
    tokens_per_s: float = 0.0
    peak_host_rss_bytes: int = 0
    exit_code: int = 0
    interrupted: bool = False
    gallery: dict[str, Any] | None = None  # the refreshed gallery (`run --gallery`), or its error

    def to_dict(self) -> dict[str, Any]:
        """Flat, as `--json` has always printed it: the worker's stats inline, unset keys left out."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "worker":
                out.update(asdict(value) if value is not None else {})
            elif value is not None and not (f.name == "interrupted" and not value):
                out[f.name] = value
        return out

    def describe(self) -> str:
        """The human summary (what `cogbatch run` prints on stdout): counts and rates, memory, the model, Ray."""
        if self.message:
            if self.interrupted:
                return f"{self.message}; run the same command again."
            return f"{self.message} ({self._items()}, {self.requests_total} requests)."
        reused = f" ({self.reused} reused)" if self.reused else ""
        line = (
            f"{self._items()}: {self.done} ok, {self.failed} failed{reused}, {self.skipped} already done; "
            f"{self.wall_s:.1f} s, {self.images_per_s:.2f} images/s, {self.tokens_per_s:.1f} generated tokens/s "
            f"-> {self.output}"
        )
        if self.interrupted:
            line += " (interrupted: run the same command again to resume)"
        memory = f"peak host memory {self.peak_host_rss_bytes / GIB:.2f} GiB"
        if self.peak_device_bytes:
            memory += f", peak device memory {self.peak_device_bytes / GIB:.2f} GiB"
        lines = [line, memory]
        if self.model_load:
            lines.append(self._describe_model(self.model_load))
        if self.engine == "ray":
            startup = f"start-up {self.ray_startup_s:.1f} s" if self.ray_startup_s is not None else "joined a cluster"
            lines.append(f"ray: {self.workers or '?'} actor(s), {startup}")
        return "\n".join(lines)

    def _items(self) -> str:
        """`3 files, 2 distinct images`: every item has its rows; byte-identical ones share a generation."""
        noun = "manifest rows" if self.input_kind == "manifest" else "files"
        if self.items == 1:
            noun = noun.removesuffix("s")
        return f"{self.items} {noun}, {self.distinct_images} distinct image{'' if self.distinct_images == 1 else 's'}"

    def _describe_model(self, load: dict[str, Any]) -> str:
        """One line from the load report's fields: what was loaded, where, how fast, and the batch plan."""
        line = f"model: {load.get('checkpoint', self.model)} on {load.get('device', '?')} ({load.get('dtype', '?')}"
        line += f", {load['quantization']})" if load.get("quantization") else ")"
        if isinstance(load.get("total_s"), int | float):
            line += f", loaded in {load['total_s']:.1f} s"
        if load.get("total_weight_bytes"):
            line += f", weights {load['total_weight_bytes'] / GIB:.2f} GiB"
        if load.get("cache_hit"):
            line += " (from the quantized-weights cache)"
        if self.worker is not None and self.worker.execution_mode:
            line += f"; {self.worker.execution_mode} mode, planned batch {self.worker.planned_batch}"
        return line


@dataclass
class PlanReport:
    """`cogbatch plan`: predicted device memory of a job's model and the batches that fit."""

    model: str
    generation: str
    device: str
    dtype: str
    quantization: str
    vram_ceiling: int  # the memory planned for: the job's ceiling, or a named card's usable memory
    weights: dict[str, Any]  # bytes per component, per dtype, on the device and the host
    per_request: dict[str, int]
    dense_copy_bytes: dict[str, int]
    modes: dict[str, dict[str, Any]]  # resident / swap: peak of one request, whether it fits, largest batch
    plan: dict[str, Any]  # the batch plan a run would start with, or {"mode": None, "error": why}
    notes: list[str] = field(default_factory=list)
    target: dict[str, Any] | None = None  # the card planned for (--gpu / --vram): memory, capability, reserve, usable
    int4_kernel: str | None = None  # what int4 layers multiply with there (None: nothing quantized)
    config_source: str | None = None  # where config.json came from when not from the checkpoint itself
    prompt_tokens_source: str = ""  # how per_request["assumed_prompt_tokens"] was decided
    embeddings_on_cpu: bool = False  # the job's setting, or what `auto` chose (`variants` has both)
    embeddings_auto: bool = False  # the job left it to the planner (`embeddings_on_cpu: auto`)
    variants: list[dict[str, Any]] = field(default_factory=list)  # without / with embeddings_on_cpu: modes, plan
    basis: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> what its planned peak is made of
    dryrun: dict[str, Any] | None = None  # the fake-CUDA dry run's row nearest to the plan (`--verbose`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self, verbose: bool = False) -> str:
        """The report for a terminal; `verbose` adds what the plan's peak is made of and the dry run's figures."""
        w, r = self.weights, self.per_request
        lines = [
            f"{self.model} ({self.generation}), {self.quantization}, {self.dtype} on {self.device}, "
            f"ceiling {self.vram_ceiling / GIB:.2f} GiB"
        ]
        if self.target:
            t = self.target
            cc = f", compute capability {t['capability']}" if t["capability"] else ""
            lines.append(
                f"card: {t['name']}, {t['memory_bytes'] / GIB:.2f} GiB{cc}; usable {t['usable_bytes'] / GIB:.2f} GiB "
                f"(minus {t['reserve_bytes'] / GIB:.2f} GiB for the CUDA context and workspaces)"
            )
        if self.int4_kernel:
            lines.append(f"int4 kernel: {self.int4_kernel}")
        if self.config_source:
            lines.append(f"config: {self.config_source}")
        lines.append(
            f"prompt: {r['assumed_prompt_tokens']} tokens ({self.prompt_tokens_source}); "
            f"up to {r['max_new_tokens']} new tokens"
        )
        lines += self._describe_variants()
        lines += [
            f"weights on the device: {w['device'] / GIB:.2f} GiB (vision {w['vision'] / GIB:.2f}, language "
            f"{w['language'] / GIB:.2f}, embeddings {w['embeddings'] / GIB:.2f}, lm_head {w['lm_head'] / GIB:.2f})",
            "  by dtype: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in sorted(w["by_dtype"].items())),
            f"per request: KV cache {r['kv_cache_bytes'] / GIB:.3f} GiB (image prefix "
            f"{r['image_prefix_bytes'] / GIB:.3f}), vision activations "
            f"{r['vision_activation_bytes_per_image'] / GIB:.3f} GiB per image",
        ]
        for mode, m in self.modes.items():
            verdict = f"largest batch {m['largest_batch']}" if m["fits"] else "does not fit"
            lines.append(f"{mode:>9}: batch 1 needs {m['peak_bytes_batch_1'] / GIB:.2f} GiB -> {verdict}")
        p = self.plan
        lines.append(f"plan: {p['mode']} mode, batch {p['slots']}" if p.get("mode") else f"plan: {p['error']}")
        lines += [f"  note: {note}" for note in (*p.get("notes", ()), *self.notes)]
        if verbose:
            lines += self._describe_basis()
        return "\n".join(lines)

    def _describe_basis(self) -> list[str]:
        """Both numbers' basis: the planned peak's parts per phase, and what the dry run traced nearest to it."""
        lines = []
        for phase, parts in self.basis.items():
            terms = " + ".join(f"{k.replace('_', ' ')} {v / GIB:.2f}" for k, v in parts.items() if v)
            lines.append(f"basis, {phase} phase (GiB): {terms} = {sum(parts.values()) / GIB:.2f}")
        d = self.dryrun
        if d:
            over = "no allocation over" if d["oom_events"] == 0 else f"{d['oom_events']} allocations over"
            table = "in host memory" if d.get("embeddings_on_cpu") else "on the device"
            lines.append(
                f"dry run, the nearest traced plan (fake CUDA at full size, {d['device']}, {d['mode']}, {d['slots']} "
                f"slots, token embeddings {table}; docs/dryrun.md): "
                f"planned {d['planned_bytes'] / GIB:.2f} GiB, simulated allocator reserved "
                f"{d['reserved_bytes'] / GIB:.2f} GiB ({d['reserved_bytes'] / d['planned_bytes']:.2f} of planned) and "
                f"allocated {d['allocated_bytes'] / GIB:.2f} GiB on a card of the planned size, {over}"
            )
        elif self.plan.get("mode") and self.device.startswith("cuda"):
            lines.append("dry run: none traced for this model and device (scripts/trace_gpu.py traces any)")
        return lines

    def _describe_variants(self) -> list[str]:
        """What fits under the ceiling with and without embeddings_on_cpu: one row each (* = the job's setting)."""
        if not self.variants:
            return []
        rows = []
        for v in self.variants:
            label = self.quantization + (" + embeddings_on_cpu" if v["embeddings_on_cpu"] else "")
            cells = [f"batch {m['largest_batch']}" if m["fits"] else "does not fit" for m in v["modes"].values()]
            p = v["plan"]
            pick = f"{'phase-swapped' if p['mode'] == 'swap' else p['mode']}, batch {p['slots']}" if p["mode"] else "-"
            mark = "*" if v["embeddings_on_cpu"] == self.embeddings_on_cpu else " "
            rows.append((f"{mark} {label}", f"{v['weights_device_bytes'] / GIB:.2f} GiB", *cells, pick))
        fits = f"what fits in {self.vram_ceiling / GIB:.2f} GiB"
        header = (fits, "weights", "resident", "phase-swapped", "a run uses")
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in (header, *rows)]
        if self.embeddings_auto:
            where = "host memory (the run swaps phases)" if self.embeddings_on_cpu else "the device"
            lines.append(f"  * embeddings_on_cpu: auto -> the token embeddings in {where}")
        return lines


@dataclass
class StatusReport:
    """`cogbatch status`: per task, ok / failed / pending items and rows made with other settings (stale)."""

    output: str
    input: str  # the folder or manifest counted
    items: int  # files of the folder, or manifest rows (one result row each per task)
    distinct_images: int
    rows: int  # current rows of the output, one per (path, task)
    tasks: dict[str, dict[str, int]]  # task -> {"ok", "error", "stale", "pending"}, over the items
    running: dict[str, Any] | None = None  # the run holding the output's lock now (its sidecar), if any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        from cogbatch.errors import describe_holder

        lines = [f"{self.output}: {self.items} items of {self.input} ({self.distinct_images} distinct images), "
                 f"{self.rows} current rows"]  # fmt: skip
        if self.running is not None:
            lines.append(f"  running now: {describe_holder(self.running)}")
        for name, t in self.tasks.items():
            lines.append(
                f"  {name}: {t['ok']} ok, {t['error']} failed, {t['pending']} pending"
                + (f", {t['stale']} made with other settings" if t["stale"] else "")
            )
        return "\n".join(lines)


@dataclass
class ExportReport:
    """`cogbatch export`: what was written, left unchanged, skipped (with why) or in conflict."""

    format: str
    output: str
    dest: str | None
    task: str | None = None
    rows: int = 0  # rows exported (jsonl / csv)
    written: int = 0
    overwritten: int = 0  # of `written`: files that existed with other content (--overwrite)
    unchanged: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    conflicts: list[dict[str, str]] = field(default_factory=list)  # {"path", "target", "reason"}
    files: list[str] = field(default_factory=list)  # jsonl / csv with a destination: one file per task

    def describe(self, limit: int = 20) -> str:
        """The human summary: counts, then the first `limit` conflicts and skips with their reasons."""
        where = self.dest or ("beside the images" if self.format == "txt" else "stdout")
        if self.files:
            where = ", ".join(self.files)
        what = f"task {self.task!r}" if self.task else "all tasks"
        if self.format != "txt" and self.dest is None:
            return f"{self.format} export of {what}: {self.rows} rows -> stdout"
        rows = f"{self.rows} rows; " if self.format != "txt" else ""
        lines = [
            f"{self.format} export of {what} -> {where}: {rows}{self.written} written "
            f"({self.overwritten} overwritten), {self.unchanged} unchanged, {len(self.skipped)} skipped, "
            f"{len(self.conflicts)} conflicts"
        ]
        problems = [("conflict", c) for c in self.conflicts] + [("skipped", c) for c in self.skipped]
        lines += [f"  {kind}: {p['path']}: {p['reason']}" for kind, p in problems[:limit]]
        if len(problems) > limit:
            lines.append(f"  ... and {len(problems) - limit} more (--json lists them all)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "counts": {
                "written": self.written,
                "unchanged": self.unchanged,
                "skipped": len(self.skipped),
                "conflicts": len(self.conflicts),
            },
        }


@dataclass
class QuantizeReport:
    """`cogbatch quantize`: the model quantized into the cache, and its load report."""

    model: str
    load_report: Any  # cogbatch.model.quant.report.LoadReport (kept untyped here: that module imports torch)

    def to_dict(self) -> dict[str, Any]:
        return self.load_report.to_dict()

    def describe(self) -> str:
        return f"{self.model}: {self.load_report.summary()}\ncache: {self.load_report.cache_path}"


@dataclass
class CompactReport:
    """`cogbatch compact`: part files before and after (equal when merging would not reduce them)."""

    output: str
    parts_before: int
    parts_after: int

    def to_dict(self) -> dict[str, Any]:
        return {"parts_before": self.parts_before, "parts_after": self.parts_after}

    def describe(self) -> str:
        return f"{self.output}: {self.parts_before} part files -> {self.parts_after}"
