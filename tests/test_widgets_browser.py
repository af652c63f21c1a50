"""Real-browser tests: JupyterLab started headless on 127.0.0.1, tests/widget_notebooks/widgets_live.ipynb executed
cell by cell through the UI in Debian's Chromium (Playwright), and the rendered page checked.

What is asserted: the token chips (ids, visible whitespace, Korean/emoji, special styling), the hostile token as
inert text (no <img> created, no dialog), the heatmap's data (hover read-out = the Python slice) and the
attention-over-text after clicking a query, the logit-lens cells, the live generation (the token count changes
at least three times while the cell runs) and the Stop button (run_async). Screenshots are saved as PNG to
docs/images/ (for the README) and to the artifacts folder ($WB_ARTIFACTS or pytest's tmp dir).
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


@pytest.fixture(scope="module")
def page(lab, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 2200})
        pg = context.new_page()
        pg.dialogs = []
        pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
        pg.set_default_timeout(60_000)
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
    def __init__(self, page, lab) -> None:
        self.page = page
        page.goto(f"{lab['url']}/lab/tree/{NOTEBOOK.name}?reset&token={lab['token']}")
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
    png = locator.screenshot()
    (artifacts / f"{name}.png").write_bytes(png)
    if readme:
        IMAGES.mkdir(parents=True, exist_ok=True)
        (IMAGES / f"{name}.png").write_bytes(png)


def _hover_tip(root, target, x: float | None = None, y: float | None = None) -> str:
    """Hover ``target`` (at (x, y) inside it, or its centre) and return the view's tooltip text."""
    target.scroll_into_view_if_needed()
    target.hover(position=None if x is None else {"x": x, "y": y})
    tip = root.locator(".wb-tip")
    tip.wait_for(state="visible")
    return tip.inner_text()


