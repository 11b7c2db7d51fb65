#!/usr/bin/env python
"""Everything of issue 7 that needs CUDA, in one call that ends well inside 10 minutes on one H100 / H200.

For each full-size model shape (CogVLM2-19B by default; CogVLM-17B with `--models cogvlm2,cogvlm1`;
the real config.json files of tests/data/golden/real_configs/) it writes a random-weight bf16
checkpoint, filled on the GPU and written by background threads (~39 GB for CogVLM2, under /dev/shm
when it has room, deleted before the next model), then for int4 and bf16:

  * loads it through the streaming quantizing loader (`CogVLM.from_pretrained`, quantized-weights
    cache off: the cache is measured on CPU by scripts/bench.py), recording load time, weight bytes
    and the kernel classes in use (`model.load_report.kernels`);
  * plain `generate` at batch 1 / 4 / 8 with random images, whole model on the GPU: peak reserved
    VRAM (`torch.cuda.max_memory_reserved`), images/s, decode tokens/s, and prefill / decode-step time
    against the memory-bandwidth floor (bytes the step must read / measured device copy bandwidth;
    a text decode step reads only the language-expert path and the LM head, a prefill every weight
    but the embedding table);
  * the pipeline's own path: `cogbatch.worker.worker.ModelWorker.process` over a batch of 4 images under an
    11 GiB ceiling (the planner picks resident or phase-swapped execution), with its peak reserved
    VRAM: the issue's goal is CogVLM2 int4 batch 4 under 11 GiB.

Random weights give meaningless text, so decoding never stops early: every sequence makes exactly
`--new-tokens` tokens (256 by default, as in the issue). The int4 load keeps the token embedding table
on the CPU (`embeddings_on_cpu`, what an 11 GB card needs; `--no-embeddings-on-cpu` to keep it on the GPU).

Every part is timed against `--budget-s`: before a part starts, its time is estimated (from what
was measured so far, else from H100 guesses) and a part that would overrun is skipped and marked so.
A part that fails is recorded as {"error": ...} and the rest still runs. The JSON is rewritten after
every part, so a device call killed at its time limit still brings back what was measured.

    python scripts/bench_gpu.py --json $OUT/gpu.json          # on a GPU machine (docs/benchmarks.md)
    python scripts/bench_gpu.py --models cogvlm2,cogvlm1 --budget-s 500
    python scripts/bench_gpu.py --simulate --new-tokens 4     # CPU dry run on tiny shapes (what the tests run)
    python scripts/bench.py --render docs/bench/gpu-<date>.json   # re-print the tables of a committed JSON

Without CUDA (and without `--simulate`) it exits with code 2 and says so, before touching the disk.
The repository root is put on sys.path, so it runs from a plain checkout where cogbatch is not installed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # cogbatch from this checkout: on the device machine it is not installed

REAL_CONFIGS = REPO / "tests" / "data" / "golden" / "real_configs"
CONFIGS = {"cogvlm2": REAL_CONFIGS / "cogvlm2-llama3-chat-19B" / "config.json",
           "cogvlm1": REAL_CONFIGS / "cogvlm-chat-hf" / "config.json"}  # fmt: skip
# --simulate: the same code path on shapes a 2-core CPU runs in seconds (int4 group 128 still applies)
SIM_SHAPES = {
    "cogvlm2": {"arch": "cogvlm2", "hidden_size": 128, "layers": 2, "heads": 2, "kv_heads": 1,
                "intermediate_size": 256, "vision_hidden_size": 128, "vision_layers": 2, "vision_heads": 2,
                "vision_intermediate_size": 256, "image_size": 112},
    "cogvlm1": {"arch": "cogvlm1", "hidden_size": 128, "layers": 2, "heads": 2, "intermediate_size": 256,
                "vision_hidden_size": 128, "vision_layers": 2, "vision_heads": 2, "vision_intermediate_size": 256,
                "image_size": 56, "vocab_size": 512},
}  # fmt: skip
QUANTS = ("int4", "int8", "bf16")
QUERY = "Describe this image in detail."
GiB = 2**30
SHARD_BYTES = 4 * 10**9
# Python packages the benchmark imports besides torch; optimum-quanto is the one a bare GPU image lacks.
NEEDED = {"optimum.quanto": "optimum-quanto", "safetensors": "safetensors", "tokenizers": "tokenizers",
          "transformers": "transformers", "accelerate": "accelerate", "yaml": "pyyaml", "pyarrow": "pyarrow",
          "PIL": "pillow", "filelock": "filelock"}  # fmt: skip

# Guesses for an H100 / H200 before anything is measured; each is replaced by the measured figure as the
# run goes. Deliberately pessimistic: skipping a part costs a figure, overrunning costs the whole call.
GUESS = {"write_bps": 1.0e9, "load_bps": {"int4": 0.5e9, "int8": 0.5e9, "bf16": 1.0e9},
         "prefill_s_per_image": 1.5, "step_s": 0.06, "swap_bps": 5e9}  # fmt: skip
SAFETY = 1.3  # estimates are multiplied by this before they are compared with the time left


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cogvlm2", help="comma-separated: cogvlm2, cogvlm1 (run in this order)")
    ap.add_argument("--quants", default="int4,bf16", help="comma-separated: int4, int8, bf16")
    ap.add_argument("--batches", default="1,4,8", help="batch sizes for plain generate")
    ap.add_argument("--new-tokens", type=int, default=256, help="decode steps per sequence")
    ap.add_argument("--worker-batch", type=int, default=4, help="images through Worker.process (0: skip it)")
    ap.add_argument("--ceiling-gib", type=float, default=11.0, help="the Worker's vram_ceiling and the goal")
    ap.add_argument("--embeddings-on-cpu", action=argparse.BooleanOptionalAction, default=True,
                    help="quantized loads keep the token embedding table on the CPU (default: yes)")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip parts that would end after this many s")
    ap.add_argument("--workdir", type=Path, help="where to write the checkpoints (default: /dev/shm if it has room)")
    ap.add_argument("--json", type=Path, help="default: outputs/bench/gpu-<date>.json")
    ap.add_argument("--simulate", action="store_true", help="run on the CPU with tiny shapes (a dry run, for tests)")
    ap.add_argument("--traced", type=Path, metavar="JSON",
                    help="instead: run the configuration of a dry-run report (scripts/trace_gpu.py --json) for "
                         "real, and print its traced peaks beside the measured ones")  # fmt: skip
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batches needs comma-separated integers, got {args.batches!r}")
    for m in args.models:
        if m not in CONFIGS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(CONFIGS)}")
    for q in args.quants:
        if q not in QUANTS:
            ap.error(f"unknown quantization {q!r}; choose from {', '.join(QUANTS)}")
    if not args.models or not args.quants:
        ap.error("--models and --quants need at least one name each")
    if not args.batches or min(args.batches) < 1:
        ap.error("--batches needs positive integers")
    if args.new_tokens < 1:
        ap.error("--new-tokens must be at least 1")
    if args.worker_batch < 0:
        ap.error("--worker-batch must be 0 (skip) or positive")
    if args.ceiling_gib <= 0:
        ap.error("--ceiling-gib must be positive")
    if args.traced is not None:
        try:
            trace = json.loads(args.traced.read_text())
            if trace["config"]["model"] not in ("cogvlm2", "cogvlm") or not {"load", "worker"} <= set(trace["phases"]):
                raise ValueError("no load and worker phases of a known model")
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--traced {args.traced}: not a dry-run report with a worker part ({type(e).__name__}: {e})")
    return args


# -- the random checkpoint -------------------------------------------------------------------------


def checkpoint_config(model: str, simulate: bool = False) -> dict[str, Any]:
    """config.json of the benchmark checkpoint: the real model's, verbatim (tiny shapes with --simulate)."""
    if simulate:
        from cogbatch.testing.tiny import tiny_config

        return tiny_config(**SIM_SHAPES[model], torch_dtype="bfloat16")
    return {**json.loads(CONFIGS[model].read_text()), "torch_dtype": "bfloat16"}


