#!/usr/bin/env python
"""INT4 / INT8 quantization benchmark: per-layer forward time at CogVLM2's real shapes, and load times.

Part 1 times one Linear layer of each of CogVLM2's shapes (LM 4096x4096 dense, 6144x4096 QKV,
14336x4096 gate/up, 4096x14336 down; vision 5376x1792 QKV, 1792x1792 dense, 15360x1792 fc1,
1792x15360 fc2) at 1, 16 and 256 tokens in fp32, bf16, int8 and int4 (quanto, group 128), plus
int4 with the dense (dequantize + matmul) path, and sweeps the token count (1 to 1024 rows) to find
where the dense path overtakes TinyGemm (the `dequant_threshold` default; `--crossover-only`).

Part 2 writes (once) a random CogVLM2-shaped checkpoint of ~0.5B parameters in fp16 shards and
loads it in fresh subprocesses: fp16 without quantization, INT4 first load (quantize + cache
write) and INT4 from the cache, with peak host memory from the load report; each with the files in
the page cache ("warm") and with their pages dropped first ("cold", a model not in memory).

    python scripts/bench_quant.py --quick          # a few minutes on a 2-core CPU
    python scripts/bench_quant.py                  # every shape, more repeats
    python scripts/bench_quant.py --loads          # only the load table of issue 17 (below)

`--loads` prints the table the load-speed work is judged by, on a 0.8B-parameter CogVLM-shaped fp16
checkpoint (`LOADS_CKPT_SHAPE`, ~1.2 GB): unquantized bf16, INT4 first load (quantize + cache
write), INT4 from the cache (the entry's first use, which checks every checksum) and again (a
later use: size and header checks only), `CogVLM.from_pretrained` timed inside a fresh process each with
torch, optimum-quanto and cogbatch imported before the clock starts, best of 3, interleaved, files
in the page cache, torch's default thread count. The first load returns before its background cache
write ends: both the load and the time until the entry is written are given. `--page-cache cold`
drops the files' pages before every load (default with --loads: warm). `--baseline-src DIR`
also times another revision's package (`git archive <rev> cogbatch | tar -x -C DIR`), interleaved
round by round with this checkout's: the "before" column of docs/performance.md.

Times are the minimum over repeats (the median is in the JSON): shared machines are noisy and the
minimum is the least disturbed run. Results go to outputs/bench/quant_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
LAYERS = {  # name: (out_features, in_features)
    "lm dense 4096x4096": (4096, 4096),
    "lm qkv 6144x4096": (6144, 4096),
    "lm gate/up 14336x4096": (14336, 4096),
    "lm down 4096x14336": (4096, 14336),
    "vit qkv 5376x1792": (5376, 1792),
    "vit dense 1792x1792": (1792, 1792),
    "vit fc1 15360x1792": (15360, 1792),
    "vit fc2 1792x15360": (1792, 15360),
}
QUICK_LAYERS = (
    "lm dense 4096x4096",
    "lm qkv 6144x4096",
    "lm gate/up 14336x4096",
    "lm down 4096x14336",
    "vit dense 1792x1792",
    "vit fc1 15360x1792",
)
TOKENS = (1, 16, 256)
SWEEP = (1, 4, 16, 32, 64, 128, 192, 256, 384, 512, 1024)
CKPT_SHAPE = {
    "arch": "cogvlm2",
    "hidden_size": 1024,
    "layers": 8,
    "vision_hidden_size": 1024,
    "vision_layers": 8,
    "image_size": 224,
    "dtype": "fp16",
    "shard_size": "200MB",
}


def timed(fn, repeats: int, budget_s: float) -> tuple[float, float]:
    """(min, median) seconds of `fn()` after one warm-up call; stops early once `budget_s` is spent."""
    fn()
    runs: list[float] = []
    start = time.perf_counter()
    while len(runs) < repeats and (not runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return min(runs), statistics.median(runs)


def make_layer(out_f: int, in_f: int, config: str) -> nn.Module:
    """One Linear in `config`: fp32, bf16, int8, int4 (fused kernel) or int4-dense (dequantize + matmul)."""
    from optimum.quanto import qint4, qint8

    from cogbatch.model.quant.linear import DequantQLinear

    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=gen) / in_f**0.5)
    if config == "fp32":
        return lin
    lin = lin.to(torch.bfloat16)
    if config == "bf16":
        return lin
    q = DequantQLinear.from_module(lin, weights=qint8 if config == "int8" else qint4)
    if config.startswith("int4"):
        q.weight_group_size = 128
    q.freeze()  # bf16 + group 128 on CPU: TinyGemm
    q.dequant_threshold = 0 if config.endswith("dense") else None
    return q


@torch.no_grad()
def bench_layers(layers: list[str], repeats: int, budget_s: float) -> list[dict]:
    rows = []
    configs = ("fp32", "bf16", "int8", "int4", "int4-dense")
    for name in layers:
        out_f, in_f = LAYERS[name]
        for config in configs:
            layer = make_layer(out_f, in_f, config)
            kind = type(layer.weight).__name__ if config.startswith("int") else str(layer.weight.dtype)
            for tokens in TOKENS:
                x = torch.randn(tokens, in_f, dtype=torch.float32 if config == "fp32" else torch.bfloat16)
                best, med = timed(lambda layer=layer, x=x: layer(x), repeats, budget_s)
                rows.append(
                    {
                        "layer": name,
                        "config": config,
                        "weight": kind,
                        "tokens": tokens,
                        "ms": best * 1e3,
                        "median_ms": med * 1e3,
                    }
                )
            del layer
            print(f"  {name:24s} {config:10s} done", file=sys.stderr, flush=True)
    return rows


@torch.no_grad()
def bench_crossover(layers: list[str], repeats: int, budget_s: float) -> list[dict]:
    """int4 fused (TinyGemm) against int4 dense (dequantize + matmul) over token counts."""
    rows = []
    for name in layers:
        out_f, in_f = LAYERS[name]
        fused, dense = make_layer(out_f, in_f, "int4"), make_layer(out_f, in_f, "int4-dense")
        for tokens in SWEEP:
            x = torch.randn(tokens, in_f, dtype=torch.bfloat16)
            f = timed(lambda x=x, layer=fused: layer(x), repeats, budget_s)[0]
            d = timed(lambda x=x, layer=dense: layer(x), repeats, budget_s)[0]
            rows.append({"layer": name, "tokens": tokens, "fused_ms": f * 1e3, "dense_ms": d * 1e3})
        print(f"  crossover {name} done", file=sys.stderr, flush=True)
    return rows


def crossover_threshold(rows: list[dict]) -> int | None:
    """The smallest swept token count from which the dense path is faster on every layer measured."""
    for tokens in SWEEP:
        later = [r for r in rows if r["tokens"] >= tokens]
        if later and all(r["dense_ms"] < r["fused_ms"] for r in later):
            return tokens
    return None


_LOAD_CHILD = r"""
import json, sys, torch
from cogbatch.model.cogvlm import CogVLM
mode, path, cache = sys.argv[1:4]
kw = {"dtype": "float32" if mode == "fp32" else "bfloat16", "device": "cpu", "cache_dir": cache}
if mode == "int4":
    kw["quantization"] = "int4"
