"""`cogbatch.gallery` on synthetic result datasets (no model): escaping, thumbnails, filters, the command."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from cogbatch.cli import cli
from cogbatch.errors import ConfigError
from cogbatch.gallery import GalleryError, build_gallery, default_dest, refresh_after_run
from cogbatch.gallery import html as page_html
from cogbatch.gallery import thumbs as thumbs_module
from cogbatch.gallery.thumbs import CHANGED, NOT_AN_ID
from cogbatch.job import load_job
from cogbatch.store import PartWriter, make_row

T0 = dt.datetime(2026, 3, 1, 8, 30, tzinfo=dt.timezone.utc)

# Strings that would be markup, script or broken JSON if anything on the way forgot to escape them.
HOSTILE = [
    '</script><script>alert("caption")</script>',
    "<img src=x onerror=alert(1)>",
    'Tom & Jerry\'s "quoted" &amp; &lt;b&gt; <b>bold</b>',
    "<!-- comment --> <![CDATA[ x ]]> </style> </noscript>",
    "line one\nline two\r\nline three\ttab",
    "مرحبا بالعالم \u202ereversed\u202c ‏שלום",
    "日本語のキャプション 😀 ü",
    "\u2028line separator\u2029 and ${template} `backtick` {{ x }}",
]
HOSTILE_NAMES = ["a<script>b.png", "q\"uote's & amp.png", "ملف صورة.png", "new\nline.png", "<!--x.png"]
HOSTILE_TASK = 'old"><script>alert(2)</script>'  # a task only old rows know; names of rows are not validated
ALLOWED_TAGS = {
    "html", "head", "meta", "link", "title", "style", "body", "header", "h1", "span", "p", "dl", "div", "dt", "dd",
    "br", "table", "tr", "th", "td", "label", "select", "option", "input", "button", "noscript", "main", "nav",
    "script",
}  # fmt: skip


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png(path: Path, size=(16, 12), color=(200, 30, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def row(path, data: bytes, task: str, text, *, status="ok", error=None, prompt="Describe this image.", minutes=0):
    return make_row(
        image_id=sha(data) if isinstance(data, bytes) else data,
        path=str(path),
        task=task,
        prompt=prompt,
        text=text,
        status=status,
        error=error,
        finish_reason="eos" if status == "ok" else None,
        tokens_in=30 if status == "ok" else None,
        tokens_out=12 if status == "ok" else None,
        width=16 if status == "ok" else None,
        height=12 if status == "ok" else None,
        model="tiny-random:cogvlm2",
        quant="none",
        fingerprint="f",
        run_id="r1",
        created_at=T0 + dt.timedelta(minutes=minutes),
        attempts=1,
    )


def write_rows(out: Path, rows: list[dict]) -> None:
    with PartWriter(out, "r1") as w:
        for r in rows:
            w.add(r)


def job_spec(tmp_path: Path, **keys) -> dict:
    (tmp_path / "images").mkdir(exist_ok=True)
    return {
        "model": "tiny-random:cogvlm2",
        "input": {"folder": str(tmp_path / "images")},
        "output": str(tmp_path / "out"),
        "quantization": "none",
        "device": "cpu",
        "max_pixels": 5000,
        "tasks": [
            {"name": "caption", "prompt": "Describe this image."},
            {"name": "colors", "prompt": "What colors are in {filename}?", "template": "vqa"},
        ],
        **keys,
    }


def job(tmp_path: Path, **keys):
    return load_job(job_spec(tmp_path, **keys), pipeline=None)


@pytest.fixture
def hostile(tmp_path):
    """An output whose captions, prompts, paths, errors and one task name are hostile strings."""
    images = tmp_path / "images"
    rows, expected = [], {}
    for i, name in enumerate(HOSTILE_NAMES):
        path = images / name
        data = png(path, color=(40 * i, 100, 200))
        caption, colors = HOSTILE[i % len(HOSTILE)], HOSTILE[(i + 3) % len(HOSTILE)]
        rows += [
            row(path, data, "caption", caption, prompt=HOSTILE[(i + 1) % len(HOSTILE)]),
            row(path, data, "colors", colors, prompt=f"What colors are in {name}?"),
        ]
        expected[(str(path), "caption")] = caption
        expected[(str(path), "colors")] = colors
    broken = images / "<broken>.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a png at all")
    error = '<b>cannot identify</b> & "bad" image'
    rows.append(row(broken, broken.read_bytes(), "caption", None, status="error", error=error))
    expected[(str(broken), "caption")] = None
    first = images / HOSTILE_NAMES[0]
    rows.append(row(first, first.read_bytes(), HOSTILE_TASK, "from an old task", minutes=1))
    expected[(str(first), HOSTILE_TASK)] = "from an old task"
    write_rows(tmp_path / "out", rows)
    return job(tmp_path), expected, error


class Page(HTMLParser):
    """Every start tag with its attributes, the text of each element kind, and the scripts' contents."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.options: list[str] = []
        self._stack: list[str] = []
        self._script: dict[str, str | None] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._script = dict(attrs)
            self.scripts.append((self._script, ""))
        self._stack.append(tag)

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None
        if self._stack and self._stack[-1] == tag:
            self._stack.pop()

    def handle_data(self, data):
        if self._script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)
        elif self._stack and self._stack[-1] == "option":
            self.options.append(data)

    @property
    def index(self) -> dict:
        (data,) = [text for attrs, text in self.scripts if attrs.get("id") == "cogbatch-data"]
        return json.loads(data)


