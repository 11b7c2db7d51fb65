"""What `cogbatch compare` found: one `Pair` per (image, task), each side's costs, the per-task summary.

`CompareReport.to_dict()` is `--json` (one line), `describe()` the table people read; `write_pairs`
writes every pair to a Parquet file beside the output (never in it: the output holds result parts only).
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cogbatch.compare.scores import ForcedScore, chrf, first_divergence, mean, prefix_agreement, rouge_l


@dataclass
class Answer:
    """One side's answer to one request (`error` when it has none)."""

    text: str | None = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Pair:
    """One (image, task): a = the reference side (`--against`), b = the job's quantization."""

    path: str
    image_id: str
    task: str
    prompt: str
    a: Answer
    b: Answer = field(default_factory=Answer)
    forced: ForcedScore | None = None  # a's tokens through b

    @property
    def ok(self) -> bool:
        return self.a.error is None and self.b.error is None and self.a.text is not None and self.b.text is not None

    def scores(self) -> dict[str, Any]:
        """The pair's scores (None where a side has no answer, or the reference generated no token)."""
        if not self.ok:
            return dict.fromkeys(SCORE_COLUMNS)
        a, b = self.a, self.b
        forced = self.forced
        return {
            "exact": a.text == b.text,
            "prefix_agreement": prefix_agreement(a.token_ids, b.token_ids),
            "first_divergence": first_divergence(a.token_ids, b.token_ids),
            "tf_positions": forced.positions if forced else 0,
            "tf_top1": forced.top1 if forced else None,
            "tf_kl": forced.kl if forced else None,
            "chrf": chrf(b.text, a.text),
            "rouge_l": rouge_l(a.text, b.text),
        }

    def row(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "image_id": self.image_id,
            "task": self.task,
            "prompt": self.prompt,
            "text_a": self.a.text,
            "text_b": self.b.text,
            "tokens_a": self.a.token_ids,
            "tokens_b": self.b.token_ids,
            "finish_a": self.a.finish_reason,
            "finish_b": self.b.finish_reason,
            "error": self.a.error or self.b.error,
            **self.scores(),
        }


SCORE_COLUMNS = ("exact", "prefix_agreement", "first_divergence", "tf_positions", "tf_top1", "tf_kl", "chrf",
                 "rouge_l")  # fmt: skip


def summarize(pairs: list[Pair]) -> dict[str, Any]:
    """Rates over the pairs both sides answered; teacher-forced figures weighted by token (not by pair)."""
    scored = [(p, p.scores()) for p in pairs if p.ok]
    rows = [s for _, s in scored]
    forced = [p.forced for p, _ in scored if p.forced is not None and p.forced.positions]
    positions = sum(f.positions for f in forced)
    diverged = [s["first_divergence"] for s in rows if s["first_divergence"] is not None]
    return {
        "pairs": len(pairs),
        "scored": len(rows),
        "errors": len(pairs) - len(rows),
        "exact_match": mean([float(s["exact"]) for s in rows]),
        "prefix_agreement": mean([s["prefix_agreement"] for s in rows]),
        "diverged": len(diverged),
        "mean_first_divergence": mean(diverged),
        "tf_positions": positions,
        "tf_top1": sum(f.top1_agree for f in forced) / positions if positions else None,
        "tf_kl": sum(f.kl_sum for f in forced) / positions if positions else None,
        "chrf": mean([s["chrf"] for s in rows]),
        "rouge_l": mean([s["rouge_l"] for s in rows]),
    }


@dataclass
class SideStats:
    """One side's model and what running it cost."""

    role: str  # "a" (reference) or "b" (the job's)
    quantization: str  # label: none, int8, int4-g128, int4-g128+rules
    device: str
    dtype: str
    mode: str | None = None  # resident / swap (phase-swapped), from the batch plan
    load_s: float | None = None
    load_peak_host_rss_bytes: int | None = None
    load_peak_device_bytes: int | None = None
    run_peak_device_bytes: int | None = None
    cache: str | None = None  # the quantized-weights cache: hit, written, disabled...
    images: int = 0
    requests: int = 0
    generated_tokens: int = 0
    generate_s: float = 0.0  # vision encode + decoding, the worker's time (what a run spends per image)
    forced_s: float = 0.0  # the teacher-forced passes (not counted in images/s)
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.generate_s if self.generate_s > 0 and self.images else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}


