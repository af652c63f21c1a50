// Helpers shared by every view; prepended as text to each view's module (no imports, no build step).
// Rule: token text only ever reaches the DOM through textContent (node() below); no HTML string parsing anywhere.

function node(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function clear(e) {
  while (e.firstChild) e.removeChild(e.firstChild);
}

// anywidget hands binary traits over as a DataView; accept ArrayBuffer / typed arrays as well.
function bytesOf(v) {
  if (!v) return new Uint8Array(0);
  if (v instanceof DataView) return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  if (v instanceof ArrayBuffer) return new Uint8Array(v);
  if (ArrayBuffer.isView(v)) return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  return new Uint8Array(0);
}

// IEEE half -> float, little-endian (Float16Array is not available in every browser yet).
function f16(v) {
  const b = bytesOf(v);
  const n = b.length >> 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const h = b[2 * i] | (b[2 * i + 1] << 8);
    const s = h & 0x8000 ? -1 : 1;
    const e = (h >> 10) & 0x1f;
    const m = h & 0x3ff;
    if (e === 0) out[i] = s * m * 5.960464477539063e-8;
    else if (e === 31) out[i] = m ? NaN : s * Infinity;
    else out[i] = s * (1 + m / 1024) * Math.pow(2, e - 15);
  }
  return out;
}

function f32(v) {
  const b = new Uint8Array(bytesOf(v)); // aligned copy
  return new Float32Array(b.buffer, 0, b.length >> 2);
}

function u8(v) {
  return bytesOf(v);
}

function i32(v) {
  const b = bytesOf(v);
  const copy = new Uint8Array(b); // aligned copy
  return new Int32Array(copy.buffer, 0, copy.length >> 2);
}

// ------------------------------------------------------------------------------------------------ theme
// Colours follow JupyterLab's theme: the page background (walked up from the view) is the colour of 0, and text
// on a cell is black or white, whichever contrasts more with the cell (at least 4.58:1 for any colour).
function parseRGB(s) {
  const m = /rgba?\(([^)]+)\)/.exec(s || "");
  if (!m) return null;
  const p = m[1].split(/[\s,/]+/).filter(Boolean).map(Number);
  return { rgb: [p[0], p[1], p[2]], a: p.length > 3 ? p[3] : 1 };
}

function backgroundOf(el) {
  for (let e = el; e && e.nodeType === 1; e = e.parentElement) {
    const c = parseRGB(getComputedStyle(e).backgroundColor);
    if (c && c.a > 0.5) return c.rgb;
  }
  return [255, 255, 255];
}

function luminance(rgb) {
  const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); };
  return 0.2126 * f(rgb[0]) + 0.7152 * f(rgb[1]) + 0.0722 * f(rgb[2]);
}

// Reading computed styles forces the browser to recompute the page's styles, so views call this once when they
// are drawn first and again only when JupyterLab's theme changes (watchTheme), never per frame.
function themeOf(el) {
  const bg = backgroundOf(el);
  const dark = luminance(bg) < 0.2;
  return { bg, dark, pos: dark ? [120, 190, 255] : [33, 90, 180], neg: dark ? [255, 130, 110] : [190, 40, 40] };
}

function mix(a, b, t) {
  return [0, 1, 2].map((i) => Math.round(a[i] + (b[i] - a[i]) * t));
}

// Call fn whenever JupyterLab switches theme; returns a function that stops watching.
function watchTheme(fn) {
  const obs = new MutationObserver(fn);
  obs.observe(document.body, { attributes: true, attributeFilter: ["data-jp-theme-light", "data-jp-theme-name"] });
  return () => obs.disconnect();
}

// The element's width, kept up to date by a ResizeObserver (reading clientWidth while drawing forces a layout of
// the whole notebook). Returns {get(), stop()}.
function widthOf(el, onChange) {
  let w = 0;
  const ro = new ResizeObserver((entries) => {
    const nw = Math.round(entries[0].contentRect.width);
    if (nw !== w) { w = nw; if (onChange) onChange(); }
  });
  ro.observe(el);
  return { get: () => w, stop: () => ro.disconnect() };
}

// value in [0, 1] (or [-1, 1] when signed) -> [r, g, b]
function colourOf(v, theme, signed) {
  if (!(v === v)) v = 0; // NaN
  if (signed) return v >= 0 ? mix(theme.bg, theme.pos, Math.min(v, 1)) : mix(theme.bg, theme.neg, Math.min(-v, 1));
  return mix(theme.bg, theme.pos, Math.min(Math.max(v, 0), 1));
}

