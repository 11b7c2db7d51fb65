#!/usr/bin/env python
"""Run the GPU path without a GPU: the real loader, Worker.process and decoder on fake CUDA tensors.

Examples:
    python scripts/trace_gpu.py --model cogvlm2 --capability 8.6 --dtype bf16 --quantization int4 \\
        --batch 4 --images 4 --new-tokens 256 --vram 11GiB --json out.json
    python scripts/trace_gpu.py --model cogvlm --quantization int4 --kv-cache int8    # an 8-bit KV cache
    python scripts/trace_gpu.py --model cogvlm --capability 7.5 --dtype fp16 --mode resident
    python scripts/trace_gpu.py --model cogvlm2 --small --new-tokens 4    # small shapes, seconds
    python scripts/trace_gpu.py --model cogvlm2 --api --vram 11GiB        # through cogbatch.load, VLM.generate

Prints a per-phase table (peak allocated / reserved beside the planner's prediction); --json writes
every figure (docs/dryrun.md lists them). Errors in the options are one line on stderr, exit 2; a
CUDA kernel check that fails (the code would fail on a GPU) exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from cogbatch.dryrun.config import DTYPES, MODELS, MODES
    from cogbatch.model.quant.spec import KV_CACHE_DTYPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="cogvlm2", choices=list(MODELS), help="shipped config to trace (default cogvlm2)"
    )
    p.add_argument("--small", action="store_true", help="the model's structure at small sizes (a quick check)")
    p.add_argument("--capability", default="8.6", help="compute capability of the fake GPU (default 8.6)")
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--quantization", default="int4", help="as a job's quantization: int4, int4-g64, int8, none")
    p.add_argument("--embeddings-on-cpu", action=argparse.BooleanOptionalAction, default=None,
                   help="the token table in host memory (default: the job's auto, host memory when the run swaps)")
    p.add_argument("--kv-cache", default="none", choices=KV_CACHE_DTYPES, help="int8: an 8-bit KV cache")
    p.add_argument("--batch", type=int, default=4, help="the job's batch_size: decode slots at most (default 4)")
    p.add_argument("--images", type=int, default=4, help="images in the chunk (default 4)")
    p.add_argument("--tasks", type=int, default=1, help="prompts per image (default 1)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens every request generates (default 256)")
    p.add_argument("--vram", default="11GiB", help="the card's memory (default 11GiB)")
    p.add_argument("--context", default="0.4GiB", help="card memory outside the allocator (default 0.4GiB)")
    p.add_argument("--vram-ceiling", help="the job's vram_ceiling (default: --vram)")
    p.add_argument("--mode", default="auto", choices=MODES, help="execution mode (default: the planner's)")
    p.add_argument(
        "--expandable-segments", action="store_true", help="model PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    )
    p.add_argument("--generate", action="store_true", help="also plain model.generate of --batch images")
    p.add_argument("--no-worker", action="store_true", help="only the load (and --generate)")
    p.add_argument("--api", action="store_true", help="load and run through cogbatch.load and VLM.generate")
    p.add_argument("--raise-oom", action="store_true", help="an allocation past the card raises, as on the card")
    p.add_argument("--trace-every-layer", action="store_true", help="trace the loader on every Linear (slow)")
    p.add_argument("--short-decode", action="store_true",
                   help="each request makes 2 tokens (its cache still sized for --new-tokens): fast grids")
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from cogbatch.dryrun.config import TraceConfig, parse_capability, small_config
    from cogbatch.model.errors import ConfigError
    from cogbatch.model.settings import parse_size

    def size(value: str, option: str) -> int:
        try:
            return parse_size(value)
        except ValueError as e:
            raise ValueError(f"{option}: {e}") from None

    try:
        cfg = TraceConfig(
            model=args.model,
            config=small_config(args.model) if args.small else None,
            capability=parse_capability(args.capability),
            dtype=args.dtype,
            quantization=args.quantization,
            embeddings_on_cpu=args.embeddings_on_cpu,
            kv_cache=args.kv_cache,
            batch=args.batch,
            images=args.images,
            tasks=args.tasks,
            new_tokens=args.new_tokens,
            card_bytes=size(args.vram, "--vram"),
            context_bytes=size(args.context, "--context") if args.context not in ("0", "") else 0,
            vram_ceiling=size(args.vram_ceiling, "--vram-ceiling") if args.vram_ceiling else None,
            mode=args.mode,
            expandable_segments=args.expandable_segments,
            generate=args.generate,
            worker=not args.no_worker,
            api=args.api,
            raise_oom=args.raise_oom,
            trace_every_layer=args.trace_every_layer,
            short_decode=args.short_decode,
        )
        cfg.job_quantization()
        if args.json is not None and not args.json.parent.is_dir():
            raise ValueError(f"--json: no directory {args.json.parent}")
    except (ValueError, ConfigError) as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from cogbatch.dryrun import trace
    from cogbatch.dryrun.config import DryRunError
    from cogbatch.dryrun.kernels import KernelCheckError

    try:
        report = trace(cfg)
    except KernelCheckError as e:
        print(f"trace_gpu: a CUDA kernel would fail: {e}", file=sys.stderr)
        return 1
    except DryRunError as e:  # the job refused the settings (e.g. a quantization rule)
        print(f"trace_gpu: {e}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
