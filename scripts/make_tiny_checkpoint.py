#!/usr/bin/env python
"""Write a tiny random CogVLM / CogVLM2 checkpoint in the official Hugging Face layout.

Examples:
    python scripts/make_tiny_checkpoint.py --out /tmp/tiny-cogvlm
    python scripts/make_tiny_checkpoint.py --out /tmp/tiny-cogvlm2 --arch cogvlm2 --hidden-size 32 --heads 4
    # a ~0.5B-parameter CogVLM2-shaped benchmark model
    python scripts/make_tiny_checkpoint.py --out /tmp/bench-cogvlm2 --arch cogvlm2 --hidden-size 1024 \\
        --layers 8 --vision-hidden-size 1024 --vision-layers 8 --image-size 224 --dtype fp16

Prints one summary line on stdout; errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Unset sizes take the defaults documented in cogbatch.testing.tiny.write_tiny_checkpoint.",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (must be empty or absent)")
    p.add_argument("--arch", default="cogvlm1", choices=["cogvlm", "cogvlm1", "cogvlm2"])
    p.add_argument("--hidden-size", type=int, default=64, help="LM hidden size (default 64)")
    p.add_argument("--layers", type=int, default=2, help="LM layers (default 2)")
    p.add_argument("--heads", type=int, help="LM heads (default: head_dim 16, or 128 from hidden 512)")
    p.add_argument("--kv-heads", type=int, help="LM key/value heads (default: heads, cogvlm2 heads//2)")
    p.add_argument("--intermediate-size", type=int, help="LM MLP size (default 2 x hidden)")
    p.add_argument("--vision-hidden-size", type=int, default=32, help="vision hidden size (default 32)")
    p.add_argument("--vision-layers", type=int, default=2, help="vision layers (default 2)")
    p.add_argument("--vision-heads", type=int, help="vision heads (default: head_dim 16, or 128 from 512)")
    p.add_argument("--vision-intermediate-size", type=int, help="vision MLP size (default 2 x vision hidden)")
    p.add_argument("--image-size", type=int, help="input resolution (default 56, cogvlm2 112)")
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--vocab-size", type=int, help="default 512, cogvlm2 128256 (fixed by the Llama-3 ids)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--shard-size", default="200MB", help="max bytes per shard, e.g. 200MB, 2MB, 1GB (default 200MB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from cogbatch.model.config import CogVLMConfig, checkpoint_tensor_shapes
    from cogbatch.testing.tiny import write_tiny_checkpoint

    start = time.perf_counter()
    try:
        out = write_tiny_checkpoint(
            args.out,
            arch=args.arch,
            hidden_size=args.hidden_size,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            intermediate_size=args.intermediate_size,
            vision_hidden_size=args.vision_hidden_size,
            vision_layers=args.vision_layers,
            vision_heads=args.vision_heads,
            vision_intermediate_size=args.vision_intermediate_size,
            image_size=args.image_size,
            patch_size=args.patch_size,
            vocab_size=args.vocab_size,
            dtype=args.dtype,
            shard_size=args.shard_size,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    seconds = time.perf_counter() - start

    shapes = checkpoint_tensor_shapes(CogVLMConfig.from_json(out))
    params = sum(math.prod(s) for name, s in shapes.items() if not name.endswith("inv_freq"))  # buffers excluded
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = len(set(index["weight_map"].values()))
    print(
        f"{params:,} parameters, {index['metadata']['total_size']:,} bytes {args.dtype} in {shards} "
        f"shard{'s' if shards > 1 else ''} -> {out} ({seconds:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
