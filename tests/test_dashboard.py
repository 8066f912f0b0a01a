"""Dashboard: every page in every language (English, Chinese, Russian; Streamlit AppTest) on run
folders made by a real short training run, complete translation catalogues, the language
switch keeping page state and the marked choices, a failed run's reason, chart axes and
legends, refusal of paths outside the workspace, and the read-only run-folder reader.
tests/test_dashboard_browser.py checks the same in a real Chromium.

    cd /work/main && python -m pytest tests/test_dashboard.py -q
"""

from __future__ import annotations

import html as htmllib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import pytest

from dashboard_workspace import build_workspace
from rwkvforge.dashboard import i18n
from rwkvforge.dashboard import runs as R

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "src" / "rwkvforge" / "dashboard" / "app.py"
PAGES = ("runs", "compare", "data", "chat", "system")
LANGS = ("en", "zh-CN")  # tests that train a run of their own per language
ALL_LANGS = i18n.LANGS  # every language of the switch: each has a complete catalogue
SCRIPTS = {"zh-CN": "[\u4e00-\u9fff]", "ru": "[а-яА-ЯёЁ]"}  # the script of a translation
# widgets whose options are translated labels (the others list data: runs, files, models)
TRANSLATED_OPTIONS = {"w.lang", "w.page", "w.compare.metric", "w.data.split", "w.chat.tuned"}
PROSE = {"markdown", "caption", "header", "subheader", "title", "info", "warning", "error",
         "success", "text"}
# data containers: their content is run data / model output, not interface text
DATA_ELEMENTS = {"code", "json", "html", "empty"}


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """A workspace with a prepared dataset and two real short training runs (shared with
    tests/test_dashboard_browser.py; built once per session)."""
    return build_workspace(tmp_path_factory)