def checkpoint_bytes(config: dict[str, Any]) -> int:
    """bf16 bytes of every tensor of a checkpoint with this config."""
    from cogbatch.model.config import CogVLMConfig, checkpoint_tensor_shapes

    return 2 * sum(math.prod(s) for s in checkpoint_tensor_shapes(CogVLMConfig.from_dict(config)).values())


def write_random_checkpoint(out: Path, config: dict[str, Any], device: str, seed: int = 0) -> dict[str, Any]:
    """A bf16 checkpoint in the official layout, drawn on `device` (`cogbatch.testing.tiny.write_checkpoint`).

    On the GPU drawing is nearly free and the time is the copy to the host plus the file writes, which a
    thread does while the GPU draws the next shard. Scales follow the tiny checkpoints' recipe (weights /
    sqrt(fan_in), norms around 1), so activations stay finite through 32 layers.
    """
    from cogbatch.testing.tiny import write_checkpoint

    t0 = time.perf_counter()
    write_checkpoint(out, config, dtype="bf16", shard_size=SHARD_BYTES, seed=seed, device=device, overwrite=True)
    total = checkpoint_bytes(config)
    shards = len(list(out.glob("model-*-of-*.safetensors")))
    return {"bytes": total, "params": total // 2, "shards": shards, "write_s": round(time.perf_counter() - t0, 1)}


def mem_available_bytes() -> int | None:
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def pick_workdir(need: int, requested: Path | None) -> Path:
    """Where the checkpoint goes: --workdir, else /dev/shm (RAM: no disk writes, page-cache-fast reads)
    when it and the host memory have room, else the temp dir, else outputs/. OSError when none has room."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        return requested
    margin = 2 * GiB
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > need + margin:
        avail = mem_available_bytes()
        if avail is not None and avail > need + 24 * GiB:  # the load and the phase swap need host memory too
            return shm
    for cand in (Path(tempfile.gettempdir()), REPO / "outputs"):
        cand.mkdir(parents=True, exist_ok=True)
        if os.access(cand, os.W_OK) and shutil.disk_usage(cand).free > need + margin:
            return cand
    raise OSError(f"no place with {(need + margin) / 1e9:.0f} GB free for the checkpoint (/dev/shm, "
                  f"{tempfile.gettempdir()}, outputs/); pass --workdir")  # fmt: skip


# -- device helpers --------------------------------------------------------------------------------


class Device:
    """The few CUDA calls the benchmark makes, as no-ops (None figures) on the CPU of --simulate."""

    def __init__(self, torch: Any, name: str) -> None:
        self.torch, self.type = torch, name
        self.cuda = name == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def gib(self, what: str) -> float | None:
        """max_memory_reserved / max_memory_allocated / memory_reserved in GiB, None on the CPU."""
        return round(getattr(self.torch.cuda, what)() / GiB, 2) if self.cuda else None

    def describe(self) -> dict[str, Any]:
        t = self.torch
        info = {"device": platform.processor() or platform.machine(), "device_type": self.type,
                "torch": t.__version__, "cuda": t.version.cuda, "python": platform.python_version(),
                "host_cores": os.cpu_count()}  # fmt: skip
        if self.cuda:
            props = t.cuda.get_device_properties(0)
            info.update(device=t.cuda.get_device_name(), capability="sm{}{}".format(*t.cuda.get_device_capability()),
                        gpu_memory_gib=round(props.total_memory / GiB, 1))  # fmt: skip
        try:
            from importlib.metadata import version

            info["optimum_quanto"] = version("optimum-quanto")
        except Exception:
            info["optimum_quanto"] = None
        return info


class PeakKeeper:
    """Peak reserved / allocated device memory over a block of code that resets CUDA's peak statistics itself.

    The worker resets them at each phase of its first chunk (to calibrate its plan), which would leave
    `max_memory_*` with the last phase's peak only; while this is active, every reset first folds the
    peak so far into ours. On the CPU the figures are None.
    """

    def __init__(self, dev: Device) -> None:
        self.dev = dev
        self.peak = {"reserved": 0, "allocated": 0}

    def _fold(self) -> None:
        cuda = self.dev.torch.cuda
        self.peak["reserved"] = max(self.peak["reserved"], cuda.max_memory_reserved())
        self.peak["allocated"] = max(self.peak["allocated"], cuda.max_memory_allocated())

    def __enter__(self) -> PeakKeeper:
        if self.dev.cuda:
            cuda = self.dev.torch.cuda
            self._reset = cuda.reset_peak_memory_stats

            def reset(*args: Any, **kwargs: Any) -> None:
                self._fold()
                self._reset(*args, **kwargs)

            cuda.reset_peak_memory_stats = reset
        return self

    def __exit__(self, *exc: object) -> None:
        if self.dev.cuda:
            self._fold()
            self.dev.torch.cuda.reset_peak_memory_stats = self._reset

    def gib(self, what: str) -> float | None:
        return round(self.peak[what] / GiB, 2) if self.dev.cuda else None


def copy_bandwidth(dev: Device) -> float:
    """Memory bandwidth in bytes/s from a device-to-device copy, read + write counted (best of 10)."""
    torch = dev.torch
    n = 2**30 if dev.cuda else 2**26
    src = torch.empty(n, dtype=torch.uint8, device=dev.type)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    dev.sync()
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        dev.sync()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    dev.reset_peak()
    return 2 * n / best


def tensor_bytes(t: Any) -> int:
    """Storage bytes, quantized tensors included (their data live in inner tensors)."""
    import torch

    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = flatten()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_split(model: Any) -> dict[str, int]:
    """Weight bytes by what reads them, and the two totals the bandwidth floors use.

    A text decode step runs `model.layers` with no vision mask: only the language experts
    (`language_expert_*`, `language_mlp`) and the norms, then the LM head. The vision experts
    (`vision_expert_*`, `vision_mlp`; half of CogVLM2's "language" parameters) and the vision tower
    are read by the prefill alone. The embedding table is a lookup of a few rows: in neither floor.
    """
    split = dict.fromkeys(("vision_tower", "vision_experts", "language_text", "lm_head", "embeddings"), 0)
    for name, p in model.named_parameters():
        if name.startswith("model.embed_tokens."):
            key = "embeddings"
        elif name.startswith("lm_head."):
            key = "lm_head"
        elif name.startswith("model.vision."):
            key = "vision_tower"
        elif ".vision_expert_" in name or ".vision_mlp." in name:
            key = "vision_experts"
        else:
            key = "language_text"
        split[key] += tensor_bytes(p)
    split["decode"] = split["language_text"] + split["lm_head"]
    split["prefill"] = split["decode"] + split["vision_experts"] + split["vision_tower"]
    return split


# -- time budget -----------------------------------------------------------------------------------


class Budget:
    """Seconds left, and estimates of each part from what was measured so far (else the H100 guesses)."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds
        self.write_bps = GUESS["write_bps"]
        self.load_bps = dict(GUESS["load_bps"])
        self.gen: dict[str, tuple[float, float]] = {}  # quant -> (prefill s per image, decode step s at batch 1)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def refuse(self, estimate: float) -> str | None:
        """None when a part of `estimate` seconds fits (with the safety factor), else the reason to skip it."""
        need = SAFETY * estimate
        if need <= self.left():
            return None
        return f"time budget: needs ~{need:.0f} s, {max(0.0, self.left()):.0f} s left of --budget-s {self.seconds:g}"

    def write(self, nbytes: int) -> float:
        return nbytes / self.write_bps

    def load(self, quant: str, nbytes: int) -> float:
        return nbytes / self.load_bps[quant]

    def generate(self, quant: str, batch: int, new_tokens: int, warm_up: bool) -> float:
        prefill, step = self.gen.get(quant, (GUESS["prefill_s_per_image"], GUESS["step_s"]))
        step_b = step * (1 + 0.1 * (batch - 1))  # decode is memory-bound: a bigger batch costs little more
        return prefill * batch * (2 if warm_up else 1) + (new_tokens + 1) * step_b

    def measured_generate(self, quant: str, batch: int, prefill_s: float, step_s: float) -> None:
        self.gen[quant] = (prefill_s / batch, step_s / (1 + 0.1 * (batch - 1)))


# -- the parts -------------------------------------------------------------------------------------


def run_part(what: str, fn: Callable[[], Any]) -> Any:
    """fn()'s result (a part's figures), or {"error": repr(e)} with the traceback on stderr: one failure never
    ends the run."""
    try:
        return fn()
    except Exception as e:
        print(f"{what} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return {"error": repr(e)[:400]}
    finally:
        gc.collect()


def load_model(ckpt: Path, quant: str, dev: Device, embeddings_on_cpu: bool) -> tuple[Any, dict[str, Any]]:
    """The model through `CogVLM.from_pretrained` (streaming quantizing loader, no cache) and its load figures."""
    from cogbatch.model.cogvlm import CogVLM

    dev.reset_peak()
    spec = None if quant == "bf16" else {"default": quant, "group_size": 128, "embeddings_on_cpu": embeddings_on_cpu}
    t0 = time.perf_counter()
    model = CogVLM.from_pretrained(ckpt, dtype="bfloat16", device=dev.type, quantization=spec, cache_dir=False)
    wall = time.perf_counter() - t0
    r = model.load_report
    split = weight_split(model)
    load = {
        "load_s": round(r.total_s, 2),
        "load_wall_s": round(wall, 2),
        "weight_bytes": r.total_weight_bytes,
        "host_bytes": r.host_bytes,
        "split_bytes": split,
        "kernels": r.kernels,
        "fallback_layers": r.fallback_layers,
        "embeddings_on_cpu": bool(spec and embeddings_on_cpu),
        "load_peak_reserved_gib": dev.gib("max_memory_reserved"),
        "reserved_gib": dev.gib("memory_reserved"),
    }
    return model, load


def random_batch(model: Any, batch: int, seed: int = 0) -> Any:
    import torch

    size = model.config.vision.image_size
    g = torch.Generator().manual_seed(seed)
    return model.collate(
        [model.build_inputs(None, QUERY, torch.randn(3, size, size, generator=g)) for _ in range(batch)]
    )


def bench_generate(model: Any, dev: Device, batch: int, new_tokens: int, bandwidth: float, split: dict[str, int],
                   warm_up: bool) -> dict[str, Any]:  # fmt: skip
    """Plain `model.generate` of `batch` random images, every sequence exactly `new_tokens` long."""
    from cogbatch.model.settings import GenerationConfig

    inputs = random_batch(model, batch)
    cfg = GenerationConfig(max_new_tokens=1 + new_tokens, stop_token_ids=())  # the first token comes from the prefill
    dev.reset_peak()
    try:
        if warm_up:  # first calls pay kernel selection and allocator growth
            model.generate(inputs, GenerationConfig(max_new_tokens=2, stop_token_ids=()))
            dev.sync()
        t = model.generate(inputs, cfg).timings
        dev.sync()
    except dev.torch.OutOfMemoryError:
        return {"oom": True, "peak_reserved_gib": dev.gib("max_memory_reserved")}
    prefill = t["encode_s"] + t["prefill_s"]
    step = t["decode_s"] / new_tokens
    return {
        "oom": False,
        "prompt_tokens": int(inputs.attention_mask.sum()),
        "peak_reserved_gib": dev.gib("max_memory_reserved"),
        "peak_allocated_gib": dev.gib("max_memory_allocated"),
        "prefill_s": round(prefill, 3),
        "prefill_floor_s": round(split["prefill"] / bandwidth, 6),
        "decode_step_ms": round(step * 1e3, 2),
        "decode_floor_ms": round(split["decode"] / bandwidth * 1e3, 3),
        "decode_tok_s": round(batch * new_tokens / t["decode_s"], 1),
        "images_per_s": round(batch / (prefill + t["decode_s"]), 3),
    }


def bench_worker(model: Any, dev: Device, quant: str, images: int, new_tokens: int, ceiling_gib: float,
                 ckpt: Path, embeddings_on_cpu: bool) -> dict[str, Any]:  # fmt: skip
    """`images` random images through `Worker.process`, the pipeline's path, under the VRAM ceiling.

    The planner decides resident or phase-swapped execution and the batch, as in `cogbatch run`.
    Only the stop condition differs (no stop tokens, no loop detection: random weights would stop at
    random), so every request makes exactly `new_tokens` tokens.
    """
    from dataclasses import replace

    import torch

    from cogbatch.errors import DoesNotFit
    from cogbatch.inputs.entries import ImageEntry
    from cogbatch.inputs.pending import Request
    from cogbatch.job import load_job
    from cogbatch.worker.loading import LoadedImage
    from cogbatch.worker.worker import ModelWorker

    class BenchWorker(ModelWorker):
        def _generation_config(self, task, attempt):
            return replace(super()._generation_config(task, attempt), stop_token_ids=(), stop_on_repetition=False)

    work = ckpt.parent / "worker-job"  # the job's folders (the images are made in memory)
    (work / "images").mkdir(parents=True, exist_ok=True)
    (work / "pipeline.yaml").write_text("{}\n")  # not the repository's pipeline.yaml
    q = "none" if quant == "bf16" else {"default": quant, "embeddings_on_cpu": embeddings_on_cpu}
    job = {"model": str(ckpt), "input": {"folder": str(work / "images")}, "output": str(work / "out"),
           "device": dev.type, "dtype": "bf16", "quantization": q, "vram_ceiling": f"{ceiling_gib}GiB",
           "batch_size": images, "tasks": [{"name": "caption", "prompt": QUERY, "max_new_tokens": new_tokens,
                                            "stop_on_repetition": False}]}  # fmt: skip
    cfg = load_job(job, pipeline=work / "pipeline.yaml")
    try:
        worker = BenchWorker(cfg, "bench-gpu", model=model)
    except DoesNotFit as e:
        return {"images": images, "does_not_fit": str(e)}
    size = model.config.vision.image_size
    g = torch.Generator().manual_seed(1)
    chunk = []
    for i in range(images):
        entry = ImageEntry(image_id=f"{i:064x}", path=f"random-{i}.jpg", values={})
        pixels = torch.randn(3, size, size, generator=g)
        chunk.append((LoadedImage(entry, pixels, size, size), [Request(entry, cfg.tasks[0], QUERY, "bench")]))
    dev.reset_peak()
    before = dev.gib("memory_reserved")
    t0 = time.perf_counter()
    with PeakKeeper(dev) as peaks:
        try:
            rows = worker.process(chunk)
            dev.sync()
        except dev.torch.OutOfMemoryError:
            rows = None
    if rows is None:
        return {"oom": True, "peak_reserved_gib": peaks.gib("reserved")}
    seconds = time.perf_counter() - t0
    stats = worker.summary_stats()
    peak = peaks.gib("reserved")
    return {
        "oom": False,
        "ok_rows": sum(r["status"] == "ok" for r in rows),
        "errors": sorted({r["error"] for r in rows if r["status"] != "ok"})[:3],
        "mode": stats.execution_mode,
        "planned_batch": stats.planned_batch,
        "planned_peak_gib": round(worker.plan.peak_bytes / GiB, 2),
        "ceiling_gib": ceiling_gib,
        "reserved_before_gib": before,
        "peak_reserved_gib": peak,
        "peak_allocated_gib": peaks.gib("allocated"),
        "seconds": round(seconds, 2),
        "model_compute_s": stats.model_compute_s,
        "phase_swap_s": stats.phase_swap_s,
        "images_per_s": round(images / seconds, 3),
        "generated_tokens": int(worker.stats.generated_tokens),
        "tokens_per_s": round(worker.stats.generated_tokens / seconds, 1),
        "oom_splits": stats.oom_splits,
        "goal_met": None if peak is None else bool(peak < ceiling_gib and not stats.oom_splits),
    }


def bench_quant(entry: dict[str, Any], ckpt: Path, model_name: str, args: argparse.Namespace, dev: Device,
                bandwidth: float, budget: Budget, nbytes: int, save: Callable[[], None]) -> None:  # fmt: skip
    """One load, then plain generate at each batch size, then the Worker path, each part on its own, into `entry`.

    `entry` is already in the report, so every save() shows the parts done so far.
    """
    quant = entry["quant"]
    skip = budget.refuse(budget.load(quant, nbytes) + budget.generate(quant, 1, args.new_tokens, True))
    if skip:
        entry["load"] = {"skipped": skip}
        return
    log(budget, f"{model_name} {quant}: loading")
    holder: dict[str, Any] = {}

    def do_load() -> dict[str, Any]:
        holder["model"], load = load_model(ckpt, quant, dev, args.embeddings_on_cpu)
        return load

    entry["load"] = run_part(f"{model_name} {quant} load", do_load)
    save()
    model = holder.pop("model", None)
    if model is None:
        return
    if "load_wall_s" in entry["load"]:
        budget.load_bps[quant] = nbytes / max(entry["load"]["load_wall_s"], 1e-3)
    log(budget, f"{model_name} {quant}: loaded in {entry['load']['load_wall_s']} s")
    split = entry["load"]["split_bytes"]
    warm = True
    for bs in args.batches:
        skip = budget.refuse(budget.generate(quant, bs, args.new_tokens, warm))
        if skip:
            entry["rows"].append({"batch": bs, "skipped": skip})
            continue
        row = run_part(f"{model_name} {quant} batch {bs}", lambda bs=bs, warm=warm: bench_generate(
            model, dev, bs, args.new_tokens, bandwidth, split, warm))  # fmt: skip
        warm = warm and "prefill_s" not in row
        if "prefill_s" in row:
            budget.measured_generate(quant, bs, row["prefill_s"], row["decode_step_ms"] / 1e3)
        entry["rows"].append({"batch": bs, **row})
        log(budget, f"{model_name} {quant} batch {bs}: {short(row)}")
        save()
    if args.worker_batch:
        swap = 2 * entry["load"]["weight_bytes"] / GUESS["swap_bps"]
        skip = budget.refuse(budget.generate(quant, args.worker_batch, args.new_tokens, warm) + swap)
        if skip:
            entry["worker"] = {"images": args.worker_batch, "skipped": skip}
        else:
            figures = run_part(f"{model_name} {quant} worker", lambda: bench_worker(
                model, dev, quant, args.worker_batch, args.new_tokens, args.ceiling_gib, ckpt,
                args.embeddings_on_cpu))  # fmt: skip
            entry["worker"] = {"images": args.worker_batch, **figures}
            log(budget, f"{model_name} {quant} worker: {short(entry['worker'])}")
        save()
    model = None  # the last reference: its memory goes back before the next load
    dev.reset_peak()


def bench_model(model_name: str, args: argparse.Namespace, dev: Device, bandwidth: float, budget: Budget,
                report: dict[str, Any], save: Callable[[], None]) -> None:  # fmt: skip
    """Write the random checkpoint, run every quantization on it, delete it."""
    config = checkpoint_config(model_name, args.simulate)
    nbytes = checkpoint_bytes(config)
    entry: dict[str, Any] = {"model": model_name, "checkpoint_bytes": nbytes, "quants": []}
    report["models"].append(entry)
    first = args.quants[0]
    skip = budget.refuse(budget.write(nbytes) + budget.load(first, nbytes) + budget.generate(first, 1, 1, True))
    if skip:
        entry["skipped"] = skip
        save()
        return
    try:
        root = pick_workdir(nbytes, args.workdir)
    except OSError as e:
        entry["error"] = str(e)
        save()
        return
    work = Path(tempfile.mkdtemp(prefix=f"cogbatch-gpu-bench-{model_name}-", dir=root))
    entry["workdir"] = str(root)
    try:
        ckpt = work / "checkpoint"  # beside it, the Worker part's job folders: all deleted with `work`
        log(budget, f"{model_name}: writing a random {nbytes / 1e9:.1f} GB bf16 checkpoint to {ckpt}")
        written = run_part(f"{model_name} checkpoint", lambda: write_random_checkpoint(ckpt, config, dev.type))
        entry.update(written)
        if "error" in written:
            save()
            return
        budget.write_bps = nbytes / max(written["write_s"], 1e-3)
        log(budget, f"{model_name}: checkpoint written in {written['write_s']} s")
        save()
        for quant in args.quants:
            q: dict[str, Any] = {"quant": quant, "rows": [], "worker": None}
            entry["quants"].append(q)
            bench_quant(q, ckpt, model_name, args, dev, bandwidth, budget, nbytes, save)
            save()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def short(row: dict[str, Any] | None) -> str:
    if not row:
        return "-"
    keys = ("error", "skipped", "does_not_fit", "oom", "peak_reserved_gib", "images_per_s", "decode_tok_s",
            "decode_step_ms", "mode", "planned_batch")  # fmt: skip
    return ", ".join(f"{k}={row[k]}" for k in keys if k in row)


def log(budget: Budget, message: str) -> None:
    print(f"[{budget.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)


# -- a dry run's configuration, for real ---------------------------------------------------------


def bench_traced(trace: dict[str, Any], args: argparse.Namespace, dev: Device) -> dict[str, Any]:
    """The run `scripts/trace_gpu.py` traced, on this GPU: the worker's own load (the vision tower parked when
    the run swaps phases), then `ModelWorker.process` of the same images, prompt, tokens, mode and ceiling.

    Random weights, stop tokens off: every request makes `new_tokens` tokens, as in the trace.
    """
    from dataclasses import replace

    import torch

    from cogbatch.inputs.entries import ImageEntry
    from cogbatch.inputs.pending import Request
    from cogbatch.job import load_job
    from cogbatch.planning.batches import plan_mode
    from cogbatch.worker.loading import LoadedImage
    from cogbatch.worker.placement import load_model as worker_load_model
    from cogbatch.worker.worker import ModelWorker

    tc = trace["config"]
    model_name = {"cogvlm2": "cogvlm2", "cogvlm": "cogvlm1"}[tc["model"]]
    config = checkpoint_config(model_name, args.simulate)
    workdir = pick_workdir(checkpoint_bytes(config), args.workdir)
    ckpt = Path(tempfile.mkdtemp(prefix="cogbatch-traced-", dir=workdir))
    out: dict[str, Any] = {"trace_config": tc}
    try:
        out["checkpoint"] = write_random_checkpoint(ckpt / "ckpt", config, dev.type)
        (ckpt / "images").mkdir()
        (ckpt / "pipeline.yaml").write_text("{}\n")
        quant = tc["quantization"] if not tc["embeddings_on_cpu"] else {"default": tc["quantization"],
                                                                         "embeddings_on_cpu": True}  # fmt: skip
        ceiling = tc["vram_ceiling"] or tc["card_bytes"]
        tasks = [{"name": f"task{i}", "prompt": tc["prompt"], "max_new_tokens": tc["new_tokens"],
                  "stop_on_repetition": False} for i in range(tc["tasks"])]  # fmt: skip
        cfg = load_job({"model": str(ckpt / "ckpt"), "input": {"folder": str(ckpt / "images")},
                        "output": str(ckpt / "out"), "device": dev.type, "dtype": tc["dtype"], "quantization": quant,
                        "vram_ceiling": ceiling, "batch_size": tc["batch"], "cache_dir": str(ckpt / "cache"),
                        "tasks": tasks}, pipeline=ckpt / "pipeline.yaml")  # fmt: skip
        dev.reset_peak()
        t0 = time.perf_counter()
        park = {"swap": True, "resident": False}.get(tc["mode"])
        model = worker_load_model(cfg, park_vision=park, use_cache=False)
        dev.sync()
        out["load"] = {"seconds": round(time.perf_counter() - t0, 1),
                       "peak_allocated_gib": dev.gib("max_memory_allocated"),
                       "peak_reserved_gib": dev.gib("max_memory_reserved")}  # fmt: skip

        class TracedWorker(ModelWorker):
            def _generation_config(self, task, attempt):
                return replace(super()._generation_config(task, attempt), stop_token_ids=(), stop_on_repetition=False)

        worker = TracedWorker(cfg, "bench-traced", model=model)
        if tc["mode"] != "auto" and worker.plan.mode != tc["mode"]:  # as the trace forced it
            forced = plan_mode(worker.memory, worker.ceiling, worker.max_text, worker.max_new, worker.slot_limit,
                               None, tc["mode"])  # fmt: skip
            worker.plan = forced or replace(worker.plan, mode=tc["mode"])
        size = model.config.vision.image_size
        g = torch.Generator().manual_seed(1)
        chunk = []
        for i in range(tc["images"]):
            entry = ImageEntry(image_id=f"{i:064x}", path=f"random-{i}.jpg", values={})
            requests = [Request(entry, t, tc["prompt"], "bench") for t in cfg.tasks]
            chunk.append((LoadedImage(entry, torch.randn(3, size, size, generator=g), size, size), requests))
        dev.reset_peak()
        t0 = time.perf_counter()
        with PeakKeeper(dev) as peaks:
            rows = worker.process(chunk)
            dev.sync()
        out["worker"] = {"seconds": round(time.perf_counter() - t0, 1),
                         "rows_ok": sum(r["status"] == "ok" for r in rows),
                         "mode": worker.plan.mode, "peak_allocated_gib": peaks.gib("allocated"),
                         "peak_reserved_gib": peaks.gib("reserved"),
                         "measured_work": {k: {"predicted": p, "measured": m}
                                           for k, (p, m) in worker._measured.items()}}  # fmt: skip
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    return out


def traced_table(trace: dict[str, Any], real: dict[str, Any]) -> dict[str, Any]:
    """Traced beside measured: the load, the worker, and the work bytes the worker measured per phase."""
    ph = trace["phases"]

    def gib(v: Any) -> Any:
        return "n/a" if v is None else round(v / GiB, 2)

    rows = []
    for part in ("load", "worker"):
        r = real.get(part, {})
        rows.append([part, gib(ph[part]["peak_allocated"]), _na(r.get("peak_allocated_gib")),
                     gib(ph[part]["peak_reserved"]), _na(r.get("peak_reserved_gib"))])  # fmt: skip
    traced_work = (trace.get("worker") or {}).get("measured_work", {})
    for phase, pm in real.get("worker", {}).get("measured_work", {}).items():
        rows.append([f"{phase} work (beyond weights)", gib(traced_work.get(phase, {}).get("measured")),
                     round(pm["measured"] / GiB, 2), "-", "-"])  # fmt: skip
    return _table("Dry run vs this device", ["what", "traced allocated GiB", "measured allocated GiB",
                                             "traced reserved GiB", "measured reserved GiB"], rows,
                  "traced: the dry run's allocator model (scripts/trace_gpu.py); measured: torch.cuda.max_memory_*; "
                  "the CUDA context and library workspaces are outside both.")  # fmt: skip


# -- tables ----------------------------------------------------------------------------------------


def _table(title: str, columns: list[str], rows: list[list[Any]], note: str) -> dict[str, Any]:
    """bench.py's table shape: string cells, every row as wide as the header."""
    cells = [[str(c) for c in r] + ["-"] * (len(columns) - len(r)) for r in rows]
    return {"title": title, "note": note, "columns": columns, "rows": cells}


def _failure(x: dict[str, Any]) -> str | None:
    """What to print instead of figures for a part that did not run or did not finish."""
    if "error" in x:
        return f"error: {x['error'][:120]}"
    if "skipped" in x:
        return f"skipped ({x['skipped']})"
    if x.get("does_not_fit"):
        return f"does not fit: {x['does_not_fit'][:120]}"
    if x.get("oom"):
        return f"out of memory (peak reserved {x.get('peak_reserved_gib')} GiB)"
    return None


def _na(v: Any) -> Any:
    return "n/a" if v is None else v


def gpu_tables(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The printed tables, from the report's figures alone (so `bench.py --render` re-prints them from the JSON)."""
    where = f"{report['device']} ({report.get('capability') or report['device_type']})"
    bw = report.get("copy_bandwidth_gbs")
    gen_rows, worker_rows, load_rows = [], [], []
    for m in report["models"]:
        name = m["model"]
        if _failure(m):
            load_rows.append([name, "all", _failure(m)])
            continue
        for q in m["quants"]:
            quant, load = q["quant"], q["load"]
            if _failure(load):
                load_rows.append([name, quant, _failure(load)])
                continue
            s = load["split_bytes"]
            kernels = ", ".join(f"{k} x{n}" for k, n in sorted(load["kernels"].items())) or "-"
            gib = [f"{load['weight_bytes'] / GiB:.2f}", f"{s['decode'] / GiB:.2f}", f"{s['prefill'] / GiB:.2f}"]
            cpu_embed = "yes" if load["embeddings_on_cpu"] else "no"
            load_rows.append([name, quant, m.get("write_s", "-"), load["load_wall_s"], *gib, cpu_embed, kernels])
            for r in q["rows"]:
                fail = _failure(r)
                if fail:
                    gen_rows.append([name, quant, r["batch"], fail])
                else:
                    gen_rows.append([name, quant, r["batch"], _na(r["peak_reserved_gib"]), r["images_per_s"],
                                     r["decode_tok_s"], r["prefill_s"], r["prefill_floor_s"], r["decode_step_ms"],
                                     r["decode_floor_ms"]])  # fmt: skip
            w = q.get("worker")
            if w:
                fail = _failure(w)
                if fail:
                    worker_rows.append([name, quant, w["images"], fail])
                else:
                    goal = "n/a" if w["goal_met"] is None else "met" if w["goal_met"] else "NOT met"
                    worker_rows.append([name, quant, w["images"], w["mode"], w["planned_batch"], w["planned_peak_gib"],
                                        _na(w["peak_reserved_gib"]), _na(w["peak_allocated_gib"]), w["images_per_s"],
                                        w["tokens_per_s"], w["seconds"], goal])  # fmt: skip
    nt = report["new_tokens"]
    tables = [
        _table(
            "gpu generate: plain `generate`, whole model on the device",
            [
                "model",
                "quant",
                "batch",
                "peak reserved GiB",
                "images/s",
                "decode tok/s",
                "prefill s",
                "prefill floor s",
                "decode step ms",
                "decode floor ms",
            ],
            gen_rows,
            f"{where}, {report['date']}; random-weight full-size models, random images, {nt} new tokens per "
            f"sequence (no early stop). Floors = bytes read / device copy bandwidth ({bw} GB/s, read + write "
            "counted): a text decode step reads the language-expert path, the norms and the LM head (not the "
            "vision experts, not the vision tower); a prefill reads every weight but the embedding table. "
            "images/s = batch / (prefill + decode).",
        ),
        _table(
            f"gpu pipeline path: `Worker.process` under a {report['ceiling_gib']:g} GiB vram_ceiling",
            [
                "model",
                "quant",
                "images",
                "mode",
                "planned batch",
                "planned peak GiB",
                "peak reserved GiB",
                "peak allocated GiB",
                "images/s",
                "tokens/s",
                "s",
                f"goal < {report['ceiling_gib']:g} GiB",
            ],
            worker_rows,
            "what `cogbatch run` does per chunk: vision encode, prefix prefill, continuous-batching decode; the "
            "planner chose the mode (swap = vision tower and language model take turns on the device) and the "
            f"batch; {nt} new tokens per request; tokens/s and images/s include encode and prefill. Peak = "
            "torch.cuda.max_memory_reserved() over the chunk.",
        ),
        _table(
            "gpu loads: streaming quantizing loader, bf16 checkpoint",
            [
                "model",
                "quant",
                "checkpoint write s",
                "load s",
                "weights GiB",
                "decode-step weights GiB",
                "prefill weights GiB",
                "embeddings on CPU",
                "kernel classes",
            ],
            load_rows,
            "checkpoint write s = random bf16 checkpoint drawn on the device and written (under /dev/shm when it "
            "has room); load s = wall time of CogVLM.from_pretrained from it, quantized-weights cache off (the "
            "cache is measured on CPU by scripts/bench.py); weights = bytes of every parameter; decode-step / "
            "prefill weights = what the floors above divide.",
        ),
    ]
    return tables


# -- main ------------------------------------------------------------------------------------------


def missing_packages() -> list[str]:
    """Distribution names of the packages that cannot be imported here."""
    missing = []
    for mod, pkg in NEEDED.items():
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:  # its parent package is missing (optimum, for optimum.quanto)
            found = False
        if not found:
            missing.append(pkg)
    return missing


def render_tables(tables: list[dict[str, Any]]) -> str:
    """The tables as scripts/bench.py prints them (its `render`, loaded by path: scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("cogbatch_bench_cpu", Path(__file__).with_name("bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return "\n".join(bench.render(t) for t in tables)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.simulate and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU and none is available (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU, or --simulate for a CPU dry run. "
              "CPU benchmarks: python scripts/bench.py --quick", file=sys.stderr)  # fmt: skip
        return 2
    missing = missing_packages()
    if missing:
        print(f"bench_gpu.py: missing Python packages: {', '.join(missing)}; install them (pip install -e . "
              "from this checkout installs them)", file=sys.stderr)  # fmt: skip
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    budget = Budget(args.budget_s)
    dev = Device(torch, "cpu" if args.simulate else "cuda")
    if args.traced is not None:
        trace = json.loads(args.traced.read_text())
        real = {**dev.describe(), **bench_traced(trace, args, dev)}
        if args.json:
            args.json.write_text(json.dumps(real, indent=1) + "\n")
        print(render_tables([traced_table(trace, real)]))
        return 0
    bandwidth = copy_bandwidth(dev)
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        **dev.describe(),
        "simulate": args.simulate,
        "copy_bandwidth_gbs": round(bandwidth / 1e9, 1),
        "new_tokens": args.new_tokens,
        "ceiling_gib": args.ceiling_gib,
        "budget_s": args.budget_s,
        "command": " ".join(["python", "scripts/bench_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "models": [],
    }
    out = args.json or REPO / "outputs" / "bench" / f"gpu-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        """Rewritten after every part: a device call killed at its limit still leaves what was measured."""
        report["seconds"] = round(budget.elapsed(), 1)
        try:
            report["tables"] = gpu_tables(report)
        except Exception as e:  # the figures matter more than their tables: keep writing them
            print(f"tables failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            report["tables"], report["tables_error"] = [], repr(e)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp, out)

    log(budget, f"{report['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; budget {args.budget_s:g} s")
    with torch.no_grad():
        for model_name in args.models:
            failed = run_part(
                model_name, lambda m=model_name: bench_model(m, args, dev, bandwidth, budget, report, save)
            )
            if failed:  # an error outside any part (the parts record their own)
                report.setdefault("errors", []).append({"model": model_name, **failed})
    save()
    print(render_tables(report["tables"]))
    print(f"wrote {out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
