"""The reference image transform: squash-resize to S x S with PIL bicubic, scale to [0, 1], CLIP mean/std.

Adapted from the transform in THUDM's `modeling_cogvlm.py` (`build_conversation_input_ids`, both generations).

Identical, bit for bit, to the official `Resize((S, S), BICUBIC) -> ToTensor -> Normalize` on a
PIL image, without torchvision. Like the official demos it converts to RGB first, which *drops* an
alpha channel; the pipeline's safe decoder composites alpha on white before calling this.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_image(image: Image.Image, size: int) -> Image.Image:
    """RGB, squashed to (size, size) with PIL's antialiased bicubic (no aspect kept, no crop)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.resize((size, size), Image.Resampling.BICUBIC)


def preprocess_image(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> float32 pixel tensor (3, size, size) as the model expects."""
    pixels = np.asarray(resize_image(image, size), dtype=np.uint8)  # (S, S, 3)
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255)  # (3, S, S) in [0, 1]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std