@pytest.fixture
def app(workspace, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("RWKVFORGE_ROOT", str(workspace))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def goto(at, page: str | None = None, lang: str | None = None):
    if lang is not None:
        at.selectbox(key="w.lang").set_value(lang)
    if page is not None:
        at.radio(key="w.page").set_value(page)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


# ---- what a page shows ----------------------------------------------------------------

def _chart_texts(spec: str) -> list[str]:
    """Axis titles and tooltip field names of a vega-lite chart (visible on the page)."""
    out: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            enc = x.get("encoding")
            if isinstance(enc, dict):
                for ch in ("x", "y", "color"):
                    title = (enc.get(ch) or {}).get("title")
                    if isinstance(title, str) and title:
                        out.append(title)
                for tip in enc.get("tooltip") or []:
                    if isinstance(tip, dict) and tip.get("title", tip.get("field")):
                        out.append(str(tip.get("title", tip.get("field"))))
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(json.loads(spec))
    return out


def visible_texts(at) -> list[tuple[str, str]]:
    """(where, text) for every piece of interface text the app rendered: prose, labels,
    help, translated options, table headers, tab / expander labels, chart titles. Data
    (code blocks, table cells, metric values, model output, decoded samples) is left out."""
    out: list[tuple[str, str]] = []
    for node in at._tree:
        typ = getattr(node, "type", "")
        proto = getattr(node, "proto", None)
        if proto is None or typ in DATA_ELEMENTS:
            continue
        if typ in PROSE:
            if typ == "markdown" and getattr(proto, "allow_html", False):
                continue  # the decoded sample: data rendered as HTML
            out.append((typ, proto.body))
        elif typ == "metric":
            out.append((typ, proto.label))
        elif typ in ("tab", "expander"):
            out.append((typ, proto.label))
        elif typ in ("dataframe", "table"):
            df = node.value
            out += [("dataframe header", str(c)) for c in df.columns]
            if df.index.name:
                out.append(("dataframe index", str(df.index.name)))
        elif typ == "vega_lite_chart":
            out += [("chart", s) for s in _chart_texts(proto.spec)]
        elif hasattr(proto, "label") and isinstance(getattr(proto, "label", None), str):
            out.append((f"{typ} label", proto.label))
            for attr in ("help", "placeholder"):
                v = getattr(proto, attr, "")
                if isinstance(v, str) and v:
                    out.append((f"{typ} {attr}", v))
            if node.key in TRANSLATED_OPTIONS:
                out += [(f"{typ} option", str(o)) for o in getattr(proto, "options", [])]
    return [(w, s) for w, s in out if s.strip()]


def _templates(lang: str) -> list[re.Pattern[str]]:
    return [i18n.template_regex(v) for v in i18n.catalogue(lang).values()]


def _clean(text: str) -> str:
    return text.replace("**", "").strip()


def untranslated(at, lang: str, data_values: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Rendered interface texts that are neither a catalogue text of `lang` (placeholders
    filled) nor one of the given data values (e.g. run names used as table headers)."""
    pats = _templates(lang)
    data = set(data_values)
    bad = []
    for where, text in visible_texts(at):
        s = _clean(text)
        if s in data or any(p.fullmatch(s) for p in pats):
            continue
        bad.append((where, s))
    return bad


def cell_texts(table) -> set[str]:
    """What the browser writes in a table's cells: a missing value is the placeholder."""
    return {str(v) for v in table.value.astype(object).where(table.value.notna(),
                                                             table.proto.placeholder or
                                                             "None").to_numpy().ravel()}


def prose(at) -> list[str]:
    return [_clean(s) for w, s in visible_texts(at)]


# ---- catalogues ---------------------------------------------------------------------------

def test_catalogues_consistent() -> None:
    """Every catalogue offered by the language switch has every key of the English one (the
    healthcheck texts included), no other key, and the same placeholders in each text."""
    assert i18n.check_catalogues() == []
    en = i18n.catalogue("en")
    assert len(en) > 200 and set(ALL_LANGS) == {"en", *SCRIPTS}
    for lang in ALL_LANGS:
        cat = i18n.catalogue(lang)
        assert set(cat) == set(en), f"{lang}: {sorted(set(en) ^ set(cat))}"
        for k, v in cat.items():
            assert i18n.placeholders(v) == i18n.placeholders(en[k]), f"{lang}:{k}"
            # a template that is only placeholders would match any string and hide
            # hard-coded text
            literal = re.sub(r"\{[^}]*\}", "", v)
            assert any(ch.isalpha() for ch in literal), f"{lang}:{k} has no literal text"
        if lang in SCRIPTS:  # a translation really is one: most values are in its script
            native = sum(bool(re.search(SCRIPTS[lang], v)) for v in cat.values())
            assert native > 0.8 * len(cat), f"{lang}: only {native} of {len(cat)} translated"


def test_catalogue_check_catches_differences(monkeypatch) -> None:
    real = i18n.catalogue

    def broken(lang: str) -> dict[str, str]:
        cat = dict(real(lang))
        if lang == "zh-CN":
            cat.pop("page.runs")
            cat.pop("doctor.gpu.none.fix")  # a healthcheck text (English from doctor.TEXTS)
            cat["only.in.zh"] = "多余"
            cat["runs.count"] = "共 {n} 次运行"  # lost {path}
        if lang == "ru":
            cat.pop("system.findings")
            cat.pop("doctor.disk.ok.message")
        return cat

    monkeypatch.setattr(i18n, "catalogue", broken)
    problems = "\n".join(i18n.check_catalogues())
    assert "'page.runs' missing from zh-CN.json" in problems
    assert "'doctor.gpu.none.fix' missing from zh-CN.json" in problems
    assert "'only.in.zh' missing from en.json (it is in zh-CN.json)" in problems
    assert "'runs.count': placeholders differ" in problems
    assert "'system.findings' missing from ru.json" in problems
    assert "'doctor.disk.ok.message' missing from ru.json" in problems
    with pytest.raises(KeyError, match="'system.findings' missing from .*ru.json"):
        i18n.t("ru", "system.findings")  # no silent English in a Russian page


def test_text_check_flags_hard_coded_strings() -> None:
    """The checker used below really fails on a string that is not in the catalogue."""
    from streamlit.testing.v1 import AppTest

    def script() -> None:
        import streamlit as st

        st.header("Runs")
        st.caption("Hard-coded text")
        st.selectbox("Language", ["a"], key="w.lang")

    at = AppTest.from_function(script).run()
    bad = untranslated(at, "en")
    assert ("caption", "Hard-coded text") in bad
    assert not any(s in ("Runs", "Language") for _, s in bad)
    assert ("header", "Runs") in untranslated(at, "zh-CN")


# ---- pages in both languages --------------------------------------------------------------

def _run_names(workspace: Path) -> list[str]:
    return [r.name for r in R.list_runs(workspace / "runs", workspace)]


@pytest.mark.parametrize("lang", ALL_LANGS)
@pytest.mark.parametrize("page", PAGES)
def test_page_renders_only_catalogue_text(app, workspace, page, lang) -> None:
    at = goto(app, page=page, lang=lang)
    if page == "chat":
        at.number_input(key="w.chat.max_tokens").set_value(4)
        at.button(key="chat.go").click().run()
        assert not at.exception
    texts = prose(at)
    t = lambda key, **kw: i18n.t(lang, key, **kw)  # noqa: E731
    assert t(f"page.{page}") in texts
    assert t("app.title") in texts
    bad = untranslated(at, lang, data_values=_run_names(workspace))
    assert not bad, f"{page}/{lang}: texts not in the {lang} catalogue: {bad}"
    other = "zh-CN" if lang == "en" else "en"
    assert i18n.t(other, f"page.{page}") not in texts


def test_runs_page_lists_real_runs(app, workspace) -> None:
    at = goto(app, page="runs", lang="en")
    table = at.dataframe[0].value
    assert sorted(table["Run"]) == ["run-a", "run-b"]
    assert set(table["Status"]) == {"finished"}
    assert all(s == "3/3" for s in table["Steps"])
    metrics = R.read_metrics(workspace / "runs" / "run-a" / "metrics.jsonl")
    best = min(r["loss"] for r in metrics if "loss" in r)
    row = table[table["Run"] == "run-a"].iloc[0]
    assert row["Best loss"] == pytest.approx(best)
    # detail of the selected run: curves, resolved config with sources, checkpoints
    at.selectbox(key="w.runs.selected").set_value("run-a").run()
    charts = [n for n in at._tree if getattr(n, "type", "") == "vega_lite_chart"]
    assert len(charts) >= 3  # loss, lr, tokens/s (+ memory)
    cfg = next(d.value for d in at.dataframe if "Source" in d.value.columns)
    lr_row = cfg[cfg["Key"] == "LR"].iloc[0]
    assert float(lr_row["Value"]) == pytest.approx(1e-3) and lr_row["Source"] == "cli"
    ck = next(d.value for d in at.dataframe if "Complete" in d.value.columns)
    assert 2 in list(ck["Step"]) and set(ck["Complete"]) == {"yes"}
    assert any("Finished after 3 steps." == s for s in prose(at))


def test_runs_page_shows_live_running_run(app, workspace, tmp_path, monkeypatch) -> None:
    """A copy of a real run whose status.json says running, with a live pid: shown as
    running with the live-refresh note; the same copy with a dead pid is resumable."""
    from streamlit.testing.v1 import AppTest

    ws = tmp_path / "ws"
    shutil.copytree(workspace / "runs" / "run-a", ws / "runs" / "run-live")
    st_path = ws / "runs" / "run-live" / "status.json"
    status = json.loads(st_path.read_text())
    status.update(state="running", pid=os.getpid(), updated=time.time(), step=2)
    st_path.write_text(json.dumps(status))
    monkeypatch.setenv("RWKVFORGE_ROOT", str(ws))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    assert list(at.dataframe[0].value["Status"]) == ["running"]
    assert i18n.t("en", "runs.live", seconds=2.0) in prose(at)
    status["pid"] = 2**22 + 12345  # no such process
    st_path.write_text(json.dumps(status))
    at.run()
    assert list(at.dataframe[0].value["Status"]) == ["resumable"]


def test_compare_page_overlays_runs_and_diffs_configs(app) -> None:
    at = goto(app, page="compare", lang="en")
    assert sorted(at.multiselect(key="w.compare.selected").value) == ["run-a", "run-b"]
    chart = next(n for n in at._tree if getattr(n, "type", "") == "vega_lite_chart")
    assert chart is not None
    diff = next(d.value for d in at.dataframe if "run-a" in d.value.columns)
    assert "LR" in diff.index and "RUN_NAME" in diff.index
    assert "LORA_R" not in diff.index  # same in both: hidden when only differences are shown
    at.checkbox(key="w.compare.only_diff").uncheck().run()
    full = next(d.value for d in at.dataframe if "run-a" in d.value.columns)
    assert "LORA_R" in full.index and len(full) > len(diff)


def test_data_page_shows_prepared_dataset(app, workspace) -> None:
    from rwkvforge.data.loader import open_split

    at = goto(app, page="data", lang="en")
    split = open_split(workspace / "data" / "processed" / "sft.meta.json", "train")
    metrics = {m.proto.label: m.proto.body for m in at.metric}
    assert metrics["Documents"] == f"{split.num_examples:,}"
    assert metrics["Tokens"] == f"{int(split.ids.sizes.sum()):,}"
    bars = [n for n in at._tree if getattr(n, "type", "") == "vega_lite_chart"]
    assert bars, "no length histogram"
    from rwkvforge.tokenizer import get_tokenizer

    def sample() -> str:
        return next(m.proto.body for m in at.markdown if m.proto.allow_html)

    # document 0, decoded, with one green span per trained token
    ids = [int(x) for x in split.ids[0]]
    mask = [int(x) for x in split.mask[0]]
    assert sample().count("#c8f7c5") == sum(mask) and 0 < sum(mask) < len(mask)
    eot = i18n.t("en", "data.eot")
    shown = htmllib.unescape(re.sub(r"<[^>]+>", "", sample()))
    assert ids[-1] == 0 and shown == get_tokenizer().decode(ids[:-1]) + eot
    assert shown.startswith("User: ") and "Assistant:" in shown
    # another document, then the validation split
    at.number_input(key="w.data.doc").set_value(2).run()
    ids2 = [int(x) for x in split.ids[2]]
    shown2 = htmllib.unescape(re.sub(r"<[^>]+>", "", sample()))
    assert shown2 == get_tokenizer().decode(ids2[:-1]) + eot != shown
    at.radio(key="w.data.split").set_value("val").run()
    val = open_split(workspace / "data" / "processed" / "sft.meta.json", "val")
    metrics = {m.proto.label: m.proto.body for m in at.metric}
    assert metrics["Documents"] == f"{val.num_examples:,}"


def test_chat_page_base_and_tuned_side_by_side(app, workspace) -> None:
    at = goto(app, page="chat", lang="en")
    assert "base + adapter runs/run-a/adapter" in at.selectbox(key="w.chat.tuned").options
    at.selectbox(key="w.chat.tuned").set_value("adapter:runs/run-a/adapter")
    at.number_input(key="w.chat.temperature").set_value(0.0)
    at.number_input(key="w.chat.max_tokens").set_value(8)
    at.button(key="chat.go").click().run()
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    answers = [c.value for c in at.code]
    assert len(answers) == 2
    heads = prose(at)
    assert any(h.startswith("Base: models/base/") for h in heads)
    assert any(h.startswith("Tuned: base + adapter runs/run-a/adapter") for h in heads)
    # greedy decoding of the same prompt with the same weights gives the same text
    from rwkvforge.dashboard import chat as C

    eng = C.load_engine(workspace / "models" / "base" / "rwkv7-tiny-test.pth")
    req = C.ChatRequest(system="", prompt=i18n.t("en", "chat.default_prompt"),
                        max_tokens=8, temperature=0.0)
    assert C.answer(eng, req).text == answers[0]
    # the page decodes on the workspace's INFER_FAST, as infer / serve (the default: bf16)
    import torch

    assert eng.model.infer_dtype is torch.bfloat16
    assert C.load_engine(workspace / "models" / "base" / "rwkv7-tiny-test.pth",
                         fast="none").model.infer_dtype is None


def test_chat_answer_uses_the_one_chat_encoding_and_defaults() -> None:
    """The Chat page encodes and samples as infer / serve do: encode_chat_prompt's ids,
    generate.chat_params (chat defaults, the reply ends at its turn's end)."""
    from rwkvforge.dashboard import chat as C
    from rwkvforge.generate import CHAT_STOP, chat_params, chat_turn, encode_chat_prompt
    from rwkvforge.tokenizer import get_tokenizer

    seen = {}

    class Handle:
        completion_tokens = 2

        def result(self) -> str:
            return " hi there "

    class Engine:
        tok = get_tokenizer()

        def generate(self, ids, params):
            seen.update(ids=ids, params=params)
            return Handle()

    req = C.ChatRequest(system="Be brief.", prompt="Hello\n\n\nthere", max_tokens=5)
    ans = C.answer(Engine(), req)
    assert seen["ids"] == encode_chat_prompt(chat_turn(req.prompt, req.system), Engine.tok)[0]
    assert seen["params"] == chat_params(temperature=req.temperature, top_p=req.top_p,
                                         max_tokens=5, seed=req.seed)
    assert seen["params"].stop == CHAT_STOP
    assert ans.text == "hi there" and ans.n_tokens == 2


def test_system_page_shows_healthcheck(app) -> None:
    from rwkvforge import doctor

    at = goto(app, page="system", lang="en")
    checks = at.table[0].value  # a table whose cells wrap: a long fix is never cut
    findings = doctor.collect()["findings"]
    assert len(checks) == len(findings) and not at.dataframe[0].value.empty
    gpu = next(d.value for d in at.dataframe
               if "Key" in d.value.columns and any(str(k).startswith("available")
                                                    for k in d.value["Key"]))
    assert len(gpu) > 0
    # nothing reads "None": a value the healthcheck could not find is shown as a dash
    for d in at.dataframe:
        assert "None" not in cell_texts(d)


@pytest.mark.parametrize("lang", ALL_LANGS)
def test_system_page_shows_findings_in_page_language(app, lang) -> None:
    """Check name, message and fix of each check on this machine are the page language's
    catalogue text ("check.<group>", "doctor.<key>.*") filled with the finding's values, a
    check with nothing to fix says so; in Chinese and Russian, no English left."""
    from rwkvforge import doctor

    at = goto(app, page="system", lang=lang)
    col = {c: i18n.t(lang, f"col.{c}") for c in ("check", "message", "fix")}
    table = next(d.value for d in at.table if col["message"] in d.value.columns)
    findings = doctor.collect()["findings"]
    assert list(table[col["check"]]) == [i18n.t(lang, f"check.{f['key'].split('.')[0]}")
                                         for f in findings]
    cat = i18n.catalogue(lang)
    for f, message, fix in zip(findings, table[col["message"]], table[col["fix"]]):
        assert i18n.template_regex(cat[f"doctor.{f['key']}.message"]).fullmatch(message)
        if f["fix"]:
            assert i18n.template_regex(cat[f"doctor.{f['key']}.fix"]).fullmatch(fix)
        else:
            assert fix == i18n.t(lang, "system.no_fix")
        assert not fix.startswith("doctor.") and not message.startswith("doctor.")
        if lang in SCRIPTS:
            assert re.search(SCRIPTS[lang], message) and message != f["message"]
        else:
            assert message == f["message"] or f["id"] == "disk"  # free space may have moved


def test_finding_text_falls_back_to_the_doctors_english() -> None:
    from rwkvforge.dashboard import system as S

    old = {"id": "gpu", "level": "warn", "message": "No GPU.", "fix": "Install a driver."}
    assert S.finding_text(old, "message", "zh-CN") == "No GPU."  # an older doctor: no key
    new = {**old, "key": "gpu.none", "params": {}}
    assert S.finding_text(new, "fix", "zh-CN") == i18n.t("zh-CN", "doctor.gpu.none.fix")
    assert S.finding_text({**new, "fix": ""}, "fix", "zh-CN") == ""
    newer = {**old, "key": "gpu.from_a_newer_doctor", "params": {"x": 1}}
    assert S.finding_text(newer, "fix", "zh-CN") == "Install a driver."
    disk = {**old, "key": "disk.ok", "params": {}}  # its {free_gib} has no value
    assert S.finding_text(disk, "message", "zh-CN") == "No GPU."


def test_english_catalogue_takes_doctor_texts_from_the_doctor() -> None:
    from rwkvforge import doctor

    en = i18n.catalogue("en")
    assert {k: v for k, v in en.items() if k.startswith("doctor.")} == doctor.catalogue_entries()
    raw = json.loads((i18n.CATALOGUE_DIR / "en.json").read_text(encoding="utf-8"))
    assert not any(k.startswith("doctor.") for k in raw)
    with pytest.raises(i18n.CatalogueError, match="doctor.gpu.none.message"):
        i18n._with_doctor_texts({**raw, "doctor.gpu.none.message": "a copy"},
                                i18n.CATALOGUE_DIR / "en.json")


# ---- state across the language switch ------------------------------------------------------

def test_language_switch_keeps_page_state(app) -> None:
    at = goto(app, page="runs", lang="en")
    at.selectbox(key="w.runs.selected").set_value("run-b").run()
    goto(at, lang="zh-CN")
    assert at.radio(key="w.page").value == "runs"
    assert at.selectbox(key="w.runs.selected").value == "run-b"
    assert i18n.t("zh-CN", "runs.detail", run="run-b") in prose(at)

    goto(at, page="compare")
    at.radio(key="w.compare.metric").set_value("lr")
    at.checkbox(key="w.compare.only_diff").uncheck().run()
    goto(at, lang="en")
    assert at.radio(key="w.page").value == "compare"
    assert at.radio(key="w.compare.metric").value == "lr"
    assert at.checkbox(key="w.compare.only_diff").value is False

    goto(at, page="chat")
    at.text_area(key="w.chat.prompt").input("Привет, как дела?")
    at.number_input(key="w.chat.max_tokens").set_value(5)
    at.button(key="chat.go").click().run()
    before = [c.value for c in at.code]
    assert before
    goto(at, lang="zh-CN")
    assert at.text_area(key="w.chat.prompt").value == "Привет, как дела?"
    assert at.number_input(key="w.chat.max_tokens").value == 5
    assert [c.value for c in at.code] == before
    assert any(s.startswith("基础模型：") for s in prose(at))
    # back to a page left earlier: its state is still there
    goto(at, page="runs")
    assert at.selectbox(key="w.runs.selected").value == "run-b"


def test_choices_stay_marked_across_a_language_switch(app) -> None:
    """The browser shows a radio / selectbox choice by its label. After a switch the labels
    are new, so the app sends the same option again under its new label (set_value): before,
    the browser kept the old label and no page option (nor the data split) looked selected.
    tests/test_dashboard_browser.py checks the marks in Chromium."""
    at = goto(app, page="data", lang="en")
    at.radio(key="w.data.split").set_value("val").run()
    for lang in ("zh-CN", "ru", "en"):
        goto(at, lang=lang)
        for key, option, label in (("w.page", "data", "page.data"),
                                   ("w.data.split", "val", "data.split.val")):
            w = at.radio(key=key)
            assert w.value == option, (lang, key)
            assert w.proto.set_value and w.proto.raw_value == i18n.t(lang, label), (lang, key)
            assert list(w.proto.options)[list(w.options).index(w.proto.raw_value)] == \
                i18n.t(lang, label)
        at.run()  # a rerun without a switch leaves the browser's choice alone
        assert not at.radio(key="w.page").proto.set_value


def test_russian_pages_are_russian(app) -> None:
    """Russian is a whole language, not a welcome box: every page's interface text is from
    ru.json (test_page_renders_only_catalogue_text), and no English catalogue text is left."""
    english = {_clean(v) for k, v in i18n.catalogue("en").items()
               if v != i18n.catalogue("ru")[k] and not i18n.placeholders(v)}
    for page in PAGES:
        at = goto(app, page=page, lang="ru")
        texts = prose(at)
        assert i18n.t("ru", f"page.{page}") in texts
        assert not english & set(texts), f"{page}: English left: {english & set(texts)}"
    at = goto(app, page="runs")
    assert i18n.catalogue("ru")["welcome"] in prose(at)


# ---- safety ------------------------------------------------------------------------------

def test_paths_outside_workspace_are_refused(app, workspace, tmp_path) -> None:
    outside = tmp_path / "elsewhere"
    shutil.copytree(workspace / "runs", outside)
    at = goto(app, page="runs", lang="en")
    at.text_input(key="w.runs_dir").input(str(outside)).run()
    errors = [e.value for e in at.error]
    assert errors == [i18n.t("en", "error.outside", path=str(outside.resolve()),
                             root=str(workspace.resolve()))]
    assert not at.dataframe  # nothing from the outside folder is listed
    # a symlink inside the workspace that points outside is refused too
    link = workspace / "runs-link"
    link.symlink_to(outside)
    try:
        at.text_input(key="w.runs_dir").input("runs-link").run()
        assert len(at.error) == 1 and not at.dataframe
        at.text_input(key="w.runs_dir").input("runs").run()
        assert not at.error and len(at.dataframe[0].value) == 2
    finally:
        link.unlink()


def test_dashboard_never_writes_run_folders(app, workspace) -> None:
    def snapshot() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in (workspace / "runs").rglob("*")}

    before = snapshot()
    for page in PAGES:
        goto(app, page=page, lang="en")
    assert snapshot() == before


def _copy_run(workspace: Path, ws: Path, name: str, **status: Any) -> Path:
    run = ws / "runs" / name
    shutil.copytree(workspace / "runs" / "run-a", run)
    if status:
        st_path = run / "status.json"
        st_path.write_text(json.dumps({**json.loads(st_path.read_text()), **status}))
    return run


def test_failed_runs_show_their_reason_never_none(workspace, tmp_path, monkeypatch) -> None:
    """A failed run shows why: status.json's error, else the ERROR line the trainer logged,
    else a sentence that no reason was recorded (a killed process). Missing values in the
    tables are a dash, never "None"."""
    from streamlit.testing.v1 import AppTest

    ws = tmp_path / "ws"
    dead = 2**22 + 12345  # no such process
    killed = _copy_run(workspace, ws, "killed", state="running", pid=dead, error=None)
    crashed = _copy_run(workspace, ws, "crashed", state="failed", pid=dead, error=None)
    _copy_run(workspace, ws, "oom", state="failed", pid=dead, error="CUDA out of memory")
    for run in (killed, crashed, ws / "runs" / "oom"):
        shutil.rmtree(run / "checkpoints")  # nothing to resume from: failed
        (run / "metrics.jsonl").unlink()  # died before the first step: no loss yet
    with open(crashed / "train.log", "a", encoding="utf-8") as f:
        f.write("2026-12-07 09:00:00 ERROR run failed at step 2: RuntimeError: boom\n")
    monkeypatch.setenv("RWKVFORGE_ROOT", str(ws))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    table = at.dataframe[0]
    assert set(table.value["Status"]) == {"failed"}
    assert table.value["Best loss"].isna().all() and table.proto.placeholder == "—"
    for name, reason in (("killed", None), ("crashed", "run failed at step 2: RuntimeError: boom"),
                         ("oom", "CUDA out of memory")):
        at.selectbox(key="w.runs.selected").set_value(name).run()
        assert i18n.t("en", "runs.is_failed") in [e.value for e in at.error]
        codes = [c.value for c in at.code]
        assert "None" not in codes
        if reason is None:
            assert i18n.t("en", "runs.no_reason") in prose(at)
        else:
            assert codes[0] == reason and i18n.t("en", "runs.no_reason") not in prose(at)
        for d in at.dataframe:
            assert d.proto.placeholder == "—"
            assert "None" not in cell_texts(d)
        assert [m.proto.body for m in at.metric][1:3] == ["—", "—"]  # best / last loss


def test_reason_of_a_failed_run_comes_from_the_end_of_its_log(tmp_path) -> None:
    """status.json without an error: the ERROR the trainer logged as the run ended is the
    reason; one from an earlier attempt (records after it: the run was resumed, then
    killed) is not."""
    runs = tmp_path / "ws" / "runs"
    log = ("2026-12-07 09:00:00 INFO step 1/4 loss 2.0\n"
           "2026-12-07 09:00:05 ERROR run failed at step 1: OSError: [Errno 28] No space left\n"
           "2026-12-07 09:00:05 INFO loss plot written\n")
    later = "".join(f"2026-12-07 10:00:0{i} INFO step {i}/4 loss 1.5\n" for i in range(1, 4))
    for name, text in (("ended", log), ("resumed-then-killed", log + later)):
        (runs / name).mkdir(parents=True)
        (runs / name / "status.json").write_text(json.dumps(
            {"state": "running", "pid": 2**22 + 12345, "updated": 0, "error": None}))
        (runs / name / "train.log").write_text(text)
    got = {r.name: r for r in R.list_runs(runs, tmp_path / "ws")}
    assert got["ended"].status == "failed"
    assert got["ended"].error == "run failed at step 1: OSError: [Errno 28] No space left"
    assert got["resumed-then-killed"].status == "failed"
    assert got["resumed-then-killed"].error is None


def test_step_axes_have_whole_ticks_and_legends_keep_long_names(workspace, tmp_path,
                                                                 monkeypatch) -> None:
    """Vega-Lite spec of the curves: the step axis ticks only at integers (a 3-step run had
    0.5 steps), and the legend never cuts a run name (Vega's default cut at 160 px left ~24
    characters). tests/test_dashboard_browser.py reads the drawn legend in Chromium."""
    from streamlit.testing.v1 import AppTest

    ws = tmp_path / "ws"
    names = [f"sft-qwen-style-lora-r16-lr{lr}-ctx1024-bsl-dataset-v2" for lr in ("1e-4", "3e-4")]
    for name in names:
        _copy_run(workspace, ws, name)
    monkeypatch.setenv("RWKVFORGE_ROOT", str(ws))
    at = goto(AppTest.from_file(str(APP), default_timeout=60).run(), page="compare", lang="en")
    specs = [json.loads(n.proto.spec) for n in at._tree
             if getattr(n, "type", "") == "vega_lite_chart"]
    at = goto(at, page="runs")
    specs += [json.loads(n.proto.spec) for n in at._tree
              if getattr(n, "type", "") == "vega_lite_chart"]
    assert len(specs) >= 4
    for spec in specs:
        enc = spec["encoding"]
        assert enc["x"]["axis"]["format"] == "d" and enc["x"]["axis"]["tickMinStep"] == 1
        assert enc["color"]["legend"]["labelLimit"] == 0


# ---- reader units --------------------------------------------------------------------------

def test_classify_statuses(tmp_path) -> None:
    now = time.time()
    done = R.Checkpoint(step=4, path=tmp_path, complete=True, size_mb=0, mtime=now)
    partial = R.Checkpoint(step=6, path=tmp_path, complete=False, size_mb=0, mtime=now)
    alive = {"state": "running", "pid": os.getpid(), "updated": now}
    assert R.classify(alive, [], now) == "running"
    assert R.classify({**alive, "updated": now - R.STALE_AFTER_S - 1}, [], now) == "failed"
    assert R.classify({**alive, "pid": 2**22 + 12345}, [done], now) == "resumable"
    assert R.classify({**alive, "pid": 2**22 + 12345}, [partial], now) == "failed"
    assert R.classify({"state": "finished"}, [done], now) == "finished"
    assert R.classify({"state": "failed", "error": "OOM"}, [done, partial], now) == "resumable"
    assert R.classify(None, [], now) == "unknown"


def test_reader_tolerates_torn_files_and_lists_checkpoints(tmp_path) -> None:
    run = tmp_path / "runs" / "r"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "checkpoints" / "step-2" / "COMPLETE").write_text("")
    (run / "checkpoints" / "step-10").mkdir()
    (run / "checkpoints" / "step-12.tmp").mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.5}\n{"step": 2, "loss": 2.5}\n'
                                       '{"step": 3, "lo')
    (run / "status.json").write_text('{"state": "runn')  # being replaced right now
    info = R.read_run(run, root=tmp_path)
    assert [c.step for c in info.checkpoints] == [2, 10]
    assert [c.complete for c in info.checkpoints] == [True, False]
    assert info.best_loss == 2.5 and info.step == 2 and info.status == "resumable"
    with pytest.raises(R.PathRefused):
        R.list_runs("/etc", tmp_path)
    with pytest.raises(R.PathRefused):
        R.check_inside("runs/../../x", tmp_path / "runs")


