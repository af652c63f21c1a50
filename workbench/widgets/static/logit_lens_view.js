// LogitLensView: rows = residual streams (layers), columns = positions; each cell the top next-token guess and its
// probability (colour), hover = top-k. With a target, colour = the target token's probability.

function render({ model, el }) {
  const root = node("div", "wb-root wb-logitlensview");
  const head = node("div", "wb-head");
  const title = node("span", "wb-title");
  const info = node("span", "wb-muted wb-lens-info");
  const targetBox = node("input", "wb-target-input");
  targetBox.type = "text";
  targetBox.placeholder = "target token (text or id)";
  targetBox.size = 18;
  const trackBtn = node("button", "wb-track", "track");
  const pan = node("input", "wb-pan wb-lens-pan");
  pan.type = "range";
  pan.min = "0";
  pan.step = "1";
  const error = node("span", "wb-error");
  head.append(title, info, targetBox, trackBtn, pan, error);
  const scroll = node("div", "wb-lens-scroll");
  const table = node("table", "wb-lens");
  scroll.appendChild(table);
  root.append(head, scroll);
  el.appendChild(root);
  const tip = makeTip(root);

  trackBtn.addEventListener("click", () => { model.set("target_text", targetBox.value); model.save_changes(); });
  targetBox.addEventListener("keydown", (ev) => { if (ev.key === "Enter") trackBtn.click(); });
  pan.addEventListener("change", () => { model.set("pos_start", parseInt(pan.value, 10)); model.save_changes(); });

  function draw() {
    const labels = model.get("row_labels") || [];
    const tokens = tokensOf(model); // the shown window only: tokens[p - pos_start]
    const p0 = model.get("pos_start");
    const total = model.get("n_positions");
    const at = (p) => tokens[p - p0] || { text: "" };
    const positions = model.get("positions") || [];
    const k = model.get("k");
    const ids = i32(model.get("top_ids"));
    const probs = f16(model.get("top_probs"));
    const tprobs = f16(model.get("target_probs"));
    const idText = model.get("id_text") || {};
    const target = model.get("target");
    const rows = labels.length, cols = positions.length;
    const tracking = target >= 0 && tprobs.length === rows * cols;
    title.textContent = tracking ? `logit lens · target ${JSON.stringify(model.get("target_label"))}` : "logit lens";
    info.textContent = cols ? `positions ${positions[0]}–${positions[cols - 1]} of ${total}` : "no positions";
    error.textContent = model.get("error") || "";
    const W = model.get("window");
    pan.style.display = total > W ? "" : "none";
    pan.max = String(Math.max(0, total - W));
    pan.value = String(model.get("pos_start"));
    clear(table);
    if (ids.length < rows * cols * k) return;
    const hr = node("tr");
    hr.appendChild(node("th", "wb-corner", "layer \\ input"));
    for (const p of positions) {
      const th = node("th", "wb-poslabel");
      th.dataset.pos = String(p);
      th.appendChild(node("div", null, at(p).text));
      th.appendChild(node("div", "wb-muted", p));
      hr.appendChild(th);
    }
    table.appendChild(hr);
    for (let r = rows - 1; r >= 0; r--) { // last layer on top, as the stream flows upwards
      const tr = node("tr");
      tr.appendChild(node("th", "wb-rowlabel", labels[r]));
      for (let c = 0; c < cols; c++) {
        const base = (r * cols + c) * k;
        const topId = ids[base];
        const p = probs[base];
        const shade = tracking ? tprobs[r * cols + c] : p;
        const td = node("td", "wb-lens-cell");
        Object.assign(td.dataset, { row: r, pos: positions[c], id: topId, prob: fmt(p) });
        if (tracking) td.dataset.target = fmt(shade);
        td.style.background = blue(shade);
        td.style.color = inkFor(shade);
        td.appendChild(node("span", "wb-text", idText[String(topId)] ?? String(topId)));
        td.appendChild(node("span", "wb-p", fmt(shade)));
        td.addEventListener("mousemove", (ev) => {
          const lines = [`${labels[r]} · position ${positions[c]} ${JSON.stringify(at(positions[c]).text)}`];
          for (let j = 0; j < k; j++) {
            lines.push(`${j + 1}. ${JSON.stringify(idText[String(ids[base + j])] ?? String(ids[base + j]))} ${fmt(probs[base + j])}`);
          }
          if (tracking) lines.push(`target ${JSON.stringify(model.get("target_label"))} ${fmt(shade)}`);
          tip.show(lines, ev);
        });
        td.addEventListener("mouseleave", () => tip.hide());
        tr.appendChild(td);
      }
      table.appendChild(tr);
    }
  }

  draw();
  let pending = false;
  const schedule = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; draw(); });
  };
  const events = ["row_labels", "tokens_json", "n_positions", "positions", "top_ids", "top_probs", "target_probs", "id_text", "target",
                  "error", "pos_start", "window"];
  for (const e of events) model.on(`change:${e}`, schedule);
  return () => { for (const e of events) model.off(`change:${e}`, schedule); };
}

export default { render };
