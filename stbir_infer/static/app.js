// STBIR web page: draw (mouse, touch, pen), type, and search the local gallery via /api/query.
// Plain JS, no dependencies. What is on the canvas is what is searched (an uploaded sketch is
// drawn onto it, so it can be drawn over, undone and cleared like strokes).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const canvas = $("sketch");
  const ctx = canvas.getContext("2d");
  const ui = {
    pen: $("tool-pen"), eraser: $("tool-eraser"), size: $("brush-size"), sizeOut: $("brush-size-value"),
    undo: $("undo"), clear: $("clear"), upload: $("upload"), uploadName: $("upload-name"),
    text: $("text"), topK: $("top-k"), auto: $("auto"), search: $("search"),
    status: $("status"), results: $("results"), info: $("gallery-info"), hint: $("canvas-hint"),
    wrap: $("canvas-wrap"), weight: $("sketch-weight"), weightOut: $("sketch-weight-value"),
    minScore: $("min-score"), minScoreOut: $("min-score-value"),
    photo: $("photo"), photoName: $("photo-name"), photoClear: $("photo-clear"),
    whereFolder: $("where-folder"), whereTag: $("where-tag"),
  };
  let weightTouched = false;   // send sketch_weight only once the slider was moved
  let example = null;          // the example photo: {file, name} (chosen / dropped) or {like: id, name}
  let thresholds = {};         // the export's score threshold per query mode (/api/health)
  let thresholdTouched = false;  // the user moved the min-score slider: keep their value
  let shown = null;            // the last answer, re-filtered when the slider moves
  const DEBOUNCE_MS = 450;
  const INK = "#111", PAPER = "#fff";

  // -- drawing ---------------------------------------------------------------------------------
  // ops: {kind: "stroke", erase, size, points: [[x, y, pressure], ...]} | {kind: "image", image}
  const ops = [];
  let current = null;      // the stroke being drawn
  let activePointer = null;
  let tool = "pen";

  function paper() {
    ctx.save();
    ctx.fillStyle = PAPER;
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.restore();
  }

  function widthAt(op, pressure) {
    // A pen reports pressure; mouse and touch report 0.5 while pressed (width = brush size).
    return Math.max(0.75, op.size * (0.35 + 1.3 * pressure));
  }

  function drawSegment(op, a, b) {
    ctx.strokeStyle = op.erase ? PAPER : INK;
    ctx.lineWidth = widthAt(op, (a[2] + b[2]) / 2);
    ctx.beginPath();
    ctx.moveTo(a[0], a[1]);
    ctx.lineTo(b[0], b[1]);
    ctx.stroke();
  }

  function drawOp(op) {
    if (op.kind === "image") {
      const w = op.image.width, h = op.image.height;
      const s = Math.min(canvas.width / w, canvas.height / h);
      const dw = w * s, dh = h * s;
      ctx.drawImage(op.image, (canvas.width - dw) / 2, (canvas.height - dh) / 2, dw, dh);
      return;
    }
    const pts = op.points;
    if (pts.length === 1) {  // a dot
      ctx.fillStyle = op.erase ? PAPER : INK;
      ctx.beginPath();
      ctx.arc(pts[0][0], pts[0][1], widthAt(op, pts[0][2]) / 2, 0, 2 * Math.PI);
      ctx.fill();
      return;
    }
    for (let i = 1; i < pts.length; i++) drawSegment(op, pts[i - 1], pts[i]);
  }

  function redraw() {
    paper();
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    for (const op of ops) drawOp(op);
    refreshButtons();
  }

  function refreshButtons() {
    const empty = ops.length === 0 && !current;
    ui.undo.disabled = ops.length === 0;
    ui.clear.disabled = empty;
    ui.hint.hidden = !empty;
  }

  function pointFrom(ev) {
    const r = canvas.getBoundingClientRect();
    const x = (ev.clientX - r.left) * (canvas.width / r.width);
    const y = (ev.clientY - r.top) * (canvas.height / r.height);
    const p = ev.pointerType === "pen" ? (ev.pressure || 0.5) : 0.5;
    return [x, y, p];
  }

  canvas.addEventListener("pointerdown", (ev) => {
    if (activePointer !== null || (ev.pointerType === "mouse" && ev.button !== 0)) return;
    ev.preventDefault();
    activePointer = ev.pointerId;
    canvas.setPointerCapture(ev.pointerId);
    current = { kind: "stroke", erase: tool === "eraser" || ev.button === 5,
                size: Number(ui.size.value), points: [pointFrom(ev)] };
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    drawOp(current);
    refreshButtons();
  });

  canvas.addEventListener("pointermove", (ev) => {
    if (ev.pointerId !== activePointer || !current) return;
    ev.preventDefault();
    const events = ev.getCoalescedEvents ? ev.getCoalescedEvents() : [ev];
    for (const e of (events.length ? events : [ev])) {
      const p = pointFrom(e);
      const last = current.points[current.points.length - 1];
      if (Math.abs(p[0] - last[0]) + Math.abs(p[1] - last[1]) < 0.5) continue;
      current.points.push(p);
      drawSegment(current, last, p);
    }
  });

  function endStroke(ev) {
    if (ev.pointerId !== activePointer) return;
    activePointer = null;
    if (current) {
      ops.push(current);
      current = null;
      refreshButtons();
      changed();
    }
  }
  canvas.addEventListener("pointerup", endStroke);
  canvas.addEventListener("pointercancel", endStroke);
  canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());

  function setTool(name) {
    tool = name;
    ui.pen.classList.toggle("active", name === "pen");
    ui.eraser.classList.toggle("active", name === "eraser");
    ui.pen.setAttribute("aria-pressed", String(name === "pen"));
    ui.eraser.setAttribute("aria-pressed", String(name === "eraser"));
  }
  ui.pen.addEventListener("click", () => setTool("pen"));
  ui.eraser.addEventListener("click", () => setTool("eraser"));
  ui.size.addEventListener("input", () => { ui.sizeOut.textContent = ui.size.value; });

  function undo() {
    if (!ops.length) return;
    ops.pop();
    if (!ops.some((op) => op.kind === "image")) ui.uploadName.textContent = "";
    redraw();
    changed();
  }
  function clearAll() {
    ops.length = 0;
    ui.uploadName.textContent = "";
    ui.upload.value = "";
    redraw();
    changed();
  }
  ui.undo.addEventListener("click", undo);
  ui.clear.addEventListener("click", clearAll);
  document.addEventListener("keydown", (ev) => {
    const typing = ev.target.matches("input[type=text], input[type=number]");
    if ((ev.ctrlKey || ev.metaKey) && !ev.shiftKey && ev.key.toLowerCase() === "z" && !typing) {
      ev.preventDefault();
      undo();
    } else if (!typing && !ev.ctrlKey && !ev.metaKey && !ev.altKey) {
      if (ev.key === "p") setTool("pen");
      if (ev.key === "e") setTool("eraser");
    }
  });

  // -- upload a sketch file ----------------------------------------------------------------------
  function loadImage(file) {
    return new Promise((resolve, reject) => {
      const url = URL.createObjectURL(file);
      const img = new Image();
      img.onload = () => { URL.revokeObjectURL(url); resolve(img); };
      img.onerror = () => { URL.revokeObjectURL(url); reject(new Error("not an image this browser can read")); };
      img.src = url;
    });
  }

  async function useFile(file) {
    if (!file) return;
    try {
      const image = await loadImage(file);
      ops.length = 0;          // the file replaces the drawing; strokes can go on top
      ops.push({ kind: "image", image });
      ui.uploadName.textContent = file.name;
      redraw();
      changed(true);
    } catch (err) {
      showError(`${file.name}: ${err.message}`);
    }
  }
  ui.upload.addEventListener("change", () => useFile(ui.upload.files[0]));
  ui.wrap.addEventListener("dragover", (ev) => { ev.preventDefault(); ui.wrap.classList.add("drop"); });
  ui.wrap.addEventListener("dragleave", () => ui.wrap.classList.remove("drop"));
  ui.wrap.addEventListener("drop", (ev) => {
    ev.preventDefault();
    ui.wrap.classList.remove("drop");
    if (ev.dataTransfer.files.length) useFile(ev.dataTransfer.files[0]);
  });

  // -- search ------------------------------------------------------------------------------------
  let timer = null;
  let inflight = null;
  let seq = 0;

  function changed(now) {
    if (!ui.auto.checked) return;
    clearTimeout(timer);
    timer = setTimeout(search, now ? 0 : DEBOUNCE_MS);
  }
  ui.text.addEventListener("input", () => changed());
  ui.text.addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); search(); } });
  ui.topK.addEventListener("change", () => {
    if (ui.topK.value !== "") ui.topK.value = readTopK();  // the field shows what is searched
    changed(true);
  });

  function readTopK() {
    const max = Number(ui.topK.max) || 200;
    const v = Math.round(Number(ui.topK.value));
    return Number.isFinite(v) && v >= 1 ? Math.min(v, max) : 12;
  }
  ui.search.addEventListener("click", () => search());
  ui.weight.addEventListener("input", () => {
    weightTouched = true;
    ui.weightOut.textContent = Number(ui.weight.value).toFixed(2);
    changed();
  });
  ui.minScore.addEventListener("input", () => {
    thresholdTouched = true;
    applyThreshold();
  });
  for (const box of [ui.whereFolder, ui.whereTag]) {
    box.addEventListener("change", () => changed(true));
    box.addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); search(); } });
  }

  // -- an example photo: chosen, dropped outside the canvas, or "more like this" on a result ----
  function setExample(next) {
    example = next;
    ui.photoName.textContent = next ? `like: ${next.name}` : "";
    ui.photoClear.hidden = !next;
    if (!next) ui.photo.value = "";
  }
  ui.photo.addEventListener("change", () => {
    if (ui.photo.files[0]) { setExample({ file: ui.photo.files[0], name: ui.photo.files[0].name }); changed(true); }
  });
  ui.photoClear.addEventListener("click", () => { setExample(null); changed(true); });
  document.addEventListener("dragover", (ev) => { if (!ui.wrap.contains(ev.target)) ev.preventDefault(); });
  document.addEventListener("drop", (ev) => {
    if (ui.wrap.contains(ev.target) || !ev.dataTransfer.files.length) return;
    ev.preventDefault();
    const file = ev.dataTransfer.files[0];
    setExample({ file, name: file.name });
    changed(true);
  });

  function moreLikeThis(r) {
    // the photo alone is the new query (as in a photo manager's "similar photos")
    ops.length = 0;
    ui.text.value = "";
    ui.uploadName.textContent = "";
    redraw();
    setExample({ like: r.id, name: r.name });
    search();
  }

  function whereLines() {
    const lines = [];
    if (ui.whereFolder.value.trim()) lines.push(`folder=${ui.whereFolder.value.trim()}`);
    if (ui.whereTag.value.trim()) lines.push(ui.whereTag.value.trim());
    return lines.join("\n");
  }

  function canvasBlob() {
    return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  }

  async function search() {
    clearTimeout(timer);
    const text = ui.text.value.trim();
    const hasSketch = ops.length > 0;
    if (!hasSketch && !text && !example) {
      ui.status.textContent = "Draw a sketch, type a few words, or both.";
      ui.status.classList.remove("error");
      ui.results.replaceChildren();
      return;
    }
    const topK = readTopK();
    const form = new FormData();
    if (hasSketch) form.append("sketch", await canvasBlob(), "sketch.png");
    if (text) form.append("text", text);
    form.append("top_k", String(topK));
    if (weightTouched) form.append("sketch_weight", ui.weight.value);
    if (example && example.file) form.append("image", example.file, example.name);
    if (example && example.like !== undefined) form.append("like", String(example.like));
    const where = whereLines();
    if (where) form.append("where", where);

    if (inflight) inflight.abort();
    const controller = new AbortController();
    inflight = controller;
    const mine = ++seq;
    document.body.classList.add("busy");
    ui.status.classList.remove("error");
    ui.status.textContent = "Searching…";
    try {
      const resp = await fetch("/api/query", { method: "POST", body: form, signal: controller.signal });
      const data = await resp.json().catch(() => ({ error: `HTTP ${resp.status}` }));
      if (mine !== seq) return;                      // a newer search has started
      if (!resp.ok) throw new Error(data.error || `HTTP ${resp.status}`);
      render(data);
    } catch (err) {
      if (err.name === "AbortError" || mine !== seq) return;
      showError(err.message);
    } finally {
      if (mine === seq) {
        document.body.classList.remove("busy");
        inflight = null;
      }
    }
  }

  function showError(message) {
    ui.status.textContent = message;
    ui.status.classList.add("error");
  }

  function modeOf(q) {
    return [q.sketch ? "sketch" : null, q.image || q.like != null ? "image" : null,
            q.text ? "text" : null].filter(Boolean).join("+");
  }

  function render(data) {
    const mode = modeOf(data.query);
    if (!thresholdTouched) {  // the export's threshold for this kind of query (none: show all)
      const t = thresholds[mode];
      ui.minScore.value = String(typeof t === "number" ? t : 0);
    }
    shown = { data, by: mode.replace("image", "photo").split("+").join(" + ") };
    const items = data.results.map((r) => {
      const li = document.createElement("li");
      li.className = "result";
      li.dataset.score = String(r.score);
      const a = document.createElement("a");
      a.className = "thumb";
      a.title = r.path;
      if (r.image) {
        a.href = `${r.image}?size=1024`;
        a.target = "_blank";
        a.rel = "noopener";
        const img = document.createElement("img");
        img.src = `${r.image}?size=256`;
        img.alt = r.name;
        img.loading = "lazy";
        img.decoding = "async";
        a.append(img);
      } else {
        a.textContent = "(gone)";
      }
      const name = document.createElement("div");
      name.className = "name";
      name.textContent = r.name;
      name.title = r.path + (r.duplicates.length ? `\n+ ${r.duplicates.length} duplicate(s)` : "");
      const meta = document.createElement("div");
      meta.className = "meta";
      const rank = document.createElement("span");
      rank.className = "rank";
      rank.textContent = `#${r.rank}`;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = r.score.toFixed(3);
      score.title = "cosine similarity";
      meta.append(rank, score);
      if (r.same_file) {
        const same = document.createElement("span");
        same.className = "same";
        same.textContent = "this photo";
        meta.append(same);
      }
      li.append(a, name, meta);
      if (r.id !== null && r.id !== undefined) {
        const more = document.createElement("button");
        more.type = "button";
        more.className = "more";
        more.textContent = "More like this";
        more.setAttribute("aria-label", `More like ${r.name}`);
        more.addEventListener("click", () => moreLikeThis(r));
        li.append(more);
      }
      return li;
    });
    ui.results.replaceChildren(...items);
    applyThreshold();
  }

  function applyThreshold() {
    const min = Number(ui.minScore.value);
    const off = min <= Number(ui.minScore.min);  // at its left end the slider hides nothing
    ui.minScoreOut.textContent = off ? "all" : min.toFixed(3);
    if (!shown) return;
    let hidden = 0;
    for (const li of ui.results.children) {
      li.hidden = !off && Number(li.dataset.score) < min;
      hidden += li.hidden ? 1 : 0;
    }
    const { data, by } = shown;
    const n = data.results.length;
    const note = hidden ? ` · ${hidden} hidden below ${min.toFixed(3)}` : "";
    ui.status.textContent = n && hidden === n
      ? `no match above ${min.toFixed(3)} (${n} hidden; by ${by} · ${Math.round(data.took_ms)} ms)`
      : `${n} result${n === 1 ? "" : "s"} by ${by} · ${Math.round(data.took_ms)} ms${note}`;
  }

  // -- start ---------------------------------------------------------------------------------------
  async function health() {
    try {
      const resp = await fetch("/api/health");
      const h = await resp.json();
      if (!resp.ok) throw new Error(h.error || `HTTP ${resp.status}`);
      ui.info.textContent = `${h.images} image${h.images === 1 ? "" : "s"} · ${h.model.clip_model || "model"} ` +
        `${String(h.model.fingerprint).slice(0, 8)} · ${h.model.precision}`;
      ui.topK.max = String(h.limits.max_top_k);
      ui.text.maxLength = h.limits.max_text;  // the server's rule (query_spec), not a copy of it
      if (typeof h.model.fusion_weight === "number") ui.weight.value = String(h.model.fusion_weight);
      thresholds = h.score_thresholds || {};
    } catch (err) {
      ui.info.textContent = `server unreachable: ${err.message}`;
      ui.info.classList.add("error");
    }
  }

  redraw();
  health();
})();
