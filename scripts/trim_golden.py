#!/usr/bin/env python
"""Trim a folder of reference fixtures to what the tests read, into tests/data/golden.

    python scripts/trim_golden.py GOLDEN_DIR [--out DIR]

GOLDEN_DIR is the complete fixture folder the reference harness wrote (the official CogVLM /
CogVLM2 code run on tiny random checkpoints: README.md, SHA256SUMS, cogvlm1/, cogvlm2/, images/,
real_configs/, templates_*.json). Nothing a test compares is changed or dropped:

* each checkpoint keeps config.json, its weights and the tokenizer files transformers loads
  (tokenizer.json, tokenizer_config.json, special_tokens_map.json); weights above 4 MiB (CogVLM2's
  128256-row vocabulary) are replaced by `weights_seed.json` when `cogbatch.testing.tiny` redraws
  them from the seed byte for byte (checked here, and again by the tests);
* cases.safetensors keeps the tensors the tests read (CASE_TENSORS), whole; a tensor or row the
  reference computed twice, bit for bit the same, is stored once (DUPLICATES, checked here);
* images/ keeps the three test images and the reference transform outputs (`img_a_S*`, `img_b_S*`);
* templates_*.json and real_configs/*/{config.json,param_shapes.json} are copied.

Then SHA256SUMS is written, and the result is restored the way the tests restore it
(tests/golden.py) and compared with the input tensor by tensor. README.md in the output is kept.
Prints the size of every file written; errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.golden and cogbatch from this checkout

from tests.golden import (  # noqa: E402
    CASES,
    README,
    SUMS,
    WEIGHTS_SEED,
    GoldenError,
    check_sums,
    expand_cases,
    golden_root,
    read_sums,
    redraw_weights,
    sha256,
)

CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Weight seeds of the reference's tiny checkpoints (section 4 of the harness's README).
SEEDS = {"cogvlm1/dev": 1001, "cogvlm1/hidden": 2002, "cogvlm2/dev": 3003, "cogvlm2/hidden": 4004}
REDRAW_ABOVE = 4 << 20  # bytes of weights worth redrawing instead of storing
# Every cases tensor a test reads (tests/unit/test_model_golden.py, test_fp16.py, test_quantize.py,
# tests/gpu/test_cuda_parity.py); `t_images` does not exist (the text-only case has no image).
CASE_TENSORS = (
    "a_input_ids", "a_token_type_ids", "a_attention_mask", "a_position_ids", "a_images",
    "a_logits", "a_inputs_embeds", "a_hidden_states",
    "t_input_ids", "t_token_type_ids", "t_attention_mask", "t_position_ids", "t_logits",
    "b_new_tokens", "b_step_logits",
    "cR_input_ids", "cR_token_type_ids", "cR_attention_mask", "cR_position_ids", "cR_images",
    "cR_last_real_index", "cR_logits_last_position", "cR_logits_last_real_token",
    "cL_input_ids", "cL_token_type_ids", "cL_attention_mask", "cL_position_ids", "cL_images",
    "cL_logits_last_position", "cL_new_tokens", "cL_step_logits_top16_indices", "cL_step_logits_top16_values",
    "c_solo_logits_last_token",
    "d_images", "d_patch_embedding_out", "d_vit_out", "d_glu_in", "d_vision_out",
)  # fmt: skip
# What the reference computed twice: step 0 of greedy decoding is the prefill's last position of
# case a; batch sample 0 alone is case a; the longest right-padded sample ends on its last real
# token; both batches and the vision-only case use the same images. Kept whole where not bit-equal.
DUPLICATES = {
    "b_step_logits": {"insert_at": 0, "row": ["a_logits", 0, -1]},
    "c_solo_logits_last_token": {"insert_at": 0, "row": ["a_logits", 0, -1]},
    "cR_logits_last_position": {"insert_at": -1, "row": ["cR_logits_last_real_token", -1]},
    "cR_images": {"same_as": "cL_images"},
    "d_images": {"same_as": "a_images"},
}
PREPROCESS_PREFIXES = ("img_a_S", "img_b_S")  # what test_preprocessing_is_bit_exact compares


class TrimError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("golden", type=Path, help="the complete reference fixture folder")
    p.add_argument("--out", type=Path, default=golden_root(), help="output folder (default: tests/data/golden)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sizes = trim(args.golden, args.out)
    except TrimError as e:
        print(f"trim_golden: {e}", file=sys.stderr)
        return 2
    width = max(map(len, sizes))
    for name, size in sizes.items():
        print(f"{name:<{width}}  {size:>10,d}")
    print(f"{'total':<{width}}  {sum(sizes.values()):>10,d} bytes in {args.out}")
    return 0


def trim(src: Path, out: Path) -> dict[str, int]:
    """Write the trimmed fixtures of `src` to `out`; returns {relative path: bytes} of what was written."""
    configs = sorted(p.parent.relative_to(src).as_posix() for p in src.glob(f"cogvlm*/*/{CASES}"))
    if not configs:
        raise TrimError(f"{src} has no cogvlm*/*/{CASES}: not a reference fixture folder")
    if not (src / SUMS).is_file():
        raise TrimError(f"{src / SUMS} is missing: the input cannot be checked")
    for name, digest in read_sums(src).items():
        if not (src / name).is_file() or sha256(src / name) != digest:
            raise TrimError(f"{src / name} is missing or does not match the input's {SUMS}")
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(p for p in out.iterdir() if p.name != README)
    if old and not (out / SUMS).is_file():
        raise TrimError(f"{out} holds files but no {SUMS}: not a trimmed fixture folder, refusing to clear it")
    for path in old:  # everything but the hand-written README is regenerated
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    for config in configs:
        for name in CHECKPOINT_FILES:
            if (src / config / name).is_file():
                copy(src, out, f"{config}/{name}")
        store_weights(src, out, config)
        write_cases(src / config / CASES, out / config / CASES)
    for image in sorted(src.glob("images/*.png")):
        copy(src, out, image.relative_to(src).as_posix())
    for pre in sorted(src.glob("images/preprocess_golden_*.safetensors")):
        write_preprocess(pre, out / pre.relative_to(src))
    for name in sorted(src.glob("templates_*.json")):
        copy(src, out, name.name)
    for real in sorted(src.glob("real_configs/*/")):
        for name in ("config.json", "param_shapes.json"):
            copy(src, out, f"real_configs/{real.name}/{name}")

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != README)
    (out / SUMS).write_text("".join(f"{sha256(out / name)}  {name}\n" for name in files))
    verify(src, out, configs)
    return {name: (out / name).stat().st_size for name in [*files, SUMS]}


def copy(src: Path, out: Path, name: str) -> None:
    if not (src / name).is_file():
        raise TrimError(f"{src / name} is missing")
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / name, out / name)


def store_weights(src: Path, out: Path, config: str) -> None:
    """Copy model.safetensors, or record its seed and SHA-256 where the maker redraws it exactly."""
    weights = src / config / "model.safetensors"
    if weights.stat().st_size <= REDRAW_ABOVE:
        copy(src, out, f"{config}/model.safetensors")
        return
    if config not in SEEDS:
        raise TrimError(f"{weights} is {weights.stat().st_size:,d} bytes and its seed is unknown (SEEDS)")
    spec = {"seed": SEEDS[config], "dtype": "float32", "sha256": sha256(weights)}
    (out / config / WEIGHTS_SEED).write_text(json.dumps(spec, indent=2) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            redraw_weights(out / config / WEIGHTS_SEED, Path(tmp) / "model.safetensors")
        except (GoldenError, ValueError, OSError) as e:
            raise TrimError(f"{config}: {e}") from None


def write_cases(path: Path, out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    cases = load_file(path)
    missing = [name for name in CASE_TENSORS if name not in cases]
    if missing:
        raise TrimError(f"{path} lacks {', '.join(missing)}, which the tests read")
    kept = {name: cases[name] for name in CASE_TENSORS}
    duplicates = {}
    for name, spec in DUPLICATES.items():
        if "same_as" in spec:
            if torch.equal(kept[name], kept[spec["same_as"]]):
                del kept[name]
                duplicates[name] = spec
            continue
        source, *index = spec["row"]
        at = spec["insert_at"] % len(kept[name])
        if torch.equal(kept[name][at], kept[source][tuple(index)]):
            rows = f"{name}.without_row_{at}"
            kept[rows] = torch.cat([kept[name][:at], kept.pop(name)[at + 1 :]])
            duplicates[name] = {"rows": rows, "insert_at": at, "row": spec["row"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in kept.items()}, str(out),
              metadata={"duplicates": json.dumps(duplicates, sort_keys=True)})  # one key: a stable header


def write_preprocess(path: Path, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    kept = {k: v for k, v in load_file(path).items() if k.startswith(PREPROCESS_PREFIXES)}
    if not kept:
        raise TrimError(f"{path} has no {' / '.join(PREPROCESS_PREFIXES)}* tensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(out), metadata={"format": "pt"})


def verify(src: Path, out: Path, configs: list[str]) -> None:
    """Restore `out` as the tests do and compare every kept tensor with the input, bit for bit."""
    import torch
    from safetensors.torch import load_file

    if check_sums(out):
        raise TrimError(f"{out} fails its own {SUMS}: {check_sums(out)[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            restored = Path(tmp) / config.replace("/", "_")
            expand_cases(out / config / CASES, restored)
            ours, ref = load_file(restored), load_file(src / config / CASES)
            if sorted(ours) != sorted(CASE_TENSORS):
                raise TrimError(f"{config}: restored cases hold {sorted(ours)}")
            different = [k for k in CASE_TENSORS if not torch.equal(ours[k], ref[k])]
            if different:
                raise TrimError(f"{config}: restored {', '.join(different)} differ from the input")
    ours, ref = read_sums(out), read_sums(src)
    for name in (f"{config}/model.safetensors" for config in configs):
        if name in ours and ours[name] != ref[name]:
            raise TrimError(f"{name} differs from the input")


if __name__ == "__main__":
    sys.exit(main())
