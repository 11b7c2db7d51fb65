"""Safe image decoding: file bytes -> a fully loaded RGB PIL image, or an `ImageError` with a short reason.

The loader threads call this for every image in a collection of millions, so one bad file must
never stop a run: no user input crashes a run. Every failure the *data* can cause
becomes `ImageError(reason)`; the worker writes `str(error)` into the row's `error` column.
Programming errors (a wrong argument type) and resource exhaustion (MemoryError,
KeyboardInterrupt, SystemExit) still propagate.

What the decoder guarantees, and why:

- The pixel count is checked against `max_pixels` from the header, before any pixel is decoded
  (`Image.open` is lazy), so a 20000 x 20000 PNG of a few KB is refused without allocating 400 MB.
  Pillow's own global guard (`Image.MAX_IMAGE_PIXELS`) is neither relied on nor mutated: loader
  threads share it. When Pillow's guard fires first, it is reported with the same reason.
- `load()` is forced here, with `ImageFile.LOAD_TRUNCATED_IMAGES` left off, so a truncated or
  corrupt file fails now, as a row, not later inside the model's batch.
- EXIF orientation is applied, so the model sees the picture the way a viewer shows it, and the
  reported width/height are the displayed ones.
- Transparency is composited onto white. `convert("RGB")`, which the official CogVLM demos and
  `cogbatch.model.preprocess` use, drops alpha and exposes whatever colour the transparent
  pixels happen to store (often black), which changes captions.
- 16-bit and float images are scaled to 8 bits; Pillow's `convert("L")` clips them to 255.
- The returned image is an in-memory copy: no file or buffer stays referenced.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cogbatch.errors import ImageError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DecodedImage",
    "ImageError",
    "decode_image",
    "from_pil",
    "load_image",
    "read_image_bytes",
]

# Pillow's own hard limit (2 * Image.MAX_IMAGE_PIXELS with its default of 89,478,485): the
# largest image Pillow decodes without the caller touching its global. About 13,400 x 13,400,
# far above any camera (a 100 MP sensor is 11,648 x 8,736) yet bounded: ~0.54 GB as RGB, which
# with a few loader threads in flight still fits ordinary RAM. CogVLM resizes to 490 or 1344
# pixels anyway, so nothing larger can help a caption.
DEFAULT_MAX_PIXELS = 178_956_970

# No legitimate encoding of an image within the pixel limit is bigger (16-bit RGBA, uncompressed:
# 8 bytes x 179 MP = 1.43 GB); the cap stops a stray video or disk image named .jpg from being
# read whole into memory.
DEFAULT_MAX_BYTES = 2 * 1024**3

WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_MAX_MESSAGE = 120  # characters of an underlying exception message kept in a reason


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: mode "RGB", EXIF orientation applied, fully loaded, detached from its bytes."""

    image: Image.Image
    width: int  # after EXIF transpose
    height: int


# --------------------------------------------------------------------------------------------- read