def page_rows(index: dict) -> dict[tuple[str, str], dict]:
    found = {}
    for card in index["cards"]:
        for r in card["rows"]:
            found[(card["path"], index["tasks"][r["t"]])] = {**r, "card": card}
    return found


# -- escaping --------------------------------------------------------------------------------------


def test_hostile_strings_are_text_never_markup(hostile):
    cfg, expected, error = hostile
    result = build_gallery(cfg)
    text = result.page.read_text(encoding="utf-8")
    page = Page(text)

    assert {tag for tag, _ in page.tags} <= ALLOWED_TAGS
    for tag, attrs in page.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        assert not any(v and "javascript:" in v.lower() for v in attrs.values()), (tag, attrs)
    assert [attrs for attrs, _ in page.scripts] == [{"type": "application/json", "id": "cogbatch-data"}, {}]
    assert text.count("</script") == 2  # only the two closing tags of the page's own scripts
    for needle in ("<img src=x", "<script>alert", "<b>", "<!-- comment", "<broken>"):
        assert needle not in text
    assert HOSTILE_TASK in page.options  # the task filter offers the name, as text

    rows = page_rows(page.index)
    assert set(rows) == set(expected)  # every row, no more
    for key, caption in expected.items():
        assert rows[key].get("x") == caption
    broken = rows[(str(cfg.input.folder / "<broken>.png"), "caption")]
    assert broken["s"] == "error" and broken["e"] == error
    index = page.index
    caption_prompts = {index["prompts"][r["q"]] for k, r in rows.items() if k[1] == "caption" and "q" in r}
    assert set(HOSTILE[1 : len(HOSTILE_NAMES) + 1]) <= caption_prompts | {"Describe this image."}
    assert result.images == len(HOSTILE_NAMES) + 1 and result.errors == 1 and result.rows == len(expected)


def test_the_header_escapes_the_output_path(tmp_path):
    out = tmp_path / '<b>out</b> & "x"'
    data = png(tmp_path / "images" / "a.png")
    write_rows(out, [row(tmp_path / "images" / "a.png", data, "caption", "hi")])
    cfg = job(tmp_path, output=str(out))
    text = build_gallery(cfg, tmp_path / "page.html").page.read_text(encoding="utf-8")
    assert "<b>out</b>" not in text and "&lt;b&gt;out&lt;/b&gt; &amp; &quot;x&quot;" in text
    assert {tag for tag, _ in Page(text).tags} <= ALLOWED_TAGS


def test_script_json_cannot_end_its_element():
    value = {"x": "</script><!-- & \u2028", "y": ["<", ">"]}
    encoded = page_html.script_json(value)
    assert not set("<>&") & set(encoded) and "\u2028" not in encoded
    assert json.loads(encoded) == value


