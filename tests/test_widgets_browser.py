"""Real-browser tests: JupyterLab started headless on 127.0.0.1, tests/widget_notebooks/widgets_live.ipynb executed
cell by cell through the UI in Debian's Chromium (Playwright), and the rendered page checked.

What is asserted: the token chips (ids, visible whitespace, Korean/emoji, zero-width joiner, special styling), the
hostile token as inert text (no <img> created, no dialog), the heatmap's data (hover read-out = the Python
slice), row labels within 8 px of their rows, tooltips inside the viewport at the right edge, the overview grid
(click a thumbnail), PNG/SVG export, the logit-lens cells and target mode (p and rank), a 400-token generation
at full speed with the page never more than 0.5 s behind the kernel, Stop during run() (status "stopped"
within 0.5 s), a kernel interrupt ("interrupted"), linked selection across three views (the strip scrolls to
the token), the compare view, and text contrast >= 4.5:1 in JupyterLab's light AND dark themes (from the
page's computed styles). Screenshots of each view in both themes go to docs/images/ (for the README) and to the
artifacts folder ($WB_ARTIFACTS or pytest's tmp dir).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "tests" / "widget_notebooks" / "widgets_live.ipynb"
IMAGES = REPO / "docs" / "images"
CHROMIUM = "/usr/bin/chromium"
SHARED_COMMAND_R = REPO.parent / "shared" / "command-r"
HOSTILE = "<img src=x onerror=alert(1)>"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 (random port, token auth, its own root/config/settings/workspace dirs)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian chromium not found at {CHROMIUM} (apt-get install chromium fonts-noto-cjk)")
    pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed")
    with start_lab(tmp_path_factory.mktemp("lab")) as info:
        yield info


@contextlib.contextmanager
def start_lab(base: Path):
    root, conf, settings, workspaces, runtime = (base / n for n in ("root", "config", "settings", "ws", "runtime"))
    for d in (root, conf, settings, workspaces, runtime):
        d.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    # no "news" toast over the screenshots
    notif = settings / "@jupyterlab" / "apputils-extension"
    notif.mkdir(parents=True)
    (notif / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                        "checkForUpdates": False}))
    port, token = _free_port(), uuid.uuid4().hex
    (conf / "jupyter_server_config.py").write_text("\n".join([
        "c.ServerApp.ip = '127.0.0.1'", f"c.ServerApp.port = {port}", "c.ServerApp.port_retries = 0",
        f"c.IdentityProvider.token = {token!r}", "c.ServerApp.open_browser = False",
        f"c.ServerApp.root_dir = {str(root)!r}", "c.ServerApp.allow_root = True",
        "c.LabApp.expose_app_in_browser = True", f"c.LabServerApp.user_settings_dir = {str(settings)!r}",
        f"c.LabServerApp.workspaces_dir = {str(workspaces)!r}", "c.LabApp.news_url = None",
        "c.LabApp.check_for_updates_class = 'jupyterlab.NeverCheckForUpdate'",
    ]))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(conf), "JUPYTER_RUNTIME_DIR": str(runtime),
           "IPYTHONDIR": str(base / "ipython"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WB_SHARED_COMMAND_R": str(SHARED_COMMAND_R) if SHARED_COMMAND_R.is_dir() else ""}
    log = open(base / "lab.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--config", str(conf / "jupyter_server_config.py")],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"JupyterLab did not start; log:\n{(base / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield {"url": url, "token": token, "root": root, "log": base / "lab.log"}
    finally:
        _shutdown_sessions(url, token)
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _shutdown_sessions(url: str, token: str) -> None:
    try:
        with urllib.request.urlopen(f"{url}/api/sessions?token={token}", timeout=5) as r:
            sessions = json.load(r)
        for s in sessions:
            req = urllib.request.Request(f"{url}/api/sessions/{s['id']}?token={token}", method="DELETE")
            urllib.request.urlopen(req, timeout=10).close()
    except OSError:
        pass


def new_tab(context):
    """A new tab in browser ``context`` that dismisses dialogs (their messages in ``tab.dialogs``), 60 s timeouts."""
    pg = context.new_page()
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.set_default_timeout(60_000)
    return pg


@pytest.fixture(scope="module")
def page(lab, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1200, "height": 2200}, accept_downloads=True)
        pg = new_tab(context)
        try:
            yield pg
        finally:
            context.close()
            browser.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("WB_ARTIFACTS") or tmp_path_factory.mktemp("widget-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ------------------------------------------------------------------------------------------------ driving Lab
class Notebook:
    def __init__(self, page, lab, name: str = NOTEBOOK.name) -> None:
        self.page = page
        page.goto(f"{lab['url']}/lab/tree/{name}?reset&token={lab['token']}")
        page.wait_for_function("window.jupyterapp !== undefined", timeout=90_000)
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=90_000)
        page.wait_for_function(
            "() => { const w = window.jupyterapp.shell.currentWidget; const k = w && w.sessionContext && "
            "w.sessionContext.session && w.sessionContext.session.kernel; return !!k && k.status === 'idle' "
            "&& k.connectionStatus === 'connected'; }", timeout=120_000)
        self.cells = page.locator(".jp-Notebook .jp-Cell")
        self.cells.first.locator(".jp-InputArea-prompt").click()
        page.keyboard.press("Escape")

    def cell(self, i: int):
        return self.cells.nth(i)

    def prompt(self, i: int) -> str:
        return self.cell(i).locator(".jp-InputArea-prompt").inner_text().strip()

    def start(self, i: int) -> None:
        """Select cell i and run it without waiting (the command's promise resolves only when it finishes).
        If the prompt shows neither busy nor done a while later (the command was dropped), fire it again."""
        for _ in range(3):
            self.page.evaluate("(i) => { const nb = window.jupyterapp.shell.currentWidget.content; "
                               "nb.activeCellIndex = i; nb.mode = 'command'; "
                               "window.jupyterapp.commands.execute('notebook:run-cell'); return 1; }", i)
            deadline = time.time() + 15
            while time.time() < deadline:
                if self.prompt(i) == "[*]:" or self.done(i):
                    return
                time.sleep(0.05)
        raise AssertionError(f"cell {i} never started; prompt {self.prompt(i)!r}")

    def done(self, i: int) -> bool:
        return re.fullmatch(r"\[\d+\]:", self.prompt(i)) is not None

    def run(self, i: int, timeout: float = 120) -> str:
        self.start(i)
        deadline = time.time() + timeout
        while not self.done(i):
            if time.time() > deadline:
                raise AssertionError(f"cell {i} did not finish in {timeout} s: {self.output(i)[-2000:]}")
            time.sleep(0.1)
        out = self.output(i)
        assert "Traceback" not in out and "Error" not in out.split("\n")[0], f"cell {i} failed:\n{out[-3000:]}"
        return out

    def output(self, i: int) -> str:
        area = self.cell(i).locator(".jp-OutputArea")
        return area.inner_text() if area.count() else ""

    def printed(self, i: int, tag: str) -> dict:
        for line in self.output(i).splitlines():
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
        raise AssertionError(f"no {tag} line in cell {i}: {self.output(i)[-1000:]}")


def shot(locator, name: str, artifacts: Path, readme: bool = True) -> None:
    png = locator.screenshot(animations="disabled")
    (artifacts / f"{name}.png").write_bytes(png)
    if readme:
        IMAGES.mkdir(parents=True, exist_ok=True)
        (IMAGES / f"{name}.png").write_bytes(png)


def start_generating(nb: Notebook, page, show: int):
    """Run cell ``show`` (it displays a GenerationView), start cell ``show + 1`` (its ``run()``) without waiting
    for it, and wait until the view's token count moves; returns the view's output area."""
    nb.run(show)
    view = nb.cell(show).locator(".jp-OutputArea")
    count = view.locator(".wb-tokenview .wb-tokcount")
    count.wait_for()
    first = count.inner_text()
    nb.start(show + 1)
    page.wait_for_function("([el, t]) => el.textContent !== t", arg=[count.element_handle(), first], timeout=60_000)
    return view


def _hover_tip(root, target, x: float | None = None, y: float | None = None) -> str:
    """Hover ``target`` (at (x, y) inside it, or its centre) and return the view's tooltip text."""
    target.scroll_into_view_if_needed()
    target.hover(position=None if x is None else {"x": x, "y": y})
    tip = root.locator(".wb-tip")
    tip.wait_for(state="visible")
    return tip.inner_text()


# Contrast of every text element of the views against its effective background, from computed styles
# (WCAG 2 relative luminance; semi-transparent text is composited over the background first).
CONTRAST_JS = """
(sel) => {
  const parse = (s) => { const m = /rgba?\\(([^)]+)\\)/.exec(s || ''); if (!m) return null;
    const p = m[1].split(/[\\s,/]+/).filter(Boolean).map(Number); return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1]; };
  const bgOf = (el) => { for (let e = el; e && e.nodeType === 1; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor); if (c && c[3] > 0.5) return c; } return [255, 255, 255, 1]; };
  const lum = (c) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]); };
  const out = [];
  for (const el of document.querySelectorAll(sel)) {
    if (!el.textContent.trim() || !el.getClientRects().length) continue;
    const st = getComputedStyle(el); if (st.visibility === 'hidden' || st.display === 'none') continue;
    const bg = bgOf(el); const fg = parse(st.color); const a = fg[3] * Number(st.opacity || 1);
    const c = [0, 1, 2].map((i) => fg[i] * a + bg[i] * (1 - a));
    const L1 = lum(c), L2 = lum(bg); const ratio = (Math.max(L1, L2) + 0.05) / (Math.min(L1, L2) + 0.05);
    out.push([ratio, el.className, el.textContent.slice(0, 20)]);
  }
  return out;
}
"""
TEXT_SELECTORS = (".wb-root .wb-title, .wb-root .wb-muted, .wb-root .wb-tokcount, .wb-qlabel, .wb-klabel, "
                  ".wb-lens th, .wb-lens-cell .wb-text, .wb-lens-cell .wb-p, .wb-tok .wb-text, .wb-tok .wb-id, "
                  ".wb-legend span, .wb-gen-status, .wb-pan-value")


def check_contrast(page, theme: str) -> int:
    found = page.evaluate(CONTRAST_JS, TEXT_SELECTORS)
    bad = [f for f in found if f[0] < 4.5]
    assert len(found) > 50 and not bad, f"{theme}: {len(bad)} of {len(found)} text elements under 4.5:1: {bad[:8]}"
    return len(found)


def set_theme(page, name: str) -> None:
    page.evaluate("(t) => { window.jupyterapp.commands.execute('apputils:change-theme', {theme: t}); return 1; }", name)
    light = "true" if "Light" in name else "false"
    page.wait_for_function(f"() => document.body.dataset.jpThemeLight === '{light}'", timeout=30_000)
    page.wait_for_timeout(600)  # the views redraw their canvases on the theme change


def lag_of(samples: list, timeline: list) -> float:
    """Worst delay of the page behind the kernel: for each page sample (time, tokens shown), how long ago the
    kernel already had more tokens than that (0 if it did not)."""
    worst = 0.0
    for t, shown in samples:
        newer = [tk for tk, n in timeline if n > shown]
        if newer:
            worst = max(worst, t - min(newer))
    return worst


SAMPLER_JS = """
(el) => { window.__wbSamples = []; const c = el;
  window.__wbSampler = setInterval(() => { const m = /^(\\d+) tokens/.exec(c.textContent);
    if (m) window.__wbSamples.push([Date.now() / 1000, Number(m[1])]); }, 10); return 1; }
"""


# ------------------------------------------------------------------------------------------------ the test
def test_views_in_real_jupyterlab(lab, page, artifacts):
    nb = Notebook(page, lab)
    setup = nb.run(0, timeout=180)
    assert "SOURCE" in setup
    shots = {}

    # --- TokenView: chips, ids, visible whitespace, Korean/emoji, ZWJ, special style, hover details, max height
    nb.run(1)
    tv = nb.cell(1).locator(".wb-tokenview")
    tv.locator(".wb-tok").first.wait_for()
    chips = tv.locator(".wb-tok")
    n = chips.count()
    assert tv.locator(".wb-tokcount").inner_text() == f"{n} tokens"
    texts = [chips.nth(i).locator(".wb-text").inner_text() for i in range(n)]
    assert texts[0] == "<BOS_TOKEN>" and "wb-special" in chips.nth(0).get_attribute("class")
    joined = "".join(texts)
    assert "→" in joined and "↵" in joined and "·" in joined                  # tab, newline, spaces visible
    shown = joined + "".join(tv.locator(".wb-chars").all_inner_texts())
    assert ("안" in shown or "<0xEC>" in joined) and ("👋" in shown)          # whole syllables or their bytes
    assert "⟨ZWJ⟩" in shown                                                   # the zero-width joiner is visible
    ids = [int(chips.nth(i).locator(".wb-id").inner_text()) for i in range(n)]
    assert ids[0] == int(chips.nth(0).get_attribute("data-id"))
    tip = _hover_tip(tv, chips.nth(1))
    assert f"id {ids[1]}" in tip and "bytes " in tip and "chars [" in tip
    page.mouse.move(0, 0)
    shots["token_view"] = nb.cell(1).locator(".jp-OutputArea")

    # --- the hostile token is text: no <img>/<i>/<b> element, no dialog
    nb.run(2)
    hv = nb.cell(2).locator(".wb-tokenview")
    hv.locator(".wb-tok").first.wait_for()
    assert hv.locator(".wb-tok .wb-text").all_inner_texts()[:3] == [HOSTILE.replace(" ", "·"), "<b>bold</b>",
                                                                     "</script><i>pwn</i>"]
    assert hv.locator(".wb-tok .wb-text").all_inner_texts()[-1] == "⟨ZWJ⟩"
    assert page.locator(".jp-OutputArea img[src='x'], .jp-OutputArea i, .wb-root b").count() == 0
    assert page.locator(".wb-root img").count() == 0

    # --- AttentionView: heatmap data, hover read-out, labels aligned, overview grid, query click, export
    nb.run(3)
    nb.run(4)
    expect = nb.printed(4, "EXPECT_ATTN")
    av = nb.cell(3).locator(".wb-attentionview")
    canvas = av.locator("canvas.wb-heatmap")
    page.wait_for_function("(c) => c.dataset.rows && Number(c.dataset.rows) > 0", arg=canvas.element_handle())
    assert [int(canvas.get_attribute("data-rows")), int(canvas.get_attribute("data-cols"))] == expect["shape"]
    assert (canvas.get_attribute("data-layer"), canvas.get_attribute("data-head")) == ("1", "1") == \
        (str(expect["layer"]), str(expect["head"]))
    assert av.locator(".wb-thumb").count() == expect["n_heads"] * expect["n_layers"]       # layer × head grid
    assert av.locator(".wb-thumb[data-score]").count() == expect["n_heads"] * expect["n_layers"]
    assert "wb-active" in av.locator(".wb-thumb[data-layer='1'][data-head='1']").get_attribute("class")
    assert av.locator(".wb-qlabel").all_inner_texts() == expect["labels"][: expect["shape"][0]]
    assert HOSTILE in "".join(av.locator(".wb-qlabel").all_inner_texts()).replace("·", " ")   # labels are text
    assert av.locator(".wb-legend canvas").count() == 1                                        # a colourbar
    cell = float(canvas.get_attribute("data-cell"))
    box = canvas.bounding_box()
    for i, label in enumerate(av.locator(".wb-qlabel").all()):                               # labels beside rows
        lb = label.bounding_box()
        row_mid = box["y"] + (i + 0.5) * cell
        assert abs(lb["y"] + lb["height"] / 2 - row_mid) <= 8, (i, lb, row_mid)
        assert -1 <= box["x"] - (lb["x"] + lb["width"]) <= 8, (i, lb, box)
    height = av.bounding_box()["height"]
    assert height < 700, f"AttentionView is {height:.0f} px tall for {expect['shape'][0]} tokens"
    tip = _hover_tip(av, canvas, (expect["k"] + 0.5) * cell, (expect["q"] + 0.5) * cell)
    assert f"query {expect['q']} {json.dumps(expect['q_text'], ensure_ascii=False)}" in tip
    assert f"key {expect['k']} {json.dumps(expect['k_text'], ensure_ascii=False)}" in tip
    weight = float(re.search(r"weight ([0-9.e-]+)", tip).group(1))
    assert abs(weight - expect["w"]) < 2e-3
    av.locator(f".wb-qlabel[data-q='{expect['q']}']").click()               # select a query token
    strip = av.locator(".wb-attn-text .wb-tok")
    page.wait_for_function("(el) => el.querySelector('.wb-attn-text .wb-tok[data-weight]') !== null",
                           arg=av.element_handle())
    assert "wb-query" in strip.nth(expect["q"]).get_attribute("class")
    for k in range(expect["q"] + 1):
        assert abs(float(strip.nth(k).get_attribute("data-weight")) - expect["row"][k]) < 2e-3
    page.mouse.move(0, 0)
    shots["attention_view"] = nb.cell(3).locator(".jp-OutputArea")
    with page.expect_download() as dl:                                      # export, drawn in the browser
        av.locator("button.wb-export-png").click()
    assert dl.value.suggested_filename == "attention.png"
    assert Path(dl.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with page.expect_download() as dl:
        av.locator("button.wb-export-svg").click()
    assert "<svg" in Path(dl.value.path()).read_text()[:200]
    av.locator(".wb-thumb[data-layer='0'][data-head='2']").click()          # overview grid: click a head
    page.wait_for_function("(c) => c.dataset.layer === '0' && c.dataset.head === '2'", arg=canvas.element_handle())
    # tooltips stay inside the viewport at the right edge (narrow window, hover the rightmost column)
    page.set_viewport_size({"width": 760, "height": 2200})
    page.wait_for_timeout(300)
    box = canvas.bounding_box()
    canvas.hover(position={"x": box["width"] - 2, "y": cell / 2})
    av.locator(".wb-tip").wait_for(state="visible")
    tb = av.locator(".wb-tip").bounding_box()
    assert tb["x"] >= 0 and tb["x"] + tb["width"] <= 760, tb
    page.mouse.move(0, 0)
    page.set_viewport_size({"width": 1200, "height": 2200})

    # --- LogitLensView: every cell's top token and probability; hover shows the top-k; target mode; fits
    nb.run(5)
    nb.run(6)
    lens = nb.printed(6, "EXPECT_LENS")
    lv = nb.cell(5).locator(".wb-logitlensview")
    lv.locator("td.wb-lens-cell").first.wait_for()
    assert lv.locator("td.wb-lens-cell").count() == len(lens["rows"]) * len(lens["positions"])
    top_row = lv.locator("tr").nth(1).locator("th.wb-rowlabel").inner_text()
    assert top_row == lens["rows"][-1]                       # the model's output (last resid_post) is on top

    def cell_at(r, c):
        return lv.locator(f"td.wb-lens-cell[data-row='{r}'][data-pos='{lens['positions'][c]}']")

    for r, row in enumerate(lens["cells"]):
        for c, (text, prob, _, _) in enumerate(row):
            assert cell_at(r, c).locator(".wb-text").inner_text() == text
            assert abs(float(cell_at(r, c).get_attribute("data-prob")) - prob) < 2e-3
    tip = _hover_tip(lv, lv.locator("td.wb-lens-cell").first)
    assert len(re.findall(r"^\d\. ", tip, flags=re.M)) == 5
    table, area = lv.locator("table.wb-lens").bounding_box(), nb.cell(5).locator(".jp-OutputArea").bounding_box()
    assert table["x"] + table["width"] <= area["x"] + area["width"] + 1, "the lens grid is wider than the notebook"
    page.mouse.move(0, 0)
    shots["logit_lens_view"] = nb.cell(5).locator(".jp-OutputArea")
    lv.locator("input.wb-target-input").fill(str(lens["target"]))        # track a target token from the browser
    lv.locator("button.wb-track").click()
    page.wait_for_function("(el) => el.querySelector('td.wb-lens-cell[data-target]') !== null", arg=lv.element_handle())
    for r, row in enumerate(lens["cells"]):
        for c, (_, _, target_prob, target_rank) in enumerate(row):
            got = cell_at(r, c)
            assert abs(float(got.get_attribute("data-target")) - target_prob) <= 1e-6 + 1e-4 * target_prob
            assert int(got.get_attribute("data-rank")) == target_rank
            assert got.locator(".wb-text").inner_text() == f"#{target_rank + 1}"   # the cell names the rank
    assert f"(id {lens['target']})" in lv.locator(".wb-title").inner_text()
    lv.locator("select.wb-scale").select_option("log")
    page.wait_for_function("(el) => el.querySelector('.wb-legend-lo').textContent.startsWith('≤1e-6')",
                           arg=lv.element_handle())

    # --- GenerationView: 400 tokens at full speed; the page never more than 0.5 s behind the kernel
    nb.run(7)
    gv = nb.cell(7).locator(".jp-OutputArea")
    count = gv.locator(".wb-tokenview .wb-tokcount")
    count.wait_for()
    page.evaluate("() => { window.wbRenderStats = {count: 0, ms: 0, max: 0}; return 1; }")
    page.evaluate(SAMPLER_JS, count.element_handle())
    nb.start(8)
    deadline = time.time() + 240
    while not nb.done(8) and time.time() < deadline:
        time.sleep(0.2)
    assert nb.done(8), "generation cell did not finish"
    page.wait_for_timeout(800)
    samples = page.evaluate("() => { clearInterval(window.__wbSampler); return window.__wbSamples; }")
    render = page.evaluate("() => window.wbRenderStats")          # the views' own drawing time in the page
    frozen = max((b[0] - a[0] for a, b in zip(samples, samples[1:])), default=0.0)   # 10 ms timer starved
    out = nb.output(8)
    assert "GEN 400 True done" in out, out[-2000:]
    timeline = nb.printed(8, "TIMELINE")
    lag = lag_of(samples, timeline)
    (artifacts / "lag.json").write_text(json.dumps({"lag": lag, "samples": samples, "timeline": timeline,
                                                    "render": render, "frozen": frozen}))
    distinct = len({n for _, n in samples})
    rate = (timeline[-1][1] - timeline[0][1]) / max(1e-9, timeline[-1][0] - timeline[0][0])
    load = os.getloadavg()[0]
    print(f"LIVE {rate:.0f} tok/s, {distinct} distinct counts seen, worst lag {lag:.3f} s (load average {load:.1f}); "
          f"views drew {render['count']} times, {render['ms']:.0f} ms in all, longest {render['max']:.0f} ms; "
          f"longest gap of the page's 10 ms timer {frozen:.2f} s")
    assert distinct >= 10, f"only {distinct} distinct token counts seen while generating"
    late = [] if lag <= 0.5 else [f"page lag {lag:.3f} s during the 400-token generation (load average {load:.1f}, "
                                  f"page timer stalled up to {frozen:.2f} s, longest redraw {render['max']:.0f} ms)"]
    assert gv.locator(".wb-gen-status").inner_text().startswith("done: 400 new tokens")
    assert gv.locator("td.wb-lens-cell").count() > 0 and gv.locator("canvas.wb-heatmap").count() == 1
    shots["generation_view"] = gv

    # --- Stop during run(): the click reaches the running loop (status "stopped" within 0.5 s)
    sv = start_generating(nb, page, 9)
    button = sv.get_by_role("button", name="Stop")
    assert button.is_enabled(), "Stop is disabled during run(): " + sv.locator(".wb-stop-note").inner_text()
    # times taken in the page: the click, and the status turning to "stopped" (a MutationObserver)
    page.evaluate("""([b, s]) => { window.__stop = {}; b.addEventListener('click', () => { window.__stop.click = Date.now(); });
        new MutationObserver(() => { if (s.textContent.startsWith('stopped') && !window.__stop.done)
          window.__stop.done = Date.now(); }).observe(s, {childList: true, characterData: true, subtree: true}); }""",
                  [button.element_handle(), sv.locator(".wb-gen-status").element_handle()])
    button.click()
    page.wait_for_function("(el) => el.textContent.startsWith('stopped')",
                           arg=sv.locator(".wb-gen-status").element_handle(), timeout=30_000)
    while not nb.done(10):
        time.sleep(0.05)
    out = nb.output(10)
    m = re.search(r"STOPPED (\d+) stopped True True ([0-9.]+)", out)
    assert m and int(m.group(1)) < 400, out
    times = page.evaluate("() => window.__stop")
    stop_s = (times["done"] - times["click"]) / 1000
    print(f"STOP {stop_s:.3f} s from click to 'stopped' (click reached the kernel after "
          f"{float(m.group(2)) - times['click'] / 1000:.3f} s)")
    if stop_s > 0.5:
        late.append(f"Stop took {stop_s:.3f} s from click to 'stopped' (load average {os.getloadavg()[0]:.1f})")

    # --- linked views: a chip selects the query row and the lens column; the minimap jumps; strips scroll
    nb.run(11)
    lk = nb.cell(11).locator(".jp-OutputArea")
    lk.locator(".wb-logitlensview td.wb-lens-cell").first.wait_for()
    lk.locator(".wb-tokenview .wb-tok[data-index='7']").click()
    page.wait_for_function("(el) => el.querySelector(\".wb-qlabel.wb-query[data-q='7']\") !== null && "
                           "el.querySelector(\".wb-lens th.wb-selected[data-pos='7']\") !== null",
                           arg=lk.element_handle())
    mini = lk.locator("canvas.wb-minimap")
    mb = mini.bounding_box()
    mini.click(position={"x": mb["width"] * 250.5 / 300, "y": 20})        # jump to position 250
    page.wait_for_function("(el) => el.querySelector(\".wb-tokenview .wb-tok.wb-query[data-index='250']\") !== null",
                           arg=lk.element_handle())
    page.wait_for_timeout(300)
    for sel in (".wb-tokenview .wb-strip", ".wb-attentionview .wb-strip"):
        strip_box = lk.locator(sel).bounding_box()
        chip = lk.locator(f"{sel} .wb-tok[data-index='250']").bounding_box()
        assert strip_box["y"] - 1 <= chip["y"] and chip["y"] + chip["height"] <= strip_box["y"] + strip_box["height"] + 1, \
            f"{sel} did not scroll to the selected token"
    assert lk.locator(".wb-qlabel.wb-query[data-q='250']").count() == 1      # the heatmap window followed
    assert lk.locator(".wb-lens th.wb-selected[data-pos='250']").count() == 1
    assert lk.locator(".wb-tokenview .wb-strip").evaluate("(e) => e.scrollHeight > e.clientHeight")   # max height

    # --- compare view: clean, corrupted and the difference share layer/head
    nb.run(12)
    cmp = nb.cell(12).locator(".jp-OutputArea")
    cmp.locator("canvas.wb-heatmap").nth(2).wait_for()
    assert cmp.locator("canvas.wb-heatmap").count() == 3
    cmp.locator(".wb-attentionview").first.locator(".wb-thumb[data-layer='2'][data-head='0']").click()
    page.wait_for_function("(el) => [...el.querySelectorAll('canvas.wb-heatmap')].every((c) => "
                           "c.dataset.layer === '2' && c.dataset.head === '0')", arg=cmp.element_handle())
    assert "−1" in cmp.locator(".wb-attentionview").nth(2).locator(".wb-legend").inner_text()
    shots["compare_view"] = cmp

    # --- a kernel interrupt ends run() cleanly and the status says so
    iv = start_generating(nb, page, 13)
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:interrupt-kernel'); return 1; }")
    page.wait_for_function("(el) => el.textContent.startsWith('interrupted')",
                           arg=iv.locator(".wb-gen-status").element_handle(), timeout=30_000)
    while not nb.done(14):
        time.sleep(0.05)
    assert "INTERRUPTED interrupted True" in nb.output(14), nb.output(14)

    # --- contrast and screenshots in both themes
    page.mouse.move(0, 0)
    for theme, suffix in (("JupyterLab Light", "light"), ("JupyterLab Dark", "dark")):
        set_theme(page, theme)
        found = check_contrast(page, theme)
        print(f"CONTRAST {theme}: {found} text elements >= 4.5:1")
        for name, loc in shots.items():
            loc.scroll_into_view_if_needed()
            shot(loc, f"{name}_{suffix}", artifacts)
    set_theme(page, "JupyterLab Light")

    assert page.dialogs == [], f"a dialog fired: {page.dialogs}"
    assert page.locator("img[src='x']").count() == 0
    # Timing checks last, so one slow moment does not hide the rest. They are asserted on a machine that is not
    # oversubscribed; on one whose load average is over 1.5x its cores (a shared CI box) the page's own timer
    # stalls for hundreds of ms with no view updating, and the numbers are reported instead of asserted.
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if late and load > 1.5 * cores:
        warnings.warn("timing not asserted on an oversubscribed machine (load average "
                      f"{load:.1f} on {cores} cores): " + "; ".join(late))
    else:
        assert not late, "; ".join(late)


# ------------------------------------------------------------------------------------------------ ragwire: ContextView
# ContextView in the same JupyterLab (its own small notebook): hovering a span ranks the documents, the model's
# citations are shown, disagreements flagged, clicking a span selects its first token in a linked TokenView and
# an AttentionView.from_model (exact rows; its minimap follows the query),
# label contrast >= 4.5:1 in both themes; screenshots docs/images/context_view_{light,dark}.png.
CONTEXT_NOTEBOOK = REPO / "tests" / "widget_notebooks" / "context_view.ipynb"
CONTEXT_SELECTORS = (".wb-contextview .wb-title, .wb-contextview .wb-muted, .wb-contextview .wb-cv-span, "
                     ".wb-contextview .wb-cv-label, .wb-contextview .wb-cv-table th, .wb-contextview .wb-cv-table td, "
                     ".wb-contextview .wb-cv-flag, .wb-contextview .wb-cv-response")


@pytest.fixture()
def fresh_page(page):
    """A new tab beside the shared one (leaving a notebook with unsaved output asks "leave page?")."""
    pg = new_tab(page.context)
    try:
        yield pg
    finally:
        pg.close()


def test_context_view_in_real_jupyterlab(lab, fresh_page, artifacts):
    if not (REPO / "workbench" / "bundled" / "command-r-tiny").is_dir():
        pytest.skip("the bundled command-r-tiny is not present")
    page = fresh_page
    shutil.copy(CONTEXT_NOTEBOOK, lab["root"] / CONTEXT_NOTEBOOK.name)
    nb = Notebook(page, lab, CONTEXT_NOTEBOOK.name)
    nb.run(0, timeout=240)
    expect = nb.printed(0, "EXPECT_CV")
    root = nb.cell(0).locator(".wb-contextview")
    spans = root.locator(".wb-cv-response .wb-cv-span")
    spans.first.wait_for()
    assert spans.count() == expect["n"]
    assert [spans.nth(i).inner_text() for i in range(expect["n"])] == expect["texts"]
    for s in range(expect["n"]):                                     # hover: ranked, cited, flagged
        spans.nth(s).hover()
        rows = root.locator(".wb-cv-panel tr.wb-cv-doc")
        rows.first.wait_for()
        assert [int(rows.nth(i).get_attribute("data-doc")) for i in range(rows.count())] == expect["ranks"][s]
        assert "wb-cv-top" in rows.nth(0).get_attribute("class")
        cited = [int(rows.nth(i).get_attribute("data-doc")) for i in range(rows.count())
                 if "cited" in rows.nth(i).locator("td").last.inner_text()]
        assert sorted(cited) == [d for d, c in enumerate(expect["citations"][s]) if c]
        flag = root.locator(".wb-cv-panel .wb-cv-flag")
        if expect["disagree"][s]:
            assert flag.inner_text().endswith(", ".join(expect["disagree"][s]))
        else:
            assert flag.count() == 0
    assert any(expect["disagree"])                                  # the flags above were exercised
    shown = expect["order"][0]                                       # the shaded method marks its disagreements
    assert [("wb-cv-disagree" in spans.nth(s).get_attribute("class")) for s in range(expect["n"])] == \
        [shown in expect["disagree"][s] for s in range(expect["n"])]
    assert page.locator("img[src='x']").count() == 0 and page.dialogs == []
    last = expect["n"] - 1                                           # click: the linked TokenView follows
    spans.nth(last).click()
    tv = nb.cell(0).locator(".wb-tokenview")
    page.wait_for_function("(el) => el.querySelector('.wb-tok.wb-query') !== null", arg=tv.element_handle(),
                           timeout=30_000)
    assert "wb-cv-active" in spans.nth(last).get_attribute("class")
    linked = nb.printed(1, "LINKED") if nb.run(1) else {}
    pos = expect["positions"][last]
    assert linked == {"selected": last, "position": pos, "token": pos, "query": pos}
    av = nb.cell(0).locator(".wb-attentionview")                     # the long-prompt view follows too
    page.wait_for_function("([el, t]) => el.textContent.includes(t)",
                           arg=[av.locator(".wb-minimap-label").element_handle(), f"attention of query {pos}"],
                           timeout=30_000)
    assert "rows computed for queries" in av.locator(".wb-minimap-label").inner_text()
    shot(av, "attention_view_from_rows", artifacts, readme=False)
    spans.nth(last).hover()
    page.wait_for_timeout(200)
    for theme, suffix in (("JupyterLab Light", "light"), ("JupyterLab Dark", "dark")):
        set_theme(page, theme)
        spans.nth(last).hover()
        found = page.evaluate(CONTRAST_JS, CONTEXT_SELECTORS)
        bad = [f for f in found if f[0] < 4.5]
        assert len(found) > 30 and not bad, f"{theme}: {len(bad)} of {len(found)} under 4.5:1: {bad[:8]}"
        print(f"CONTEXT CONTRAST {theme}: {len(found)} text elements >= 4.5:1")
        shot(root, f"context_view_{suffix}", artifacts)
    set_theme(page, "JupyterLab Light")
# ------------------------------------------------------------------------------------------------ end ragwire
