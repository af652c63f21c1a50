// AttentionView: a layer × head overview grid, a windowed heatmap with token labels, a colourbar, each row's weight
// outside the key window, a minimap of the whole sequence (spans shaded, click to jump), and the text coloured by
// one query's attention. Numbers arrive as bytes (float16 heatmap/rows, uint8 thumbnails).

function render({ model, el }) {
  const root = node("div", "wb-root wb-attentionview");
  const head = node("div", "wb-head");
  const layerSel = node("select", "wb-select wb-layer");
  const headSel = node("select", "wb-select wb-headsel");
  const scaleSel = node("select", "wb-select wb-scale");
  const scoreSel = node("select", "wb-select wb-scoreby");
  const info = node("span", "wb-muted wb-window-info");
  const [pngBtn, svgBtn] = exportButtons(root, "attention", () => exportGrid());
  head.append(node("span", "wb-title", "layer"), layerSel, node("span", "wb-title", "head"), headSel,
              node("span", "wb-muted", "scale"), scaleSel, node("span", "wb-muted", "overview by"), scoreSel,
              info, pngBtn, svgBtn);
  const body = node("div", "wb-attn-body");
  const overview = node("div", "wb-overview");
  const main = node("div", "wb-attn-main");
  const legendBox = node("div", "wb-legend");
  const heat = node("div", "wb-heat");
  const corner = node("div", "wb-corner");
  const klabels = node("div", "wb-klabels");
  const qlabels = node("div", "wb-qlabels");
  const canvas = node("canvas", "wb-heatmap");
  const outCanvas = node("canvas", "wb-outside");
  outCanvas.title = "weight of the row outside the key window (left | right)";
  heat.append(corner, klabels, node("div", "wb-muted wb-outside-head", "out"), qlabels, canvas, outCanvas);
  const pans = node("div", "wb-pans");
  const winPan = node("input", "wb-pan wb-qpan");
  const keyPan = node("input", "wb-pan wb-kpan");
  for (const p of [winPan, keyPan]) { p.type = "range"; p.min = "0"; p.step = "1"; }
  const winVal = node("span", "wb-pan-value");
  const keyVal = node("span", "wb-pan-value");
  const winLabel = node("label", "wb-muted", "window at ");
  const keyLabel = node("label", "wb-muted", "keys from ");
  winLabel.append(winPan, winVal);
  keyLabel.append(keyPan, keyVal);
  pans.append(winLabel, keyLabel);
  main.append(legendBox, heat, pans);
  body.append(overview, main);
  const miniBox = node("div", "wb-minimap-box");
  const mini = node("canvas", "wb-minimap");
  const miniLabel = node("div", "wb-muted wb-minimap-label");
  miniBox.append(mini, miniLabel);
  const hint = node("div", "wb-muted wb-attn-hint");
  const strip = node("div", "wb-chips wb-attn-text wb-strip");
  root.append(head, body, miniBox, hint, strip);
  el.appendChild(root);
  const tip = makeTip(root);
  const st = { els: [], recs: [] };
  let values = new Float32Array(0);
  let cell = 12;
  let theme = null;
  const rootWidth = widthOf(root, () => { dirty.add("mini"); schedule(); });

  layerSel.addEventListener("change", () => setTrait(model, "layer", parseInt(layerSel.value, 10)));
  headSel.addEventListener("change", () => setTrait(model, "head", parseInt(headSel.value, 10)));
  scaleSel.addEventListener("change", () => setTrait(model, "scale", scaleSel.value));
  scoreSel.addEventListener("change", () => setTrait(model, "score_by", scoreSel.value));
  winPan.addEventListener("input", () => { winVal.textContent = winPan.value; });
  keyPan.addEventListener("input", () => { keyVal.textContent = keyPan.value; });
  winPan.addEventListener("change", () => {
    const v = parseInt(winPan.value, 10);
    model.set("q_start", v);
    model.set("k_start", v);
    model.save_changes();
  });
  keyPan.addEventListener("change", () => setTrait(model, "k_start", parseInt(keyPan.value, 10)));

  function options(sel, items, current, labels) {
    const want = items.map(String).join(",");
    if (sel.dataset.items !== want) {
      clear(sel);
      items.forEach((it, i) => {
        const o = node("option", null, labels ? labels[i] : it);
        o.value = String(it);
        sel.appendChild(o);
      });
      sel.dataset.items = want;
    }
    sel.value = String(current);
  }

  function scores() {
    try { return JSON.parse(model.get("head_scores_json") || "{}"); } catch (e) { return {}; }
  }

  function drawHeader() {
    const T = model.get("n_tokens");
    const W = model.get("window");
    const [nq, nk] = model.get("pattern_shape") || [0, 0];
    options(layerSel, model.get("layers") || [], model.get("layer"));
    options(headSel, [...Array(model.get("n_heads") || 0).keys()], model.get("head"));
    options(scaleSel, ["linear", "log", "row"], model.get("scale"), ["linear", "log", "per-row max"]);
    const names = Object.keys(scores());
    options(scoreSel, [""].concat(names), model.get("score_by"), ["—"].concat(names));
    const q0 = model.get("q_start"), k0 = model.get("k_start");
    info.textContent = nq ? `queries ${q0}–${q0 + nq - 1}, keys ${k0}–${k0 + nk - 1} of ${T} tokens` : `${T} tokens`;
    pans.style.display = T > W ? "" : "none";
    winPan.max = keyPan.max = String(Math.max(0, T - W));
    winPan.value = String(q0);
    keyPan.value = String(k0);
    winVal.textContent = String(q0);
    keyVal.textContent = String(k0);
  }

  function drawOverview() {
    const s = model.get("thumb_size");
    const H = model.get("n_heads") || 0;
    const layers = model.get("overview_layers") || [];
    const data = u8(model.get("thumbs"));
    const by = model.get("score_by");
    const sc = by ? scores()[by] : null;
    const all = model.get("layers") || [];
    clear(overview);
    if (!s || data.length < layers.length * H * s * s) return;
    const px = Math.max(14, Math.min(36, Math.floor(360 / Math.max(H, 1))));
    const grid = node("div", "wb-ov-grid");
    grid.style.gridTemplateColumns = `max-content repeat(${H}, ${px + 4}px)`;
    grid.appendChild(node("div", "wb-muted wb-ov-corner", "L\\H"));
    for (let h = 0; h < H; h++) grid.appendChild(node("div", "wb-muted wb-ov-hlabel", h));
    layers.forEach((layer, li) => {
      grid.appendChild(node("div", "wb-muted wb-ov-llabel", layer));
      for (let h = 0; h < H; h++) {
        const active = layer === model.get("layer") && h === model.get("head");
        const box = node("div", "wb-thumb" + (active ? " wb-active" : ""));
        box.dataset.layer = String(layer);
        box.dataset.head = String(h);
        const c = node("canvas");
        c.width = s;
        c.height = s;
        c.style.width = c.style.height = `${px}px`;
        const ctx = c.getContext("2d");
        const img = ctx.createImageData(s, s);
        const base = (li * H + h) * s * s;
        for (let i = 0; i < s * s; i++) {
          const rgb = colourOf(data[base + i] / 255, theme, false);
          img.data[4 * i] = rgb[0];
          img.data[4 * i + 1] = rgb[1];
          img.data[4 * i + 2] = rgb[2];
          img.data[4 * i + 3] = 255;
        }
        ctx.putImageData(img, 0, 0);
        box.appendChild(c);
        let score = null;
        const idx = all.indexOf(layer);
        if (sc && sc[idx] !== undefined) {
          score = sc[idx][h];
          box.style.outline = `3px solid ${css(mix(theme.bg, [230, 120, 20], Math.min(1, Math.max(0, score))))}`;
          box.dataset.score = fmt(score);
        }
        box.addEventListener("mousemove", (ev) => tip.show([`layer ${layer} head ${h}`].concat(
          score === null ? [] : [`${by} score ${fmt(score)}`]), ev));
        box.addEventListener("mouseleave", () => tip.hide());
        box.addEventListener("click", () => { model.set("layer", layer); model.set("head", h); model.save_changes(); });
        grid.appendChild(box);
      }
    });
    overview.appendChild(grid);
    const start = model.get("overview_start"), rows = model.get("overview_rows");
    if (all.length > rows) {
      const nav = node("div", "wb-ov-nav");
      const up = node("button", "wb-ov-up", "▲ layers");
      const down = node("button", "wb-ov-down", "▼ layers");
      up.disabled = start <= 0;
      down.disabled = start + rows >= all.length;
      up.addEventListener("click", () => setTrait(model, "overview_start", Math.max(0, start - rows)));
      down.addEventListener("click", () => setTrait(model, "overview_start", start + rows));
      nav.append(up, down, node("span", "wb-muted", `layers ${layers[0]}–${layers[layers.length - 1]} of ${all.length}`));
      overview.appendChild(nav);
    }
    if (by) overview.appendChild(node("div", "wb-muted wb-ov-note", `ring: ${by} score (0 … 1)`));
  }

  function rowMaxes(nq, nk) {
    const m = new Float32Array(nq);
    for (let i = 0; i < nq; i++) {
      let best = 0;
      for (let j = 0; j < nk; j++) best = Math.max(best, Math.abs(values[i * nk + j]));
      m[i] = best;
    }
    return m;
  }

  function cellColour(v, scale, signed, rmax) {
    if (signed) return colourOf(scale === "row" ? (rmax > 0 ? v / rmax : 0) : v, theme, true);
    return colourOf(scaled(v, scale, rmax), theme, false);
  }

  function drawHeat() {
    const tokens = tokensOf(model);
    const [nq, nk] = model.get("pattern_shape") || [0, 0];
    const q0 = model.get("q_start"), k0 = model.get("k_start");
    const scale = model.get("scale"), signed = model.get("signed");
    values = f16(model.get("pattern"));
    const out = f16(model.get("outside"));
    cell = Math.max(10, Math.min(18, Math.floor(400 / Math.max(nq, nk, 1))));
    canvas.width = nk * cell;
    canvas.height = nq * cell;
    canvas.style.width = `${nk * cell}px`;
    canvas.style.height = `${nq * cell}px`;
    Object.assign(canvas.dataset, { rows: nq, cols: nk, q0, k0, layer: model.get("layer"), head: model.get("head"),
                                    cell });
    const rmax = rowMaxes(nq, nk);
    const ctx = canvas.getContext("2d");
    for (let i = 0; i < nq; i++) {
      for (let j = 0; j < nk; j++) {
        ctx.fillStyle = css(cellColour(values[i * nk + j], scale, signed, rmax[i]));
        ctx.fillRect(j * cell, i * cell, cell, cell);
      }
    }
    const query = model.get("query");
    if (query >= q0 && query < q0 + nq) {
      ctx.strokeStyle = theme.dark ? "#ff8080" : "#d03030";
      ctx.lineWidth = 2;
      ctx.strokeRect(1, (query - q0) * cell + 1, nk * cell - 2, cell - 2);
    }
    // weight outside the key window: a grey bar per row, left half = before the window, right half = after
    outCanvas.width = 24;
    outCanvas.height = Math.max(1, nq * cell);
    outCanvas.style.height = `${nq * cell}px`;
    const oc = outCanvas.getContext("2d");
    oc.fillStyle = theme.dark ? "#888" : "#777";
    for (let i = 0; i < nq && out.length >= 2 * nq; i++) {
      const l = Math.min(1, Math.abs(out[2 * i])), r = Math.min(1, Math.abs(out[2 * i + 1]));
      oc.fillRect(11 - Math.round(11 * l), i * cell + 2, Math.round(11 * l), cell - 4);
      oc.fillRect(13, i * cell + 2, Math.round(11 * r), cell - 4);
    }
    const font = `${Math.max(9, Math.min(11, cell - 2))}px`;
    clear(klabels);
    klabels.style.width = `${nk * cell}px`;
    for (let j = 0; j < nk; j++) {
      const t = tokens[k0 + j] || { text: "" };
      const l = node("div", "wb-klabel", t.text);
      l.style.width = `${cell}px`;
      l.style.fontSize = font;
      l.style.lineHeight = `${cell}px`;
      klabels.appendChild(l);
    }
    clear(qlabels);
    qlabels.style.height = `${nq * cell}px`;
    for (let i = 0; i < nq; i++) {
      const t = tokens[q0 + i] || { text: "" };
      const l = node("div", "wb-qlabel" + (q0 + i === query ? " wb-query" : ""), t.text);
      l.dataset.q = String(q0 + i);
      l.style.height = `${cell}px`;
      l.style.lineHeight = `${cell}px`;
      l.style.fontSize = font;
      l.addEventListener("click", () => setTrait(model, "query", q0 + i === model.get("query") ? -1 : q0 + i));
      qlabels.appendChild(l);
    }
    legend(legendBox, theme, scale, signed, signed ? "difference" : "attention weight");
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
              `${model.get("signed") ? "difference" : "weight"} ${fmt(c.w)}`], ev);
  });
  canvas.addEventListener("mouseleave", () => tip.hide());
  canvas.addEventListener("click", (ev) => {
    const c = cellAt(ev);
    if (c) setTrait(model, "query", c.q === model.get("query") ? -1 : c.q);
  });
  outCanvas.addEventListener("mousemove", (ev) => {
    const r = outCanvas.getBoundingClientRect();
    const i = Math.floor((ev.clientY - r.top) / cell);
    const out = f16(model.get("outside"));
    if (2 * i + 1 >= out.length) return tip.hide();
    tip.show([`query ${model.get("q_start") + i}: weight outside the key window`,
              `before keys ${model.get("k_start")}: ${fmt(out[2 * i])}`, `after the window: ${fmt(out[2 * i + 1])}`], ev);
  });
  outCanvas.addEventListener("mouseleave", () => tip.hide());

  function drawMinimap() {
    const T = model.get("n_tokens");
    const prof = f16(model.get("minimap"));
    const spans = JSON.parse(model.get("spans_json") || "[]");
    const width = Math.max(200, Math.min(800, (rootWidth.get() || 800) - 10));
    mini.width = width;
    mini.height = 34;
    mini.style.width = `${width}px`;
    mini.dataset.n = String(T);
    // the minimap is for sequences longer than the window (or with spans to show)
    miniBox.style.display = T > model.get("window") || spans.length ? "" : "none";
    const ctx = mini.getContext("2d");
    ctx.fillStyle = css(theme.bg);
    ctx.fillRect(0, 0, width, 34);
    const x = (p) => (p / Math.max(T, 1)) * width;
    const hues = [[230, 159, 0], [86, 180, 233], [0, 158, 115], [204, 121, 167], [213, 94, 0]];
    spans.forEach(([label, a, b], i) => {
      const c = hues[i % hues.length];
      ctx.fillStyle = `rgba(${c[0]},${c[1]},${c[2]},0.28)`;
      ctx.fillRect(x(a), 0, Math.max(1, x(b) - x(a)), 34);
      ctx.fillStyle = theme.dark ? "#eee" : "#111";
      ctx.font = "10px sans-serif";
      ctx.fillText(String(label).slice(0, 24), x(a) + 2, 10);
    });
    let top = 0;
    for (const v of prof) top = Math.max(top, Math.abs(v));
    const n = prof.length;
    ctx.fillStyle = css(theme.pos);
    for (let i = 0; i < n; i++) {
      const h = top > 0 ? Math.round(20 * Math.abs(prof[i]) / top) : 0;
      ctx.fillRect((i / n) * width, 34 - h, Math.max(1, width / n), h);
    }
    const W = model.get("window"), q0 = model.get("q_start"), k0 = model.get("k_start");
    ctx.strokeStyle = theme.dark ? "#ff8080" : "#d03030";
    ctx.lineWidth = 1.5;
    ctx.strokeRect(x(k0) + 0.5, 1, Math.max(2, x(Math.min(T, k0 + W)) - x(k0) - 1), 32);
    miniLabel.textContent = `whole sequence (${T} tokens): ${model.get("minimap_label")}` +
      (spans.length ? `; ${spans.length} spans shaded` : "") + "; click to jump";
  }
  mini.addEventListener("click", (ev) => {
    const r = mini.getBoundingClientRect();
    const T = model.get("n_tokens"), W = model.get("window");
    const p = Math.min(T - 1, Math.max(0, Math.floor(((ev.clientX - r.left) / r.width) * T)));
    const start = Math.min(Math.max(0, p - Math.floor(W / 2)), Math.max(0, T - W));
    model.set("q_start", start);
    model.set("k_start", start);
    model.set("query", p);
    model.save_changes();
  });
  mini.addEventListener("mousemove", (ev) => {
    const r = mini.getBoundingClientRect();
    const T = model.get("n_tokens");
    const p = Math.floor(((ev.clientX - r.left) / r.width) * T);
    const spans = JSON.parse(model.get("spans_json") || "[]").filter(([, a, b]) => p >= a && p < b);
    tip.show([`position ${p}`].concat(spans.map(([l, a, b]) => `${l} [${a}, ${b})`)), ev);
  });
  mini.addEventListener("mouseleave", () => tip.hide());

  strip.addEventListener("mousemove", (ev) => {
    const c = ev.target.closest(".wb-tok");
    if (!c) return tip.hide();
    const i = Number(c.dataset.index), t = st.recs[i];
    if (!t) return;
    const extra = c.dataset.weight ? [`attention from ${model.get("query")}: ${c.dataset.weight}`] : [];
    tip.show(tokenTip(t).concat(extra), ev);
  });
  strip.addEventListener("mouseleave", () => tip.hide());
  toggleTokenOnClick(strip, model, "query");

  let coloured = false;
  function drawStrip() {
    const tokens = tokensOf(model);
    const query = model.get("query");
    const row = f16(model.get("query_row"));
    hint.textContent = query >= 0 && row.length
      ? `attention of query ${query} ${JSON.stringify((tokens[query] || { text: "" }).text)} over the text`
      : "click a query token (row label, heatmap row, minimap or chip) to see where it attends";
    const first = syncStrip(strip, tokens, st, chip);
    const colour = query >= 0 && row.length > 0;
    const from = colour || coloured ? 0 : first;
    let rmax = 0;
    for (const v of row) rmax = Math.max(rmax, v);
    for (let i = from; i < st.els.length; i++) {
      const c = st.els[i][0];
      c.classList.toggle("wb-query", i === query);
      if (colour && i < row.length) {
        const rgb = colourOf(scaled(row[i], model.get("scale"), rmax), theme, false);
        c.style.background = css(rgb);
        c.style.color = inkOn(rgb);
        c.dataset.weight = fmt(row[i]);
      } else if (coloured || c.dataset.weight) {
        c.style.background = "";
        c.style.color = "";
        delete c.dataset.weight;
      }
    }
    coloured = colour;
    if (query >= 0 && st.els[query]) scrollInto(strip, st.els[query][0]);
  }

  function exportGrid() {
    const tokens = tokensOf(model);
    const [nq, nk] = model.get("pattern_shape") || [0, 0];
    const q0 = model.get("q_start"), k0 = model.get("k_start");
    const scale = model.get("scale"), signed = model.get("signed");
    const rmax = rowMaxes(nq, nk);
    const cells = [];
    for (let i = 0; i < nq; i++) {
      const r = [];
      for (let j = 0; j < nk; j++) r.push({ fill: css(cellColour(values[i * nk + j], scale, signed, rmax[i])) });
      cells.push(r);
    }
    return { title: `attention layer ${model.get("layer")} head ${model.get("head")} (${scale})`,
             rowLabels: [...Array(nq).keys()].map((i) => (tokens[q0 + i] || { text: "" }).text.slice(0, 16)),
             colLabels: [...Array(nk).keys()].map((j) => (tokens[k0 + j] || { text: "" }).text),
             cells, cellPx: cell, note: `queries ${q0}–${q0 + nq - 1}, keys ${k0}–${k0 + nk - 1} of ${model.get("n_tokens")}` };
  }

  const dirty = new Set(["all"]);
  function drawAll() {
    if (!theme || dirty.has("theme")) theme = themeOf(root);
    const all = dirty.has("all") || dirty.has("theme");
    drawHeader();
    if (all || dirty.has("overview")) drawOverview();
    if (all || dirty.has("heat")) drawHeat();
    if (all || dirty.has("mini")) drawMinimap();
    if (all || dirty.has("strip")) drawStrip();
    dirty.clear();
    root.dataset.theme = theme.dark ? "dark" : "light";
  }
  const schedule = scheduler(drawAll);
  drawAll();
  const groups = {
    overview: ["thumbs", "thumb_size", "overview_layers", "overview_start", "overview_rows", "head_scores_json",
               "score_by", "layer", "head", "n_heads", "layers"],
    heat: ["pattern", "pattern_shape", "outside", "scale", "signed", "query", "tokens_json", "tail_json", "window"],
    mini: ["minimap", "minimap_label", "spans_json", "q_start", "k_start", "n_tokens", "window"],
    strip: ["tokens_json", "tail_json", "n_committed", "query", "query_row", "scale"],
  };
  const handlers = [];
  for (const [g, names] of Object.entries(groups)) {
    for (const e of names) {
      const h = () => { dirty.add(g); schedule(); };
      model.on(`change:${e}`, h);
      handlers.push([e, h]);
    }
  }
  // follow JupyterLab's theme switches (light <-> dark): redraw the canvases with the new background
  const unwatch = watchTheme(() => { dirty.add("theme"); schedule(); });
  return () => { unwatch(); rootWidth.stop(); for (const [e, h] of handlers) model.off(`change:${e}`, h); };
}

export default { render };
