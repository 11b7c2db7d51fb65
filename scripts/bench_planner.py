"""The planner against the fake-CUDA dry run: predicted peak vs simulated reserved peak over a grid.

    python scripts/bench_planner.py              # the whole grid (about 15 min on 2 cores), a table
    python scripts/bench_planner.py --write      # ... into docs/dryrun.md and cogbatch/planning/dryrun_grid.json
    python scripts/bench_planner.py --models cogvlm --batches 4 --devices 8.6-bf16 --modes swap
    python scripts/bench_planner.py --fits [--write]   # only the largest batch under 11 GiB, from the planner

For each model (CogVLM, CogVLM2 at full size), device (sm86 bf16: TinyGemm; sm75 fp16: a dense copy per
call), mode (resident, phase-swapped, forced) and batch (1, 2, 4, 8 decode slots, as many images, one
prompt each, 256 new tokens planned): one `cogbatch.dryrun.trace`, planned on a card large enough for
the batch (so the planner's batch is the one asked for), whose allocator then gets exactly the plan's
peak (`plan.peak_bytes`, its 0.5 GiB margin included: `TraceConfig.card_from_plan`), as a card that
size would. The simulated caching allocator says what it reserves under that pressure (releasing
cached segments when full) and `over` counts allocations that still would not fit: 0 means the plan
fits a card of its own size; `allocated / planned` well below 1 is room the planner gave away.

By default every request makes 2 new tokens, one decode step (`TraceConfig.short_decode`): its cache
is still planned and allocated for 256 tokens, so the peaks are the same up to the late decode steps'
working memory (the attention bias and output grow with the keys seen: well under 1 MiB per slot);
`--full` decodes every token (about 5x longer).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "dryrun.md"
JSON = REPO / "cogbatch" / "planning" / "dryrun_grid.json"  # `cogbatch plan --verbose` quotes it
BEGIN, END = "<!-- planner-grid: begin -->", "<!-- planner-grid: end -->"
FITS = ("<!-- planner-fits: begin -->", "<!-- planner-fits: end -->")
DEVICES = {"8.6-bf16": ((8, 6), "bf16"), "7.5-fp16": ((7, 5), "fp16")}
GiB = 2**30


def run_one(model: str, device: str, mode: str, batch: int, full: bool) -> dict:
    from cogbatch.dryrun import TraceConfig, trace

    capability, dtype = DEVICES[device]
    card = 80 * GiB  # room for every batch of the grid in both modes: the planner's batch is the one asked
    cfg = TraceConfig(model=model, capability=capability, dtype=dtype, quantization="int4", batch=batch,
                      images=batch, tasks=1, new_tokens=256, card_bytes=card, mode=mode,
                      short_decode=not full, card_from_plan=True)  # fmt: skip
    t0 = time.perf_counter()
    r = trace(cfg)
    row = {
        "model": model, "device": device, "mode": mode, "batch": batch, "slots": r["plan"]["slots"],
        "planned_bytes": r["planned_peak_bytes"], "reserved_bytes": r["peak_reserved_bytes"],
        "allocated_bytes": r["peak_allocated_bytes"], "rows_ok": r["rows_ok"], "rows": r["rows"],
        "peak_phase": _peak_phase(r), "oom_events": r["oom_events"], "segment_releases": r["segment_releases"],
        "embeddings_on_cpu": r["load"]["embeddings_on_cpu"],
        "seconds": round(time.perf_counter() - t0, 1), "full_decode": full,
    }  # fmt: skip
    row["ratio"] = round(row["reserved_bytes"] / row["planned_bytes"], 3)
    return row


def _peak_phase(r: dict) -> str:
    phases = {k: v for k, v in r["phases"].items() if k not in ("worker", "generate", "load")}
    return max(phases, key=lambda k: phases[k]["peak_reserved"]) if phases else "-"


def render(rows: list[dict]) -> str:
    head = ("| model | device | mode | batch | slots | planned GiB | reserved GiB | allocated GiB | reserved / planned"
            " | allocated / planned | over | peak in |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['device']} | {r['mode']} | {r['batch']} | - | - | - | - | - | - | - | "
                         f"{r['error']} |")  # fmt: skip
            continue
        lines.append(
            f"| {r['model']} | {r['device']} | {r['mode']} | {r['batch']} | {r['slots']} | "
            f"{r['planned_bytes'] / GiB:.2f} | {r['reserved_bytes'] / GiB:.2f} | {r['allocated_bytes'] / GiB:.2f} | "
            f"{r['ratio']:.3f} | {r['allocated_bytes'] / r['planned_bytes']:.3f} | {r['oom_events']} | "
            f"{r['peak_phase']} |"
        )
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    if ratios:
        lines.append("")
        fits = sum(r.get("oom_events") == 0 for r in rows)
        lines.append(f"reserved / planned: {min(ratios):.3f} to {max(ratios):.3f} over {len(ratios)} runs; "
                     f"{sum(abs(x - 1) <= 0.10 for x in ratios)} within 10 %; {fits} fit a card of the planned "
                     "size with no allocation over.")  # fmt: skip
    return "\n".join(lines) + "\n"


def render_fits() -> str:
    """The largest batch the planner gives under an 11 GiB ceiling: model x device x KV cache x embeddings."""
    import cogbatch

    head = ("| model | device | KV cache | resident | phase-swapped | resident, embeddings on host "
            "| phase-swapped, embeddings on host | a run uses (`auto`) |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---|"]
    for model in ("cogvlm", "cogvlm2"):
        for device, (capability, _) in DEVICES.items():
            for kv in ("none", "int8"):
                job = {"model": model, "quantization": {"default": "int4", "kv_cache": kv},
                       "input": {"folder": "images"}, "output": "outputs/fits",  # never read: plan only
                       "tasks": [{"name": "caption", "prompt": "Describe this image.", "max_new_tokens": 256}]}
                r = cogbatch.plan_job(job, vram="11.5GiB", capability=".".join(map(str, capability)),
                                      pipeline=REPO / "pipeline.yaml")  # 11.5 GiB card: 11.0 GiB usable
                cells = [str(v["modes"][m]["largest_batch"]) for v in r.variants for m in ("resident", "swap")]
                p = r.plan
                uses = f"{p['mode']}, {p['slots']}" + (", embeddings on host" if r.embeddings_on_cpu else "")
                uses = uses if p["mode"] else "does not fit"
                lines.append(f"| {model} | {device} | {kv} | " + " | ".join(cells) + f" | {uses} |")
    return "\n".join(lines) + "\n"


def _write_block(marks: tuple[str, str], text: str) -> None:
    page = PAGE.read_text()
    pattern = re.compile(re.escape(marks[0]) + r"\n.*?" + re.escape(marks[1]), flags=re.S)
    if not pattern.search(page):
        raise SystemExit(f"{PAGE}: no {marks[0]} ... {marks[1]} block")
    PAGE.write_text(pattern.sub(lambda _: f"{marks[0]}\n{text}{marks[1]}", page))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cogvlm", "cogvlm2"], choices=["cogvlm", "cogvlm2"])
    ap.add_argument("--devices", nargs="+", default=list(DEVICES), choices=list(DEVICES))
    ap.add_argument("--modes", nargs="+", default=["resident", "swap"], choices=["resident", "swap"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--full", action="store_true", help="decode all 256 tokens of every request (slow)")
    ap.add_argument("--write", action="store_true", help=f"write {JSON.relative_to(REPO)} and the table in "
                    f"{PAGE.relative_to(REPO)}")  # fmt: skip
    ap.add_argument("--fits", action="store_true", help="only the planner's largest batches under 11 GiB (seconds)")
    args = ap.parse_args()
    if args.fits:
        table = render_fits()
        print(table)
        if args.write:
            _write_block(FITS, table)
        return 0
    if any(b < 1 for b in args.batches):
        ap.error("--batches: positive integers")
    import logging

    logging.basicConfig(level=logging.ERROR)
    rows = []
    for model in args.models:
        for device in args.devices:
            for mode in args.modes:
                for batch in args.batches:
                    try:
                        row = run_one(model, device, mode, batch, args.full)
                    except Exception as e:  # one failed configuration must not lose the grid
                        row = {"model": model, "device": device, "mode": mode, "batch": batch,
                               "error": f"{type(e).__name__}: {e}"[:200]}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    table = render(rows)
    print(table)
    if args.write:
        JSON.write_text(json.dumps(rows, indent=1) + "\n")
        _write_block((BEGIN, END), table)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
