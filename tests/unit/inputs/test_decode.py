"""The safe decoder: every corpus entry behaves as declared, guards hold, and no bad data escapes as
anything but ImageError."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from cogbatch.inputs import decode as images
from cogbatch.inputs.decode import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    ImageError,
    decode_image,
    from_pil,
    load_image,
    read_image_bytes,
)
from tests.corpus import (
    BLUE,
    EXIF_STORED_SIZE,
    RED,
    UNICODE_NAME,
    VALID_SIZE,
    WHITE,
    _png_bilevel_bomb,
    make_bad_image_corpus,
)

REQUIRED = {
    "valid.jpg": None,
    "valid.png": None,
    "truncated.jpg": "truncated",
    "empty.jpg": "empty file",
    "text.png": "not an image",
    "cmyk.jpg": None,
    "gray16.png": None,
    "palette_transparent.png": None,
    "animated.gif": None,
    "exif_rotated.jpg": None,
    "rgba.png": None,
    "bomb.png": "image too large",
    "missing.jpg": "file not found",
    UNICODE_NAME: None,
    "folder.jpg": "is a directory",
}
if hasattr(os, "symlink") and sys.platform != "win32":
    REQUIRED["loop.jpg"] = "symlink loop"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    directory = tmp_path_factory.mktemp("corpus")
    return directory, make_bad_image_corpus(directory)


def _load(corpus: tuple[Path, dict[str, str | None]], name: str) -> np.ndarray:
    directory, _ = corpus
    decoded = load_image(directory / name)
    assert decoded.image.mode == "RGB"
    return np.asarray(decoded.image).astype(int)  # (H, W, 3)


def _close(pixel: np.ndarray, colour: tuple[int, int, int], tol: int = 8) -> bool:
    return bool(np.abs(pixel - np.array(colour)).max() <= tol)


# ------------------------------------------------------------------------------------------- corpus


def test_corpus_contract(corpus: tuple[Path, dict[str, str | None]]) -> None:
    directory, declared = corpus
    for name, expect in REQUIRED.items():
        assert name in declared, name
        assert declared[name] == expect, name
    assert not (directory / "missing.jpg").exists()
    assert (directory / "folder.jpg").is_dir()
    if "loop.jpg" in declared:
        assert os.readlink(directory / "loop.jpg") == "loop.jpg"
    assert (directory / "bomb.png").stat().st_size < 200_000
    assert (directory / UNICODE_NAME).is_file()
    contents = [(directory / n).read_bytes() for n in declared if (directory / n).is_file()]
    assert len(set(contents)) == len(contents)  # distinct sha256 image ids, so one row per entry


def test_corpus_is_cheap_to_write(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_bad_image_corpus(tmp_path)
    assert time.perf_counter() - start < 2.0


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # bad_exif.jpg, on purpose
def test_every_entry_behaves_as_declared(corpus: tuple[Path, dict[str, str | None]]) -> None:
    directory, declared = corpus
    wrong = []
    for name, expect in declared.items():
        try:
            decoded = load_image(directory / name)
        except ImageError as e:
            if expect is None or expect not in str(e):
                wrong.append(f"{name}: expected {expect!r}, got ImageError({str(e)!r})")
            continue
        if expect is not None:
            wrong.append(f"{name}: expected ImageError containing {expect!r}, but it decoded")
        elif decoded.image.mode != "RGB" or decoded.image.size != (decoded.width, decoded.height):
            wrong.append(
                f"{name}: mode {decoded.image.mode}, size {decoded.image.size} vs {decoded.width}x{decoded.height}"
            )
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    "name",
    ["valid.jpg", "valid.png", "cmyk.jpg", "gray16.png", "rgba.png", "animated.gif", "bilevel.png", UNICODE_NAME],
)
def test_valid_entries_keep_their_size(corpus: tuple[Path, dict[str, str | None]], name: str) -> None:
    decoded = load_image(corpus[0] / name)
    assert (decoded.width, decoded.height) == VALID_SIZE
    assert decoded.image.size == VALID_SIZE


def test_exif_orientation_is_applied(corpus: tuple[Path, dict[str, str | None]]) -> None:
    decoded = load_image(corpus[0] / "exif_rotated.jpg")
    w, h = EXIF_STORED_SIZE
    assert (decoded.width, decoded.height) == (h, w) == (20, 40)
    pixels = np.asarray(decoded.image).astype(int)
    assert _close(pixels[5, 10], RED, tol=16)  # the stored left half is on top once rotated 90° clockwise
    assert _close(pixels[35, 10], BLUE, tol=16)


@pytest.mark.parametrize("name", ["palette_transparent.png", "rgba.png"])
def test_transparent_pixels_are_white(corpus: tuple[Path, dict[str, str | None]], name: str) -> None:
    pixels = _load(corpus, name)
    w = VALID_SIZE[0]
    assert (pixels[:, : w // 2] == WHITE).all()  # transparent half (stored black / green)
    assert (pixels[:, w // 2 :] == BLUE).all()


@pytest.mark.parametrize(
    "name",
    ["valid.jpg", "cmyk.jpg", "gray16.png", "rgba.png", "palette_transparent.png", "la.png", "exif_rotated.jpg",
     "animated.gif", "bilevel.png"],
)  # fmt: skip
def test_an_opened_image_gets_the_pixels_of_its_file(corpus: tuple[Path, dict[str, str | None]], name: str) -> None:
    """`from_pil` (an image handed over in Python) decodes as its file does, and leaves the object as it was."""
    with Image.open(corpus[0] / name) as opened:
        mode = opened.mode
        decoded = from_pil(opened)
        assert opened.mode == mode
    assert decoded.image.mode == "RGB" and (decoded.width, decoded.height) == decoded.image.size
    assert (np.asarray(decoded.image) == np.asarray(load_image(corpus[0] / name).image)).all()


def test_an_opened_image_fails_with_the_reasons_of_its_file(corpus: tuple[Path, dict[str, str | None]]) -> None:
    with Image.open(corpus[0] / "truncated.jpg") as opened, pytest.raises(ImageError, match="truncated"):
        from_pil(opened)  # opened lazily: the pixels are read, and fail, here
    with pytest.raises(ImageError, match="image too large: 10000 pixels > limit 9999"):
        from_pil(Image.new("L", (100, 100)), max_pixels=9999)


def test_grey_with_alpha_is_composited(corpus: tuple[Path, dict[str, str | None]]) -> None:
    pixels = _load(corpus, "la.png")
    w = VALID_SIZE[0]
    assert (pixels[:, : w // 2] == WHITE).all()
    assert (pixels[:, w // 2 :] == 0).all()


def test_16_bit_png_is_scaled_not_clipped(corpus: tuple[Path, dict[str, str | None]]) -> None:
    pixels = _load(corpus, "gray16.png")
    assert pixels.min() == 0 and pixels.max() == 255
    assert len(np.unique(pixels)) > 200  # the full 0..65535 ramp maps to (almost) every 8-bit level
    assert (np.diff(pixels[..., 0].ravel()) >= 0).all()  # still a ramp


@pytest.mark.parametrize("name", ["animated.gif", "animated.png", "animated.webp"])
def test_animation_gives_first_frame(corpus: tuple[Path, dict[str, str | None]], name: str) -> None:
    pixels = _load(corpus, name)
    assert (pixels == RED).all()


def test_cmyk_becomes_rgb(corpus: tuple[Path, dict[str, str | None]]) -> None:
    pixels = _load(corpus, "cmyk.jpg")
    assert _close(pixels.mean(axis=(0, 1)), RED, tol=16)


def test_result_is_loaded_and_detached() -> None:
    data = bytearray(_encode(Image.new("RGB", (8, 8), BLUE), "PNG"))
    decoded = decode_image(data)
    data[:] = bytes(len(data))  # the decoder must not keep a view of the buffer
    assert isinstance(decoded, DecodedImage)
    assert not isinstance(decoded.image, ImageFile.ImageFile)
    assert decoded.image.getpixel((0, 0)) == BLUE


# -------------------------------------------------------------------------------------------- modes


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


RAMP16 = np.linspace(0, 65535, 32 * 16).round().astype(np.uint16).reshape(16, 32)


@pytest.mark.parametrize(
    ("image", "fmt"),
    [
        (Image.fromarray(RAMP16), "TIFF"),  # I;16
        (Image.fromarray(RAMP16.astype(">u2")), "TIFF"),  # I;16B
        (Image.fromarray(RAMP16), "PPM"),  # 16-bit PGM, opened as I
        (Image.fromarray(RAMP16.astype(np.int32)), "TIFF"),  # I with 16-bit values
        (Image.fromarray((RAMP16 / 65535).astype(np.float32)), "TIFF"),  # F in [0, 1]
        (Image.fromarray((RAMP16.astype(np.float32) - 30000) * 1000), "TIFF"),  # F, arbitrary range
        (Image.fromarray(RAMP16.astype(np.int32) * 100 - 2_000_000), "TIFF"),  # I, negative values
    ],
    ids=["I;16", "I;16B", "pgm16", "I", "F-unit", "F-range", "I-signed"],
)
def test_high_bit_depth_spans_8_bits(image: Image.Image, fmt: str) -> None:
    data = _encode(image, fmt)
    assert Image.open(io.BytesIO(data)).mode in {"I;16", "I;16B", "I", "F"}
    pixels = np.asarray(decode_image(data).image)
    assert pixels.min() == 0 and pixels.max() == 255
    assert (np.diff(pixels[..., 0].astype(int).ravel()) >= 0).all()


def test_float_nan_and_constant_images() -> None:
    values = np.full((4, 4), 0.5, dtype=np.float32)
    values[0, 0] = np.nan
    pixels = np.asarray(decode_image(_encode(Image.fromarray(values), "TIFF")).image)
    assert tuple(pixels[0, 0]) == (0, 0, 0) and tuple(pixels[1, 1]) == (128, 128, 128)
    const = np.asarray(decode_image(_encode(Image.fromarray(np.full((4, 4), 7, np.int32) * -1), "TIFF")).image)
    assert (const == 0).all()


def test_16_bit_png_transparency_is_white() -> None:
    data = _encode(Image.fromarray(RAMP16), "PNG", transparency=0)
    pixels = np.asarray(decode_image(data).image)
    assert tuple(pixels[0, 0]) == WHITE  # value 0 is the tRNS grey level
    assert tuple(pixels[0, 1]) == (0, 0, 0)


def test_palette_with_rgba_palette_is_composited() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([*RED, 0, *BLUE, 255], rawmode="RGBA")
    image.paste(1, (2, 0, 4, 4))
    for source in (image, image.convert("PA")):
        pixels = np.asarray(images._to_rgb(source))
        assert tuple(pixels[0, 0]) == WHITE and tuple(pixels[0, 3]) == BLUE


# ------------------------------------------------------------------------------------------- guards


def test_max_pixels_is_honoured() -> None:
    data = _encode(Image.new("RGB", (40, 20)), "PNG")
    assert decode_image(data, max_pixels=800).width == 40
    with pytest.raises(ImageError, match=r"^image too large: 800 pixels > limit 799$"):
        decode_image(data, max_pixels=799)
    with pytest.raises(ValueError):
        decode_image(data, max_pixels=0)


def test_draft_decodes_a_jpeg_smaller_but_checks_the_full_size() -> None:
    data = _encode(Image.new("RGB", (2000, 1200), (10, 200, 30)), "JPEG")
    small = decode_image(data, draft=(256, 256))
    assert (small.width, small.height) == (500, 300)  # 1/4 scale: the smallest that still covers 256 x 256
    assert small.image.mode == "RGB" and small.image.getpixel((10, 10))[1] > 150
    assert decode_image(_encode(Image.new("RGB", (40, 20)), "PNG"), draft=(8, 8)).width == 40  # PNG: full size
    with pytest.raises(ImageError, match=r"^image too large: 2400000 pixels > limit 1000000$"):
        decode_image(data, max_pixels=1_000_000, draft=(256, 256))


def test_bomb_is_rejected_quickly_without_allocating(corpus: tuple[Path, dict[str, str | None]]) -> None:
    data = read_image_bytes(corpus[0] / "bomb.png")
    resource = pytest.importorskip("resource")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"^image too large: 400000000 pixels > limit 178956970$"):
        decode_image(data)
    with pytest.raises(ImageError, match=r"^image too large: 400000000 pixels > limit 1000$"):
        decode_image(data, max_pixels=1000)
    # Above Pillow's own hard limit Pillow refuses anyway; the reason says whose limit it was.
    with pytest.raises(ImageError, match=r"^image too large: 400000000 pixels > Pillow limit"):
        decode_image(data, max_pixels=10**12)
    assert time.perf_counter() - start < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100 * 1024  # 400 MB if decoded


def test_our_limit_applies_below_pillows() -> None:
    data = _png_bilevel_bomb(9_000, 9_000)  # 81 M pixels: under Pillow's warning threshold, over ours
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"^image too large: 81000000 pixels > limit 50000000$"):
        decode_image(data, max_pixels=50_000_000)
    assert time.perf_counter() - start < 0.5


def test_pillow_bomb_warning_escalated_to_error_is_mapped() -> None:
    data = _png_bilevel_bomb(10_000, 10_000)  # 100 M pixels: above Image.MAX_IMAGE_PIXELS, below 2x
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match=r"^image too large: 100000000 pixels > Pillow limit 89478485"):
            decode_image(data)


def test_pillow_globals_are_left_alone(corpus: tuple[Path, dict[str, str | None]]) -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for name in ("truncated.jpg", "bomb.png", "valid.png"):
        with contextlib.suppress(ImageError):
            load_image(corpus[0] / name)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before == (89_478_485, False)
    assert DEFAULT_MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS


# ------------------------------------------------------------------------------ exceptions and paths


def test_unexpected_exceptions_become_image_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(data: bytes, max_pixels: int, draft: object = None) -> DecodedImage:
        raise RuntimeError("something odd")

    monkeypatch.setattr(images, "_decode", boom)
    with pytest.raises(ImageError, match=r"RuntimeError: something odd"):
        decode_image(b"x")


@pytest.mark.parametrize("exc", [MemoryError, KeyboardInterrupt, SystemExit])
def test_fatal_exceptions_pass_through(monkeypatch: pytest.MonkeyPatch, exc: type[BaseException]) -> None:
    def fatal(data: bytes, max_pixels: int, draft: object = None) -> DecodedImage:
        raise exc()

    monkeypatch.setattr(images, "_decode", fatal)
    with pytest.raises(exc):
        decode_image(b"x")


def test_missing_path_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"^file not found$"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match=r"^file not found$"):
        read_image_bytes(str(tmp_path / "nope.jpg"))


def test_path_errors(tmp_path: Path, corpus: tuple[Path, dict[str, str | None]]) -> None:
    with pytest.raises(ImageError, match="not a directory"):
        read_image_bytes(corpus[0] / "valid.jpg" / "inside.jpg")
    with pytest.raises(ImageError, match="invalid path"):
        read_image_bytes(str(tmp_path / "nul\0.jpg"))
    with pytest.raises(ImageError, match=r"^file too large: \d+ bytes > limit 10$"):
        read_image_bytes(corpus[0] / "valid.jpg", max_bytes=10)
    if hasattr(os, "symlink") and sys.platform != "win32":
        os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
        with pytest.raises(ImageError, match=r"^file not found \(broken symlink\)$"):
            read_image_bytes(tmp_path / "dangling.jpg")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match=r"^not a regular file$"):
        read_image_bytes(fifo)


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.jpg"
    path.write_bytes(b"x")
    path.chmod(0)
    with pytest.raises(ImageError, match=r"^permission denied$"):
        read_image_bytes(path)


# ------------------------------------------------------------------------------------------- fuzzing


def _seeds() -> list[bytes]:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (12, 16, 4), dtype=np.uint8))
    rgb = image.convert("RGB")
    return [
        _encode(rgb, "JPEG"),
        _encode(image, "PNG"),
        _encode(rgb, "GIF"),
        _encode(image, "WEBP"),
        _encode(rgb, "TIFF"),
        _encode(rgb, "BMP"),
        _encode(Image.fromarray(RAMP16), "PNG"),
    ]


SEEDS = _seeds()


def _decode_or_image_error(data: bytes) -> None:
    try:
        decoded = decode_image(data, max_pixels=1_000_000)
    except ImageError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert decoded.image.mode == "RGB"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=256))
def test_random_bytes_raise_only_image_error(data: bytes) -> None:
    _decode_or_image_error(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=8),
)
def test_mutated_images_raise_only_image_error(seed: bytes, cut: float, flips: list[tuple[float, int]]) -> None:
    data = bytearray(seed[: max(1, round(len(seed) * cut))])
    for where, value in flips:
        data[int(where * len(data))] = value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about some corrupt metadata; only exceptions matter here
        _decode_or_image_error(bytes(data))