# ------------------------------------------------------------------------------------------------ the test
def test_views_in_real_jupyterlab(lab, page, artifacts):
    nb = Notebook(page, lab)
    setup = nb.run(0, timeout=180)
    assert "SOURCE" in setup

    # --- TokenView: chips, ids, visible whitespace, Korean/emoji, special style, hover details
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
    ids = [int(chips.nth(i).locator(".wb-id").inner_text()) for i in range(n)]
    assert ids[0] == int(chips.nth(0).get_attribute("data-id"))
    tip = _hover_tip(tv, chips.nth(1))
    assert f"id {ids[1]}" in tip and "bytes " in tip and "chars [" in tip
    page.mouse.move(0, 0)
    shot(nb.cell(1).locator(".jp-OutputArea"), "token_view", artifacts)

    # --- the hostile token is text: no <img>/<i>/<b> element, no dialog
    nb.run(2)
    hv = nb.cell(2).locator(".wb-tokenview")
    hv.locator(".wb-tok").first.wait_for()
    assert hv.locator(".wb-tok .wb-text").all_inner_texts()[:3] == [HOSTILE.replace(" ", "·"), "<b>bold</b>",
                                                                     "</script><i>pwn</i>"]
    assert page.locator(".jp-OutputArea img[src='x'], .jp-OutputArea i, .wb-root b").count() == 0
    assert tv.locator(".wb-tok .wb-text").all_inner_texts()  # the tokenizer view: also no element from the text
    assert page.locator(".wb-root img").count() == 0

    # --- AttentionView: heatmap data, hover read-out, thumbnails, query click -> attention over the text
    nb.run(3)
    nb.run(4)
    expect = nb.printed(4, "EXPECT_ATTN")
    av = nb.cell(3).locator(".wb-attentionview")
    canvas = av.locator("canvas.wb-heatmap")
    page.wait_for_function("(c) => c.dataset.rows && Number(c.dataset.rows) > 0", arg=canvas.element_handle())
    assert [int(canvas.get_attribute("data-rows")), int(canvas.get_attribute("data-cols"))] == expect["shape"]
    assert (canvas.get_attribute("data-layer"), canvas.get_attribute("data-head")) == ("1", "1") == \
        (str(expect["layer"]), str(expect["head"]))
    assert av.locator(".wb-thumb").count() == expect["n_heads"]
    assert "wb-active" in av.locator(".wb-thumb").nth(1).get_attribute("class")
    assert av.locator(".wb-qlabel").all_inner_texts() == expect["labels"][: expect["shape"][0]]
    assert HOSTILE in "".join(av.locator(".wb-qlabel").all_inner_texts()).replace("·", " ")   # labels are text
    cell = float(canvas.get_attribute("data-cell"))
    tip = _hover_tip(av, canvas, (expect["k"] + 0.5) * cell, (expect["q"] + 0.5) * cell)
    assert f"query {expect['q']} {json.dumps(expect['q_text'], ensure_ascii=False)}" in tip
    assert f"key {expect['k']} {json.dumps(expect['k_text'], ensure_ascii=False)}" in tip
    weight = float(re.search(r"weight ([0-9.]+)", tip).group(1))
    assert abs(weight - expect["w"]) < 2e-3
    av.locator(f".wb-qlabel[data-q='{expect['q']}']").click()               # select a query token
    strip = av.locator(".wb-attn-text .wb-tok")
    page.wait_for_function("(el) => el.querySelector('.wb-attn-text .wb-tok[data-weight]') !== null",
                           arg=av.element_handle())
    assert "wb-query" in strip.nth(expect["q"]).get_attribute("class")
    for k in range(expect["q"] + 1):
        assert abs(float(strip.nth(k).get_attribute("data-weight")) - expect["row"][k]) < 2e-3
    page.mouse.move(0, 0)
    shot(nb.cell(3).locator(".jp-OutputArea"), "attention_view", artifacts)

    # --- LogitLensView: every cell's top token and probability; hover shows the top-k
    nb.run(5)
    nb.run(6)
    lens = nb.printed(6, "EXPECT_LENS")
    lv = nb.cell(5).locator(".wb-logitlensview")
    lv.locator("td.wb-lens-cell").first.wait_for()
    assert lv.locator("td.wb-lens-cell").count() == len(lens["rows"]) * len(lens["positions"])
    def cell_at(r, c):
        return lv.locator(f"td.wb-lens-cell[data-row='{r}'][data-pos='{lens['positions'][c]}']")

    for r, row in enumerate(lens["cells"]):
        for c, (text, prob, _) in enumerate(row):
            assert cell_at(r, c).locator(".wb-text").inner_text() == text
            assert abs(float(cell_at(r, c).get_attribute("data-prob")) - prob) < 2e-3
    tip = _hover_tip(lv, lv.locator("td.wb-lens-cell").first)
    assert len(re.findall(r"^\d\. ", tip, flags=re.M)) == 5
    page.mouse.move(0, 0)
    shot(nb.cell(5).locator(".jp-OutputArea"), "logit_lens_view", artifacts)
    lv.locator("input.wb-target-input").fill("the")                  # track a target token from the browser
    lv.locator("button.wb-track").click()
    page.wait_for_function("(el) => el.querySelector('td.wb-lens-cell[data-target]') !== null", arg=lv.element_handle())
    for r, row in enumerate(lens["cells"]):
        for c, (_, _, target_prob) in enumerate(row):
            assert abs(float(cell_at(r, c).get_attribute("data-target")) - target_prob) < 2e-3
    assert 'target "the"' in lv.locator(".wb-title").inner_text()

    # --- GenerationView: the token count changes while the cell runs
    nb.run(7)
    gv = nb.cell(7).locator(".jp-OutputArea")
    count = gv.locator(".wb-tokenview .wb-tokcount")
    count.wait_for()
    seen = [count.inner_text()]
    nb.start(8)
    deadline = time.time() + 120
    while not nb.done(8) and time.time() < deadline:
        text = count.inner_text()
        if text != seen[-1]:
            seen.append(text)
        time.sleep(0.05)
    assert nb.done(8), "generation cell did not finish"
    out = nb.output(8)
    assert "GEN 24 True" in out, out
    assert len(set(seen)) >= 4, f"token count changed only {len(set(seen)) - 1} times while the cell ran: {seen}"
    assert gv.locator(".wb-gen-status").inner_text().startswith("done: 24 new tokens")
    assert gv.locator("td.wb-lens-cell").count() > 0 and gv.locator("canvas.wb-heatmap").count() == 1
    shot(gv, "generation_view", artifacts)

    # --- Stop button (run_async: the kernel is idle, so the click reaches Python)
    nb.run(9)
    sv = nb.cell(9).locator(".jp-OutputArea")
    scount = sv.locator(".wb-tokenview .wb-tokcount")
    scount.wait_for()
    first = scount.inner_text()
    nb.run(10)
    page.wait_for_function("([el, t]) => el.textContent !== t", arg=[scount.element_handle(), first], timeout=60_000)
    sv.get_by_role("button", name="Stop").click()
    page.wait_for_function("(el) => el.textContent.startsWith('stopped')",
                           arg=sv.locator(".wb-gen-status").element_handle(), timeout=60_000)
    m = re.search(r"STOPPED (\d+) True True", nb.run(11))
    assert m and int(m.group(1)) < 400

    assert page.dialogs == [], f"a dialog fired: {page.dialogs}"
    assert page.locator("img[src='x']").count() == 0
