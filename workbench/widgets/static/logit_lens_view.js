// LogitLensView: rows = residual streams (layers; the model's output, resid_post of the last layer, on TOP),
// columns = positions; each cell the top next-token guess and its probability (colour), hover = top-k.
// With a target: each cell shows the target's rank (#1 = top) and probability; the title names the token and id.

function render({ model, el }) {
  const root = node("div", "wb-root wb-logitlensview");
  const head = node("div", "wb-head");
  const title = node("span", "wb-title");
  const info = node("span", "wb-muted wb-lens-info");
  const scaleSel = node("select", "wb-select wb-scale");
  for (const s of ["linear", "log"]) { const o = node("option", null, s); o.value = s; scaleSel.appendChild(o); }
  const targetBox = node("input", "wb-target-input");
  targetBox.type = "text";
  targetBox.placeholder = "target token (text or id)";
  targetBox.size = 16;
  const trackBtn = node("button", "wb-track", "track");
  const altBtn = node("button", "wb-target-alt");
  const pan = node("input", "wb-pan wb-lens-pan");
  pan.type = "range";
  pan.min = "0";
  pan.step = "1";
  const panVal = node("span", "wb-pan-value");
  const error = node("span", "wb-error");
  const [pngBtn, svgBtn] = exportButtons(root, "logit_lens", () => exportGrid());
  head.append(title, info, node("span", "wb-muted", "scale"), scaleSel, targetBox, trackBtn, altBtn, pan, panVal,
              pngBtn, svgBtn, error);
  const legendBox = node("div", "wb-legend");
  const scroll = node("div", "wb-lens-scroll");
  const table = node("table", "wb-lens");
  scroll.appendChild(table);
  root.append(head, legendBox, scroll);
  el.appendChild(root);
  const tip = makeTip(root);
  let theme = null;
  let grid = null;
  let themeDirty = true;

  trackBtn.addEventListener("click", () => setTrait(model, "target_text", targetBox.value));
  targetBox.addEventListener("keydown", (ev) => { if (ev.key === "Enter") trackBtn.click(); });
  altBtn.addEventListener("click", () => {
    const alt = JSON.parse(model.get("target_alt_json") || "null");
    if (alt) { targetBox.value = String(alt.id); setTrait(model, "target_text", String(alt.id)); }
  });
  scaleSel.addEventListener("change", () => setTrait(model, "scale", scaleSel.value));
  pan.addEventListener("input", () => { panVal.textContent = pan.value; });
  pan.addEventListener("change", () => setTrait(model, "pos_start", parseInt(pan.value, 10)));

  function draw() {
    if (themeDirty || !theme) { theme = themeOf(root); themeDirty = false; }
    const labels = model.get("row_labels") || [];
    const tokens = tokensOf(model); // the shown window only: tokens[p - pos_start]
    const p0 = model.get("pos_start");
    const total = model.get("n_positions");
    const at = (p) => tokens[p - p0] || { text: "" };
    const positions = model.get("positions") || [];
    const k = model.get("k");
    const ids = i32(model.get("top_ids"));
    const probs = f16(model.get("top_probs"));
    const tprobs = f32(model.get("target_probs"));
    const tranks = i32(model.get("target_ranks"));
    const idText = model.get("id_text") || {};
    const target = model.get("target");
    const scale = model.get("scale");
    const selected = model.get("selected");
    const rows = labels.length, cols = positions.length;
    const tracking = target >= 0 && tprobs.length === rows * cols;
    const tLabel = JSON.stringify(model.get("target_label"));
    title.textContent = tracking ? `logit lens · target ${tLabel} (id ${target}): p and rank per cell` : "logit lens";
    info.textContent = cols ? `positions ${positions[0]}–${positions[cols - 1]} of ${total}` : "no positions";
    error.textContent = model.get("error") || "";
    const alt = JSON.parse(model.get("target_alt_json") || "null");
    altBtn.style.display = alt && alt.id !== target ? "" : "none";
    if (alt) altBtn.textContent = `track ${JSON.stringify(alt.label)} (id ${alt.id}) instead`;
    scaleSel.value = scale;
    const W = model.get("window");
    pan.style.display = panVal.style.display = total > W ? "" : "none";
    pan.max = String(Math.max(0, total - W));
    pan.value = panVal.textContent = String(model.get("pos_start"));
    legend(legendBox, theme, scale, false, tracking ? `p(${model.get("target_label")})` : "top-1 probability");
    clear(table);
    grid = null;
    if (ids.length < rows * cols * k) return;
    // fit the notebook: cells shrink (down to 34 px) before the table scrolls
    const avail = Math.max(300, (width.get() || 900) - 100);
    const cw = Math.max(34, Math.min(58, Math.floor(avail / Math.max(cols, 1))));
    table.style.width = `${cw * cols + 96}px`;
    const hr = node("tr");
    const corner = node("th", "wb-corner", "layer \\ input");
    corner.style.width = "96px";
    hr.appendChild(corner);
    for (const p of positions) {
      const th = node("th", "wb-poslabel" + (p === selected ? " wb-selected" : ""));
      th.dataset.pos = String(p);
      th.style.width = `${cw}px`;
      th.appendChild(node("div", "wb-poslabel-text", at(p).text));
      th.appendChild(node("div", "wb-muted", p));
      th.addEventListener("click", () => setTrait(model, "selected", p === model.get("selected") ? -1 : p));
      hr.appendChild(th);
    }
    table.appendChild(hr);
    grid = { rows: [], cells: [] };
    for (let r = rows - 1; r >= 0; r--) { // last layer (the model's output) on top: the stream flows upwards
      const tr = node("tr");
      tr.appendChild(node("th", "wb-rowlabel", labels[r]));
      const gcells = [];
      for (let c = 0; c < cols; c++) {
        const base = (r * cols + c) * k;
        const topId = ids[base];
        const p = probs[base];
        const tp = tracking ? tprobs[r * cols + c] : p;
        const rank = tracking ? tranks[r * cols + c] : 0;
        const rgb = colourOf(scaled(tp, scale, 1), theme, false);
        const td = node("td", "wb-lens-cell" + (positions[c] === selected ? " wb-selected" : ""));
        Object.assign(td.dataset, { row: r, pos: positions[c], id: topId, prob: fmt(p) });
        if (tracking) { td.dataset.target = String(tp); td.dataset.rank = String(rank); }
        td.style.background = css(rgb);
        td.style.color = inkOn(rgb);
        const main = tracking ? `#${rank + 1}` : (idText[String(topId)] ?? String(topId));
        td.appendChild(node("span", "wb-text", main));
        td.appendChild(node("span", "wb-p", fmt(tp)));
        td.addEventListener("mousemove", (ev) => {
          const lines = [`${labels[r]} · position ${positions[c]} ${JSON.stringify(at(positions[c]).text)}`];
          if (tracking) lines.push(`target ${tLabel} (id ${target}): p ${fmt(tp)}, rank ${rank + 1}`);
          for (let j = 0; j < k; j++) {
            lines.push(`${j + 1}. ${JSON.stringify(idText[String(ids[base + j])] ?? String(ids[base + j]))} ${fmt(probs[base + j])}`);
          }
          tip.show(lines, ev);
        });
        td.addEventListener("mouseleave", () => tip.hide());
        tr.appendChild(td);
        gcells.push({ fill: css(rgb), ink: inkOn(rgb), text: main });
      }
      table.appendChild(tr);
      grid.rows.push(labels[r]);
      grid.cells.push(gcells);
    }
    grid.cols = positions.map((p) => at(p).text);
    const sel = table.querySelector("th.wb-selected");
    if (sel) scrollInto(scroll, sel);
  }

  function exportGrid() {
    const g = grid || { rows: [], cells: [], cols: [] };
    const tracking = model.get("target") >= 0;
    return { title: tracking ? `logit lens: p(${model.get("target_label")}) and rank (${model.get("scale")})`
                             : `logit lens: top-1 and its probability (${model.get("scale")})`,
             rowLabels: g.rows, colLabels: g.cols, cells: g.cells, cellPx: 18, cellW: 46,
             note: `positions ${model.get("pos_start")}– of ${model.get("n_positions")}` };
  }

  const schedule = scheduler(draw);
  const width = widthOf(root, schedule);
  draw();
  const events = ["row_labels", "tokens_json", "n_positions", "positions", "top_ids", "top_probs", "target_probs",
                  "target_ranks", "id_text", "target", "target_alt_json", "error", "pos_start", "window", "scale",
                  "selected"];
  for (const e of events) model.on(`change:${e}`, schedule);
  const unwatch = watchTheme(() => { themeDirty = true; schedule(); });
  return () => { unwatch(); width.stop(); for (const e of events) model.off(`change:${e}`, schedule); };
}

export default { render };