def test_the_page_reaches_nothing_outside_itself(hostile):
    cfg, _, _ = hostile
    text = build_gallery(cfg).page.read_text(encoding="utf-8")
    page = Page(text)
    js = page_html.asset("page.js")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function("):
        assert sink not in js  # text from the index only ever goes through textContent
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text)  # no external scripts, fonts, images
    assert "@import" not in page_html.asset("page.css") and "url(" not in page_html.asset("page.css")
    # The policy allows exactly this page's script and style, by hash: as a browser computes it.
    (csp,) = [a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    (script,) = [body for attrs, body in page.scripts if not attrs]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp


# -- thumbnails ------------------------------------------------------------------------------------


@pytest.fixture
def decodes(monkeypatch):
    """How many images the thumbnail maker decodes."""
    calls = []
    real = thumbs_module.decode_image

    def counting(data, **kw):
        calls.append(len(data))
        return real(data, **kw)

    monkeypatch.setattr(thumbs_module, "decode_image", counting)
    return calls


def test_thumbnails_are_made_once_and_broken_images_get_a_placeholder(tmp_path, decodes):
    images = tmp_path / "images"
    good = [png(images / f"img_{i}.png", color=(i * 50, 0, 0)) for i in range(3)]
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    huge = png(images / "huge.png", size=(100, 100))  # 10,000 pixels > the job's max_pixels 5000
    rows = [row(images / f"img_{i}.png", d, "caption", f"caption {i}") for i, d in enumerate(good)]
    rows.append(row(images / "broken.png", (images / "broken.png").read_bytes(), "caption", None, status="error"))
    rows.append(row(images / "huge.png", huge, "caption", "too big to show"))
    write_rows(tmp_path / "out", rows)
    cfg = job(tmp_path)

    first = build_gallery(cfg, workers=2)
    assert (first.thumbnails_made, first.thumbnails_reused, first.placeholders) == (3, 0, 2)
    assert len(decodes) == 5
    cards = {Path(c["path"]).name: c for c in Page(first.page.read_text(encoding="utf-8")).index["cards"]}
    for i in range(3):
        thumb = first.page.parent / cards[f"img_{i}.png"]["thumb"]
        assert thumb.is_file() and Image.open(thumb).format == "JPEG"
        assert cards[f"img_{i}.png"]["thumb"] == f"thumbs/256/{sha(good[i])[:2]}/{sha(good[i])}.jpg"
    assert "thumb" not in cards["broken.png"]
    assert cards["broken.png"]["why"] in ("not an image", "truncated image data")
    assert cards["huge.png"]["why"] == "image too large: 10000 pixels > limit 5000"

    decodes.clear()
    second = build_gallery(cfg, workers=2)
    assert decodes == []  # thumbnails and remembered failures alike: nothing is decoded again
    assert (second.thumbnails_made, second.thumbnails_reused, second.placeholders) == (0, 3, 2)
    again = {Path(c["path"]).name: c for c in Page(second.page.read_text(encoding="utf-8")).index["cards"]}
    assert again == cards

    bigger = build_gallery(cfg, tmp_path / "big" / "index.html", thumb_size=64)  # another size: its own cache
    assert bigger.thumbnails_made == 3 and (tmp_path / "big" / "thumbs" / "64").is_dir()


def test_a_changed_missing_or_foreign_image_is_a_placeholder_with_its_reason(tmp_path, decodes):
    images = tmp_path / "images"
    old = png(images / "edited.png", color=(1, 2, 3))
    png(images / "edited.png", color=(9, 9, 9))  # the file now holds other bytes than its row's
    rows = [
        row(images / "edited.png", old, "caption", "old caption"),
        row(images / "gone.png", b"was here once", "caption", None, status="error", error="file not found"),
        row(images / "edited.png", "../../../../escape", "colors", "an id that is not a sha256"),
    ]
    write_rows(tmp_path / "out", rows)
    result = build_gallery(job(tmp_path))
    cards = Page(result.page.read_text(encoding="utf-8")).index["cards"]
    why = {(Path(c["path"]).name, c["id"][:4]): c.get("why") for c in cards}
    assert why == {
        ("edited.png", sha(old)[:4]): CHANGED,
        ("gone.png", sha(b"was here once")[:4]): "file not found",
        ("edited.png", "../."): NOT_AN_ID,
    }
    assert decodes == [] and result.placeholders == 3
    assert not list((tmp_path / "out.cogbatch").rglob("*escape*"))  # an odd id never becomes a path


def test_images_inside_a_manifest_get_thumbnails(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs = [png(tmp_path / "src" / f"{i}.png", color=(0, i * 60, 0)) for i in range(3)]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"name": ["a", "b", "c"], "image": blobs}), manifest)
    rows = [row(name, data, "caption", f"caption {name}") for name, data in zip("abc", blobs, strict=True)]
    rows.append(row("d", b"not in the manifest", "caption", "gone"))
    write_rows(tmp_path / "out", rows)
    cfg = job(tmp_path, input={"manifest": str(manifest), "bytes_column": "image", "id_column": "name"})
    result = build_gallery(cfg)
    assert (result.thumbnails_made, result.placeholders) == (3, 1)
    cards = {c["path"]: c for c in Page(result.page.read_text(encoding="utf-8")).index["cards"]}
    assert all((result.page.parent / cards[n]["thumb"]).is_file() for n in "abc")
    assert "not in the manifest m.parquet now" in cards["d"]["why"] and "src" not in cards["d"]


