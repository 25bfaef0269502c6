// The retrieval browser's page: plain JavaScript, no library, no build step. State lives in the URL (permalinks):
//   /?q=TEXT  a sentence -> images      /?caption=ID  a caption -> images      /?image=ID  an image -> captions
//   /?view=eval&direction=t2i&page=0    the evaluation view        (&k=K on any of them: results per view)
// Every text from the server is inserted with textContent (never as HTML). "Export PNG" draws the current view onto
// a <canvas> (the images already shown, frames, scores, texts) and downloads it.
"use strict";
(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  let info = null;
  let current = null; // {kind, data} of the view on screen, for the PNG export

  function el(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("data-") || k === "href" || k === "title" || k === "alt" || k === "src") e.setAttribute(k, v);
      else e[k] = v;
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  const params = () => new URLSearchParams(location.search);

  function href(p) {
    const u = new URLSearchParams();
    for (const [k, v] of Object.entries(p)) if (v !== undefined && v !== null && v !== "") u.set(k, v);
    const k = params().get("k");
    if (k && !u.has("k")) u.set("k", k);
    const s = u.toString();
    return s ? `/?${s}` : "/";
  }

  const link = (p, ...children) => el("a", {class: "nav", href: href(p)}, ...children);
  const fmt = (x) => Number(x).toFixed(3);

  async function api(path) {
    const resp = await fetch(path, {headers: {Accept: "application/json"}});
    let body;
    try { body = await resp.json(); } catch (e) { body = {error: `HTTP ${resp.status} ${resp.statusText}`}; }
    if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
    return body;
  }

  function go(url) { history.pushState(null, "", url); route(); }

  document.addEventListener("click", (ev) => {
    const a = ev.target.closest("a.nav");
    if (!a || ev.button !== 0 || ev.ctrlKey || ev.metaKey || ev.shiftKey || ev.altKey) return;
    ev.preventDefault();
    go(a.getAttribute("href"));
  });
  window.addEventListener("popstate", route);
  $("#search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = $("#query").value.trim();
    if (q) go(href({q}));
  });
  $("#export").addEventListener("click", () => {
    if (!current) return;
    const a = el("a", {href: figureDataURL(), download: `${fileStem()}.png`});
    document.body.append(a);
    a.click();
    a.remove();
  });

  // ------------------------------------------------------------------------------------------------ routing
  async function route() {
    document.body.dataset.state = "loading";
    const p = params(), view = $("#view");
    const k = p.get("k") ? `k=${encodeURIComponent(p.get("k"))}` : "";
    try {
      if (!info) { info = await api("/api/info"); renderMeta(); }
      let node;
      if (p.has("q")) {
        $("#query").value = p.get("q");
        const d = await api(`/api/search?q=${encodeURIComponent(p.get("q"))}&${k}`);
        node = renderResults(d, "query");
      } else if (p.has("caption")) {
        const d = await api(`/api/caption/${encodeURIComponent(p.get("caption"))}?${k}`);
        node = renderResults(d, "caption");
      } else if (p.has("image")) {
        node = renderImage(await api(`/api/image/${encodeURIComponent(p.get("image"))}?${k}`));
      } else if (p.get("view") === "eval") {
        const q = new URLSearchParams({page: p.get("page") || "0"});
        if (p.get("direction")) q.set("direction", p.get("direction"));
        node = renderEval(await api(`/api/eval?${q}`));
      } else {
        node = renderHome();
      }
      view.replaceChildren(node);
      await Promise.all([...view.querySelectorAll("img")].map((img) => img.decode().catch(() => null)));
      document.body.dataset.state = "ready";
    } catch (e) {
      current = null;
      document.title = "error - dual-path browser";
      view.replaceChildren(el("p", {class: "error", text: e.message}));
      document.body.dataset.state = "error";
    }
  }

  function renderMeta() {
    const what = info.mode === "folder" ? `folder of ${info.images} images` : `${info.split} split: ${info.images} images`;
    $("#meta").textContent = `${info.dataset} · ${what}, ${info.captions} ${info.split} captions · top ${info.top_k}` +
      ` · ${info.source}` + (info.has_truth ? "" : " · no ground truth (own images): nothing is marked correct");
    if (!info.evaluation) $("#eval-link").hidden = true;
  }

  // ------------------------------------------------------------------------------------------------ views
  function renderHome() {
    current = null;
    document.title = "dual-path browser";
    const grid = el("div", {class: "grid"});
    for (let i = 0; i < Math.min(info.images, 24); i++) {
      grid.append(link({image: i}, el("img", {src: `/image/${i}`, alt: `image ${i}`, loading: "eager"})));
    }
    return el("section", {},
      el("h2", {text: "Search the gallery with a sentence, or open an image"}),
      el("p", {class: "muted", text: info.evaluation ? "The evaluation view lists the worst-ranked queries of each direction." :
        "A folder of your own images has no ground truth, so there is no evaluation view."}),
      grid);
  }

  function wordsLine(d) {
    const p = el("p", {class: "words"}, el("span", {class: "muted", text: "words used: "}));
    for (const w of d.words) p.append(el("span", {text: `${w} `}));
    if (d.ignored.length) {
      p.append(el("span", {class: "muted", text: " · not in the dictionary (ignored): "}));
      for (const w of d.ignored) {
        const hint = d.hints[w] ? `did you mean ${d.hints[w]}?` : "not in the training dictionary";
        p.append(el("span", {class: "oov", title: hint, text: w}), " ");
        if (d.hints[w]) p.append(el("span", {class: "hint", text: `(${hint})`}), " ");  // visible, not only on hover
      }
    }
    if (d.truncated) p.append(el("span", {class: "muted", text: ` · ${d.truncated} words beyond max_len dropped`}));
    return p;
  }

  function truthLine(d) {
    if (!d.truth.length) return null;
    const p = el("p", {class: "truth"}, el("span", {class: "muted", text: "ground truth: "}));
    d.truth.forEach((t, n) => p.append(n ? ", " : "", link({image: t.id}, t.name), ` at rank ${t.rank}`));
    return p;
  }

  // "true" / "false", or "none" when the view has no ground truth (a typed sentence that is no caption of the
  // split, your own images): then a result is neither right nor wrong and gets no red frame
  const verdict = (correct) => (correct === null || correct === undefined ? "none" : String(correct));

  function tile(r, n) {
    return el("a", {class: "nav tile", href: href({image: r.id}), "data-correct": verdict(r.correct), "data-id": r.id},
      el("img", {src: `/image/${r.id}`, alt: r.name}),
      el("div", {class: "label", text: `#${n + 1} ${fmt(r.score)}${r.correct ? " ✓" : ""}`}),
      el("div", {class: "label muted", text: r.name}));
  }

  function renderResults(d, kind) {
    current = {kind: "results", data: d};
    document.title = `${d.query} - dual-path browser`;
    const head = kind === "caption" ? `Caption ${d.caption} of the ${info.split} split` : "Query";
    return el("section", {},
      el("h2", {}, `${head}: `, el("q", {id: "query-text", text: d.query})),
      wordsLine(d), truthLine(d),
      el("div", {class: "grid", id: "results"}, ...d.results.map(tile)));
  }

  function captionItem(c, n) {
    const li = el("li", {"data-correct": verdict(c.correct), "data-id": c.id},
      el("span", {class: "rank", text: n === null ? `rank ${c.rank}` : `#${n + 1}`}), " ",
      el("span", {class: "score", text: fmt(c.score)}), " ", link({caption: c.id}, c.text));
    if (c.correct) li.append(" ✓");
    if (c.image !== null && c.image !== undefined && !c.correct) {
      li.append(" ", el("span", {class: "muted"}, "(", link({image: c.image}, "its image"), ")"));
    }
    return li;
  }

  function renderImage(d) {
    current = {kind: "image", data: d};
    document.title = `${d.name} - dual-path browser`;
    const right = el("div", {},
      el("h3", {text: `Top ${d.results.length} captions of the ${info.split} split`}),
      el("ol", {class: "captions", id: "captions"}, ...d.results.map(captionItem)));
    if (d.truth.length) {
      right.append(el("h3", {text: `Ground-truth captions (${d.truth.length}) and their ranks`}),
        el("ol", {class: "captions", id: "truth"}, ...d.truth.map((c) => captionItem(c, null))));
    } else if (!info.has_truth) {
      right.append(el("p", {class: "muted", text: "An image of your own folder: no ground-truth captions."}));
    }
    return el("section", {},
      el("h2", {text: `Image ${d.image}: ${d.name}`}),
      el("div", {class: "image-view"},
        el("figure", {}, el("a", {href: `/image/${d.image}/full`}, el("img", {src: `/image/${d.image}`, alt: d.name, id: "image"}))),
        right));
  }

  function renderEval(d) {
    current = {kind: "eval", data: d};
    document.title = "evaluation - dual-path browser";
    const m = d.metrics;
    const table = el("table", {class: "metrics", id: "metrics"},
      el("tr", {}, ...["direction", "R@1", "R@5", "R@10", "Med r", "mean r"].map((h) => el("th", {text: h}))));
    for (const dir of ["i2t", "t2i"]) {
      if (!m[dir]) continue;
      const r = m[dir];
      table.append(el("tr", {"data-direction": dir}, ...[dir, r["R@1"].toFixed(1), r["R@5"].toFixed(1),
        r["R@10"].toFixed(1), String(r.medr), r.meanr.toFixed(1)].map((t) => el("td", {text: t}))));
    }
    const tabs = el("p", {class: "tabs"}, el("span", {class: "muted", text: "worst-ranked queries: "}));
    for (const dir of info.directions) {
      const a = link({view: "eval", direction: dir}, dir === "i2t" ? "image → text" : "text → image");
      if (dir === d.direction) a.className += " active";
      tabs.append(a);
    }
    const list = el("ol", {class: "worst", id: "worst", start: d.page * d.per_page + 1});
    for (const it of d.items) {
      const li = el("li", {}, el("span", {class: "rank", text: `rank ${it.rank}`}), " ");
      if (it.kind === "image") li.append(link({image: it.id}, el("img", {src: `/image/${it.id}`, alt: it.name}), it.name));
      else li.append(link({caption: it.id}, it.text));
      list.append(li);
    }
    const pager = el("p", {class: "pager"});
    if (d.page > 0) pager.append(link({view: "eval", direction: d.direction, page: d.page - 1}, "← worse"));
    pager.append(el("span", {class: "muted", text: `page ${d.page + 1} of ${d.pages} (${d.queries} queries) `}));
    if (d.page + 1 < d.pages) pager.append(link({view: "eval", direction: d.direction, page: d.page + 1}, "better →"));
    return el("section", {},
      el("h2", {text: `Evaluation of the ${info.split} split (${info.images} images, ${info.captions} captions)`}),
      table, el("p", {text: `rsum ${m.rsum.toFixed(1)}`, id: "rsum"}), tabs, list, pager);
  }

  // ------------------------------------------------------------------------------------------------ PNG export
  const GREEN = "#00a000", RED = "#d73c3c", MUTED = "#5a5a5a", NEUTRAL = "#c8c8c8", FONT = "14px sans-serif", PAD = 16;

  function fileStem() {
    const p = params();
    const key = p.has("q") ? `query-${p.get("q")}` : p.has("caption") ? `caption-${p.get("caption")}` :
      p.has("image") ? `image-${p.get("image")}` : `eval-${p.get("direction") || "default"}-${p.get("page") || 0}`;
    return "dualpath-" + key.replace(/[^A-Za-z0-9_-]+/g, "_").slice(0, 60);
  }

  function wrapText(ctx, text, width) {
    const lines = [];
    let line = "";
    for (const w of String(text).split(/\s+/)) {
      const cand = line ? `${line} ${w}` : w;
      if (ctx.measureText(cand).width > width && line) { lines.push(line); line = w; } else line = cand;
    }
    if (line) lines.push(line);
    return lines;
  }

  // A list of drawing steps for the current view, then one pass to size the canvas and one to draw.
  function figureSteps(ctx, width) {
    const steps = [];
    const text = (t, colour = "#111", font = FONT) => {
      ctx.font = font;
      for (const line of wrapText(ctx, t, width - 2 * PAD)) steps.push({type: "text", t: line, colour, font, h: 20});
    };
    const imgOf = (id) => document.querySelector(`img[src="/image/${id}"]`);
    const {kind, data: d} = current;
    if (kind === "results") {
      text(`${d.caption !== undefined ? `caption ${d.caption}` : "query"}: "${d.query}"`, "#111", "bold 16px sans-serif");
      if (d.ignored.length) text(`not in the dictionary: ${d.ignored.join(", ")}`, RED);
      const cell = 150, perRow = Math.max(1, Math.floor((width - PAD) / (cell + PAD)));
      for (let s = 0; s < d.results.length; s += perRow) {
        steps.push({type: "tiles", items: d.results.slice(s, s + perRow), start: s, cell, imgOf, h: cell + 44});
      }
    } else if (kind === "image") {
      steps.push({type: "image", img: imgOf(d.image), h: 0, side: 200});
      text(`image ${d.image}: ${d.name}`, "#111", "bold 16px sans-serif");
      d.results.forEach((c, n) => text(`${n + 1}. [${c.score.toFixed(3)}] ${c.text}${c.correct ? "  [+]" : ""}`,
        c.correct ? GREEN : "#111"));
      if (d.truth.length) {
        text("ground-truth captions:", MUTED, "bold 14px sans-serif");
        d.truth.forEach((c) => text(`rank ${c.rank}: ${c.text}`, GREEN));
      }
    } else {
      text(`${info.dataset} ${info.split}: ${info.images} images, ${info.captions} captions`, "#111", "bold 16px sans-serif");
      for (const dir of ["i2t", "t2i"]) {
        const r = d.metrics[dir];
        if (r) text(`${dir}  R@1 ${r["R@1"].toFixed(1)}  R@5 ${r["R@5"].toFixed(1)}  R@10 ${r["R@10"].toFixed(1)}` +
          `  Med r ${r.medr}  mean r ${r.meanr.toFixed(1)}`);
      }
      text(`rsum ${d.metrics.rsum.toFixed(1)}`);
      text(`worst-ranked ${d.direction} queries, page ${d.page + 1} of ${d.pages}:`, MUTED, "bold 14px sans-serif");
      for (const it of d.items) text(`rank ${it.rank}: ${it.kind === "image" ? it.name : it.text}`);
    }
    return steps;
  }

  function figureCanvas() {
    const width = current.kind === "image" ? 1000 : 900;
    const canvas = document.createElement("canvas");
    const ctx = canvas.getContext("2d");
    const steps = figureSteps(ctx, current.kind === "image" ? width - 220 : width);
    const left = current.kind === "image" ? 220 + PAD : PAD;
    const textH = steps.reduce((h, s) => h + s.h, 0);
    canvas.width = width;
    canvas.height = Math.ceil(Math.max(textH, current.kind === "image" ? 200 : 0) + 2 * PAD);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.textBaseline = "top";
    let y = PAD;
    for (const s of steps) {
      if (s.type === "text") {
        ctx.font = s.font; ctx.fillStyle = s.colour; ctx.fillText(s.t, left, y + 2);
      } else if (s.type === "image") {
        if (s.img) drawFit(ctx, s.img, PAD, PAD, s.side, s.side);
      } else if (s.type === "tiles") {
        s.items.forEach((r, j) => {
          const x = PAD + j * (s.cell + PAD);
          ctx.fillStyle = r.correct ? GREEN : r.correct === false ? RED : NEUTRAL;  // null: no ground truth
          const band = r.correct ? 6 : 2;
          ctx.fillRect(x, y, s.cell, s.cell);
          ctx.fillStyle = "#eee";
          ctx.fillRect(x + band, y + band, s.cell - 2 * band, s.cell - 2 * band);
          const img = s.imgOf(r.id);
          if (img) drawFit(ctx, img, x + 6, y + 6, s.cell - 12, s.cell - 12);
          ctx.font = FONT; ctx.fillStyle = r.correct ? GREEN : "#111";
          ctx.fillText(`#${s.start + j + 1}  ${r.score.toFixed(3)}${r.correct ? "  [+]" : ""}`, x, y + s.cell + 4);
          ctx.fillStyle = MUTED;
          ctx.fillText(r.name.length > 20 ? `${r.name.slice(0, 19)}…` : r.name, x, y + s.cell + 22);
        });
      }
      y += s.h;
    }
    return canvas;
  }

  function drawFit(ctx, img, x, y, w, h) {
    if (!img.naturalWidth) return;
    const s = Math.min(w / img.naturalWidth, h / img.naturalHeight);
    const dw = img.naturalWidth * s, dh = img.naturalHeight * s;
    ctx.drawImage(img, x + (w - dw) / 2, y + (h - dh) / 2, dw, dh);
  }

  function figureDataURL() { return current ? figureCanvas().toDataURL("image/png") : null; }

  window.dualpathBrowse = {figureDataURL, route};
  route();
})();