r = CogVLM.from_pretrained(path, **kw).load_report
import threading
for t in threading.enumerate():  # the background cache write (it updates the report when it ends)
    if t.name == "cogbatch-cache-write":
        t.join()
print(json.dumps({"load_s": r.total_s, "cpu_s": r.cpu_s, "read_s": r.read_s, "quantize_s": r.quantize_s,
                  "pack_s": r.pack_s, "cache_read_s": r.cache_read_s, "cache_write_s": r.cache_write_s,
                  "cache": r.cache_status, "peak_rss": r.peak_host_rss_bytes, "peak_anon": r.peak_host_anon_bytes,
                  "baseline_anon": r.baseline_host_anon_bytes, "weight_bytes": r.total_weight_bytes,
                  "kernels": r.kernels}))
"""
# label -> child mode; "int4 from cache" runs right after "int4 first load" filled the cache
LOAD_MODES = {"bf16 unquantized": "bf16", "fp32 unquantized": "fp32", "int4 first load": "int4",
              "int4 from cache": "int4"}  # fmt: skip


LOADS_CKPT_SHAPE = {
    "arch": "cogvlm",
    "hidden_size": 1536,
    "layers": 12,
    "vision_hidden_size": 512,
    "vision_layers": 8,
    "image_size": 224,
    "dtype": "fp16",
    "shard_size": "400MB",
}
_LOADS_CHILD = r"""
import json, sys, time
src, mode, path, cache = sys.argv[1:5]
if src:
    sys.path.insert(0, src)
import torch, optimum.quanto
from cogbatch.model.cogvlm import CogVLM
kw = {"dtype": torch.bfloat16, "device": "cpu", "cache_dir": cache}
if mode == "int4":
    kw["quantization"] = "int4"
