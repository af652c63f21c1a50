// AttentionView: layer/head selectors, head thumbnails, a windowed heatmap with token labels, and the text
// coloured by one query's attention. Numbers arrive as bytes (float16 heatmap/row, uint8 thumbnails).

function render({ model, el }) {
  const root = node("div", "wb-root wb-attentionview");
  const head = node("div", "wb-head");
  const layerSel = node("select", "wb-select wb-layer");
  const headSel = node("select", "wb-select wb-headsel");
  const info = node("span", "wb-muted wb-window-info");
  const qPan = node("input", "wb-pan wb-qpan");
  const kPan = node("input", "wb-pan wb-kpan");
  for (const p of [qPan, kPan]) { p.type = "range"; p.min = "0"; p.step = "1"; }
  const qPanLabel = node("label", "wb-muted", "queries from ");
  const kPanLabel = node("label", "wb-muted", "keys from ");
  qPanLabel.appendChild(qPan);
  kPanLabel.appendChild(kPan);
  head.append(node("span", "wb-title", "layer"), layerSel, node("span", "wb-title", "head"), headSel, info,
              qPanLabel, kPanLabel);
  const thumbs = node("div", "wb-thumbs");
  const heat = node("div", "wb-heat");
  const corner = node("div", "wb-corner");
  const klabels = node("div", "wb-klabels");
  const qlabels = node("div", "wb-qlabels");
  const canvas = node("canvas", "wb-heatmap");
  heat.append(corner, klabels, qlabels, canvas);
  heat.style.gridTemplateColumns = "auto auto";
  const hint = node("div", "wb-muted wb-attn-hint");
  const strip = node("div", "wb-chips wb-attn-text");
  root.append(head, thumbs, heat, hint, strip);
  el.appendChild(root);
  const tip = makeTip(root);
  let values = new Float32Array(0);
  let cell = 8;

  function setTrait(name, value) {
    model.set(name, value);
    model.save_changes();
  }
  layerSel.addEventListener("change", () => setTrait("layer", parseInt(layerSel.value, 10)));
  headSel.addEventListener("change", () => setTrait("head", parseInt(headSel.value, 10)));
  qPan.addEventListener("change", () => setTrait("q_start", parseInt(qPan.value, 10)));
  kPan.addEventListener("change", () => setTrait("k_start", parseInt(kPan.value, 10)));

  function options(sel, items, current) {
    const want = items.map(String).join(",");
    if (sel.dataset.items !== want) {
      clear(sel);
      for (const it of items) {
        const o = node("option", null, it);
        o.value = String(it);
        sel.appendChild(o);
      }
      sel.dataset.items = want;
    }
    sel.value = String(current);
  }

  function drawHeader() {
    const tokens = tokensOf(model);
    const T = model.get("n_tokens");
    const W = model.get("window");
    const [nq, nk] = model.get("pattern_shape") || [0, 0];
    options(layerSel, model.get("layers") || [], model.get("layer"));
    options(headSel, [...Array(model.get("n_heads") || 0).keys()], model.get("head"));
    const q0 = model.get("q_start"), k0 = model.get("k_start");
    info.textContent = nq ? `queries ${q0}–${q0 + nq - 1}, keys ${k0}–${k0 + nk - 1} of ${T} tokens` : `${T} tokens`;
    const pan = T > W;
    qPanLabel.style.display = kPanLabel.style.display = pan ? "" : "none";
    qPan.max = kPan.max = String(Math.max(0, T - W));
    qPan.value = String(q0);
    kPan.value = String(k0);
  }

  function drawThumbs() {
    const s = model.get("thumb_size");
    const H = model.get("n_heads") || 0;
    const data = u8(model.get("thumbs"));
    clear(thumbs);
    if (!s || data.length < H * s * s) return;
    for (let h = 0; h < H; h++) {
      const box = node("div", "wb-thumb" + (h === model.get("head") ? " wb-active" : ""));
      box.dataset.head = String(h);
      const c = node("canvas");
      c.width = s;
      c.height = s;
      const ctx = c.getContext("2d");
      const img = ctx.createImageData(s, s);
      for (let i = 0; i < s * s; i++) {
        const p = data[h * s * s + i] / 255;
        img.data[4 * i] = Math.round(255 - 222 * p);
        img.data[4 * i + 1] = Math.round(255 - 165 * p);
        img.data[4 * i + 2] = Math.round(255 - 75 * p);
        img.data[4 * i + 3] = 255;
      }
      ctx.putImageData(img, 0, 0);
      box.append(c, node("span", null, `H${h}`));
      box.addEventListener("click", () => setTrait("head", h));
      thumbs.appendChild(box);
    }
  }

  function drawHeat() {
    const tokens = tokensOf(model);
    const [nq, nk] = model.get("pattern_shape") || [0, 0];
    const q0 = model.get("q_start"), k0 = model.get("k_start");
    values = f16(model.get("pattern"));
    cell = Math.max(4, Math.min(22, Math.floor(560 / Math.max(nq, nk, 1))));
    canvas.width = nk * cell;
    canvas.height = nq * cell;
    Object.assign(canvas.dataset, { rows: nq, cols: nk, q0, k0, layer: model.get("layer"), head: model.get("head"),
                                    cell });
    const ctx = canvas.getContext("2d");
    for (let i = 0; i < nq; i++) {
      for (let j = 0; j < nk; j++) {
        ctx.fillStyle = blue(values[i * nk + j]);
        ctx.fillRect(j * cell, i * cell, cell, cell);
      }
    }
    const query = model.get("query");
    if (query >= q0 && query < q0 + nq) {
      ctx.strokeStyle = "#d03030";
      ctx.lineWidth = 2;
      ctx.strokeRect(1, (query - q0) * cell + 1, nk * cell - 2, cell - 2);
    }
    const font = `${Math.min(10, Math.max(6, cell - 1))}px`;
    clear(klabels);
    for (let j = 0; j < nk; j++) {
      const t = tokens[k0 + j] || { text: "" };
      const l = node("div", "wb-klabel", t.text);
      l.style.width = `${cell}px`;
      l.style.fontSize = font;
      l.style.lineHeight = `${cell}px`;
      klabels.appendChild(l);
    }
    clear(qlabels);
    for (let i = 0; i < nq; i++) {
      const t = tokens[q0 + i] || { text: "" };
      const l = node("div", "wb-qlabel" + (q0 + i === query ? " wb-query" : ""), t.text);
      l.dataset.q = String(q0 + i);
      l.style.height = `${cell}px`;
      l.style.lineHeight = `${cell}px`;
      l.style.fontSize = font;
      l.addEventListener("click", () => setTrait("query", q0 + i === model.get("query") ? -1 : q0 + i));
      qlabels.appendChild(l);
    }
  }

  function cellAt(ev) {
    const r = canvas.getBoundingClientRect();
    const [nq, nk] = model.get("pattern_shape") || [0, 0];
    const j = Math.floor((ev.clientX - r.left) * (canvas.width / r.width) / cell);
    const i = Math.floor((ev.clientY - r.top) * (canvas.height / r.height) / cell);
    if (i < 0 || j < 0 || i >= nq || j >= nk) return null;
    return { i, j, q: model.get("q_start") + i, k: model.get("k_start") + j, w: values[i * nk + j] };
  }
  canvas.addEventListener("mousemove", (ev) => {
    const c = cellAt(ev);
    if (!c) return tip.hide();
    const tokens = tokensOf(model);
    const qt = tokens[c.q] || { text: "" }, kt = tokens[c.k] || { text: "" };
    tip.show([`query ${c.q} ${JSON.stringify(qt.text)}`, `key ${c.k} ${JSON.stringify(kt.text)}`,
              `weight ${fmt(c.w)}`], ev);
  });
  canvas.addEventListener("mouseleave", () => tip.hide());
  canvas.addEventListener("click", (ev) => {
    const c = cellAt(ev);
    if (c) setTrait("query", c.q === model.get("query") ? -1 : c.q);
  });

  function drawStrip() {
    const tokens = tokensOf(model);
    const query = model.get("query");
    const row = f16(model.get("query_row"));
    hint.textContent = query >= 0 && row.length
      ? `attention of query ${query} ${JSON.stringify((tokens[query] || { text: "" }).text)} over the text`
      : "click a query token (row label or heatmap row) to see where it attends";
    clear(strip);
    tokens.forEach((t, i) => {
      const c = chip(t, i);
      if (query >= 0 && i < row.length) {
        c.style.background = blue(row[i]);
        c.style.color = inkFor(row[i]);
        c.dataset.weight = fmt(row[i]);
      }
      if (i === query) c.classList.add("wb-query");
      const lines = () => tokenTip(t).concat(query >= 0 && i < row.length ? [`attention from ${query}: ${fmt(row[i])}`] : []);
      c.addEventListener("mousemove", (ev) => tip.show(lines(), ev));
      c.addEventListener("mouseleave", () => tip.hide());
      c.addEventListener("click", () => setTrait("query", i === model.get("query") ? -1 : i));
      strip.appendChild(c);
      if (t.newline) strip.appendChild(node("span", "wb-break"));
    });
  }

  function drawAll() {
    drawHeader();
    drawThumbs();
    drawHeat();
    drawStrip();
  }
  drawAll();
  const events = ["tokens_json", "n_tokens", "layers", "n_heads", "layer", "head", "window", "q_start", "k_start", "pattern",
                  "pattern_shape", "thumbs", "thumb_size", "query", "query_row"];
  // Coalesce the several trait changes of one update into one redraw.
  let pending = false;
  const schedule = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; drawAll(); });
  };
  for (const e of events) model.on(`change:${e}`, schedule);
  return () => { for (const e of events) model.off(`change:${e}`, schedule); };
}

export default { render };