def test_manifest_paths_are_read_relative_to_the_manifest(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = png(tmp_path / "data" / "pics" / "x.png")
    manifest = tmp_path / "data" / "list.parquet"
    pq.write_table(pa.table({"path": ["pics/x.png"]}), manifest)
    write_rows(tmp_path / "out", [row("pics/x.png", data, "caption", "relative")])
    result = build_gallery(job(tmp_path, input={"manifest": str(manifest)}))
    (card,) = Page(result.page.read_text(encoding="utf-8")).index["cards"]
    assert result.thumbnails_made == 1 and card["src"] == (tmp_path / "data" / "pics" / "x.png").as_uri()


# -- filters, header, destination ------------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path):
    """Four images: two tasks each, one caption an error, one caption redone later (newest row wins)."""
    images = tmp_path / "images"
    rows = []
    for i in range(4):
        data = png(images / f"img_{i}.png", color=(0, 0, 60 * i))
        status = "error" if i == 2 else "ok"
        rows.append(row(images / f"img_{i}.png", data, "caption", None if i == 2 else f"cap {i}", status=status,
                        error="out of memory" if i == 2 else None))  # fmt: skip
        rows.append(row(images / f"img_{i}.png", data, "colors", f"colors {i}", minutes=5))
    data3 = (images / "img_3.png").read_bytes()
    rows.append(row(images / "img_3.png", data3, "caption", "cap 3, redone", minutes=10))
    write_rows(tmp_path / "out", rows)
    return job(tmp_path)


def test_filters_by_task_status_and_limit(mixed):
    def shown(**filters):
        result = build_gallery(mixed, **filters)
        index = Page(result.page.read_text(encoding="utf-8")).index
        found = {(Path(c["path"]).name, index["tasks"][r["t"]], r["s"]) for c in index["cards"] for r in c["rows"]}
        return result, found

    result, everything = shown()
    assert len(everything) == 8 and result.errors == 1
    assert ("img_3.png", "caption", "ok") in everything
    rows = page_rows(Page(result.page.read_text(encoding="utf-8")).index)
    assert rows[(str(mixed.input.folder / "img_3.png"), "caption")]["x"] == "cap 3, redone"

    _, captions = shown(task="caption")
    assert {t for _, t, _ in captions} == {"caption"} and len(captions) == 4
    result, errors = shown(status="error")
    assert errors == {("img_2.png", "caption", "error")} and result.images == 1
    _, oks = shown(status="ok", task="colors")
    assert len(oks) == 4
    result, first_two = shown(limit=2)
    assert {name for name, _, _ in first_two} == {"img_0.png", "img_1.png"}
    assert (result.images, result.matched_images) == (2, 4)
    text = result.page.read_text(encoding="utf-8")
    assert "first 2 images" in text and "2 of 4 matching images" in text


def test_header_shows_counts_model_quantization_dates_and_last_run(mixed):
    from cogbatch.history import append_record

    append_record(mixed.output, {"run_id": "r1", "started": "2026-03-01T08:29:00Z", "exit_code": 0, "outcome": "ok",
                                 "done": 7, "failed": 1, "wall_s": 62.0})  # fmt: skip
    text = build_gallery(mixed).page.read_text(encoding="utf-8")
    header = text[text.index("<header") : text.index("</header>")]
    facts = ["tiny-random:cogvlm2", ">none<", "8 (7 ok, ", "1 error<", "2026-03-01 08:30 UTC → 2026-03-01 08:40 UTC",
             "2026-03-01 08:29 UTC · ok (exit 0) · 7 done, 1 failed · 62 s", ">4<"]  # fmt: skip
    for fact in facts:
        assert fact in header, fact


def test_refused_requests_exit_2_and_write_nothing(tmp_path, mixed):
    with pytest.raises(GalleryError, match=r"--task 'nope' is neither a task of this job.*caption, colors"):
        build_gallery(mixed, task="nope")
    with pytest.raises(GalleryError, match="--status must be one of"):
        build_gallery(mixed, status="bad")
    empty = job(tmp_path, output=str(tmp_path / "empty"))
    with pytest.raises(GalleryError, match=r"no results in .*empty; has the job run"):
        build_gallery(empty)
    assert not (tmp_path / "empty.cogbatch").exists() and not (tmp_path / "out.cogbatch").exists()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(GalleryError, match=r"cannot write .*a_file"):
        build_gallery(mixed, tmp_path / "a_file" / "index.html")
    with pytest.raises(GalleryError, match="is a directory"):
        build_gallery(mixed, tmp_path)
    with pytest.raises(GalleryError, match=r"under the job's input folder .*the next run would caption them"):
        build_gallery(mixed, mixed.input.folder / "review" / "index.html")
    assert not (mixed.input.folder / "review").exists()


def test_default_destination_is_beside_the_output(tmp_path, mixed):
    assert default_dest(Path("/data/outputs/caption")) == Path("/data/outputs/caption.cogbatch/gallery/index.html")
    result = build_gallery(mixed)
    assert result.page == tmp_path / "out.cogbatch" / "gallery" / "index.html"
    assert sorted(p.name for p in (tmp_path / "out.cogbatch" / "gallery").iterdir()) == ["index.html", "thumbs"]
    assert not [p for p in mixed.output.iterdir() if "gallery" in p.name or "thumb" in p.name]


def _summary(**kw):
    from cogbatch.results import RunSummary

    return RunSummary(run_id="r", output="out", model="m", quant="none", **kw)


def test_refresh_after_run_never_fails_the_run(tmp_path, mixed, caplog):
    assert refresh_after_run(mixed, _summary(interrupted=True)) == {"skipped": "the run was interrupted"}
    assert not (tmp_path / "out.cogbatch").exists()
    done = refresh_after_run(mixed, _summary())
    assert Path(done["page"]).is_file() and done["images"] == 4
    (tmp_path / "out.cogbatch").rename(tmp_path / "moved")
    (tmp_path / "out.cogbatch").write_text("a file in the way")
    failed = refresh_after_run(mixed, _summary())
    assert "cannot write" in failed["error"] and "gallery not refreshed" in caplog.text


def test_the_gallery_job_key_is_validated(tmp_path):
    assert job(tmp_path, gallery=True).gallery is True
    assert job(tmp_path).gallery is False
    with pytest.raises(ConfigError, match="gallery: must be true or false"):
        job(tmp_path, gallery="yes")


# -- the command -----------------------------------------------------------------------------------


def test_gallery_command_exit_codes(tmp_path, mixed, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_spec(tmp_path)))
    runner = CliRunner()

    ok = runner.invoke(cli, ["gallery", str(job_file), "--json", "--quiet"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert summary["images"] == 4 and Path(summary["page"]).is_file() and summary["url"].startswith("file://")

    human = runner.invoke(cli, ["gallery", str(job_file), "--status", "error", "--dest", "errors.html"])
    assert human.exit_code == 0 and "gallery: 1 image, 1 row (1 error) -> errors.html" in human.stderr
    assert (tmp_path / "errors.html").is_file() and (tmp_path / "thumbs").is_dir()

    for args, message in (
        (["--output", str(tmp_path / "nothing")], "no results in"),
        (["--task", "nope"], "--task 'nope'"),
        (["--dest", str(tmp_path)], "is a directory"),
        (["--limit", "0"], "--limit"),
        (["--status", "maybe"], "--status"),
    ):
        res = runner.invoke(cli, ["gallery", str(job_file), *args])
        assert res.exit_code == 2, (args, res.output)
        assert message in res.stderr and "Traceback" not in res.stderr


def test_the_benchmark_synthesizes_distinct_decodable_images(tmp_path):
    from cogbatch.inputs.decode import load_image
    from cogbatch.store import read_results
    from tests.scripts import import_script

    bench = import_script("bench_gallery")
    cfg = load_job(bench.synthesize(tmp_path, rows=40, base_images=3))
    table = read_results(cfg.output)
    assert table.num_rows == 40 and len(set(table["image_id"].to_pylist())) == 20  # 3 base images, 20 distinct ids
    for path, image_id in set(zip(table["path"].to_pylist(), table["image_id"].to_pylist(), strict=True)):
        assert sha(Path(path).read_bytes()) == image_id and load_image(path).width == 400
    result = build_gallery(cfg, limit=3)
    assert (result.images, result.thumbnails_made, result.placeholders) == (3, 3, 0)