# ---- launcher ------------------------------------------------------------------------------

def test_launch_command_binds_localhost(capsys) -> None:
    from rwkvforge.dashboard import launch

    assert launch.main(["--port", "8765", "--print-command"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("dashboard/app.py")
    i = cmd.index("--server.address")
    assert cmd[i + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8765"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert launch.main(["--port", "70000"]) == 2
    assert "not a TCP port" in capsys.readouterr().err


@pytest.mark.slow  # starts a real streamlit server
def test_sigterm_to_the_launcher_stops_the_server(workspace) -> None:
    """`dashboard.sh` killed with SIGTERM (a service manager, `kill`) must not leave the
    streamlit server running with the port held."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "RWKVFORGE_ROOT": str(workspace)}
    proc = subprocess.Popen([sys.executable, "-m", "rwkvforge.cli", "dashboard",
                             "--dashboard-port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening() -> bool:
        with socket.socket() as c:
            return c.connect_ex(("127.0.0.1", port)) == 0

    try:
        deadline = time.time() + 120
        while not listening() and time.time() < deadline:
            time.sleep(0.2)
        assert listening(), "the dashboard did not start"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while listening() and time.time() < deadline:
            time.sleep(0.2)
        assert not listening(), "the streamlit server outlived its launcher"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_datasets_reader_plain_binidx_and_histogram(workspace, tmp_path) -> None:
    """A bare binidx (e.g. from RWKV-LM's make_data.py) next to a prepared SFT dataset: both
    are found, the SFT mask streams are not listed as datasets, text is all trained."""
    from rwkvforge.dashboard import datasets as D
    from rwkvforge.data.binidx import write_binidx
    from rwkvforge.tokenizer import get_tokenizer

    root = tmp_path / "ws"
    shutil.copytree(workspace / "data" / "processed", root / "data" / "processed")
    tok = get_tokenizer()
    docs = [tok.encode("Hello world") + [0], tok.encode("Перем А = 1;") + [0]]
    write_binidx(root / "data" / "raw" / "plain", docs)
    found = [p.relative_to(root).as_posix() for p in D.find_datasets(root)]
    assert found == ["data/processed/sft.meta.json", "data/raw/plain.bin"]
    ds = D.open_dataset(root / "data" / "raw" / "plain.bin")
    assert ds.data_type == "text" and ds.lengths == [len(d) for d in docs]
    ids, mask = ds.document(1)
    assert ids == docs[1] and mask is None
    html = D.render_tokens_html(tok, ids, mask, "<EOT>")
    assert html.count(D.TRAINED_STYLE) == len(ids) and D.MASKED_STYLE not in html
    assert htmllib.unescape(re.sub(r"<[^>]+>", "", html)) == "Перем А = 1;<EOT>"
    assert D.histogram([5, 5, 9]) == [("5", 2), ("6", 0), ("7", 0), ("8", 0), ("9", 1)]
    assert sum(c for _, c in D.histogram(list(range(1000)))) == 1000
    with pytest.raises(D.DatasetError):
        D.open_dataset(root / "data" / "raw" / "missing.bin")


def test_bad_run_folders_never_hide_the_others(tmp_path) -> None:
    """Run folders written by hand or by other tools: wrong JSON shapes, a start that failed
    before training (only train.log), and symlinks that lead outside the workspace."""
    runs = tmp_path / "ws" / "runs"
    good = runs / "good"
    good.mkdir(parents=True)
    (good / "config.json").write_text('{"settings": {"max_steps": 4}}')
    (good / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"loss": 0.01}\n')
    for name, fname, text in (("a", "config.json", '{"settings": {"max_steps": "abc"}}'),
                              ("b", "config.json", '{"settings": [1, 2], "model": "x.pth"}'),
                              ("c", "status.json", '{"state": "failed", "step": "abc"}'),
                              ("d", "config.json", '{"files": 5, "sources": []}')):
        (runs / name).mkdir()
        (runs / name / fname).write_text(text)
    (runs / "early").mkdir()
    (runs / "early" / "train.log").write_text(
        "2026-11-22 10:00:00 INFO DEMO RUN\n2026-11-22 10:00:01 ERROR the run did not start: "
        "BASE_MODEL x.pth: model file not found.\n")
    (runs / "setting-up").mkdir()
    (runs / "setting-up" / "train.log").write_text("2026-11-22 10:00:00 INFO DEMO RUN\n")
    (runs / "gone").mkdir()
    (runs / "gone" / "train.log").write_text("2026-11-22 10:00:00 INFO DEMO RUN\n")
    old = time.time() - R.STALE_AFTER_S - 5
    os.utime(runs / "gone" / "train.log", (old, old))
    outside = tmp_path / "outside"
    (outside / "step-1").mkdir(parents=True)
    (outside / "step-1" / "COMPLETE").write_text("")
    (outside / "config.json").write_text('{"settings": {"max_steps": 9}}')
    (outside / "metrics.jsonl").write_text('{"step": 1, "loss": 42.0}\n')
    (runs / "evil").symlink_to(outside)
    (runs / "good" / "checkpoints").symlink_to(outside)
    (runs / "c" / "metrics.jsonl").symlink_to(outside / "metrics.jsonl")
    got = {r.name: r for r in R.list_runs(runs, tmp_path / "ws")}
    assert sorted(got) == ["a", "b", "c", "d", "early", "gone", "good", "setting-up"]  # no evil
    assert got["good"].max_steps == 4 and got["good"].best_loss == 2.0  # not the stepless 0.01
    assert got["good"].checkpoints == [] and got["c"].best_loss is None  # nothing outside
    assert got["a"].max_steps == 0 and got["c"].step == 0 and got["b"].profile == ""
    assert got["early"].status == "failed"
    assert got["early"].error == "BASE_MODEL x.pth: model file not found."
    assert got["setting-up"].status == "unknown" and "starting" in got["setting-up"].error
    assert got["gone"].status == "failed" and "before training began" in got["gone"].error
    assert R.config_rows(runs / "b") == []


def test_token_view_html_survives_blank_lines() -> None:
    """A blank line in the decoded text must not end Markdown's HTML block."""
    from rwkvforge.dashboard import datasets as D
    from rwkvforge.tokenizer import get_tokenizer

    tok = get_tokenizer()
    ids = tok.encode("User: q\n\nAssistant: a\r\n")
    html = D.render_tokens_html(tok, ids, [0] * len(ids), "<EOT>")
    assert "\n" not in html and "\r" not in html
    assert htmllib.unescape(re.sub(r"<[^>]+>", "", html)) == "User: q\n\nAssistant: a\r\n"


def test_dataset_metas_of_other_shapes_or_pointing_outside(workspace, tmp_path) -> None:
    from rwkvforge.dashboard import datasets as D

    root = tmp_path / "ws"
    shutil.copytree(workspace / "data" / "processed", root / "data" / "processed")
    proc = root / "data" / "processed"
    (proc / "list.meta.json").write_text("[1, 2]")
    (proc / "str.meta.json").write_text('{"format": "rwkvforge-data/1", "splits": "oops"}')
    meta = json.loads((proc / "sft.meta.json").read_text())
    meta["splits"]["train"]["prefix"] = "../../../outside/sft"
    (proc / "trav.meta.json").write_text(json.dumps(meta))
    found = {p.name for p in D.find_datasets(root)}
    assert {"list.meta.json", "str.meta.json", "trav.meta.json", "sft.meta.json"} <= found
    for name, why in (("list", "not a meta file"), ("str", "not a meta file"),
                      ("trav", "points outside the workspace")):
        with pytest.raises(D.DatasetError, match=why):
            D.open_dataset(proc / f"{name}.meta.json", root=root)
    assert D.open_dataset(proc / "sft.meta.json", root=root).data_type == "sft"


def test_metrics_are_read_incrementally_and_follow_a_rewrite(tmp_path) -> None:
    """A live page re-reads metrics every few seconds: appended lines are added, a torn line
    waits for its newline, and a file replaced by a resume (truncated) is read afresh."""
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    assert [r["step"] for r in R.read_metrics(m)] == [1]
    with open(m, "a") as f:
        f.write('ss": 2.5}\n{"step": 3, "loss": 2.0}')
    assert [r["step"] for r in R.read_metrics(m)] == [1, 2, 3]  # the last one has no newline
    with open(m, "a") as f:
        f.write("\n")
    assert [r["step"] for r in R.read_metrics(m)] == [1, 2, 3]
    tmp = tmp_path / "new"
    tmp.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 9.0}\n'
                   '{"step": 3, "loss": 8.0}\n{"step": 4, "loss": 7.0}\n')
    os.replace(tmp, m)  # what resume's truncate_metrics does (then training appends)
    assert [r["loss"] for r in R.read_metrics(m)] == [3.0, 9.0, 8.0, 7.0]


@pytest.mark.parametrize("lang", LANGS)
def test_dpo_run_shows_its_reward_curves(tmp_path, tiny_model_path, monkeypatch, lang) -> None:
    """A real 2-step DPO run (shipped preference sample): its detail page adds the reward
    accuracy and margin charts, titled in the page's language; an SFT run has none."""
    from streamlit.testing.v1 import AppTest

    from rwkvforge import config as cfgmod
    from rwkvforge import train as T

    ws = tmp_path / "ws"
    cli = {"base_model": str(tiny_model_path), "data_type": "dpo", "runs_dir": str(ws / "runs"),
           "data_file": str(ROOT / "data" / "samples" / "bsl_dpo.jsonl"),
           "data_prefix": str(tmp_path / "dpo"), "ctx_len": 160, "max_steps": 2,
           "lora_r": 4, "save_every": 0, "precision": "fp32", "micro_bsz": 2}
    T.Trainer(cfgmod.resolve(cli=cli, env={}, root=ROOT), ws / "runs" / "dpo-run", root=ROOT,
              progress=False).run()
    monkeypatch.setenv("RWKVFORGE_ROOT", str(ws))
    at = goto(AppTest.from_file(str(APP), default_timeout=60).run(), page="runs", lang=lang)
    at.selectbox(key="w.runs.selected").set_value("dpo-run").run()
    texts = prose(at)
    for key in ("metric.reward_acc", "metric.reward_margin"):
        assert i18n.t(lang, key) in texts, key
    charts = [n for n in at._tree if getattr(n, "type", "") == "vega_lite_chart"]
    assert len(charts) == 6  # loss, tokens/s, lr, memory + the two DPO charts
    assert not untranslated(at, lang, data_values=["dpo-run"])


def test_compare_page_reads_no_run_file_outside_the_workspace(tmp_path):
    """The Compare page's readers (run_metrics, config_rows) refuse a config.json or
    metrics.jsonl symlinked out of the workspace, like the Runs page."""
    ws = tmp_path / "ws"
    run = ws / "runs" / "sym"
    run.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text('{"settings": {"serve_api_key": "leaked"}}')
    (outside / "metrics.jsonl").write_text('{"step": 1, "loss": 42.0}\n')
    (run / "config.json").symlink_to(outside / "config.json")
    (run / "metrics.jsonl").symlink_to(outside / "metrics.jsonl")
    assert R.run_metrics(run, ws) == [] and R.config_rows(run, ws) == []
    inside = ws / "runs" / "ok"
    inside.mkdir()
    (inside / "config.json").write_text('{"settings": {"lr": 0.001}}')
    (inside / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert R.run_metrics(inside, ws) == [{"step": 1, "loss": 2.0}]
    assert R.config_rows(inside, ws) == [("LR", "0.001", "")]
    import inspect

    from rwkvforge.dashboard import app

    src = inspect.getsource(app)
    assert "R.read_metrics(" not in src  # every page goes through the checked readers
