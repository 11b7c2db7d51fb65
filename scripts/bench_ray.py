#!/usr/bin/env python
"""What `--engine ray` costs over the local engine on one machine: the demo job, each engine N times, alternated.

    python scripts/bench_ray.py                 # 3 runs each; prints a table, writes outputs/bench/ray_overhead.json
    python scripts/bench_ray.py --runs 5

Every run is a fresh `cogbatch run jobs/demo.yaml --json` process into an empty output (8 images, 2 tasks,
the tiny random model), so the figures include what a user waits for: imports, model load, Ray's start-up
and shutdown. The load average before each run is recorded: on a shared machine it explains the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def one_run(engine: str, output: Path) -> dict:
    exe = shutil.which("cogbatch")
    cmd = [exe] if exe else [sys.executable, "-m", "cogbatch"]
    cmd += ["run", "jobs/demo.yaml", "--json", "--quiet", "--output", str(output), "--engine", engine]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    process_s = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{engine} run failed ({res.returncode}):\n{res.stderr[-2000:]}")
    summary = json.loads(res.stdout)
    return {"engine": engine, "process_s": round(process_s, 2), "wall_s": summary["wall_s"],
            "ray_startup_s": summary.get("ray_startup_s"), "model_load_s": summary.get("model_load_s"),
            "load_average": round(load, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each engine (default 3)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "ray_overhead.json")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="cogbatch-bench-ray-") as tmp:
        for i in range(args.runs):
            for engine in ("local", "ray"):
                runs.append(one_run(engine, Path(tmp) / f"{engine}-{i}"))
                print(json.dumps(runs[-1]), flush=True)
    print(f"\n{'engine':<7} {'process s (median, min-max)':>28} {'run wall s':>11} {'ray start-up s':>15}")
    for engine in ("local", "ray"):
        mine = [r for r in runs if r["engine"] == engine]
        proc = [r["process_s"] for r in mine]
        startup = [r["ray_startup_s"] for r in mine if r["ray_startup_s"] is not None]
        print(f"{engine:<7} {statistics.median(proc):>10.1f} ({min(proc):.1f}-{max(proc):.1f})"
              f"{statistics.median(r['wall_s'] for r in mine):>20.1f}"
              f"{statistics.median(startup) if startup else float('nan'):>16.1f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                    "cpus": os.cpu_count(), "runs": runs}, indent=1))  # fmt: skip
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
