// ContextView: the reply with its spans; hover or click a span to rank the documents by each method.
// Uses _common.js's node() and clear() (prepended by the Python side); text only ever reaches the DOM through
// textContent.

// A translucent blue over the theme's background; the text keeps the theme's colour (readable on both themes).
function shade(p) {
  p = Math.min(Math.max(p || 0, 0), 1);
  return `rgba(49,90,180,${(0.45 * p).toFixed(3)})`;
}

function render({ model, el }) {
  const root = node("div", "wb-root wb-contextview");
  const head = node("div", "wb-head");
  const title = node("span", "wb-title");
  const pick = node("select", "wb-select");
  head.append(title, node("span", "wb-muted", "shade by"), pick);
  const reply = node("div", "wb-cv-response");
  const panel = node("div", "wb-cv-panel");
  root.append(head, reply, panel);
  el.appendChild(root);
  let hover = -1;

  function data() {
    try { return JSON.parse(model.get("data_json") || "{}"); } catch (e) { return {}; }
  }

  function drawReply(d) {
    clear(reply);
    const text = d.response || "";
    let at = 0;
    (d.spans || []).forEach((s, i) => {
      if (s.start > at) reply.appendChild(document.createTextNode(text.slice(at, s.start)));
      const e = node("span", "wb-cv-span", text.slice(s.start, s.end));
      if (i === model.get("selected")) e.classList.add("wb-cv-active");
      const m = (d.methods || {})[model.get("method")];
      if (m && m.disagree[i]) e.classList.add("wb-cv-disagree");
      e.addEventListener("mouseenter", () => { hover = i; drawPanel(d); });
      e.addEventListener("mouseleave", () => { hover = -1; drawPanel(d); });
      e.addEventListener("click", () => {
        model.set("selected", i === model.get("selected") ? -1 : i);
        model.save_changes();
      });
      reply.appendChild(e);
      at = Math.max(at, s.end);
    });
    if (at < text.length) reply.appendChild(document.createTextNode(text.slice(at)));
  }

  function drawPanel(d) {
    clear(panel);
    const s = hover >= 0 ? hover : model.get("selected");
    if (s < 0 || !d.spans || !d.spans[s]) {
      panel.appendChild(node("div", "wb-muted", "hover or click a span of the reply"));
      return;
    }
    const span = d.spans[s];
    const line = node("div");
    if (span.label) line.appendChild(node("span", "wb-cv-label", span.label));
    line.appendChild(node("span", "wb-cv-span", span.text));
    panel.appendChild(line);
    const method = d.methods[model.get("method")] || d.methods[d.order[0]];
    const row = method.scores[s];
    const hi = Math.max(...row.map((x) => Math.max(x, 0)), 1e-9);
    const table = node("table", "wb-cv-table");
    const th = node("tr");
    ["doc", "title"].concat(d.order).concat(["model"]).forEach((h) => th.appendChild(node("th", "", h)));
    table.appendChild(th);
    method.ranks[s].forEach((i) => {
      const doc = d.documents[i];
      const tr = node("tr");
      tr.style.background = shade(Math.max(row[i], 0) / hi * 0.8);
      tr.title = doc.text;
      tr.className = "wb-cv-doc" + (i === method.ranks[s][0] ? " wb-cv-top" : "");
      tr.dataset.doc = String(i);
      tr.append(node("td", "", String(i)), node("td", "", doc.title));
      d.order.forEach((m) => {
        const r = d.methods[m].ranks[s].indexOf(i) + 1;
        tr.appendChild(node("td", "", `#${r} (${d.methods[m].scores[s][i].toPrecision(3)})`));
      });
      tr.appendChild(node("td", d.citations[s][i] ? "wb-cv-cited" : "", d.citations[s][i] ? "\u2713 cited" : ""));
      table.appendChild(tr);
    });
    panel.appendChild(table);
    const flags = d.order.filter((m) => d.methods[m].disagree[s]);
    if (flags.length) panel.appendChild(node("div", "wb-cv-flag", `top document not cited by the span: ${flags.join(", ")}`));
  }

  function draw() {
    const d = data();
    title.textContent = model.get("title") || "";
    clear(pick);
    (d.order || []).forEach((m) => {
      const o = node("option", "", m);
      o.value = m;
      if (m === model.get("method")) o.selected = true;
      pick.appendChild(o);
    });
    drawReply(d);
    drawPanel(d);
  }

  pick.addEventListener("change", () => { model.set("method", pick.value); model.save_changes(); });
  draw();
  const names = ["change:data_json", "change:selected", "change:method", "change:title"];
  names.forEach((n) => model.on(n, draw));
  return () => names.forEach((n) => model.off(n, draw));
}

export default { render };
