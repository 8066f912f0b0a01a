"""The dashboard in a real browser: Debian's Chromium (headless, driven by Playwright) against
a real `rwkvforge dashboard` (streamlit run) on 127.0.0.1, on a workspace with real training
runs. Visits every page in English and Chinese, checks the visible text, and saves a
screenshot of each page under the test's tmp folder and .test-artifacts/dashboard/.

    apt-get install -y chromium        # /usr/bin/chromium; the test skips without it
    python -m pytest tests/test_dashboard_browser.py -q -m browser
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dashboard_workspace import build_workspace
from rwkvforge.dashboard import i18n

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / ".test-artifacts" / "dashboard"
PAGES = ("runs", "compare", "data", "chat", "system")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 90_000  # a page rerun on 2 busy cores can take a while


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """URL of a dashboard started with `python -m rwkvforge.dashboard.launch --port N`."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: Debian's chromium is needed for the browser test "
                    "(apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    ws = build_workspace(tmp_path_factory)
    port = _free_port()
    env = dict(os.environ, RWKVFORGE_ROOT=str(ws), OMP_NUM_THREADS="1")
    log = tmp_path_factory.mktemp("dashboard-server") / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "rwkvforge.dashboard.launch",
                                 "--port", str(port)], env=env, cwd=ws, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            assert proc.poll() is None, f"dashboard exited early:\n{log.read_text()}"
            assert time.time() < deadline, f"dashboard did not start:\n{log.read_text()}"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # launcher + its streamlit child
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_idle(page) -> None:
    """Wait until Streamlit has finished the current script run: no "running" status widget
    and no stale (greyed, left over from the previous run) elements, twice in a row."""
    page.wait_for_timeout(300)  # let a rerun that was just triggered start
    js = ("() => !document.querySelector('[data-testid=\"stStatusWidget\"]') && "
          "!document.querySelector('[data-stale=\"true\"]')")
    for _ in range(2):
        page.wait_for_function(js, timeout=TIMEOUT_MS)
        page.wait_for_timeout(300)


def _goto_page(page, lang: str, name: str) -> None:
    side = page.locator('[data-testid="stSidebar"]')
    side.get_by_text(i18n.t(lang, f"page.{name}"), exact=True).click()
    main = page.locator('[data-testid="stMain"]')
    main.get_by_role("heading", name=i18n.t(lang, f"page.{name}"),
                     exact=True).wait_for(timeout=TIMEOUT_MS)
    _wait_idle(page)


def _switch_language(page, to: str) -> None:
    side = page.locator('[data-testid="stSidebar"]')
    side.locator('[data-testid="stSelectbox"]').first.click()
    page.get_by_role("option", name=i18n.t(to, f"lang.{to}")).click()
    page.locator('[data-testid="stSidebar"]').get_by_text(
        i18n.t(to, "app.title"), exact=True).wait_for(timeout=TIMEOUT_MS)
    _wait_idle(page)


def _pick_tuned(page, adapter: str) -> None:
    label = i18n.t("en", "chat.tuned_adapter", path=adapter)
    page.locator('[data-testid="stSelectbox"]').filter(
        has_text=i18n.t("en", "chat.tuned")).click()
    page.get_by_role("option", name=label, exact=True).click()
    _wait_idle(page)


def _shot(page, out: Path, name: str) -> None:
    path = out / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000, f"{path} looks empty"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, ARTIFACTS / path.name)


def test_every_page_in_both_languages(dashboard, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    errors: list[str] = []
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1800})
        try:
            page = ctx.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(dashboard)
            page.get_by_text(i18n.t("en", "welcome")).wait_for()
            _wait_idle(page)
            page.on("pageerror", lambda e: errors.append(str(e)))
            for lang in ("en", "zh-CN"):
                if lang != "en":
                    _switch_language(page, lang)
                for name in PAGES:
                    _goto_page(page, lang, name)
                    if name == "chat":
                        if lang == "en":  # kept after the language switch (page state)
                            _pick_tuned(page, "runs/run-a/adapter")
                            page.get_by_label(i18n.t(lang, "chat.max_tokens")).fill("4")
                            page.keyboard.press("Enter")
                            _wait_idle(page)
                        page.get_by_role("button", name=i18n.t(lang, "chat.generate")).click()
                        page.get_by_text(i18n.t(lang, "chat.tuned_answer", model=i18n.t(
                            lang, "chat.tuned_adapter", path="runs/run-a/adapter"))).wait_for()
                        _wait_idle(page)
                    body = page.locator('[data-testid="stMain"]').inner_text()
                    side = page.locator('[data-testid="stSidebar"]').inner_text()
                    _check_visible(lang, name, body, side)
                    _shot(page, shots, f"{name}-{lang}")
            # the language switch kept the page: still on System, now in English again
            _switch_language(page, "en")
            page.locator('[data-testid="stMain"]').get_by_role(
                "heading", name=i18n.t("en", "page.system"), exact=True).wait_for()
        except Exception:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            raise
        finally:
            ctx.close()
    assert not errors, f"JavaScript errors in the page: {errors}"
    assert sorted(p.name for p in shots.iterdir()) == sorted(
        f"{n}-{lang}.png" for n in PAGES for lang in ("en", "zh-CN"))


def _check_visible(lang: str, name: str, body: str, side: str) -> None:
    """Visible text of one page: its own language's strings, not the other one's."""
    t = lambda key, **kw: i18n.t(lang, key, **kw)  # noqa: E731
    other = "zh-CN" if lang == "en" else "en"
    for p in PAGES:
        assert t(f"page.{p}") in side, f"{lang}: sidebar lacks {t(f'page.{p}')!r}"
        assert i18n.t(other, f"page.{p}") not in side.replace(t(f"page.{p}"), "")
    assert t("sidebar.language") in side
    expected = {
        # (table cells are drawn on a canvas: the run names checked are in the picker)
        "runs": [t("welcome"), (t("runs.detail", run="run-a"), t("runs.detail", run="run-b")),
                 t("runs.is_finished", step=3),
                 t("tab.curves"), t("metric.loss")],
        "compare": [t("compare.summary"), t("compare.configs"), "run-a", "run-b"],
        "data": [t("data.documents"), t("data.histogram"), t("data.sample"), "Assistant:"],
        "chat": [t("chat.base"), t("chat.generate"),
                 t("chat.base_answer", model="models/base/rwkv7-tiny-test.pth"),
                 t("chat.tuned_answer",
                   model=t("chat.tuned_adapter", path="runs/run-a/adapter"))],
        "system": [t("system.findings"), t("system.gpu"), t("system.packages")],
    }[name]
    for text in expected:
        alternatives = text if isinstance(text, tuple) else (text,)
        assert any(a in body for a in alternatives), f"{name}/{lang}: {text!r} not visible"
    if lang == "zh-CN":  # no English interface text left on the page
        for key in ("welcome", "runs.pick", "compare.summary", "data.sample", "chat.generate",
                    "system.findings", "tab.curves"):
            assert i18n.t("en", key) not in body, f"{name}: English {key!r} still shown"
