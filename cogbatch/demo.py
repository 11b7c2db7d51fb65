"""The no-GPU, no-download smoke run: generated images, a tiny random model, a real job."""

from __future__ import annotations

from pathlib import Path

from cogbatch.job import JobConfig, load_job

# The same job as jobs/demo.yaml, with paths under the chosen output directory.
DEMO_TASKS = [
    {"name": "caption", "prompt": "Describe this image.", "template": "chat", "max_new_tokens": 16},
    {"name": "shapes", "prompt": "What shapes are in {filename}?", "template": "vqa", "max_new_tokens": 8},
]


def make_sample_images(folder: Path, n: int) -> None:
    """Coloured shapes on plain backgrounds, deterministic, a few KB each."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colors = ["red", "green", "blue", "orange", "purple", "yellow", "black", "white"]
    for i in range(n):
        path = folder / f"sample_{i:03d}.png"
        if path.exists():
            continue
        img = Image.new("RGB", (96 + 8 * (i % 5), 64 + 8 * (i % 3)), colors[(i + 3) % len(colors)])
        draw = ImageDraw.Draw(img)
        if i % 2:
            draw.ellipse((10, 10, 50, 50), fill=colors[i % len(colors)])
        else:
            draw.rectangle((10, 10, 50, 40), fill=colors[i % len(colors)])
        img.save(path)


def demo_job(output: Path, n_images: int) -> JobConfig:
    images = output / "images"
    make_sample_images(images, n_images)
    return load_job(
        {
            "model": "tiny-random:cogvlm2",
            "input": {"folder": str(images)},
            "output": str(output / "results"),
            "tasks": DEMO_TASKS,
            "quantization": "none",
            "device": "cpu",
            "dtype": "fp32",
            "batch_size": 4,
        },
        pipeline=None,
    )
