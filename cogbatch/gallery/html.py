"""The page model -> one self-contained HTML file: a static header, an embedded JSON index, a small script.

Why one page with an index rather than one static page per few hundred images: the text filter has to
see every caption, which static pages cannot do without a script anyway, and a browser parses a JSON
index of 50,000 rows in well under a second while it only ever builds the DOM of one page of cards.

Escaping, the one rule: every string of the data (captions, prompts, paths, errors, task names, the
output path) reaches the browser either through `html.escape` (the header) or inside the JSON index,
where `<`, `>` and `&` are written as \\u escapes, so no caption can end the script element or open a
comment (`</script>`, `<!--`). The script sets text with `textContent` only. A Content-Security-Policy
allows nothing but this page's own script and style (by hash) and images from the page's folder, so
even markup that slipped through could neither run nor reach the network.

The index, `{"tasks", "variants", "varying", "prompts", "pageSize", "cards"}`; a card is
`{"id", "path", "src", "w", "h", "thumb", "why", "rows"}` and a row `{"t": task index, "s": status,
"x": text, "e": error, "f": finish reason, "i": tokens in, "o": tokens out, "q": prompt index,
"at": "YYYY-MM-DD HH:MM", "n": attempts, "v": variant index}`, absent keys meaning null. Prompts are
stored once: a task's prompt repeats on every row.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import html
import json
import os
import urllib.parse
from importlib.resources import files
from pathlib import PurePath
from typing import IO, Any

from cogbatch.gallery.build import Card, PageModel, TaskTotals

PAGE_SIZES = (50, 100, 200, 500)
_SCRIPT_SAFE = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def script_json(value: Any) -> str:
    """JSON that can sit inside a <script> element: no `<`, `>` or `&` outside of \\u escapes."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escape in _SCRIPT_SAFE:  # str.replace is C speed; str.translate with a dict is 10x slower
        if char in text:
            text = text.replace(char, escape)
    return text


