// ContextView: the reply with its spans; hover or click a span to rank the documents by each method.
// Self-contained (no shared helpers); text only ever reaches the DOM through textContent.

function el_(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function clear_(e) {
  while (e.firstChild) e.removeChild(e.firstChild);
}

// A translucent blue over the theme's background; the text keeps the theme's colour (readable on both themes).
function shade(p) {
  p = Math.min(Math.max(p || 0, 0), 1);
  return `rgba(49,90,180,${(0.45 * p).toFixed(3)})`;
}

function render({ model, el }) {
  const root = el_("div", "wb-root wb-contextview");
  const head = el_("div", "wb-head");
  const title = el_("span", "wb-title");
  const pick = el_("select", "wb-select");
  head.append(title, el_("span", "wb-muted", "shade by"), pick);
  const reply = el_("div", "wb-cv-response");
  const panel = el_("div", "wb-cv-panel");
  root.append(head, reply, panel);
  el.appendChild(root);
  let hover = -1;

  function data() {
    try { return JSON.parse(model.get("data_json") || "{}"); } catch (e) { return {}; }
  }

  function drawReply(d) {
    clear_(reply);
    const text = d.response || "";
    let at = 0;
    (d.spans || []).forEach((s, i) => {
      if (s.start > at) reply.appendChild(document.createTextNode(text.slice(at, s.start)));
      const e = el_("span", "wb-cv-span", text.slice(s.start, s.end));
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
    clear_(panel);
    const s = hover >= 0 ? hover : model.get("selected");
    if (s < 0 || !d.spans || !d.spans[s]) {
      panel.appendChild(el_("div", "wb-muted", "hover or click a span of the reply"));
      return;
    }
    const span = d.spans[s];
    const line = el_("div");
    if (span.label) line.appendChild(el_("span", "wb-cv-label", span.label));
    line.appendChild(el_("span", "wb-cv-span", span.text));
    panel.appendChild(line);
    const method = d.methods[model.get("method")] || d.methods[d.order[0]];
    const row = method.scores[s];
    const hi = Math.max(...row.map((x) => Math.max(x, 0)), 1e-9);
    const table = el_("table", "wb-cv-table");
    const th = el_("tr");
    ["doc", "title"].concat(d.order).concat(["model"]).forEach((h) => th.appendChild(el_("th", "", h)));
    table.appendChild(th);
    method.ranks[s].forEach((i) => {
      const doc = d.documents[i];
      const tr = el_("tr");
      tr.style.background = shade(Math.max(row[i], 0) / hi * 0.8);
      tr.title = doc.text;
      tr.className = "wb-cv-doc" + (i === method.ranks[s][0] ? " wb-cv-top" : "");
      tr.dataset.doc = String(i);
      tr.append(el_("td", "", String(i)), el_("td", "", doc.title));
      d.order.forEach((m) => {
        const r = d.methods[m].ranks[s].indexOf(i) + 1;
        tr.appendChild(el_("td", "", `#${r} (${d.methods[m].scores[s][i].toPrecision(3)})`));
      });
      tr.appendChild(el_("td", d.citations[s][i] ? "wb-cv-cited" : "", d.citations[s][i] ? "\u2713 cited" : ""));
      table.appendChild(tr);
    });
    panel.appendChild(table);
    const flags = d.order.filter((m) => d.methods[m].disagree[s]);
    if (flags.length) panel.appendChild(el_("div", "wb-cv-flag", `top document not cited by the span: ${flags.join(", ")}`));
  }

  function draw() {
    const d = data();
    title.textContent = model.get("title") || "";
    clear_(pick);
    (d.order || []).forEach((m) => {
      const o = el_("option", "", m);
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