function css(rgb) {
  return `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;
}

function inkOn(rgb) {
  const L = luminance(rgb);
  return (L + 0.05) / 0.05 >= 1.05 / (L + 0.05) ? "#000" : "#fff";
}

// linear | log (1e-6 … 1) | row (divided by the row's maximum): value -> [0, 1] colour position
const LOG_FLOOR = 1e-6;
function scaled(v, scale, rowMax) {
  if (scale === "log") return v <= LOG_FLOOR ? 0 : Math.min(1, (Math.log10(v) + 6) / 6);
  if (scale === "row") return rowMax > 0 ? v / rowMax : 0;
  return v;
}

// Three decimals, or scientific notation for small non-zero magnitudes (never a misleading 0.000).
function fmt(p) {
  if (p === undefined || Number.isNaN(p)) return "–";
  if (p !== 0 && Math.abs(p) < 1e-3) return p.toExponential(1);
  return p.toFixed(Math.abs(p) >= 0.995 ? 2 : 3);
}

// A colourbar: gradient canvas and the values at its ends (and middle).
function legend(box, theme, scale, signed, label) {
  clear(box);
  const c = node("canvas", "wb-legend-bar");
  c.width = 120;
  c.height = 10;
  const ctx = c.getContext("2d");
  for (let x = 0; x < 120; x++) {
    const t = x / 119;
    ctx.fillStyle = css(colourOf(signed ? 2 * t - 1 : t, theme, signed));
    ctx.fillRect(x, 0, 1, 10);
  }
  let lo = "0", mid = "0.5", hi = "1";
  if (signed) { lo = "−1"; mid = "0"; hi = "+1"; }
  else if (scale === "log") { lo = "≤1e-6"; mid = "1e-3"; hi = "1"; }
  else if (scale === "row") { lo = "0"; mid = "½ row max"; hi = "row max"; }
  box.append(node("span", "wb-legend-lo", lo), c, node("span", "wb-legend-hi", hi),
             node("span", "wb-muted wb-legend-mid", `(middle ${mid}; ${scale}${label ? "; " + label : ""})`));
}

// ------------------------------------------------------------------------------------------------ tooltip
// A tooltip owned by one view, kept inside the viewport (flipped left/up at the edges).
function makeTip(root) {
  const tip = node("div", "wb-tip");
  tip.style.display = "none";
  root.appendChild(tip);
  return {
    show(lines, ev) {
      clear(tip);
      for (const line of lines) tip.appendChild(node("div", "wb-tip-line", line));
      tip.style.display = "block";
      tip.style.left = "0px";
      tip.style.top = "0px";
      const r = root.getBoundingClientRect();
      const t = tip.getBoundingClientRect();
      const vw = document.documentElement.clientWidth || window.innerWidth;
      const vh = document.documentElement.clientHeight || window.innerHeight;
      let x = ev.clientX + 14, y = ev.clientY + 14;
      if (x + t.width > vw - 4) x = Math.max(4, ev.clientX - 14 - t.width);
      if (y + t.height > vh - 4) y = Math.max(4, ev.clientY - 14 - t.height);
      tip.style.left = `${x - r.left}px`;
      tip.style.top = `${y - r.top}px`;
    },
    hide() {
      tip.style.display = "none";
    },
    el: tip,
  };
}

function tokenTip(t) {
  const lines = [`id ${t.id}`, `bytes ${t.hex || "—"}`, `chars [${t.start}, ${t.end}) ${JSON.stringify(t.chars)}`];
  if (t.special) lines.push("special token");
  if (t.partial) lines.push("partial UTF-8: shares its character with a neighbouring token");
  return lines;
}

// ------------------------------------------------------------------------------------------------ tokens
// Invisible characters named, as in the Python records (a chip must never look empty).
const INVISIBLE = { "\u200b": "⟨ZWSP⟩", "\u200c": "⟨ZWNJ⟩", "\u200d": "⟨ZWJ⟩", "\u2060": "⟨WJ⟩", "\ufeff": "⟨BOM⟩",
                    "\u00ad": "⟨SHY⟩", "\u200e": "⟨LRM⟩", "\u200f": "⟨RLM⟩", "\u034f": "⟨CGJ⟩" };
function visibleChars(s) {
  return Array.from(String(s), (c) => INVISIBLE[c] || c).join("");
}

// One token chip: readable text (visible whitespace), the character it helps spell when partial, and its id.
function chip(t, index) {
  const c = node("span", "wb-tok" + (t.special ? " wb-special" : "") + (t.partial ? " wb-partial" : ""));
  c.dataset.index = String(index);
  c.dataset.id = String(t.id);
  c.appendChild(node("span", "wb-text", t.text));
  if (t.partial) c.appendChild(node("span", "wb-chars", visibleChars(t.chars)));
  c.appendChild(node("span", "wb-id", t.id));
  return c;
}

// Token records arrive as a committed prefix (tokens_json) plus a streamed tail (tail_json), each one JSON string;
// each string is parsed once.
const _parsed = new WeakMap();
function parsedOnce(model, key) {
  const s = model.get(key) || "[]";
  let hit = _parsed.get(model);
  if (!hit) { hit = {}; _parsed.set(model, hit); }
  if (hit[key] && hit[key].s === s) return hit[key].v;
  const v = JSON.parse(s);
  hit[key] = { s, v };
  return v;
}

function tokensOf(model) {
  const base = parsedOnce(model, "tokens_json");
  if (model.get("tail_json") === undefined) return base;
  const tail = parsedOnce(model, "tail_json");
  if (!tail.length) return base;
  const hit = _parsed.get(model);
  if (hit.joined && hit.joined.base === base && hit.joined.tail === tail) return hit.joined.v;
  const v = base.slice(0, model.get("n_committed")).concat(tail);
  hit.joined = { base, tail, v };
  return v;
}

function sameTok(a, b) {
  return a.id === b.id && a.text === b.text && a.chars === b.chars && a.start === b.start && a.partial === b.partial
    && a.newline === b.newline && a.special === b.special;
}

// Keep a container's chips in step with `tokens`, touching only what changed (streaming appends a few chips,
// it does not rebuild a thousand). make(t, i) -> the chip; returns the first index rebuilt.
function syncStrip(box, tokens, st, make) {
  let i = 0;
  const n = Math.min(st.recs.length, tokens.length);
  while (i < n && sameTok(st.recs[i], tokens[i])) i++;
  for (let j = st.els.length - 1; j >= i; j--) for (const e of st.els[j]) e.remove();
  st.els.length = i;
  st.recs.length = i;
  const frag = document.createDocumentFragment();
  for (let j = i; j < tokens.length; j++) {
    const els = [make(tokens[j], j)];
    if (tokens[j].newline) els.push(node("span", "wb-break"));
    for (const e of els) frag.appendChild(e);
    st.els.push(els);
    st.recs.push(tokens[j]);
  }
  box.appendChild(frag);
  return i;
}

// Scroll a scrolling container (not the page) so that `child` is visible.
function scrollInto(box, child) {
  if (!child) return;
  const b = box.getBoundingClientRect(), c = child.getBoundingClientRect();
  if (c.top < b.top) box.scrollTop -= b.top - c.top + 4;
  else if (c.bottom > b.bottom) box.scrollTop += c.bottom - b.bottom + 4;
  if (c.left < b.left) box.scrollLeft -= b.left - c.left + 4;
  else if (c.right > b.right) box.scrollLeft += c.right - b.right + 4;
}

// ------------------------------------------------------------------------------------------------ export
// A grid picture described as {title, rowLabels, colLabels, cells: [[{fill, ink, text}]], note} -> SVG or PNG,
// drawn in the browser and downloaded (no server, no network). Text goes in with textContent / fillText.
function gridGeometry(g) {
  const cell = g.cellPx || 14, wRow = 8 + 7 * Math.max(4, ...g.rowLabels.map((s) => String(s).length));
  const hCol = 8 + 6 * Math.min(14, Math.max(1, ...g.colLabels.map((s) => String(s).length)));
  const cw = g.cellW || cell;
  return { cell, cw, wRow, hCol, top: 22, width: wRow + cw * g.colLabels.length + 10,
           height: 22 + hCol + cell * g.rowLabels.length + (g.note ? 18 : 6) };
}

function gridSVG(g, theme) {
  const NS = "http://www.w3.org/2000/svg";
  const geo = gridGeometry(g);
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("xmlns", NS);
  svg.setAttribute("width", geo.width);
  svg.setAttribute("height", geo.height);
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = String(text);
    svg.appendChild(e);
    return e;
  };
  const fg = theme.dark ? "#eee" : "#111";
  el("rect", { x: 0, y: 0, width: geo.width, height: geo.height, fill: css(theme.bg) });
  el("text", { x: 4, y: 15, fill: fg, "font-family": "sans-serif", "font-size": 12 }, g.title);
  g.colLabels.forEach((s, j) => {
    const x = geo.wRow + j * geo.cw + geo.cw / 2, y = geo.top + geo.hCol - 4;
    el("text", { x, y, fill: fg, "font-family": "monospace", "font-size": 10, transform: `rotate(-90 ${x} ${y})` },
       String(s).slice(0, 14));
  });
  g.rowLabels.forEach((s, i) => {
    el("text", { x: geo.wRow - 4, y: geo.top + geo.hCol + i * geo.cell + geo.cell * 0.7, fill: fg,
                 "text-anchor": "end", "font-family": "monospace", "font-size": 10 }, s);
    g.cells[i].forEach((c, j) => {
      el("rect", { x: geo.wRow + j * geo.cw, y: geo.top + geo.hCol + i * geo.cell, width: geo.cw, height: geo.cell,
                   fill: c.fill });
      if (c.text) {
        el("text", { x: geo.wRow + j * geo.cw + geo.cw / 2, y: geo.top + geo.hCol + i * geo.cell + geo.cell * 0.7,
                     fill: c.ink, "text-anchor": "middle", "font-family": "monospace", "font-size": 9 },
           String(c.text).slice(0, 8));
      }
    });
  });
  if (g.note) el("text", { x: 4, y: geo.height - 5, fill: fg, "font-family": "sans-serif", "font-size": 10 }, g.note);
  return new XMLSerializer().serializeToString(svg);
}

function gridPNG(g, theme, done) {
  const geo = gridGeometry(g);
  const c = document.createElement("canvas");
  c.width = geo.width;
  c.height = geo.height;
  const ctx = c.getContext("2d");
  const fg = theme.dark ? "#eee" : "#111";
  ctx.fillStyle = css(theme.bg);
  ctx.fillRect(0, 0, geo.width, geo.height);
  ctx.fillStyle = fg;
  ctx.font = "12px sans-serif";
  ctx.fillText(g.title, 4, 15);
  ctx.font = "10px monospace";
  g.colLabels.forEach((s, j) => {
    ctx.save();
    ctx.translate(geo.wRow + j * geo.cw + geo.cw / 2 + 3, geo.top + geo.hCol - 4);
    ctx.rotate(-Math.PI / 2);
    ctx.fillStyle = fg;
    ctx.fillText(String(s).slice(0, 14), 0, 0);
    ctx.restore();
  });
  g.rowLabels.forEach((s, i) => {
    ctx.textAlign = "end";
    ctx.fillStyle = fg;
    ctx.fillText(String(s), geo.wRow - 4, geo.top + geo.hCol + i * geo.cell + geo.cell * 0.7);
    ctx.textAlign = "center";
    g.cells[i].forEach((cl, j) => {
      ctx.fillStyle = cl.fill;
      ctx.fillRect(geo.wRow + j * geo.cw, geo.top + geo.hCol + i * geo.cell, geo.cw, geo.cell);
      if (cl.text) {
        ctx.fillStyle = cl.ink;
        ctx.font = "9px monospace";
        ctx.fillText(String(cl.text).slice(0, 8), geo.wRow + j * geo.cw + geo.cw / 2,
                     geo.top + geo.hCol + i * geo.cell + geo.cell * 0.7);
        ctx.font = "10px monospace";
      }
    });
  });
  ctx.textAlign = "start";
  if (g.note) { ctx.fillStyle = fg; ctx.font = "10px sans-serif"; ctx.fillText(g.note, 4, geo.height - 5); }
  c.toBlob((blob) => done(blob), "image/png");
}

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.style.display = "none";
  document.body.appendChild(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

// PNG / SVG buttons for a view; grid() -> the picture description (see gridSVG).
function exportButtons(root, name, grid) {
  const png = node("button", "wb-export wb-export-png", "PNG");
  const svg = node("button", "wb-export wb-export-svg", "SVG");
  png.title = "download this view as a PNG image";
  svg.title = "download this view as an SVG image";
  png.addEventListener("click", () => gridPNG(grid(), themeOf(root), (b) => download(b, `${name}.png`)));
  svg.addEventListener("click", () => download(new Blob([gridSVG(grid(), themeOf(root))], { type: "image/svg+xml" }),
                                               `${name}.svg`));
  return [png, svg];
}

function setTrait(model, name, value) {
  model.set(name, value);
  model.save_changes();
}

// A click on a token chip (.wb-tok) inside `box` sets trait `name` to its index; clicking the one already chosen
// sets -1 (none).
function toggleTokenOnClick(box, model, name) {
  box.addEventListener("click", (ev) => {
    const c = ev.target.closest(".wb-tok");
    if (!c) return;
    const i = Number(c.dataset.index);
    setTrait(model, name, i === model.get(name) ? -1 : i);
  });
}

// Coalesce the several trait changes of one update into one redraw per animation frame. Redraw time is added up
// in window.wbRenderStats ({count, ms, max}) so a test or a curious user can see what the views cost the page.
function scheduler(fn) {
  let pending = false;
  return () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      const t0 = performance.now();
      fn();
      const dt = performance.now() - t0;
      const stats = (window.wbRenderStats = window.wbRenderStats || { count: 0, ms: 0, max: 0 });
      stats.count += 1;
      stats.ms += dt;
      stats.max = Math.max(stats.max, dt);
    });
  };
}
