// cogbatch gallery: pages and filters the embedded index in memory. Text from the data is only ever
// set with textContent or as an attribute value, never parsed as HTML.
(() => {
  "use strict";
  const data = JSON.parse(document.getElementById("cogbatch-data").textContent);
  const $ = (id) => document.getElementById(id);
  const grid = $("grid");
  const ui = { q: $("q"), task: $("task"), status: $("status"), finish: $("finish"), size: $("size") };
  const state = { q: "", task: "", status: "", finish: "", page: 1, size: data.pageSize };
  const FINISH = ["eos", "length", "stop", "repetition"];
  const varying = new Set(data.varying);
  const total = data.cards.length;
  let matches = [];

  const fmt = (n) => n.toLocaleString("en-US");

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function haystack(card) {
    if (card.hay === undefined) {
      const parts = [card.path || ""];
      for (const r of card.rows) parts.push(r.x || "", r.e || "", r.q !== undefined ? data.prompts[r.q] : "");
      card.hay = parts.join("\n").toLowerCase();
    }
    return card.hay;
  }

  function rowsShown(card) {
    return card.rows.filter((r) =>
      (state.task === "" || data.tasks[r.t] === state.task) &&
      (state.status === "" || r.s === state.status) &&
      (state.finish === "" || r.f === state.finish));
  }

  function filter() {
    const words = state.q.toLowerCase().split(/\s+/).filter(Boolean);
    matches = [];
    for (const card of data.cards) {
      const rows = rowsShown(card);
      if (!rows.length) continue;
      if (words.length) {
        const hay = haystack(card);
        if (!words.every((w) => hay.includes(w))) continue;
      }
      matches.push([card, rows]);
    }
  }

  function missing(box, why) {
    box.classList.add("missing");
    box.replaceChildren(el("span", "missing-label", "no thumbnail"), el("span", "missing-why", why || ""));
  }

  function thumb(card) {
    const box = el(card.src ? "a" : "div", "thumb");
    if (card.src) {
      box.href = card.src;
      box.target = "_blank";
      box.rel = "noopener";
      box.title = "Open the image";
    }
    if (card.thumb) {
      const img = el("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.alt = "";
      img.addEventListener("error", () => missing(box, "thumbnail file missing: build the gallery again"));
      img.src = card.thumb;
      box.append(img);
    } else {
      missing(box, card.why);
    }
    return box;
  }

  function splitPath(path) {
    const cut = Math.max(path.lastIndexOf("/"), path.lastIndexOf("\\"));
    return [path.slice(0, cut + 1), path.slice(cut + 1)];
  }

  function row(r) {
    const section = el("section", "row " + (r.s === "error" ? "error" : "ok"));
    const head = el("div", "row-head");
    const task = el("span", "task", data.tasks[r.t]);
    task.title = (r.q !== undefined ? "Prompt: " + data.prompts[r.q] + "\n" : "") + "Made " + r.at + " UTC";
    head.append(task);
    if (r.s === "error") head.append(el("span", "badge err", "error"));
    if (r.f) head.append(el("span", "badge fin-" + (FINISH.includes(r.f) ? r.f : "other"), r.f));
    if (r.i !== undefined || r.o !== undefined) {
      head.append(el("span", "tokens", (r.i ?? "?") + " → " + (r.o ?? "?") + " tokens"));
    }
    if (r.n > 1) head.append(el("span", "attempts", r.n + " attempts"));
    if (data.variants.length > 1) head.append(el("span", "variant", data.variants[r.v]));
    section.append(head);
    if (varying.has(r.t) && r.q !== undefined) {
      const question = el("p", "question", data.prompts[r.q]);
      question.dir = "auto";
      section.append(question);
    }
    if (r.s === "error") section.append(el("p", "error-text", r.e || "no reason recorded"));
    if (r.x !== undefined && r.x !== "") {
      const text = el("p", "text clamp", r.x);
      text.dir = "auto";
      text.addEventListener("click", () => text.classList.toggle("clamp"));
      section.append(text);
    } else if (r.s === "ok") {
      section.append(el("p", "text empty", "(empty text)"));
    }
    return section;
  }

  function card(c, rows) {
    const article = el("article", "card");
    if (c.rows.some((r) => r.s === "error")) article.classList.add("has-error");
    article.append(thumb(c));
    const body = el("div", "body");
    const [dir, base] = splitPath(c.path || "(no path)");
    const path = el("div", "path");
    path.title = c.path || "";
    path.append(el("span", "dir", dir), el("bdi", "base", base));
    const meta = [];
    if (c.w) meta.push(c.w + " × " + c.h + " px");
    meta.push("id " + c.id.slice(0, 12));
    const newest = c.rows.reduce((last, r) => (r.at > last ? r.at : last), "");
    if (newest) meta.push("made " + newest);
    const line = el("div", "meta");
    meta.forEach((item, i) => line.append(...(i ? [" · "] : []), el("span", "", item)));
    body.append(path, line);
    for (const r of rows) body.append(row(r));
    article.append(body);
    return article;
  }

  function saveHash() {
    const params = new URLSearchParams();
    for (const key of ["q", "task", "status", "finish"]) if (state[key]) params.set(key, state[key]);
    if (state.page > 1) params.set("page", String(state.page));
    if (state.size !== data.pageSize) params.set("size", String(state.size));
    const hash = params.toString();
    try {
      history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
    } catch (e) {
      // some browsers refuse replaceState on file: pages; the state is then not kept on reload
    }
  }

  function render() {
    const pages = Math.max(1, Math.ceil(matches.length / state.size));
    state.page = Math.min(Math.max(1, state.page), pages);
    const start = (state.page - 1) * state.size;
    const slice = matches.slice(start, start + state.size);
    const cards = document.createDocumentFragment();
    for (const [c, rows] of slice) cards.append(card(c, rows));
    if (!slice.length) cards.append(el("p", "nothing", "No image matches these filters."));
    grid.replaceChildren(cards);
    const shown = slice.length ? "showing " + fmt(start + 1) + "–" + fmt(start + slice.length) : "";
    const of = matches.length === total ? fmt(total) + " images" : fmt(matches.length) + " of " + fmt(total) + " images";
    $("count").textContent = of + (shown ? " · " + shown : "");
    for (const pager of document.querySelectorAll(".pager")) {
      pager.querySelector(".pageinfo").textContent = "Page " + fmt(state.page) + " of " + fmt(pages);
      pager.querySelector(".prev").disabled = state.page <= 1;
      pager.querySelector(".next").disabled = state.page >= pages;
    }
    saveHash();
  }

  function readUi() {
    state.q = ui.q.value.trim();
    state.task = ui.task.value;
    state.status = ui.status.value;
    state.finish = ui.finish.value;
    state.size = Number(ui.size.value) || data.pageSize;
  }

  function refilter() {
    readUi();
    state.page = 1;
    filter();
    render();
  }

  function go(step) {
    state.page += step;
    render();
    grid.scrollIntoView({ block: "start" });
  }

  function restore() {
    const params = new URLSearchParams(location.hash.slice(1));
    ui.q.value = params.get("q") || "";
    for (const key of ["task", "status", "finish", "size"]) {
      const value = params.get(key);
      if (value !== null && Array.from(ui[key].options).some((o) => o.value === value)) ui[key].value = value;
    }
    readUi();
    filter();
    state.page = Number(params.get("page")) || 1;
    render();
  }

  let timer = 0;
  ui.q.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(refilter, 150);
  });
  for (const key of ["task", "status", "finish", "size"]) ui[key].addEventListener("change", refilter);
  for (const button of document.querySelectorAll(".pager .prev")) button.addEventListener("click", () => go(-1));
  for (const button of document.querySelectorAll(".pager .next")) button.addEventListener("click", () => go(1));
  document.addEventListener("keydown", (event) => {
    const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(event.target.tagName);
    if (event.key === "/" && !typing) {
      event.preventDefault();
      ui.q.focus();
    } else if (event.key === "Escape" && event.target === ui.q) {
      ui.q.value = "";
      refilter();
    } else if (!typing && event.key === "ArrowLeft" && state.page > 1) {
      go(-1);
    } else if (!typing && event.key === "ArrowRight" && state.page * state.size < matches.length) {
      go(1);
    }
  });
  restore();
  // When the first page of cards was on screen (ms since navigation): read by tests and benchmarks.
  document.documentElement.dataset.ready = String(Math.round(performance.now()));
})();
