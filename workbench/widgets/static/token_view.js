// TokenView: chips with ids; hover shows id, bytes (hex) and character span. Text only via textContent.
// Streaming: only the changed tail of the chips is rebuilt. The strip has a maximum height and scrolls; the
// selected token is scrolled into sight.

function render({ model, el }) {
  const root = node("div", "wb-root wb-tokenview");
  const head = node("div", "wb-head");
  const title = node("span", "wb-title");
  const count = node("span", "wb-tokcount");
  head.append(title, count);
  const chips = node("div", "wb-chips wb-strip");
  root.append(head, chips);
  el.appendChild(root);
  const tip = makeTip(root);
  const st = { els: [], recs: [] };
  let shownSel = -1;
  let acked = 0;
  let atBottom = true;
  chips.addEventListener("scroll", () => {
    atBottom = chips.scrollHeight - chips.scrollTop - chips.clientHeight < 8;
  }, { passive: true });

  chips.addEventListener("mousemove", (ev) => {
    const c = ev.target.closest(".wb-tok");
    if (!c) return tip.hide();
    const t = st.recs[Number(c.dataset.index)];
    if (t) tip.show(tokenTip(t), ev);
  });
  chips.addEventListener("mouseleave", () => tip.hide());
  toggleTokenOnClick(chips, model, "selected");

  function draw() {
    const tokens = tokensOf(model);
    title.textContent = model.get("title") || "";
    count.textContent = `${tokens.length} tokens`;
    const follow = atBottom;
    syncStrip(chips, tokens, st, chip);
    const selected = model.get("selected");
    if (shownSel >= 0 && st.els[shownSel]) st.els[shownSel][0].classList.remove("wb-query");
    shownSel = -1;
    if (selected >= 0 && st.els[selected]) {
      st.els[selected][0].classList.add("wb-query");
      shownSel = selected;
      scrollInto(chips, st.els[selected][0]);
    } else if (follow) {
      chips.scrollTop = 1e9;  // streaming: stay at the newest token (a write, no layout read)
    }
    // Acknowledge a streamed frame once drawn: the kernel sends the next one only then (or after a timeout).
    // A custom message, not a trait: ipywidgets holds back a model's state updates while an earlier one is
    // unanswered, and a busy kernel answers only when its cell ends.
    const frame = model.get("frame");
    if (frame && model.get("frame_time")) {
      const d = (window.wbFrameDelay = window.wbFrameDelay || { n: 0, sum: 0, max: 0 });
      const late = Date.now() / 1000 - model.get("frame_time");
      d.n += 1; d.sum += late; d.max = Math.max(d.max, late);
    }
    if (frame && frame !== acked) {
      acked = frame;
      model.send({ rendered: frame });
    }
  }

  draw();
  const schedule = scheduler(draw);
  const events = ["tokens_json", "tail_json", "n_committed", "title", "selected", "frame"];
  for (const e of events) model.on(`change:${e}`, schedule);
  return () => { for (const e of events) model.off(`change:${e}`, schedule); };
}

export default { render };