@functools.cache
def asset(name: str) -> str:
    """page.css / page.js, shipped beside this module."""
    return files("cogbatch.gallery").joinpath(name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def content_security_policy(css: str, js: str) -> str:
    """Only this page's own style and script run; images come from the page's folder (thumbnails)."""
    return (
        f"default-src 'none'; script-src {_csp_hash(js)}; style-src {_csp_hash(css)}; "
        "img-src 'self' file: data:; base-uri 'none'; form-action 'none'"
    )


def file_uri(path: str) -> str | None:
    """`Path(path).as_uri()` for an absolute path, None for a relative one; without a Path on POSIX (50,000 of
    them cost a second)."""
    if os.name == "posix":
        return "file://" + urllib.parse.quote_from_bytes(os.fsencode(path)) if path.startswith("/") else None
    pure = PurePath(path)
    return pure.as_uri() if pure.is_absolute() else None


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(n: int) -> str:
    return f"{n:,}"


def _when(ts: dt.datetime | str | None) -> str:
    if ts is None:
        return "-"
    if isinstance(ts, str):
        try:
            ts = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
        except ValueError:
            return ts
    return ts.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# -- the header ----------------------------------------------------------------------------------


def _fact(label: str, value_html: str) -> str:
    return f"<div><dt>{_e(label)}</dt><dd>{value_html}</dd></div>"


def _last_run(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return "none recorded"
    r = runs[-1]
    parts = [_e(_when(r.get("started")))]
    outcome = r.get("outcome")
    if outcome:
        code = r.get("exit_code")
        parts.append(_e(f"{outcome} (exit {code})" if code is not None else outcome))
    if "done" in r or "failed" in r:
        parts.append(_e(f"{r.get('done', 0):,} done, {r.get('failed', 0):,} failed"))
    if isinstance(r.get("wall_s"), int | float):
        parts.append(_e(f"{r['wall_s']:.0f} s"))
    return " · ".join(parts) + (f' <span class="num">({_num(len(runs))} runs)</span>' if len(runs) > 1 else "")


def _prompt_cell(t: TaskTotals) -> str:
    if not t.prompts:
        return "-"
    first = sorted(t.prompts)[0]
    return _e(first) if len(t.prompts) == 1 else f"varies per image, e.g. {_e(first)}"


def _finish_cell(t: TaskTotals) -> str:
    return ", ".join(f"{_e(k)} {_num(v)}" for k, v in sorted(t.finish.items(), key=lambda kv: -kv[1])) or "-"


def _task_table(page: PageModel) -> str:
    head = "<tr><th>Task</th><th>Prompt</th><th>OK</th><th>Errors</th><th>Finish</th><th>Tokens out</th></tr>"
    lines = [head]
    for name in page.tasks:
        t = page.totals[name]
        rows = t.ok + t.error
        mean = f"{t.tokens_out / t.ok:.0f} avg" if t.ok else "-"
        lines.append(
            f'<tr><td>{_e(name)}</td><td class="prompt">{_prompt_cell(t)}</td><td class="num">{_num(t.ok)}</td>'
            f'<td class="num">{_num(t.error) if rows else "-"}</td><td>{_finish_cell(t)}</td>'
            f'<td class="num">{_e(mean)}</td></tr>'
        )
    return f'<table class="tasks">{"".join(lines)}</table>'


def header(page: PageModel, built_at: dt.datetime) -> str:
    ok = sum(t.ok for t in page.totals.values())
    errors = sum(t.error for t in page.totals.values())
    rows = f"{_num(ok + errors)} ({_num(ok)} ok, " + (
        f'<span class="err">{_num(errors)} error{"" if errors == 1 else "s"}</span>)' if errors else "0 errors)"
    )
    models = sorted({v.split(" · ")[0] for v in page.variants})
    quants = sorted({v.split(" · ", 1)[1] for v in page.variants})
    made = _when(page.last_row)
    if _when(page.first_row) != made:
        made = f"{_when(page.first_row)} → {made}"
    facts = [
        _fact("Images", f'<span class="num">{_num(page.images)}</span>'),
        _fact("Rows", f'<span class="num">{rows}</span>'),
        _fact("Model", "<br>".join(_e(m) for m in models)),
        _fact("Quantization", ", ".join(_e(q) for q in quants)),
        _fact("Rows made", _e(made)),
        _fact("Last run", _last_run(page.runs)),
        _fact("Page built", _e(_when(built_at))),
    ]
    note = ""
    if page.filters.describe():
        shown = len(page.cards)
        note = (
            f'<p class="note">This page holds {_e(page.filters.describe())}: {_num(shown)} of '
            f"{_num(page.matched_images)} matching images.</p>"
        )
    name = page.output.name or str(page.output)
    return (
        f'<header class="top"><h1>cogbatch gallery <span class="out">· {_e(name)}</span></h1>'
        f'<p class="where">{_e(page.output)}</p><dl class="facts">{"".join(facts)}</dl>'
        f"{_task_table(page)}{note}</header>"
    )


def _select(ident: str, label: str, options: list[tuple[str, str]]) -> str:
    opts = "".join(f'<option value="{_e(v)}">{_e(text)}</option>' for v, text in options)
    return f'<label>{_e(label)} <select id="{ident}">{opts}</select></label>'


def _pager() -> str:
    return (
        '<span class="pager"><button type="button" class="prev">‹ Prev</button>'
        '<span class="pageinfo"></span><button type="button" class="next">Next ›</button></span>'
    )


def controls(page: PageModel, page_size: int) -> str:
    finishes = sorted({f for t in page.totals.values() for f in t.finish})
    sizes = sorted({*PAGE_SIZES, page_size})
    return (
        '<div class="controls" role="search">'
        '<input type="search" id="q" placeholder="Filter by caption or path  ( / )" aria-label="Filter">'
        + _select("task", "Task", [("", "all"), *((t, t) for t in page.tasks)])
        + _select("status", "Status", [("", "all"), ("ok", "ok"), ("error", "error")])
        + _select("finish", "Finish", [("", "any"), *((f, f) for f in finishes)])
        + _select("size", "Per page", [(str(s), str(s)) for s in sizes]).replace(
            f'<option value="{page_size}">', f'<option value="{page_size}" selected>'
        )
        + f'<span class="count" id="count"></span>{_pager()}</div>'
    )


# -- the index -----------------------------------------------------------------------------------


class _Interner:
    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def __call__(self, value: str) -> int:
        return self.index.setdefault(value, len(self.index))

    def values(self) -> list[str]:
        return list(self.index)


def _card_json(card: Card, tasks: dict[str, int], prompts: _Interner, variants: dict[str, int]) -> dict[str, Any]:
    rows = []
    for r in card.rows:
        row: dict[str, Any] = {"t": tasks[r.task], "s": r.status, "at": r.created_at, "v": variants.get(r.variant, 0)}
        for key, value in (("x", r.text), ("e", r.error), ("f", r.finish_reason), ("i", r.tokens_in),
                           ("o", r.tokens_out), ("n", r.attempts)):  # fmt: skip
            if value is not None:
                row[key] = value
        if r.prompt is not None:
            row["q"] = prompts(r.prompt)
        rows.append(row)
    src = file_uri(card.file) if card.file is not None else None
    out: dict[str, Any] = {"id": card.image_id, "path": card.path, "rows": rows}
    for key, value in (("src", src), ("w", card.width), ("h", card.height), ("thumb", card.thumb),
                       ("why", card.thumb_error)):  # fmt: skip
        if value is not None:
            out[key] = value
    return out


def _write_index(page: PageModel, out: IO[str], page_size: int) -> None:
    """Streams the index card by card, so the page is never held in memory as one string."""
    tasks = {name: i for i, name in enumerate(page.tasks)}
    variants = {name: i for i, name in enumerate(page.variants)}
    prompts = _Interner()
    varying = [tasks[name] for name in page.tasks if len(page.totals[name].prompts) > 1]
    out.write('{"tasks":' + script_json(page.tasks) + ',"variants":' + script_json(list(page.variants)))
    out.write(f',"varying":{script_json(varying)},"pageSize":{int(page_size)},"cards":[')
    for i, card in enumerate(page.cards):
        out.write(("," if i else "") + script_json(_card_json(card, tasks, prompts, variants)))
    out.write('],"prompts":' + script_json(prompts.values()) + "}")


def render(page: PageModel, out: IO[str], *, page_size: int = 200, built_at: dt.datetime | None = None) -> None:
    """Write the whole page to `out` (text, UTF-8)."""
    built_at = built_at or dt.datetime.now(dt.timezone.utc)
    css, js = asset("page.css"), asset("page.js")
    title = f"cogbatch gallery · {page.output.name or page.output}"
    out.write(
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(content_security_policy(css, js))}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="generator" content="cogbatch gallery">'
        f'<link rel="icon" href="data:,"><title>{_e(title)}</title><style>{css}</style></head>\n<body>'
    )
    out.write(header(page, built_at) + "\n")
    out.write(controls(page, page_size) + "\n")
    out.write(
        "<noscript><p>This page shows the images with a small script of its own (no network); "
        "allow JavaScript for this file to see them.</p></noscript>\n"
    )
    out.write('<main class="grid" id="grid"></main>\n')
    out.write(f'<nav class="bottom">{_pager()}</nav>\n')
    out.write('<script type="application/json" id="cogbatch-data">')
    _write_index(page, out, page_size)
    out.write(f"</script>\n<script>{js}</script>\n</body></html>\n")
