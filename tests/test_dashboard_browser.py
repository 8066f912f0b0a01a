"""The dashboard in a real browser: Debian's Chromium (headless, driven by Playwright) against
a real `rwkvforge dashboard` (streamlit run) on 127.0.0.1, on a workspace with real training
runs. Visits every page in English, Chinese and Russian and checks the visible text; checks
that the page and data-split choices stay marked after each language switch, that the System
page's checks table shows every fix whole and translated, and that the Compare legend and
step axis show whole run names and whole steps. Every screenshot is kept under the test's tmp
folder and in .test-artifacts/dashboard/ (git-ignored), the folder of test artefacts that
scripts/test.sh makes; a failing check also leaves failure-<test>.png there.

    apt-get install -y chromium        # /usr/bin/chromium; the test skips without it
    python -m pytest tests/test_dashboard_browser.py -q -m browser
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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
LANGS = i18n.LANGS
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 90_000  # a page rerun on 2 busy cores can take a while


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need_browser() -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: Debian's chromium is needed for the browser test "
                    "(apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """URL of a dashboard started with `python -m rwkvforge.dashboard.launch --port N`."""
    _need_browser()
    with _serve(build_workspace(tmp_path_factory), tmp_path_factory) as url:
        yield url


LONG_NAMES = tuple(f"sft-bsl-lora-r16-lr{lr}-ctx1024-warmup50-dataset-v2-{lr}"
                   for lr in ("1e-4", "3e-4"))


@pytest.fixture(scope="module")
def long_named_dashboard(tmp_path_factory):
    """A dashboard on a workspace whose two runs (copies of a real one) have long names."""
    _need_browser()
    src = build_workspace(tmp_path_factory) / "runs" / "run-a"
    ws = tmp_path_factory.mktemp("long-names")
    (ws / "pyproject.toml").write_text("[project]\nname = 'ws'\n")
    for i, name in enumerate(LONG_NAMES):
        run = ws / "runs" / name
        shutil.copytree(src, run)
        record = json.loads((run / "config.json").read_text())
        record["started_at"] = f"2026-12-0{i + 1}T10:00:00+00:00"  # a stable order
        (run / "config.json").write_text(json.dumps(record))
    with _serve(ws, tmp_path_factory) as url:
        yield url


@contextlib.contextmanager
def _serve(ws: Path, tmp_path_factory):
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


def _shot(page, out: Path, name: str, check: bool = True) -> None:
    path = out / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert not check or path.stat().st_size > 10_000, f"{path} looks empty"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, ARTIFACTS / path.name)


@contextlib.contextmanager
def _browser(url: str, tmp_path: Path):
    """(page, shots folder, JavaScript errors) of a Chromium tab on the dashboard's first
    page; on a failure, a screenshot of the page as it was (failure.png) is kept too."""
    from playwright.sync_api import sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    errors: list[str] = []
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1800})
        page = ctx.new_page()
        try:
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.get_by_text(i18n.t("en", "welcome")).wait_for()
            _wait_idle(page)
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page, shots, errors
        except Exception:
            _shot(page, shots, f"failure-{tmp_path.name}", check=False)
            raise
        finally:
            ctx.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def _marked(page, where: str) -> list[str]:
    """Labels of the radio options the browser shows as selected in `where` (sidebar|main)."""
    testid = {"sidebar": "stSidebar", "main": "stMain"}[where]
    return page.locator(f'[data-testid="{testid}"]').evaluate(
        "root => [...root.querySelectorAll('input[type=radio]')].filter(i => i.checked)"
        ".map(i => i.closest('label').innerText.trim())")


def test_every_page_in_every_language(dashboard, tmp_path) -> None:
    with _browser(dashboard, tmp_path) as (page, shots, _errors):
        for lang in LANGS:
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
                if name == "system":
                    _check_system_table(page, lang)
                _shot(page, shots, f"{name}-{lang}")
        # the language switch kept the page: still on System, now in English again
        _switch_language(page, "en")
        page.locator('[data-testid="stMain"]').get_by_role(
            "heading", name=i18n.t("en", "page.system"), exact=True).wait_for()
        assert _marked(page, "sidebar") == [i18n.t("en", "page.system")]
    assert sorted(p.name for p in shots.iterdir()) == sorted(
        f"{n}-{lang}.png" for n in PAGES for lang in LANGS)


def test_language_switch_keeps_the_choices_marked(dashboard, tmp_path) -> None:
    """After each switch the page option and the Data page's split option are still shown
    selected, under their new labels (before, after 中文 no option looked selected)."""
    with _browser(dashboard, tmp_path) as (page, shots, _errors):
        _goto_page(page, "en", "data")
        main = page.locator('[data-testid="stMain"]')
        main.get_by_text(i18n.t("en", "data.split.val"), exact=True).click()
        _wait_idle(page)
        for lang in ("en", "zh-CN", "ru", "en"):
            if _marked(page, "sidebar") != [i18n.t(lang, "page.data")]:
                _switch_language(page, lang)
            assert _marked(page, "sidebar") == [i18n.t(lang, "page.data")], lang
            assert _marked(page, "main") == [i18n.t(lang, "data.split.val")], lang
            # the validation split's numbers, not the training split's
            main.get_by_role("heading", name=i18n.t(lang, "data.histogram")).wait_for()
            _shot(page, shots, f"switch-data-{lang}")


def test_compare_legend_and_axis_show_whole_names_and_steps(long_named_dashboard,
                                                            tmp_path) -> None:
    """Compare page of two runs with 52-character names: the drawn legend (Vega's SVG) holds
    each whole name, uncut, and the step axis is labelled with whole numbers only."""
    with _browser(long_named_dashboard, tmp_path) as (page, shots, _errors):
        _goto_page(page, "en", "compare")
        chart = page.locator('[data-testid="stVegaLiteChart"]').first
        chart.locator("svg").wait_for()
        texts = chart.evaluate("c => [...c.querySelectorAll('svg text')]"
                               ".map(t => t.textContent)")
        for name in LONG_NAMES:
            assert name in texts, f"legend lacks the whole name {name!r}: {texts}"
        assert not [t for t in texts if t.endswith("…")], texts
        ticks = chart.evaluate(
            "c => [...c.querySelectorAll('svg .role-axis')].filter(a => a.querySelector("
            "'.role-axis-title')?.textContent === " + json.dumps(i18n.t("en", "metric.step"))
            + ").flatMap(a => [...a.querySelectorAll('.role-axis-label text')]"
            ".map(t => t.textContent))")
        assert ticks and all(re.fullmatch(r"\d+", t) for t in ticks), ticks
        _shot(page, shots, "compare-long-names")


def _check_system_table(page, lang: str) -> None:
    """The checks table: every cell shown whole (nothing cut at a column edge), the fix
    column in the page language, never a raw catalogue key."""
    from rwkvforge import doctor
    from rwkvforge.dashboard import system as S

    table = page.locator('[data-testid="stTable"]').first
    cells = table.evaluate("t => [...t.querySelectorAll('td, th')].map(c => "
                           "[c.innerText, c.scrollWidth <= c.clientWidth + 1])")
    cut = [text for text, whole in cells if not whole]
    assert not cut, f"{lang}: cells cut at the column edge: {cut}"
    shown = {text for text, _ in cells}
    assert i18n.t(lang, "col.fix") in shown
    for f in doctor.collect()["findings"]:
        fix = S.finding_text(f, "fix", lang) or i18n.t(lang, "system.no_fix")
        fix = fix.replace("`", "")  # `nvidia-smi` is drawn as code
        if f["id"] != "disk":  # free space may have moved since the page was drawn
            assert fix in shown, f"{lang}: fix of {f['id']} not shown whole: {fix!r}"
    assert not [t for t in shown if t.startswith(("doctor.", "check."))]


def _check_visible(lang: str, name: str, body: str, side: str) -> None:
    """Visible text of one page: its own language's strings, not another one's."""
    t = lambda key, **kw: i18n.t(lang, key, **kw)  # noqa: E731
    for p in PAGES:
        assert t(f"page.{p}") in side, f"{lang}: sidebar lacks {t(f'page.{p}')!r}"
        for other in LANGS:
            if other != lang and i18n.t(other, f"page.{p}") != t(f"page.{p}"):
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
        "system": [t("system.findings"), t("system.gpu"), t("system.packages"),
                   t("col.fix")],
    }[name]
    for text in expected:
        alternatives = text if isinstance(text, tuple) else (text,)
        assert any(a in body for a in alternatives), f"{name}/{lang}: {text!r} not visible"
    if lang != "en":  # no English interface text left on the page
        for key in ("welcome", "runs.pick", "compare.summary", "data.sample", "chat.generate",
                    "system.findings", "tab.curves", "col.fix", "system.no_fix"):
            assert i18n.t("en", key) not in body, f"{name}/{lang}: English {key!r} shown"
