#!/usr/bin/env python
"""Everything of issue 7 that needs CUDA, in one call meant to fit 10 minutes on one H100.

For each full-size model shape (CogVLM2-19B first, then CogVLM-17B, sizes from the real configs in
tests/data/*/config.json) it writes a random-weight bf16 checkpoint (~38 GB for CogVLM2: it goes to
a temp dir and is deleted before the next model, the device machine has 64 GiB of disk), then for
int4 and bf16:

  * loads it through the streaming quantizing loader (`CogVLM.from_pretrained`), recording the load
    time, weight bytes and the kernel classes in use (`model.load_report.kernels`);
  * generates at batch 1 / 4 / 8 with random images: peak reserved VRAM
    (`torch.cuda.max_memory_reserved`, goal: CogVLM2 int4 batch 4 under 11 GiB), images/s,
    decode tokens/s, and prefill / decode-step time against the memory-bandwidth floor
    (weight bytes / measured device copy bandwidth: a decode step must read every LM weight once).

The whole model stays on the GPU here (no phase swap): the memory figures are what a plain
`generate` needs, the upper bound of what the planner runs. Random weights give meaningless text,
so decoding runs with no stop tokens: every sequence makes exactly `--new-tokens` tokens.

    python scripts/bench_gpu.py                         # writes outputs/bench/gpu-<date>.json
    python scripts/bench_gpu.py --models cogvlm2 --batches 1,4 --json docs/bench/gpu-<date>.json

Without CUDA it exits with code 2 and says so, before touching the disk. A run past `--budget-s`
skips what is left and says which parts were skipped (the JSON marks them), so a partial result
still comes back from a time-limited device call.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"cogvlm2": REPO / "tests" / "data" / "cogvlm2-llama3-chat-19B" / "config.json",
           "cogvlm1": REPO / "tests" / "data" / "cogvlm-chat-hf" / "config.json"}  # fmt: skip
ARCH = {"cogvlm2": "cogvlm2", "cogvlm1": "cogvlm1"}
QUERY = "Describe this image in detail."
VRAM_GOAL_GIB = 11.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cogvlm2,cogvlm1", help="comma-separated: cogvlm2, cogvlm1 (in this order)")
    ap.add_argument("--quants", default="int4,bf16", help="comma-separated: int4, int8, bf16")
    ap.add_argument("--batches", default="1,4,8", help="batch sizes to generate at")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps per sequence")
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip what is left after this many seconds")
    ap.add_argument("--workdir", type=Path, help="where to write the random checkpoints (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="default: outputs/bench/gpu-<date>.json")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    for m in args.models:
        if m not in CONFIGS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(CONFIGS)}")
    for q in args.quants:
        if q not in ("int4", "int8", "bf16"):
            ap.error(f"unknown quantization {q!r}; choose from int4, int8, bf16")
    if not args.batches or min(args.batches) < 1:
        ap.error("--batches needs positive integers")
    if args.new_tokens < 1:
        ap.error("--new-tokens must be at least 1")
    return args


def shape_kwargs(model: str) -> dict:
    """write_tiny_checkpoint keyword arguments that reproduce the real config's sizes."""
    c = json.loads(CONFIGS[model].read_text())
    v = c["vision_config"]
    kw = {
        "arch": ARCH[model],
        "hidden_size": c["hidden_size"],
        "layers": c["num_hidden_layers"],
        "heads": c["num_attention_heads"],
        "intermediate_size": c["intermediate_size"],
        "vocab_size": c["vocab_size"],
        "vision_hidden_size": v["hidden_size"],
        "vision_layers": v["num_hidden_layers"],
        "vision_heads": v["num_heads"],
        "vision_intermediate_size": v["intermediate_size"],
        "image_size": v["image_size"],
        "patch_size": v["patch_size"],
    }
    if "num_multi_query_heads" in c:
        kw["kv_heads"] = c["num_multi_query_heads"]
    return kw


def copy_bandwidth(torch) -> float:
    """Device memory bandwidth in bytes/s from a 1 GiB device-to-device copy (read + write counted)."""
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / best


