"""A corpus of tricky image files, shared by the decoder's unit tests and the runner's end-to-end tests.

`make_bad_image_corpus(directory)` writes the files and returns {relative name: expectation}:
None when the file must decode to an RGB image, else a substring of the `ImageError` reason.
Some entries are deliberately *not* regular files (a missing file, a directory, a symlink loop).

The constants below describe what the valid entries contain, so tests can check pixels as well
as success.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)

VALID_SIZE = (48, 32)  # (width, height) of valid.jpg, valid.png and the other plain valid images
EXIF_STORED_SIZE = (40, 20)  # exif_rotated.jpg as stored; orientation 6 makes it display as 20 x 40
BOMB_SIZE = (20_000, 20_000)  # bomb.png: 400 M pixels in a few tens of KB
GIF_FRAME_COLOURS = (RED, BLUE)  # animated.gif / .png / .webp: frame 0 is red, frame 1 blue
UNICODE_NAME = "dir with spaces/café ünï.jpg"


def make_bad_image_corpus(directory: Path) -> dict[str, str | None]:
    """Write the corpus under `directory` (created if needed); return {relative file name: expectation}.

    Expectation None: decodes fine. Otherwise a substring of the ImageError reason. Every file's
    bytes differ from every other's: the pipeline identifies an image by the sha256 of its bytes, so
    two identical files would collapse into one result row.

        valid.jpg, valid.png, wrong_extension.png (a JPEG), gray.png, bilevel.png    None
        cmyk.jpg, gray16.png (0..65535 ramp), palette_transparent.png, rgba.png,
        la.png, animated.gif, animated.png, animated.webp, exif_rotated.jpg,
        bad_exif.jpg, "dir with spaces/café ünï.jpg"                                None
        truncated.jpg, truncated.png                                                "truncated"
        corrupt.png (IDAT bytes overwritten)                                        "corrupt"
        empty.jpg (0 bytes)                                                         "empty file"
        text.png (plain text), ghostscript.eps (never handed to Ghostscript)        "not an image"
        bomb.png (20000 x 20000, 1-bit)                                             "image too large"
        missing.jpg (not created)                                                   "file not found"
        loop.jpg (symlink to itself; left out where symlinks cannot be made)        "symlink loop"
        folder.jpg (a directory)                                                    "is a directory"
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus: dict[str, str | None] = {}

    def add(name: str, content: bytes, expect: str | None) -> None:
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        corpus[name] = expect

    w, h = VALID_SIZE
    jpeg = _encode(_noise(0), "JPEG", quality=90)
    png = _encode(_noise(1), "PNG")

    # Valid, in the modes the decoder converts.
    add("valid.jpg", jpeg, None)
    add("valid.png", png, None)
    add("wrong_extension.png", _encode(_noise(2), "JPEG", quality=90), None)  # sniffed from bytes, not name
    add("gray.png", _encode(_noise(3).convert("L"), "PNG"), None)
    add("bilevel.png", _encode(_noise(4).convert("1"), "PNG"), None)
    add("cmyk.jpg", _encode(Image.new("CMYK", VALID_SIZE, (0, 255, 255, 0)), "JPEG", quality=95), None)  # red
    ramp = np.linspace(0, 65535, w * h).round().astype(np.uint16).reshape(h, w)
    add("gray16.png", _encode(Image.fromarray(ramp), "PNG"), None)  # mode I;16, 16 bits per sample on disk
    add("palette_transparent.png", _palette_png_with_transparency(), None)
    add("rgba.png", _encode(_half_transparent("RGBA", (0, 255, 0, 0), (0, 0, 255, 255)), "PNG"), None)
    add("la.png", _encode(_half_transparent("LA", (0, 0), (0, 255)), "PNG"), None)
    add("animated.gif", _animated("GIF"), None)
    add("animated.png", _animated("PNG"), None)
    add("animated.webp", _animated("WEBP", lossless=True), None)
    add("exif_rotated.jpg", _exif_rotated_jpeg(), None)
    add(
        "bad_exif.jpg",
        _encode(_noise(5), "JPEG", quality=90, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff garbage"),
        None,
    )
    add(UNICODE_NAME, _encode(_noise(6), "JPEG", quality=90), None)

    # Bad data.
    add("truncated.jpg", jpeg[: len(jpeg) * 6 // 10], "truncated")
    add("truncated.png", png[: len(png) * 6 // 10], "truncated")
    add("corrupt.png", _corrupt_idat(png), "corrupt")
    add("empty.jpg", b"", "empty file")
    add("text.png", b"This is not a PNG, just text with the wrong name.\n" * 4, "not an image")
    add("ghostscript.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "not an image")
    (directory / "bomb.png").write_bytes(_png_bilevel_bomb(*BOMB_SIZE))
    corpus["bomb.png"] = "image too large"

    # Bad paths.
    corpus["missing.jpg"] = "file not found"  # deliberately not created
    try:
        os.symlink("loop.jpg", directory / "loop.jpg")  # relative target: itself
        corpus["loop.jpg"] = "symlink loop"
    except (OSError, NotImplementedError):  # e.g. Windows without the symlink privilege
        pass
    (directory / "folder.jpg").mkdir(exist_ok=True)
    corpus["folder.jpg"] = "is a directory"
    return corpus


def _noise(seed: int) -> Image.Image:
    w, h = VALID_SIZE
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _half_transparent(mode: str, left: tuple[int, ...], right: tuple[int, ...]) -> Image.Image:
    """Left half `left` (transparent, with a colour that must not show), right half `right` (opaque)."""
    w, h = VALID_SIZE
    image = Image.new(mode, VALID_SIZE, left)
    image.paste(right, (w // 2, 0, w, h))
    return image


def _palette_png_with_transparency() -> bytes:
    """A "P" PNG with a tRNS chunk: index 0 (black) transparent on the left, index 1 (blue) on the right."""
    w, h = VALID_SIZE
    image = Image.new("P", VALID_SIZE, 0)
    image.putpalette([0, 0, 0, *BLUE])
    image.paste(1, (w // 2, 0, w, h))
    return _encode(image, "PNG", transparency=0)


def _animated(fmt: str, **params: object) -> bytes:
    first, *rest = (Image.new("RGB", VALID_SIZE, colour) for colour in GIF_FRAME_COLOURS)
    return _encode(first, fmt, save_all=True, append_images=rest, duration=100, loop=0, **params)


def _exif_rotated_jpeg() -> bytes:
    """Stored 40 x 20, left half red, right half blue; EXIF orientation 6 (rotate 90° clockwise to view).

    Displayed it is 20 x 40 with red on top and blue below.
    """
    w, h = EXIF_STORED_SIZE
    image = Image.new("RGB", EXIF_STORED_SIZE, RED)
    image.paste(BLUE, (w // 2, 0, w, h))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    return _encode(image, "JPEG", quality=95, exif=exif.tobytes())


def _corrupt_idat(png: bytes) -> bytes:
    """Overwrite the middle of the first IDAT's compressed data, fixing its CRC so only zlib can notice."""
    start = png.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", png[start : start + 4])
    data = bytearray(png[start + 8 : start + 8 + length])
    mid = len(data) // 2
    data[mid : mid + 16] = b"\xff" * 16
    chunk = _png_chunk(b"IDAT", bytes(data))
    return png[:start] + chunk + png[start + 12 + length :]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bilevel_bomb(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG written row block by row block: no full image is ever held in memory.

    Pillow would allocate the whole image (one byte per pixel, 400 MB here) to save it.
    """
    row = b"\x00" + bytes((width + 7) // 8)  # filter type 0, then the packed bits
    rows_per_block = 1024
    compressor = zlib.compressobj(9)
    idat = []
    for start in range(0, height, rows_per_block):
        idat.append(compressor.compress(row * min(rows_per_block, height - start)))
    idat.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(idat))
        + _png_chunk(b"IEND", b"")
    )
