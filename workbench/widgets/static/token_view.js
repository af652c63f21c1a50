// TokenView: chips with ids; hover shows id, bytes (hex) and character span. Text only via textContent.

function render({ model, el }) {
  const root = node("div", "wb-root wb-tokenview");
  const head = node("div", "wb-head");
  const title = node("span", "wb-title");
  const count = node("span", "wb-tokcount");
  head.append(title, count);
  const chips = node("div", "wb-chips");
  root.append(head, chips);
  el.appendChild(root);
  const tip = makeTip(root);

  function draw() {
    const tokens = tokensOf(model);
    title.textContent = model.get("title") || "";
    count.textContent = `${tokens.length} tokens`;
    const selected = model.get("selected");
    clear(chips);
    tokens.forEach((t, i) => {
      const c = chip(t, i);
      if (i === selected) c.classList.add("wb-query");
      c.addEventListener("mouseenter", (ev) => { c.classList.add("wb-hover"); tip.show(tokenTip(t), ev); });
      c.addEventListener("mousemove", (ev) => tip.show(tokenTip(t), ev));
      c.addEventListener("mouseleave", () => { c.classList.remove("wb-hover"); tip.hide(); });
      c.addEventListener("click", () => { model.set("selected", i === model.get("selected") ? -1 : i); model.save_changes(); });
      chips.appendChild(c);
      if (t.newline) chips.appendChild(node("span", "wb-break"));
    });
  }

  draw();
  model.on("change:tokens_json", draw);
  model.on("change:title", draw);
  model.on("change:selected", draw);
  return () => {
    model.off("change:tokens_json", draw);
    model.off("change:title", draw);
    model.off("change:selected", draw);
  };
}

export default { render };
