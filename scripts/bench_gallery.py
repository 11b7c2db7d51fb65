#!/usr/bin/env python
"""Seconds and peak memory of `cogbatch gallery` on a large output: cold (no thumbnails yet) and warm.

    python scripts/bench_gallery.py                     # 50,000 rows = 25,000 images x 2 tasks
    python scripts/bench_gallery.py --rows 2000 --keep /tmp/gbench

The output is synthesized, not generated (the tiny model makes about 2 images/s on a CPU): rows
shaped like the demo job's tiny-model rows (random `<|tiny_unused_N|>` tokens, 16 for the caption
task, 8 for the question task, finish reason "length", 2% error rows) are written with the store's
PartWriter in parts of 256 rows, as a run writes them. The images are a few hundred small JPEGs
(400 x 300, shapes on gradients and noise), each copied many times with a distinct trailer after
its end-of-image marker: every copy has its own sha256, so every card needs its own thumbnail, and
decodes like its original.

Each `cogbatch gallery` is a separate process; its peak RSS comes from wait4(2). With --chromium,
the page is then opened in headless Chromium and the time until its first page of cards is on
screen is read from the page itself (`data-ready`, ms since navigation).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TASKS = [
    {"name": "caption", "prompt": "Describe this image.", "template": "chat", "max_new_tokens": 16},
    {"name": "shapes", "prompt": "What shapes are in {filename}?", "template": "vqa", "max_new_tokens": 8},
]


def make_base_images(n: int, seed: int = 0) -> list[bytes]:
    """`n` small JPEGs of shapes on gradients with some noise: photo-like enough to decode like JPEGs do."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = 400, 300
        ramp = np.linspace(0, 1, w, dtype=np.float32)[None, :, None] * rng.uniform(60, 200, 3).astype(np.float32)
        pixels = ramp + rng.normal(0, 12, (h, w, 3)).astype(np.float32) + rng.uniform(0, 50, 3).astype(np.float32)
        im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x, y = int(rng.integers(0, w - 80)), int(rng.integers(0, h - 80))
            box = (x, y, x + int(rng.integers(30, 140)), y + int(rng.integers(30, 120)))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def camera_jpeg_ms(repeats: int = 5) -> dict:
    """One thumbnail of a 12 MP JPEG (4000 x 3000, smooth shapes, quality 90), as a camera makes them:
    ms to decode it whole, to decode it at a DCT scale (`draft`), and for the whole thumbnail step."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    from cogbatch.gallery.thumbs import ThumbCache
    from cogbatch.inputs.decode import decode_image

    rng = np.random.default_rng(0)
    w, h = 4000, 3000
    ramp = np.linspace(0, 1, w, dtype=np.float32)[None, :, None] * np.array([150, 90, 200], np.float32)
    im = Image.fromarray(np.clip(ramp + rng.normal(0, 6, (h, w, 3)).astype(np.float32) + 30, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = int(rng.integers(0, w - 800)), int(rng.integers(0, h - 800))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x, y, x + int(rng.integers(100, 800)), y + int(rng.integers(100, 800))), fill=color)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    data = buf.getvalue()

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return round(min(times) * 1000, 1)

    image_id = hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        cache = ThumbCache(Path(tmp), 256)
        return {
            "bytes": len(data),
            "decode_full_ms": best(lambda: decode_image(data)),
            "decode_draft_ms": best(lambda: decode_image(data, draft=(256, 256))),
            "thumbnail_ms": best(lambda: cache.make(image_id, lambda: data)),
        }


def tiny_text(rng: random.Random, tokens: int) -> str:
    return "".join(f"<|tiny_unused_{rng.randrange(128_000)}|>" for _ in range(tokens))


def synthesize(work: Path, rows: int, base_images: int) -> Path:
    """Images and result parts for `rows` rows (len(TASKS) per image); returns the job file."""
    from cogbatch.store import PartWriter

    images, out = work / "images", work / "out"
    shutil.rmtree(out, ignore_errors=True)  # a kept folder: the same rows again, not twice
    n_images = rows // len(TASKS)
    base = make_base_images(base_images)
    rng = random.Random(0)
    created = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    with PartWriter(out, "20260101T000000Z-bench0", flush_rows=256) as writer:
        for i in range(n_images):
            data = base[i % len(base)] + b"\0cogbatch-bench\0" + str(i).encode()  # after EOI: ignored by decoders
            folder = images / f"{i // 1000:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"img_{i:06d}.jpg"
            path.write_bytes(data)
            image_id = hashlib.sha256(data).hexdigest()
            for task in TASKS:
                error = rng.random() < 0.02
                prompt = task["prompt"].format(filename=path.name)
                writer.add(
                    {
                        "image_id": image_id,
                        "path": str(path),
                        "task": task["name"],
                        "prompt": prompt,
                        "text": None if error else tiny_text(rng, task["max_new_tokens"]),
                        "status": "error" if error else "ok",
                        "error": "CUDA out of memory (synthetic)" if error else None,
                        "finish_reason": None if error else "length",
                        "tokens_in": None if error else 27 + len(prompt) // 4,
                        "tokens_out": None if error else task["max_new_tokens"],
                        "width": 400,
                        "height": 300,
                        "model": "tiny-random:cogvlm2",
                        "quant": "none",
                        "fingerprint": "bench",
                        "run_id": "20260101T000000Z-bench0",
                        "created_at": created + dt.timedelta(seconds=i),
                        "attempts": 1,
                    }
                )
    job = work / "job.yaml"
    spec = {"model": "tiny-random:cogvlm2", "input": {"folder": str(images)}, "output": str(out),
            "quantization": "none", "device": "cpu", "dtype": "fp32", "tasks": TASKS}  # fmt: skip
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    return job


def timed_gallery(job: Path) -> dict:
    """One `cogbatch gallery --json` process: wall seconds, peak RSS (wait4), and its JSON summary."""
    exe = shutil.which("cogbatch")
    cmd = [exe] if exe else [sys.executable, "-m", "cogbatch"]
    start = time.perf_counter()
    proc = subprocess.Popen([*cmd, "gallery", str(job), "--json", "--quiet"], stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"cogbatch gallery exited {proc.returncode}")
    summary = json.loads(stdout)
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        "summary": summary,
    }


def browser_ready_ms(page: Path) -> int | None:
    """ms from navigation to the first page of cards on screen, in headless Chromium (None without it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from screenshot_gallery import chromium, find_chromium

    if find_chromium() is None:
        return None
    with tempfile.TemporaryDirectory(prefix="cogbatch-chromium-") as tmp:
        res = chromium(["--dump-dom", page.resolve().as_uri()], Path(tmp) / "profile", timeout=300)
    found = re.search(r'data-ready="(\d+)"', res.stdout[:4096])
    return int(found[1]) if found else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--base-images", type=int, default=300)
    ap.add_argument("--keep", type=Path, help="Work in this folder and keep it (default: a temp folder).")
    ap.add_argument("--chromium", action="store_true", help="Also time the page's first render in headless Chromium.")
    ap.add_argument("--json", type=Path, default=REPO / "outputs" / "bench" / "gallery_cpu.json")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cogbatch-bench-gallery-") as tmp:
        work = args.keep or Path(tmp)
        t0 = time.perf_counter()
        job = synthesize(work, args.rows, args.base_images)
        print(f"synthesized {args.rows:,} rows in {time.perf_counter() - t0:.0f} s under {work}", flush=True)
        shutil.rmtree(work / "out.cogbatch", ignore_errors=True)  # cold: no thumbnails yet
        cold = timed_gallery(job)
        warm = timed_gallery(job)
        page = Path(cold["summary"]["page"])
        ready = browser_ready_ms(page) if args.chromium else None
        thumbs = sum(f.stat().st_size for f in (page.parent / "thumbs").rglob("*.jpg"))
    camera = camera_jpeg_ms()

    result = {
        "date": dt.date.today().isoformat(),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rows": args.rows,
        "images": args.rows // len(TASKS),
        "base_images": args.base_images,
        "cold": cold,
        "warm": warm,
        "page_mib": round(cold["summary"]["page_bytes"] / 2**20, 1),
        "thumbnails_mib": round(thumbs / 2**20, 1),
        "chromium_first_render_ms": ready,
        "camera_jpeg": camera,
    }
    for name in ("cold", "warm"):
        r = result[name]
        s = r["summary"]
        print(f"{name}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, peak RSS {r['peak_rss_mib']:.0f} MiB; "
              f"{s['thumbnails_made']:,} thumbnails made, {s['thumbnails_reused']:,} reused")  # fmt: skip
    print(f"page {result['page_mib']} MiB, thumbnails {result['thumbnails_mib']} MiB"
          + (f", Chromium first render {ready} ms" if ready is not None else ""))  # fmt: skip
    print(f"12 MP JPEG: decode {camera['decode_full_ms']} ms whole, {camera['decode_draft_ms']} ms at a DCT scale; "
          f"thumbnail {camera['thumbnail_ms']} ms")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
