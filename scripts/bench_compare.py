#!/usr/bin/env python
"""`cogbatch compare` on the golden tiny checkpoints: int4 g128, int4 g32 and int8 against none.

Runs `cogbatch.compare_job` on both reference checkpoints of tests/data/golden (CogVLM `cogvlm1/dev`,
CogVLM2 `cogvlm2/dev`; random weights, so the absolute figures say nothing about real captions:
they check the machinery and the order int8 < int4) over a few generated images, with a caption
task and a short-answer task, in each compute dtype asked for, and prints a Markdown table
(docs/quantization-quality.md shows it). `--per-layer` adds the layer-group breakdown of int4 g128.

    python scripts/bench_compare.py                          # 8 images, bf16 and fp32, ~5 min on 2 cores
    python scripts/bench_compare.py --images 4 --dtypes bf16 --per-layer

The KL is exact here (`topk=None`: every log-probability kept; the vocabularies are small). Results
go to outputs/bench/compare-<date>.json. The repository root is put on sys.path, so it runs from a
plain checkout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ARCHES = ("cogvlm1", "cogvlm2")
QUANTS = ("int4-g128", "int4-g32", "int8")
TASKS = [
    {"name": "caption", "prompt": "Describe this image.", "max_new_tokens": 24},
    {"name": "colors", "prompt": "What colors are in this image?", "template": "vqa", "max_new_tokens": 8},
]
FIGURES = ("exact_match", "prefix_agreement", "mean_first_divergence", "tf_top1", "tf_kl", "chrf", "rouge_l")


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """`n` small PNGs of random pixels and sizes (distinct bytes)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = int(rng.integers(24, 96)), int(rng.integers(24, 96))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.png")


def run(args: argparse.Namespace) -> dict:
    import cogbatch
    from tests.golden import materialize

    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    golden = materialize(work / "golden")
    make_images(work / "images", args.images)
    rows = []
    for arch in ARCHES:
        for dtype in args.dtypes:
            for quant in QUANTS:
                job = {
                    "model": str(golden / arch / "dev"),
                    "input": {"folder": str(work / "images")},
                    "output": str(work / f"out-{arch}"),
                    "quantization": quant,
                    "device": "cpu",
                    "dtype": dtype,
                    "cache_dir": str(work / "cache"),
                    "tasks": TASKS,
                }
                per_layer = args.per_layer and quant == "int4-g128"
                t0 = time.perf_counter()
                report = cogbatch.compare_job(job, sample=args.images, topk=None, per_layer=per_layer,
                                              pairs=work / f"pairs-{arch}-{dtype}-{quant}.parquet")  # fmt: skip
                row = {
                    "checkpoint": f"{arch}/dev",
                    "dtype": dtype,
                    "b": quant,
                    "a": "none",
                    "seconds": round(time.perf_counter() - t0, 1),
                    **{k: report.overall[k] for k in ("pairs", "tf_positions", *FIGURES)},
                    "tasks": {t: {k: s[k] for k in FIGURES} for t, s in report.tasks.items()},
                    "images_per_s": {"a": report.a.images_per_s, "b": report.b.images_per_s},
                }
                if report.per_layer is not None:
                    row["per_layer"] = [g.to_dict() for g in report.per_layer]
                rows.append(row)
                print(f"{arch} {dtype} {quant}: KL {row['tf_kl']:.4f} top-1 {row['tf_top1']:.3f} "
                      f"({row['seconds']} s)", file=sys.stderr, flush=True)  # fmt: skip
    return {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
        "images": args.images,
        "tasks": TASKS,
        "topk": None,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else fmt.format(v)

    lines = [
        "| checkpoint | dtype | b (vs none) | exact | prefix | 1st fork | TF top-1 | TF KL (nats) | chrF | ROUGE-L |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['checkpoint']} | {r['dtype']} | {r['b']} | {f(r['exact_match'], '{:.2f}')} | "
            f"{f(r['prefix_agreement'], '{:.2f}')} | {f(r['mean_first_divergence'], '{:.1f}')} | "
            f"{f(r['tf_top1'], '{:.3f}')} | {f(r['tf_kl'], '{:.4f}')} | {f(r['chrf'], '{:.1f}')} | "
            f"{f(r['rouge_l'], '{:.2f}')} |"
        )
    layered = [r for r in result["rows"] if "per_layer" in r]
    if layered:
        names = [g["group"] for g in layered[0]["per_layer"]]  # the first row's order: largest KL first
        lines += ["", f"Per layer group, {layered[0]['b']} (TF KL, nats per token):", "",
                  f"| checkpoint | dtype | {' | '.join(names)} |", "|---|---|" + "---:|" * len(names)]  # fmt: skip
        for r in layered:
            kl = {g["group"]: g["tf_kl"] for g in r["per_layer"]}
            lines.append(f"| {r['checkpoint']} | {r['dtype']} | " + " | ".join(f(kl.get(n), "{:.4f}") for n in names)
                         + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--per-layer", action="store_true", help="Also the layer groups of int4-g128.")
    parser.add_argument("--json", type=Path, help="Where the results go (default outputs/bench/compare-<date>.json).")
    args = parser.parse_args()
    result = run(args)
    out = args.json or REPO / "outputs" / "bench" / f"compare-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"\nwritten: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
