"""The "what fits which card" table of docs/hardware.md, as `cogbatch plan --gpu` predicts it.

    python scripts/hardware_table.py            # print the table (Markdown)
    python scripts/hardware_table.py --write    # replace the table in docs/hardware.md

For every card of `cogbatch.planning.gpus.GPUS` and both model generations (pipeline.yaml's `cogvlm` and
`cogvlm2`), with pipeline.yaml's defaults (int4, dtype auto, 128 prompt tokens, 256 new tokens): the
mode and batch a run would start with under the card's usable memory, without and with
`embeddings_on_cpu`. Nothing is downloaded (the configs cogbatch ships); a test keeps the page equal
to this output.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "hardware.md"
BEGIN, END = "<!-- hardware-table: begin -->", "<!-- hardware-table: end -->"
MODELS = (("CogVLM", "cogvlm"), ("CogVLM2", "cogvlm2"))


def cell(plan: dict) -> str:
    if plan["mode"] is None:
        return "does not fit"
    return f"{'swapped' if plan['mode'] == 'swap' else 'resident'}, {plan['slots']}"


def render() -> str:
    import cogbatch
    from cogbatch.planning.gpus import GPUS, GiB

    header = ["card", "memory (usable) GiB", "sm", "dtype"]
    for label, _ in MODELS:
        header += [f"{label} int4", f"{label} int4 + embeddings_on_cpu"]
    rows = [header, ["---", "---:", "---:", "---", *["---"] * (2 * len(MODELS))]]
    for gpu in GPUS:
        row: list[str] = []
        for _, alias in MODELS:
            report = cogbatch.plan_job(model=alias, gpu=gpu.name, pipeline=REPO / "pipeline.yaml")
            if not row:
                usable = report.target["usable_bytes"] / GiB
                dtype = {"bfloat16": "bf16", "float16": "fp16"}[report.dtype]
                row = [gpu.name, f"{gpu.memory / GiB:.2f} ({usable:.2f})", gpu.sm, dtype]
            row += [cell(v["plan"]) for v in report.variants]  # without, then with embeddings_on_cpu
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def replace_table(page: str, table: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), flags=re.S)
    if not pattern.search(page):
        raise SystemExit(f"{PAGE}: no {BEGIN} ... {END} block")
    return pattern.sub(lambda _: f"{BEGIN}\n{table}{END}", page)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"replace the table in {PAGE.relative_to(REPO)}")
    args = ap.parse_args()
    table = render()
    if args.write:
        PAGE.write_text(replace_table(PAGE.read_text(), table))
    else:
        print(table, end="")


if __name__ == "__main__":
    main()