def read_image_bytes(path: str | os.PathLike[str], *, max_bytes: int | None = DEFAULT_MAX_BYTES) -> bytes:
    """Read a whole image file, mapping every OS error (missing, directory, permission, symlink loop...)
    to `ImageError`.

    The file is opened non-blocking and must be a regular file: a FIFO or device named `x.jpg` in a
    scanned folder would otherwise block a loader thread forever, or read `/dev/zero` until memory
    runs out. Files above `max_bytes` are refused before they are read.
    """
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ImageError(_os_reason(e, path)) from None
    except ValueError as e:  # e.g. an embedded NUL byte in a path read from a manifest
        raise ImageError(f"invalid path ({_short(str(e))})") from None
    try:
        with open(fd, "rb") as f:  # owns fd from here on
            st = os.fstat(f.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise ImageError("is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise ImageError("not a regular file")
            if max_bytes is not None and st.st_size > max_bytes:
                raise ImageError(f"file too large: {st.st_size} bytes > limit {max_bytes}")
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)  # +1: the file may grow
    except OSError as e:
        raise ImageError(_os_reason(e, path)) from None
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageError(f"file too large: more than {max_bytes} bytes")
    return data


def _os_reason(e: OSError, path: str | os.PathLike[str]) -> str:
    """A short reason for an OS error; the path itself is left out (the row records it)."""
    if e.errno == errno.ENOENT:
        return "file not found (broken symlink)" if os.path.islink(path) else "file not found"
    if e.errno == errno.EISDIR:
        return "is a directory"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if e.errno == errno.ENOTDIR:
        return "not a directory (a component of the path is a file)"
    if e.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return f"cannot read file ({e.strerror or type(e).__name__})"


# ------------------------------------------------------------------------------------------- decode


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None
) -> DecodedImage:
    """Bytes -> a fully loaded RGB image, or `ImageError`.

    Any exception the data can provoke inside Pillow (OSError, SyntaxError, ValueError,
    struct.error, zlib.error, EOFError...) is turned into a short reason here, at the decode
    boundary; only MemoryError, KeyboardInterrupt and SystemExit pass through.

    `draft` (width, height): the caller needs no more than this, so a JPEG may be decoded at a
    1/2 to 1/8 scale that still covers it (Pillow's `draft`), several times faster for a camera
    photo made into a thumbnail. The size limit is checked on the full size all the same, and the
    returned width/height are those of the reduced image. Formats without reduced decoding ignore it.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if not data:
        raise ImageError("empty file")
    return _with_reasons(lambda: _decode(data, max_pixels, draft), max_pixels)


def from_pil(image: Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """An image already opened in Python (a notebook's) given the treatment of decoded bytes, or `ImageError`.

    The same size limit, EXIF orientation, alpha on white and bit-depth scaling as `decode_image`, so
    an image passed as an object gives the model the pixels its file would. A lazily opened image is
    loaded here (a truncated file fails now, with a reason).
    """

    def convert() -> DecodedImage:
        _check_size(image.size, max_pixels)
        image.load()
        return _upright_rgb(image)  # works on a copy: the caller's image is never changed

    return _with_reasons(convert, max_pixels)


def _with_reasons(fn: Callable[[], DecodedImage], max_pixels: int) -> DecodedImage:
    """`fn()`, with every exception the data can provoke inside Pillow turned into `ImageError(reason)`."""
    try:
        return fn()
    except (ImageError, MemoryError):  # KeyboardInterrupt and SystemExit are not Exceptions: never caught
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's global guard fired first (an error, or its warning escalated by `-W error`).
        raise ImageError(_bomb_reason(e, max_pixels)) from None
    except UnidentifiedImageError:
        raise ImageError("not an image") from None
    except Exception as e:
        raise ImageError(_decode_reason(e)) from None


def load_image(
    path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = DEFAULT_MAX_BYTES
) -> DecodedImage:
    """Read and decode one file; every failure is an `ImageError` with a short reason."""
    return decode_image(read_image_bytes(path, max_bytes=max_bytes), max_pixels=max_pixels)


@functools.cache
def _formats() -> tuple[str, ...]:
    """Every format Pillow can read, in its detection order, except EPS.

    Pillow decodes EPS by running Ghostscript on the file: an external interpreter, with a long
    CVE history, fed untrusted input. Such files are reported as "not an image".
    """
    Image.init()
    return tuple(f for f in Image.ID if f != "EPS")


def _decode(data: bytes, max_pixels: int, draft: tuple[int, int] | None = None) -> DecodedImage:
    with Image.open(io.BytesIO(data), formats=_formats()) as im:  # lazy: reads the header only
        _check_size(im.size, max_pixels)
        if draft is not None:
            im.draft(None, draft)  # JPEG: pick a DCT scale >= draft before decoding; others: no-op
        im.load()  # decodes the first frame of animations; raises on truncated or corrupt data
        _check_size(im.size, max_pixels)  # a few formats (GIF, ICO) settle their size while loading
        return _upright_rgb(im)


def _upright_rgb(im: Image.Image) -> DecodedImage:
    """A loaded image turned by its EXIF orientation and converted to RGB, as a new in-memory image."""
    try:
        oriented = ImageOps.exif_transpose(im)  # a new, in-memory image: rotated, or a copy
    except Exception:
        # Malformed EXIF is common (camera firmware, editors) and says nothing about the
        # pixels: keep the image unrotated rather than losing it.
        oriented = im.copy()
    rgb = _to_rgb(oriented)
    return DecodedImage(image=rgb, width=rgb.width, height=rgb.height)


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width * height} pixels > limit {max_pixels}")


def _bomb_reason(e: Exception, max_pixels: int) -> str:
    """Pillow's bomb message -> the same reason as `_check_size` gives.

    Pillow refuses above its own limit whatever `max_pixels` says; that limit is then named.
    """
    match = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))
    if match is None:
        return f"image too large (Pillow: {_short(str(e))})"
    pixels, pil_limit = int(match[1]), int(match[2])
    if pixels > max_pixels:
        return f"image too large: {pixels} pixels > limit {max_pixels}"
    return f"image too large: {pixels} pixels > Pillow limit {pil_limit} (PIL.Image.MAX_IMAGE_PIXELS)"


def _decode_reason(e: Exception) -> str:
    """A short, specific reason where Pillow's error is recognisable, else the class and message."""
    message = str(e)
    if isinstance(e, EOFError) or "truncated" in message.lower():
        return "truncated image data"
    detail = f"{type(e).__name__}: {_short(message)}" if message else type(e).__name__
    return f"corrupt image data ({detail})"


def _short(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 3] + "..."


# -------------------------------------------------------------------------------------------- modes


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> "RGB": alpha composited on white, high bit depths scaled to 8 bits."""
    if im.mode in _HIGH_BIT_MODES:
        return _high_bit_to_rgb(im)
    if _has_transparency(im):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if im.mode == "RGB":
        return im
    try:
        return im.convert("RGB")  # "1", "L", "P", "CMYK", "YCbCr", "HSV", "RGBX"...
    except ValueError:
        raise ImageError(f"unsupported image mode {im.mode}") from None


def _has_transparency(im: Image.Image) -> bool:
    """Alpha band, a tRNS-style `transparency` entry ("P", "L", "RGB"), or a palette with alpha.

    Pillow >= 10.1 has `Image.has_transparency_data` for this; pyproject allows Pillow 10.0.
    """
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return True
    return im.mode == "P" and im.palette is not None and im.palette.mode.endswith("A")


def _high_bit_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit integer and 32-bit int/float greyscale -> 8-bit, then RGB.

    16-bit data keep their absolute brightness (high byte, as libpng's strip_16). "I" values that
    fit in 0..65535 are 16-bit data that Pillow widened; anything else, like "F" outside [0, 1]
    (depth maps, scientific TIFFs), has no standard scale and is stretched min..max.
    """
    a = np.asarray(im)  # (H, W): uint16 (">u2" for I;16B), int32 or float32
    if a.dtype.kind == "u" or (a.dtype.kind == "i" and a.size and a.min() >= 0 and a.max() <= 65535):
        gray = (a >> 8).astype(np.uint8)
    else:
        finite = np.isfinite(a) if a.dtype.kind == "f" else None
        values = a[finite] if finite is not None else a
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if a.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        if hi > lo:
            scaled = (a.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
        else:  # constant image: keep its value where it is a valid 8-bit level
            scaled = np.full(a.shape, np.clip(lo, 0, 255), dtype=np.float32)
        if finite is not None:
            scaled[~finite] = 0
        gray = np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)
    rgb = Image.fromarray(gray).convert("RGB")  # fromarray: uint8 (H, W) -> "L"
    transparency = im.info.get("transparency")
    if isinstance(transparency, int) and not isinstance(transparency, bool):  # 16-bit PNG tRNS: one grey level
        out = Image.new("RGB", rgb.size, WHITE)
        out.paste(rgb, mask=Image.fromarray(np.where(a == transparency, 0, 255).astype(np.uint8)))
        return out
    return rgb