t0 = time.perf_counter()
model = CogVLM.from_pretrained(path, **kw)
load_s = time.perf_counter() - t0


def leaves(t):
    t = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(t) is torch.Tensor:
        yield t
    else:  # a quantized weight: its inner tensors
        for name in t.__tensor_flatten__()[0]:
            yield from leaves(getattr(t, name))


t1 = time.perf_counter()  # every page of every weight touched, as the first forward pass does: a mapped
for t in list(model.parameters()) + list(model.buffers()):  # cache file is read here when not in memory
    for x in leaves(t):
        if x.numel() and x.device.type == "cpu":
            x.detach().contiguous().reshape(-1).view(torch.uint8)[::4096].sum()
touch_s = time.perf_counter() - t1
r = model.load_report
import threading
for t in threading.enumerate():  # the background cache write (it updates the report when it ends)
    if t.name == "cogbatch-cache-write":
        t.join()
cached_s = time.perf_counter() - t0
fields = {k: v for k, v in vars(r).items() if k.endswith("_s") and isinstance(v, float)}
print(json.dumps({"load_s": load_s, "touch_s": touch_s, "until_cached_s": cached_s, "cache": r.cache_status,
                  "phases": fields, "workers": getattr(r, "workers", 1), "kernels": r.kernels,
                  "peak_anon": r.peak_host_anon_bytes, "baseline_anon": r.baseline_host_anon_bytes,
                  "weight_bytes": r.total_weight_bytes}))
