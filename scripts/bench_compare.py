#!/usr/bin/env python
"""`cogbatch compare` on the golden tiny checkpoints: int4 g128, int4 g32 and int8 against none.

Runs `cogbatch.compare_job` on both reference checkpoints of tests/data/golden (CogVLM `cogvlm1/dev`,
CogVLM2 `cogvlm2/dev`; random weights, so the absolute figures say nothing about real captions:
they check the machinery and the order int8 < int4) over a few generated images, with a caption
task and a short-answer task, in each compute dtype asked for, and prints a Markdown table
(docs/quantization-quality.md shows it). `--per-layer` adds the layer-group breakdown of int4 g128.

    python scripts/bench_compare.py                          # 8 images, bf16 and fp32, ~5 min on 2 cores
    python scripts/bench_compare.py --images 4 --dtypes bf16 --per-layer
    python scripts/bench_compare.py --kv-cache --dtypes bf16 # the 8-bit KV cache: weights none / int4 / int8

`--kv-cache` compares, for weights none, int4-g128 and int8, the weights alone against none, the
weights with an 8-bit KV cache (`W+kv8`) against none, and `W+kv8` against `W` (the cache's own
effect); it adds the teacher-forced logit error of the 8-bit cache against the 16-bit one (max abs,
relative to the largest logit, and KL) on the golden checkpoints' first reference case.

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
KV_WEIGHTS = ("none", "int4-g128", "int8")  # --kv-cache: each alone, with +kv8, and +kv8 against itself
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
    pairs = [(q, "none") for q in QUANTS]
    if args.kv_cache:
        pairs = []
        for w in KV_WEIGHTS:
            alone = [] if w == "none" else [(w, "none")]
            pairs += alone + [(f"{w}+kv8", "none")] + ([] if w == "none" else [(f"{w}+kv8", w)])
    for arch in ARCHES:
        for dtype in args.dtypes:
            for quant, against in pairs:
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
                pairs_file = work / f"pairs-{arch}-{dtype}-{quant}-{against}.parquet"
                report = cogbatch.compare_job(job, sample=args.images, topk=None, per_layer=per_layer, against=against,
                                              pairs=pairs_file)  # fmt: skip
                row = {
                    "checkpoint": f"{arch}/dev",
                    "dtype": dtype,
                    "b": quant,
                    "a": against,
                    "seconds": round(time.perf_counter() - t0, 1),
                    **{k: report.overall[k] for k in ("pairs", "tf_positions", *FIGURES)},
                    "tasks": {t: {k: s[k] for k in FIGURES} for t, s in report.tasks.items()},
                    "images_per_s": {"a": report.a.images_per_s, "b": report.b.images_per_s},
                }
                if report.per_layer is not None:
                    row["per_layer"] = [g.to_dict() for g in report.per_layer]
                if args.kv_cache and against == "none" and quant.endswith("+kv8"):
                    row["kv_logit_error"] = kv_logit_error(golden / arch / "dev", quant.removesuffix("+kv8"), dtype)
                rows.append(row)
                print(f"{arch} {dtype} {quant} vs {against}: KL {row['tf_kl']:.4f} top-1 {row['tf_top1']:.3f} "
                      f"({row['seconds']} s)", file=sys.stderr, flush=True)  # fmt: skip
    return {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
        "images": args.images,
        "tasks": TASKS,
        "topk": None,
        "rows": rows,
    }


def kv_logit_error(ckpt: Path, weights: str, dtype: str) -> dict:
    """Logits of the 8-bit KV cache against the 16-bit one, same weights, teacher-forced on the reference's
    greedy continuation of case `a` (`CogVLM.logits` reads keys and values as the cache stores them)."""
    import torch
    from safetensors.torch import load_file

    from cogbatch.model.cogvlm import CogVLM

    model = CogVLM.from_pretrained(ckpt, dtype=dtype, device="cpu", quantization=weights, cache_dir=False)
    c = load_file(ckpt / "cases.safetensors")
    new = c["b_new_tokens"][:, :-1]
    ids = torch.cat([c["a_input_ids"], new], 1)
    types = torch.cat([c["a_token_type_ids"], torch.zeros_like(new)], 1)
    mask = torch.cat([c["a_attention_mask"], torch.ones_like(new)], 1)
    out = {}
    for kv in ("none", "int8"):
        model.kv_cache = kv
        out[kv] = model.logits(ids, types, mask, c["a_images"], last=new.shape[1] + 1)[0]
    diff = (out["int8"] - out["none"]).abs().max()
    p, q = out["none"].log_softmax(-1), out["int8"].log_softmax(-1)
    return {"positions": int(p.shape[0]), "max_abs": float(diff), "max_rel": float(diff / out["none"].abs().max()),
            "kl": float((p.exp() * (p - q)).sum(-1).mean()),
            "top1": float((p.argmax(-1) == q.argmax(-1)).float().mean())}  # fmt: skip


def markdown(result: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else fmt.format(v)

    lines = [
        "| checkpoint | dtype | b | a | exact | prefix | 1st fork | TF top-1 | TF KL (nats) | chrF | ROUGE-L |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        kl = "{:.4f}" if (r["tf_kl"] or 0) >= 1e-3 else "{:.1e}"  # the KV cache's KL is 1e-4 or less
        lines.append(
            f"| {r['checkpoint']} | {r['dtype']} | {r['b']} | {r['a']} | {f(r['exact_match'], '{:.2f}')} | "
            f"{f(r['prefix_agreement'], '{:.2f}')} | {f(r['mean_first_divergence'], '{:.1f}')} | "
            f"{f(r['tf_top1'], '{:.3f}')} | {f(r['tf_kl'], kl)} | {f(r['chrf'], '{:.1f}')} | "
            f"{f(r['rouge_l'], '{:.2f}')} |"
        )
    kv = [r for r in result["rows"] if "kv_logit_error" in r]
    if kv:
        lines += ["", "Logits of the 8-bit KV cache against the 16-bit one, same weights (teacher-forced):", "",
                  "| checkpoint | dtype | weights | positions | max abs | max abs / max logit | KL (nats) | top-1 |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in kv:
            e = r["kv_logit_error"]
            lines.append(f"| {r['checkpoint']} | {r['dtype']} | {r['b'].removesuffix('+kv8')} | {e['positions']} | "
                         f"{e['max_abs']:.2e} | {e['max_rel']:.2e} | {e['kl']:.2e} | {e['top1']:.3f} |")  # fmt: skip
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
    parser.add_argument("--kv-cache", action="store_true", help="The 8-bit KV cache with weights none, int4, int8.")
    parser.add_argument("--json", type=Path, help="Where the results go (default outputs/bench/compare-<date>.json).")
    args = parser.parse_args()
    result = run(args)
    out = args.json or REPO / "outputs" / "bench" / f"compare{'-kv8' if args.kv_cache else ''}-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"\nwritten: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
