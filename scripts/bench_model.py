#!/usr/bin/env python
"""Prefill and decode throughput of our CogVLM implementation at batch sizes 1, 4 and 16.

Builds (once, cached under outputs/bench/) a random CogVLM2-shaped checkpoint of a few hundred
million parameters with the tiny-checkpoint maker, loads it and prints a table. Prefill time is
image encode + one pass over the prompt; decode time is the `--new-tokens` single-token steps
after it (phase times as `generate` reports them). Run it before and after a change to the model code:

    python scripts/bench_model.py                 # CPU, fp32
    python scripts/bench_model.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # cogbatch from this checkout, installed or not (a GPU machine's bare python)

from cogbatch.model.cogvlm import CogVLM  # noqa: E402
from cogbatch.model.settings import GenerationConfig  # noqa: E402
from cogbatch.testing.tiny import write_tiny_checkpoint  # noqa: E402

SHAPE = {"arch": "cogvlm2", "hidden_size": 1024, "layers": 8, "heads": 8, "kv_heads": 2,
         "vision_hidden_size": 768, "vision_layers": 8, "image_size": 224, "dtype": "fp16"}  # fmt: skip
QUERIES = ["Describe this image.", "What is in the picture?", "Write a short caption for this photo, please.",
           "What colors do you see?"]  # fmt: skip


def checkpoint(path: Path) -> Path:
    if not (path / "model.safetensors.index.json").is_file():
        print(f"writing the benchmark checkpoint to {path} ...", flush=True)
        write_tiny_checkpoint(path, **SHAPE, seed=0)
    return path


def timed(model: CogVLM, batch, cfg: GenerationConfig, repeats: int) -> dict[str, float]:
    """Median phase times over `repeats` runs, after one warm-up run."""
    model.generate(batch, cfg)
    runs = [model.generate(batch, cfg).timings for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=REPO / "outputs" / "bench" / "cogvlm2-bench-ckpt")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = ap.parse_args()

    model = CogVLM.from_pretrained(checkpoint(args.checkpoint), dtype=args.dtype, device=args.device)
    n_params = sum(p.numel() for p in model.parameters())
    S = model.config.vision.image_size
    g = torch.Generator().manual_seed(0)
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        samples = [
            model.build_inputs(None, QUERIES[i % len(QUERIES)], torch.randn(3, S, S, generator=g)) for i in range(bs)
        ]
        batch = model.collate(samples)
        prompt_tokens = int(batch.attention_mask.sum())
        # The first new token comes from the prefill; the decode phase makes the other `new_tokens`.
        t = timed(model, batch, GenerationConfig(max_new_tokens=1 + args.new_tokens, stop_token_ids=()), args.repeats)
        t_prefill, t_decode = t["encode_s"] + t["prefill_s"], t["decode_s"]
        rows.append({"batch": bs, "prompt_tokens": prompt_tokens, "prefill_s": round(t_prefill, 3),
                     "prefill_tok_s": round(prompt_tokens / t_prefill, 1), "decode_s": round(t_decode, 3),
                     "decode_tok_s": round(bs * args.new_tokens / t_decode, 1)})  # fmt: skip

    print(f"\nCogVLM2-shaped random model, {n_params / 1e6:.0f} M parameters, {args.dtype} on {args.device} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"image {S} px = {model.config.vision_tokens} image tokens, {args.new_tokens} new tokens")  # fmt: skip
    header = f"{'batch':>5} | {'prompt tok':>10} | {'prefill s':>9} | {'prefill tok/s':>13} | " \
             f"{'decode s':>8} | {'decode tok/s':>12}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['batch']:>5} | {r['prompt_tokens']:>10} | {r['prefill_s']:>9} | {r['prefill_tok_s']:>13} | "
              f"{r['decode_s']:>8} | {r['decode_tok_s']:>12}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"params": n_params, "dtype": args.dtype, "device": args.device,
                                         "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    with torch.no_grad():
        main()
