"""`cogbatch run --gallery` on a tiny checkpoint, and the page as headless Chromium renders it."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from cogbatch.gallery import build_gallery
from tests.e2e.conftest import cogbatch_cmd, make_images, summary_of
from tests.scripts import import_script
from tests.unit.test_gallery import HOSTILE, HOSTILE_NAMES, job, png, row, write_rows

screenshot_gallery = import_script("screenshot_gallery")
needs_chromium = pytest.mark.skipif(screenshot_gallery.find_chromium() is None, reason="needs chromium")


def test_run_with_gallery_refreshes_the_page(tmp_path, job_factory):
    make_images(tmp_path / "images", 3)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    job = job_factory()
    res = cogbatch_cmd("run", str(job), "--gallery", "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    gallery = summary_of(res)["gallery"]
    page = tmp_path / "out.cogbatch" / "gallery" / "index.html"
    assert gallery["page"] == str(page) and page.is_file()
    assert (gallery["images"], gallery["rows"], gallery["errors"]) == (4, 8, 2)
    assert (gallery["thumbnails_made"], gallery["placeholders"]) == (3, 1)

    make_images(tmp_path / "images", 1, seed=1, start=3)  # the next night: one new image
    again = summary_of(cogbatch_cmd("run", str(job), "--gallery", "--json", "--quiet"))["gallery"]
    assert (again["images"], again["thumbnails_made"], again["thumbnails_reused"]) == (5, 1, 3)


def test_the_job_key_refreshes_it_too_and_a_failure_is_only_a_warning(tmp_path, job_factory):
    make_images(tmp_path / "images", 2)
    (tmp_path / "out.cogbatch").write_text("a file where the gallery's folder would go")
    job = job_factory(gallery=True)
    res = cogbatch_cmd("run", str(job), "--json")
    assert res.returncode == 0, res.stderr
    summary = summary_of(res)
    assert summary["done"] == 4 and "cannot write" in summary["gallery"]["error"]
    assert "gallery not refreshed" in res.stderr and "Traceback" not in res.stderr

    bad = job_factory("bad.yaml", gallery="yes")
    res = cogbatch_cmd("run", str(bad))
    assert res.returncode == 2 and "gallery: must be true or false" in res.stderr


def test_run_job_honours_the_job_key(tmp_path):
    import cogbatch

    make_images(tmp_path / "images", 2)
    spec = {"model": "tiny-random:cogvlm2", "input": {"folder": str(tmp_path / "images")},
            "output": str(tmp_path / "out"), "quantization": "none", "device": "cpu", "dtype": "fp32",
            "gallery": True, "tasks": [{"name": "caption", "prompt": "Describe.", "max_new_tokens": 2}]}  # fmt: skip
    summary = cogbatch.run_job(spec, quiet=True)
    assert summary.exit_code == 0 and summary.gallery["images"] == 2
    assert (tmp_path / "out.cogbatch" / "gallery" / "index.html").is_file()


class Dom(HTMLParser):
    """The rendered DOM: tags with attributes, and the text of each element with a class."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.texts: dict[str, list[str]] = {}
        self._open: list[tuple[str, str | None]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag not in ("img", "br", "input", "meta", "link"):
            self._open.append((tag, attrs.get("class")))

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data):
        if self._open and self._open[-1][1]:
            self.texts.setdefault(self._open[-1][1], []).append(data)


@pytest.mark.slow
@needs_chromium
def test_chromium_renders_hostile_captions_as_text(tmp_path):
    images = tmp_path / "images"
    rows = []
    for i, name in enumerate(HOSTILE_NAMES):
        data = png(images / name, color=(50 * i, 90, 160))
        rows += [row(images / name, data, "caption", HOSTILE[i]), row(images / name, data, "colors", HOSTILE[-1 - i])]
    write_rows(tmp_path / "out", rows)
    page = build_gallery(job(tmp_path)).page
    res = screenshot_gallery.chromium(["--dump-dom", page.as_uri()], tmp_path / "profile")
    assert res.returncode == 0 and "</html>" in res.stdout, res.stderr[-2000:]
    dom = Dom(res.stdout)

    cards = [a for t, a in dom.tags if t == "article"]
    assert len(cards) == len(HOSTILE_NAMES)  # the script ran and rendered every card
    assert [a for t, a in dom.tags if t == "script"] == [{"type": "application/json", "id": "cogbatch-data"}, {}]
    for tag, attrs in dom.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
    assert all(a["src"].startswith("thumbs/256/") for t, a in dom.tags if t == "img")
    assert len([t for t, _ in dom.tags if t == "img"]) == len(HOSTILE_NAMES)
    texts = dom.texts["text clamp"]
    expected = [HOSTILE[i] for i in range(len(HOSTILE_NAMES))] + [HOSTILE[-1 - i] for i in range(len(HOSTILE_NAMES))]
    assert sorted(texts) == sorted(t.replace("\r\n", "\n") for t in expected)  # the DOM keeps LF line ends
    assert sorted(dom.texts["base"]) == sorted(HOSTILE_NAMES)


@pytest.mark.slow
@needs_chromium
def test_chromium_pages_and_filters_as_the_url_says(tmp_path):
    images = tmp_path / "images"
    rows = []
    for i in range(5):
        data = png(images / f"img_{i}.png", color=(40 * i, 0, 0))
        rows += [row(images / f"img_{i}.png", data, "caption", f"caption {i}" + (" Tom & Jerry" if i == 3 else "")),
                 row(images / f"img_{i}.png", data, "colors", f"colors {i}")]  # fmt: skip
    (images / "broken.png").write_bytes(b"not an image")
    rows.append(row(images / "broken.png", b"not an image", "caption", None, status="error", error="not an image"))
    write_rows(tmp_path / "out", rows)
    page = build_gallery(job(tmp_path), page_size=2).page

    def rendered(fragment: str) -> Dom:
        res = screenshot_gallery.chromium(["--dump-dom", page.as_uri() + fragment], tmp_path / "profile")
        assert "data-ready=" in res.stdout, res.stderr[-2000:]
        return Dom(res.stdout)

    def shown(dom: Dom) -> list[str]:
        return dom.texts.get("base", [])

    first = rendered("")
    assert shown(first) == ["broken.png", "img_0.png"] and first.texts["pageinfo"] == ["Page 1 of 3"] * 2
    assert shown(rendered("#page=3")) == ["img_3.png", "img_4.png"]
    assert shown(rendered("#size=50")) == ["broken.png", *(f"img_{i}.png" for i in range(5))]
    assert shown(rendered("#status=error")) == ["broken.png"]
    assert shown(rendered("#q=tom%20JERRY")) == ["img_3.png"]  # words, any case, any order
    colors = rendered("#task=colors&size=50")
    assert shown(colors) == [f"img_{i}.png" for i in range(5)] and set(colors.texts["task"]) == {"colors"}
    assert shown(rendered("#q=nothing-matches")) == [] and "No image matches" in rendered("#q=zzz").texts["nothing"][0]


@pytest.mark.slow
@needs_chromium
def test_screenshot_script_photographs_the_demo(tmp_path):
    from PIL import Image

    page = screenshot_gallery.build_demo(tmp_path / "demo", n_images=4)
    out = screenshot_gallery.screenshot(page, tmp_path / "shot.png", size=(1000, 700))
    with Image.open(out) as im:
        assert im.size == (1000, 700)
        colors = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colors is not None and len(colors) > 20  # a rendered page, not a blank screen
