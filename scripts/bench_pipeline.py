#!/usr/bin/env python
"""Pipeline throughput on CPU: batch size 1 vs planner-chosen batches, 1 task vs 4 tasks per image.

Runs the worker (the same code `cogbatch run` uses, without the process start-up) over generated
images with a random CogVLM2-shaped checkpoint whose image prefix dominates the prompt, as it does
for the real model (2,306 image tokens vs a few dozen text tokens):

    python scripts/bench_pipeline.py            # prints a table, writes outputs/bench/pipeline_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cogbatch.inputs.pending import build_entries, expand_requests
from cogbatch.job import load_job
from cogbatch.model.cogvlm import CogVLM
from cogbatch.testing.tiny import write_tiny_checkpoint
from cogbatch.worker.loading import load_entry
from cogbatch.worker.worker import ModelWorker

REPO = Path(__file__).resolve().parent.parent
SHAPE = {
    "arch": "cogvlm2",
    "hidden_size": 512,
    "layers": 6,
    "heads": 4,
    "kv_heads": 2,
    "vision_hidden_size": 512,
    "vision_layers": 12,
    "image_size": 672,
    "dtype": "fp16",
}
TASKS = [
    {"name": "caption", "prompt": "Describe this image in detail.", "template": "chat"},
    {"name": "objects", "prompt": "What objects are in this picture?", "template": "vqa"},
    {"name": "colors", "prompt": "What are the main colors?", "template": "vqa"},
    {"name": "text", "prompt": "Is there any text in the picture?", "template": "vqa"},
]


def make_images(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8, generator=g).numpy()
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")


def measure(model, ckpt: Path, images: Path, n_tasks: int, batch: int | None, new_tokens: int, repeats: int):
    cfg = load_job(
        {
            "model": str(ckpt),
            "input": {"folder": str(images)},
            "output": str(images.parent / "out"),
            "quantization": "none",
            "device": "cpu",
            "dtype": "fp32",
            "batch_size": batch,
            "generation": {"max_new_tokens": new_tokens},
            "tasks": TASKS[:n_tasks],
        },
        pipeline=None,
    )
    requests = expand_requests(build_entries(cfg), cfg, {t["name"]: "x" for t in TASKS})
    by_image: dict[str, tuple] = {}
    for r in requests:
        by_image.setdefault(r.image.image_id, (r.image, []))[1].append(r)
    times, worker = [], None
    for _ in range(repeats):
        worker = ModelWorker(cfg, "bench", model=model)
        chunk = [(load_entry(e, cfg, worker.image_size, None), reqs) for e, reqs in by_image.values()]
        t0 = time.perf_counter()
        for i in range(0, len(chunk), worker.chunk_images):
            worker.process(chunk[i : i + worker.chunk_images])
        times.append(time.perf_counter() - t0)
    s = worker.summary_stats()
    t = statistics.median(times)
    return {
        "tasks": n_tasks,
        "batch": "planner" if batch is None else batch,
        "planned_batch": s.planned_batch,
        "images": len(by_image),
        "requests": s.requests,
        "seconds": round(t, 2),
        "images_per_s": round(len(by_image) / t, 3),
        "requests_per_s": round(s.requests / t, 3),
        "vision_encodes": s.vision_encodes,
        "prefix_reuses": s.prefix_reuses,
        "mean_batch_size": s.mean_batch_size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", type=Path, default=REPO / "outputs" / "bench" / "pipeline_cpu.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="cogbatch-bench-"))
    ckpt = REPO / "outputs" / "bench" / "cogvlm2-pipeline-ckpt-v2"
    if not (ckpt / "config.json").is_file():
        write_tiny_checkpoint(ckpt, **SHAPE, seed=0, overwrite=True)
    make_images(work / "images", args.images)
    model = CogVLM.from_pretrained(ckpt, dtype="float32", device="cpu")
    rows = [
        measure(model, ckpt, work / "images", n, b, args.new_tokens, args.repeats)
        for n, b in ((1, 1), (1, None), (4, 1), (4, None))
    ]
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\nworker throughput, random CogVLM2-shaped model ({params / 1e6:.0f} M params, {SHAPE['image_size']} px = "
        f"{model.config.vision_tokens} image tokens), fp32 CPU ({platform.machine()}, {torch.get_num_threads()} "
        f"threads), {args.images} images, {args.new_tokens} new tokens"
    )
    cols = [
        "tasks",
        "batch",
        "planned_batch",
        "requests",
        "seconds",
        "images_per_s",
        "requests_per_s",
        "vision_encodes",
        "prefix_reuses",
        "mean_batch_size",
    ]
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]!s:>14}" for c in cols))
    one = next(r for r in rows if r["tasks"] == 1 and r["batch"] == "planner")["seconds"]
    four = next(r for r in rows if r["tasks"] == 4 and r["batch"] == "planner")["seconds"]
    print(f"4 tasks per image cost {four / one:.2f}x the time of 1 task (planner batches)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "shape": SHAPE,
                "images": args.images,
                "new_tokens": args.new_tokens,
                "rows": rows,
                "four_vs_one_task": round(four / one, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    with torch.no_grad():
        main()
