#!/usr/bin/env python
"""Build the demo gallery and photograph it with headless Chromium (Debian's `chromium` package).

    python scripts/screenshot_gallery.py                    # writes docs/gallery.png
    python scripts/screenshot_gallery.py --out /tmp/g.png --workdir /tmp/demo

The demo is `cogbatch demo`'s job (8 generated images, the tiny random model on the CPU, so its
text is random tokens) plus one truncated file, so that the picture also shows how an error row and
a missing thumbnail look. The page is opened from the disk (file://), as a user would open it; the
PNG is reduced to a 256-colour palette to stay small in the repository.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Flags that work in a container as root without a display, GPU, D-Bus or network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=5000",  # let the page's script run and the visible thumbnails load
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium(args: list[str], profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run headless Chromium with a fresh profile; `args` are the action (--screenshot=..., --dump-dom) and URL."""
    exe = find_chromium()
    if exe is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def build_demo(workdir: Path, n_images: int = 8) -> Path:
    """Run the demo job into `workdir` (once) and build its gallery; the page's path."""
    from cogbatch.api import run_job
    from cogbatch.demo import demo_job
    from cogbatch.gallery import build_gallery

    cfg = demo_job(workdir, n_images)
    broken = cfg.input.folder / "broken.png"
    if not broken.exists():
        data = (cfg.input.folder / "sample_000.png").read_bytes()
        broken.write_bytes(data[: len(data) // 2])
    summary = run_job(cfg, quiet=True)
    if summary.exit_code != 0:
        raise SystemExit(f"demo run failed: {summary}")
    return build_gallery(cfg).page


def screenshot(page: Path, out: Path, size: tuple[int, int] = (1280, 900)) -> Path:
    """Photograph `page` into `out` (PNG, 256-colour palette)."""
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cogbatch-chromium-") as tmp:
        raw = Path(tmp) / "shot.png"
        res = chromium([f"--screenshot={raw}", f"--window-size={size[0]},{size[1]}", page.resolve().as_uri()],
                       Path(tmp) / "profile")  # fmt: skip
        if not raw.is_file():
            raise SystemExit(f"chromium wrote no screenshot (exit {res.returncode}):\n{res.stderr[-2000:]}")
        with Image.open(raw) as im:
            im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "gallery.png")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "cogbatch-gallery-demo",
        help="Where the demo is built afresh (default: %(default)s); its path shows in the picture.",
    )
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)  # a fresh run: the page's dates are today's
    page = build_demo(args.workdir, args.images)
    out = screenshot(page, args.out)
    print(f"{out}: {out.stat().st_size / 1024:.0f} KiB (page {page})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