def bench_model(torch, ckpt: Path, quant: str, batches: list[int], new_tokens: int, bandwidth: float, cache: Path):
    """Load once, then generate at each batch size; one dict per batch plus the load figures."""
    from cogbatch.model.cogvlm import CogVLM
    from cogbatch.model.generate import GenerationConfig

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    kw = {"quantization": quant, "cache_dir": cache} if quant != "bf16" else {"cache_dir": False}
    t0 = time.perf_counter()
    model = CogVLM.from_pretrained(ckpt, dtype="bfloat16", device="cuda", **kw)
    load_wall = time.perf_counter() - t0
    report = model.load_report
    # a decode step reads every language-model weight and the LM head once (the embedding is a lookup);
    # the prefill also reads the vision tower
    comp = report.component_bytes
    lm_bytes = comp.get("language", 0) + comp.get("lm_head", 0) or report.total_weight_bytes
    prefill_bytes = lm_bytes + comp.get("vision", 0)
    load = {"load_s": round(report.total_s, 2), "load_wall_s": round(load_wall, 2),
            "weight_bytes": report.total_weight_bytes, "component_bytes": report.component_bytes,
            "kernels": report.kernels, "cache": report.cache_status,
            "weights_reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2)}  # fmt: skip
    size = model.config.vision.image_size
    g = torch.Generator().manual_seed(0)
    cfg = GenerationConfig(max_new_tokens=1 + new_tokens, stop_token_ids=())
    rows = []
    for bs in batches:
        samples = [model.build_inputs(None, QUERY, torch.randn(3, size, size, generator=g)) for _ in range(bs)]
        batch = model.collate(samples)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            model.generate(batch, GenerationConfig(max_new_tokens=2, stop_token_ids=()))  # warm-up
            torch.cuda.synchronize()
            t = model.generate(batch, cfg).timings
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            rows.append(
                {"batch": bs, "oom": True, "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
            )
            continue
        prefill = t["encode_s"] + t["prefill_s"]
        step = t["decode_s"] / new_tokens
        total = prefill + t["decode_s"]
        rows.append({
            "batch": bs,
            "oom": False,
            "prompt_tokens": int(batch.attention_mask.sum()),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "prefill_s": round(prefill, 3),
            "prefill_floor_s": round(prefill_bytes / bandwidth, 4),
            "decode_step_ms": round(step * 1e3, 2),
            "decode_floor_ms": round(lm_bytes / bandwidth * 1e3, 2),
            "decode_tok_s": round(bs * new_tokens / t["decode_s"], 1),
            "images_per_s": round(bs / total, 3),
        })  # fmt: skip
    del model
    torch.cuda.empty_cache()
    return load, rows


def print_table(results: list[dict], bandwidth: float) -> None:
    print(f"\ndevice copy bandwidth {bandwidth / 1e9:.0f} GB/s; floors = weight bytes / bandwidth")
    cols = ["model", "quant", "batch", "peak reserved GiB", "images/s", "decode tok/s", "prefill s",
            "prefill floor s", "decode step ms", "decode floor ms"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in results:
        if r.get("skipped"):
            print(f"| {r['model']} | {r['quant']} | skipped: {r['skipped']} |")
            continue
        for row in r["rows"]:
            if row.get("error"):
                cells = [r["model"], r["quant"], row["batch"], f"error: {row['error'][:80]}"]
            elif row["oom"]:
                cells = [r["model"], r["quant"], row["batch"], f"OOM at {row['peak_reserved_gib']}"]
            else:
                cells = [r["model"], r["quant"], row["batch"], row["peak_reserved_gib"], row["images_per_s"],
                         row["decode_tok_s"], row["prefill_s"], row["prefill_floor_s"], row["decode_step_ms"],
                         row["decode_floor_ms"]]  # fmt: skip
            print("| " + " | ".join(str(c) for c in cells) + " |")
    print("\nloads (streaming loader)")
    print("| model | quant | load s | weights GiB | cache | kernel classes |")
    print("|---|---|---:|---:|---|---|")
    for r in results:
        if not r.get("skipped"):
            ld = r["load"]
            kernels = ", ".join(f"{k} x{n}" for k, n in sorted(ld["kernels"].items())) or "-"
            print(f"| {r['model']} | {r['quant']} | {ld['load_s']} | {ld['weight_bytes'] / 2**30:.2f} | "
                  f"{ld['cache']} | {kernels} |")  # fmt: skip
    for r in results:
        if r["model"] == "cogvlm2" and r["quant"] == "int4" and not r.get("skipped"):
            b4 = next((x for x in r["rows"] if x["batch"] == 4), None)
            if b4 is not None and not b4.get("error"):
                ok = not b4["oom"] and not b4.get("error") and b4["peak_reserved_gib"] < VRAM_GOAL_GIB
                verdict = "met" if ok else "NOT met"
                print(f"\nCogVLM2 int4 batch 4 peak reserved {b4['peak_reserved_gib']} GiB: goal < {VRAM_GOAL_GIB} "
                      f"GiB {verdict} (whole model on the GPU, no phase swap)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU and none is available (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU. CPU benchmarks: python scripts/bench.py --quick",
              file=sys.stderr)  # fmt: skip
        return 2
    from cogbatch.model.tiny import write_tiny_checkpoint

    started = time.perf_counter()
    bandwidth = copy_bandwidth(torch)
    report: dict = {"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__, "copy_bandwidth_gbs": round(bandwidth / 1e9, 1),
                    "new_tokens": args.new_tokens,
                    "command": " ".join(["python", "scripts/bench_gpu.py", *sys.argv[1:]]),
                    "results": []}  # fmt: skip
    out = args.json or REPO / "outputs" / "bench" / f"gpu-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cogbatch-gpu-bench-", dir=args.workdir))
    try:
        for model in args.models:
            if time.perf_counter() - started > args.budget_s:
                report["results"] += [{"model": model, "quant": q, "skipped": "time budget"} for q in args.quants]
                continue
            ckpt = work / model
            t0 = time.perf_counter()
            print(f"writing a random {model} checkpoint to {ckpt} ...", file=sys.stderr, flush=True)
            write_tiny_checkpoint(ckpt, **shape_kwargs(model), dtype="bf16", shard_size="4GB", seed=0, overwrite=True)
            write_s = time.perf_counter() - t0
            for quant in args.quants:
                if time.perf_counter() - started > args.budget_s:
                    report["results"].append({"model": model, "quant": quant, "skipped": "time budget"})
                    continue
                print(f"{model} {quant} ...", file=sys.stderr, flush=True)
                load, rows = bench_model(torch, ckpt, quant, args.batches, args.new_tokens, bandwidth, work / "cache")
                report["results"].append({"model": model, "quant": quant, "write_s": round(write_s, 1),
                                          "load": load, "rows": rows})  # fmt: skip
                # written after every part: a device call killed at its time limit still leaves the results so far
                out.write_text(json.dumps(report, indent=1) + "\n")
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(work / "cache", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print_table(report["results"], bandwidth)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    with __import__("torch").no_grad():
        sys.exit(main())