@dataclass
class GroupKL:
    """`--per-layer`: the job's quantization applied to one group of layers only, scored against side a."""

    group: str
    patterns: list[str]
    layers: int  # Linears of the group the job quantizes
    tf_positions: int = 0
    tf_kl: float | None = None
    tf_top1: float | None = None
    skipped: str | None = None  # why it was not measured

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompareReport:
    """The comparison of a job's quantization (b) against a reference setting (a) on a sample of its images."""

    job: str | None
    model: str
    a: SideStats
    b: SideStats
    seed: int
    requested_images: int
    images: int  # sampled (fewer when the input has fewer)
    input_images: int
    topk: int | None  # reference log-probabilities kept per position (None: all)
    overall: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    pairs_file: str | None
    kept_mass: float | None = None  # mean reference probability the kept top-k hold
    per_layer: list[GroupKL] | None = None
    advice: list[dict[str, str]] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["a"], d["b"] = self.a.to_dict(), self.b.to_dict()
        return d

    def describe(self) -> str:
        head = (f"compare: b = {self.b.quantization} (the job's) against a = {self.a.quantization}, "
                f"{self.images} of {self.input_images} images (seed {self.seed}), {self.overall['pairs']} pairs, "
                f"{self.model} in {self.b.dtype}")  # fmt: skip
        lines = [head, "", _table(self.tasks, self.overall), "", _sides(self.a, self.b)]
        if self.per_layer is not None:
            lines += ["", _groups(self.per_layer)]
        if self.advice:
            rules = ", ".join(f'{{pattern: "{r["pattern"]}", dtype: {r["dtype"]}}}' for r in self.advice)
            lines.append(f"advice: the group that moves the answers most; add to quantization.rules: {rules}")
        if self.kept_mass is not None and self.kept_mass < 1:
            lines.append(f"KL over the reference's top {self.topk} tokens + the rest as one outcome (a lower "
                         f"bound; they held {self.kept_mass:.1%} of its probability)")  # fmt: skip
        if self.pairs_file:
            lines.append(f"pairs: {self.pairs_file}")
        return "\n".join([*(f"note: {n}" for n in self.notes), *lines])


_COLUMNS = (
    ("pairs", "pairs", "{:d}"),
    ("exact", "exact_match", "{:.2f}"),
    ("prefix", "prefix_agreement", "{:.2f}"),
    ("1st fork", "mean_first_divergence", "{:.1f}"),
    ("TF top-1", "tf_top1", "{:.3f}"),
    ("TF KL", "tf_kl", "{:.4f}"),
    ("chrF", "chrf", "{:.1f}"),
    ("ROUGE-L", "rouge_l", "{:.2f}"),
)


def _table(tasks: dict[str, dict[str, Any]], overall: dict[str, Any]) -> str:
    rows = [["task", *(c[0] for c in _COLUMNS)]]
    for name, s in [*tasks.items(), ("all", overall)]:
        rows.append([name, *("-" if s[key] is None else fmt.format(s[key]) for _, key, fmt in _COLUMNS)])
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width,
                     strict=True))) for r in rows)  # fmt: skip


def _sides(a: SideStats, b: SideStats) -> str:
    def gib(n: int | None) -> str:
        return "-" if n is None else f"{n / 2**30:.2f} GiB"

    out = []
    for s in (a, b):
        rate = "-" if s.images_per_s is None else f"{s.images_per_s:.2f} images/s"
        mode = f", {s.mode}" if s.mode else ""
        load = "-" if s.load_s is None else f"{s.load_s:.1f} s"
        out.append(f"{s.role}: {s.quantization:<16} {s.device}{mode}; load {load}, peak RSS "
                   f"{gib(s.load_peak_host_rss_bytes)}, device peak {gib(s.load_peak_device_bytes)} (load) / "
                   f"{gib(s.run_peak_device_bytes)} (run); {rate}")  # fmt: skip
        out += [f"   {n}" for n in s.notes]
    return "\n".join(out)


def _groups(groups: list[GroupKL]) -> str:
    out = ["per layer group (the job's quantization in that group only), by teacher-forced KL:"]
    for g in groups:
        if g.skipped:
            out.append(f"  {g.group:<17} -  ({g.skipped})")
        else:
            kl = "-" if g.tf_kl is None else f"{g.tf_kl:.4f}"
            top1 = "-" if g.tf_top1 is None else f"{g.tf_top1:.3f}"
            layers = f"{g.layers} layer{'' if g.layers == 1 else 's'}"
            out.append(f"  {g.group:<17} KL {kl}  top-1 {top1}  ({layers}: {', '.join(g.patterns)})")
    return "\n".join(out)


def default_pairs_path(output: str | os.PathLike[str], now: _dt.datetime | None = None) -> Path:
    """`<output>.cogbatch/compare-<UTC time>.parquet`: beside the output, never in it."""
    output = Path(output)
    stamp = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    return output.with_name(output.name + ".cogbatch") / f"compare-{stamp}.parquet"


def write_pairs(path: Path, pairs: list[Pair], meta: dict[str, str]) -> None:
    """One row per (image, task), written through a temp file renamed into place; `meta` in the schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cogbatch.fsio import atomic_file

    schema = pa.schema(
        [
            ("path", pa.string()), ("image_id", pa.string()), ("task", pa.string()), ("prompt", pa.string()),
            ("text_a", pa.string()), ("text_b", pa.string()),
            ("tokens_a", pa.list_(pa.int32())), ("tokens_b", pa.list_(pa.int32())),
            ("finish_a", pa.string()), ("finish_b", pa.string()), ("error", pa.string()),
            ("exact", pa.bool_()), ("prefix_agreement", pa.float64()), ("first_divergence", pa.int32()),
            ("tf_positions", pa.int32()), ("tf_top1", pa.float64()), ("tf_kl", pa.float64()),
            ("chrf", pa.float64()), ("rouge_l", pa.float64()),
        ],
        metadata={f"cogbatch.{k}".encode(): v.encode() for k, v in meta.items()},
    )  # fmt: skip
    rows = [p.row() for p in pairs]
    table = pa.Table.from_pylist(rows, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        pq.write_table(table, f)