"""
# the entry's first use checks every checksum (and records it); later uses check size and header only
ISSUE_LOADS = {"bf16 unquantized": "bf16", "int4 first load": "int4", "int4 from cache": "int4",
               "int4 from cache, later use": "int4"}  # fmt: skip


def bench_issue_loads(ckpt: Path, repeats: int, sources: dict[str, Path | None], cold: bool = False) -> dict:
    """{revision: results}: best of `repeats` fresh processes per load and revision, interleaved (each round
    runs every load of every revision, so a noisy minute disturbs all alike). Each round's first INT4 load
    starts from an empty cache dir, and the cached loads read that entry. `sources`: revision label ->
    directory holding its `cogbatch` package (None: the installed one). `cold`: the checkpoint's and the
    cache's pages are dropped before every load (a model not in memory: the disk's speed shows)."""
    runs = {rev: {k: [] for k in ISSUE_LOADS} for rev in sources}
    load_avg = []
    with tempfile.TemporaryDirectory(prefix="cogbatch-bench-loads-") as tmp:
        for i in range(repeats):
            for rev, src in sources.items():
                cache = Path(tmp) / f"{rev}-run{i}"
                for label, mode in ISSUE_LOADS.items():
                    if cold:
                        drop_page_cache([f for d in (ckpt, cache) if d.is_dir() for f in d.rglob("*") if f.is_file()])
                    load_avg.append(os.getloadavg()[0])
                    out = subprocess.run(
                        [sys.executable, "-c", _LOADS_CHILD, str(src or ""), mode, str(ckpt), str(cache)],
                        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, check=True,
                    )  # fmt: skip
                    runs[rev][label].append(json.loads(out.stdout.strip().splitlines()[-1]))
                    took = runs[rev][label][-1]["load_s"]
                    print(f"  round {i + 1} {rev} {label}: {took:.2f} s", file=sys.stderr, flush=True)
    return {
        "load_average_1min": load_avg,
        "revisions": {
            rev: {"best": {k: min(v, key=lambda r: r["load_s"]) for k, v in by_label.items()}, "runs": by_label}
            for rev, by_label in runs.items()
        },
    }


def print_issue_table(report: dict) -> None:
    loads = report["issue_loads"]
    avg = loads["load_average_1min"]
    print(
        f"\nLoad of {report['checkpoint']} ({report['checkpoint_mib']:.0f} MiB fp16), CPU, page cache "
        f"{report['page_cache']}, "
        f"best of {report['load_repeats']} fresh processes, interleaved; 1-min load average "
        f"{min(avg):.2f}-{max(avg):.2f} during the runs"
    )
    for rev, results in loads["revisions"].items():
        best = results["best"]
        plain = best["bf16 unquantized"]["load_s"]
        print(f"\n{rev}\n| load | seconds | vs unquantized | + touching every weight page | until cached |")
        print("|---|---:|---:|---:|---:|")
        for label, r in best.items():
            tail = f"{r['until_cached_s']:.2f} s" if label == "int4 first load" else ""
            touch = f"{r['touch_s']:.2f} s" if "touch_s" in r else ""
            print(f"| {label} | {r['load_s']:.2f} | {r['load_s'] / plain:.2f}x | {touch} | {tail} |")
        print("phases of the best runs (s; read/quantize/pack summed over the worker threads):")
        for label, r in best.items():
            print(f"  {label}: " + ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in r["phases"].items() if v))


def load_once(mode: str, ckpt: Path, cache: Path, threads: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_CHILD, mode, str(ckpt), str(cache)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def drop_page_cache(paths: list[Path]) -> None:
    """Evict these files' pages from the OS page cache (posix_fadvise DONTNEED; no root needed).

    What a load meets when the model is not in memory: after a reboot, or a checkpoint bigger than
    the page cache. Dirty pages cannot be dropped, hence the sync first.
    """
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_loads(ckpt: Path, repeats: int, threads: int, pages: tuple[str, ...] = ("warm",)) -> dict:
    """Best and median of `repeats` per mode, each in a fresh process; the INT4 first load gets a fresh cache
    dir each time. `pages`: "warm" (files in the page cache, as a second load finds them) and/or "cold"
    (the checkpoint's and the cache entry's pages dropped before every load)."""
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="cogbatch-bench-cache-") as tmp:
        results = {page: {k: [] for k in LOAD_MODES} for page in pages}
        for i in range(repeats):
            for page in pages:  # interleaved, so that a noisy minute disturbs both alike
                cache = Path(tmp) / f"run{i}-{page}"
                for label, mode in LOAD_MODES.items():
                    if page == "cold":
                        drop_page_cache([f for d in (ckpt, cache) if d.is_dir() for f in d.rglob("*") if f.is_file()])
                    results[page][label].append(load_once(mode, ckpt, cache, threads))
    for page, runs in results.items():
        best = {k: min(v, key=lambda r: r["load_s"]) for k, v in runs.items()}
        median = {k: statistics.median(r["load_s"] for r in v) for k, v in runs.items()}
        out[page] = {"best": best, "median_load_s": median, "runs": runs}
    return out


def checkpoint(path: Path) -> Path:
    if not (path / "model.safetensors.index.json").is_file():
        from cogbatch.testing.tiny import write_tiny_checkpoint

        print(f"writing the benchmark checkpoint to {path} ...", file=sys.stderr, flush=True)
        write_tiny_checkpoint(path, **CKPT_SHAPE, seed=0, overwrite=True)
    return path


def print_tables(report: dict) -> None:
    mib = 2**20
    if report.get("layers"):
        print(f"\nPer-layer forward, ms (min over repeats; CPU, {report['threads']} threads)")
        header = f"{'layer':24s} {'config':10s} {'weight class':27s}" + "".join(f"{t:>9d} tok" for t in TOKENS)
        print(header)
        print("-" * len(header))
        rows = report["layers"]
        for name in dict.fromkeys(r["layer"] for r in rows):
            for config in dict.fromkeys(r["config"] for r in rows if r["layer"] == name):
                cells = {r["tokens"]: r for r in rows if r["layer"] == name and r["config"] == config}
                kind = next(iter(cells.values()))["weight"]
                print(f"{name:24s} {config:10s} {kind:27s}" + "".join(f"{cells[t]['ms']:13.2f}" for t in TOKENS))
    if report.get("crossover"):
        print("\nint4: fused TinyGemm vs dense path (dequantize + matmul), ms")
        rows = report["crossover"]
        print(f"{'layer':24s}" + "".join(f"{t:>15d}" for t in SWEEP))
        for name in dict.fromkeys(r["layer"] for r in rows):
            cells = {r["tokens"]: r for r in rows if r["layer"] == name}
            print(f"{name:24s}" + "".join(f"{cells[t]['fused_ms']:7.1f}/{cells[t]['dense_ms']:<7.1f}" for t in SWEEP))
        print(f"dense faster on every layer from {report['crossover_threshold']} tokens")
    for page, loads in (report.get("loads") or {}).items():
        best, median = loads["best"], loads["median_load_s"]
        threads = report["load_threads"] or "default"
        print(
            f"\nLoad of {report['checkpoint']} ({report['checkpoint_mib']:.0f} MiB fp16 on disk), CPU, {page} page "
            f"cache, best of {report['load_repeats']} (columns of the best run), {threads} thread(s); peak anon = "
            "above the load's start"
        )
        cols = ("load s", "median", "cpu s", "read", "quant", "pack", "c.read", "c.write")
        print(f"{'mode':18s}" + "".join(f"{c:>8s}" for c in cols) + f" {'peak anon MiB':>14s} {'weights MiB':>12s}")
        keys = ("load_s", "cpu_s", "read_s", "quantize_s", "pack_s", "cache_read_s", "cache_write_s")
        for mode, r in best.items():
            anon = (r["peak_anon"] - r["baseline_anon"]) / mib if r["peak_anon"] else float("nan")
            cells = f"{r['load_s']:8.2f}{median[mode]:8.2f}" + "".join(f"{r[k]:8.2f}" for k in keys[1:])
            print(f"{mode:18s}{cells} {anon:14.1f} {r['weight_bytes'] / mib:12.1f}")
        cached, plain = "int4 from cache", "bf16 unquantized"
        ratio, mid = best[cached]["load_s"] / best[plain]["load_s"], median[cached] / median[plain]
        print(f"int4 from cache / bf16 unquantized load ({page}): best {ratio:.2f}, median {mid:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the layer timings (0 = torch's default)")
    ap.add_argument("--load-threads", type=int, default=1, help="OMP threads of the load subprocesses (0 = default)")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--crossover-only", action="store_true", help="only the fused vs dense sweep (dequant_threshold)")
    ap.add_argument("--skip-loads", action="store_true")
    ap.add_argument("--load-repeats", type=int, default=0, help="loads per mode and page state (0: 2 quick, else 3)")
    ap.add_argument("--page-cache", choices=("warm", "cold", "both"), default="both",
                    help="load with the files in the page cache, with their pages dropped first, or both")  # fmt: skip
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="default: outputs/bench/cogvlm2-quant-ckpt; --loads: .../cogvlm-0.8b-ckpt")  # fmt: skip
    ap.add_argument("--json", type=Path, default=None, help="default: outputs/bench/quant_cpu.json")
    ap.add_argument("--loads", action="store_true", help="only the load table of issue 17 (see above)")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="with --loads: also time the cogbatch package in DIR, interleaved")  # fmt: skip
    args = ap.parse_args()
    if args.loads:
        main_loads(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, budget = (3, 2.0) if args.quick else (7, 6.0)
    layers = list(QUICK_LAYERS) if args.quick else list(LAYERS)
    report: dict = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": args.quick,
    }
    if not args.skip_layers:
        if not args.crossover_only:
            report["layers"] = bench_layers(layers, repeats, budget)
        cross_layers = ["lm dense 4096x4096", "lm gate/up 14336x4096", "lm down 4096x14336", "vit fc1 15360x1792"]
        report["crossover"] = bench_crossover(cross_layers[:2] if args.quick else cross_layers, repeats, budget)
        report["crossover_threshold"] = crossover_threshold(report["crossover"])
    if not args.skip_loads and not args.crossover_only:
        ckpt = checkpoint(args.checkpoint or REPO / "outputs" / "bench" / "cogvlm2-quant-ckpt")
        report["checkpoint"] = str(ckpt)
        report["checkpoint_mib"] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
        report["load_repeats"] = args.load_repeats or (2 if args.quick else 3)
        report["load_threads"] = args.load_threads
        pages = ("warm", "cold") if args.page_cache == "both" else (args.page_cache,)
        report["loads"] = bench_loads(ckpt, report["load_repeats"], args.load_threads, pages)
    print_tables(report)
    out = args.json or REPO / "outputs" / "bench" / "quant_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out}")


def main_loads(args: argparse.Namespace) -> None:
    path = args.checkpoint or REPO / "outputs" / "bench" / "cogvlm-0.8b-ckpt"
    if not (path / "model.safetensors.index.json").is_file():
        from cogbatch.testing.tiny import write_tiny_checkpoint

        print(f"writing the benchmark checkpoint to {path} ...", file=sys.stderr, flush=True)
        write_tiny_checkpoint(path, **LOADS_CKPT_SHAPE, seed=0, overwrite=True)
    report: dict = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "checkpoint": str(path),
        "checkpoint_mib": sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20,
        "load_repeats": args.load_repeats or 3,
    }
    sources: dict[str, Path | None] = {"this checkout": None}
    if args.baseline_src is not None:
        sources = {"baseline": args.baseline_src, **sources}
    report["page_cache"] = "cold" if args.page_cache == "cold" else "warm"
    report["issue_loads"] = bench_issue_loads(path, report["load_repeats"], sources, report["page_cache"] == "cold")
    print_issue_table(report)
    out = args.json or REPO / "outputs" / "bench" / "quant_loads_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
