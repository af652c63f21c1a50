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

function u8(v) {
  return bytesOf(v);
}

function i32(v) {
  const b = bytesOf(v);
  const copy = new Uint8Array(b); // aligned copy
  return new Int32Array(copy.buffer, 0, copy.length >> 2);
}

// White (0) -> dark blue (1); the same scale as the Python snapshots.
function blue(p) {
  p = Math.min(Math.max(p || 0, 0), 1);
  return `rgb(${Math.round(255 - 222 * p)},${Math.round(255 - 165 * p)},${Math.round(255 - 75 * p)})`;
}

function inkFor(p) {
  return p > 0.55 ? "#fff" : "#111";
}

function fmt(p) {
  return (p === undefined || Number.isNaN(p)) ? "–" : p.toFixed(p >= 0.995 ? 2 : 3);
}

// A tooltip owned by one view. lines: array of strings, each set with textContent.
function makeTip(root) {
  const tip = node("div", "wb-tip");
  tip.style.display = "none";
  root.appendChild(tip);
  return {
    show(lines, ev) {
      clear(tip);
      for (const line of lines) tip.appendChild(node("div", "wb-tip-line", line));
      tip.style.display = "block";
      const r = root.getBoundingClientRect();
      tip.style.left = `${Math.max(0, ev.clientX - r.left + 14)}px`;
      tip.style.top = `${Math.max(0, ev.clientY - r.top + 14)}px`;
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

// One token chip: readable text (visible whitespace), the character it helps spell when partial, and its id.
function chip(t, index) {
  const c = node("span", "wb-tok" + (t.special ? " wb-special" : "") + (t.partial ? " wb-partial" : ""));
  c.dataset.index = String(index);
  c.dataset.id = String(t.id);
  c.appendChild(node("span", "wb-text", t.text));
  if (t.partial) c.appendChild(node("span", "wb-chars", t.chars));
  c.appendChild(node("span", "wb-id", t.id));
  return c;
}

// Token records arrive as one JSON string (cheap for the kernel to send); parse once per new string.
const _parsed = new WeakMap();
function tokensOf(model) {
  const s = model.get("tokens_json") || "[]";
  const hit = _parsed.get(model);
  if (hit && hit.s === s) return hit.v;
  const v = JSON.parse(s);
  _parsed.set(model, { s, v });
  return v;
}
