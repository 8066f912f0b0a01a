"""The rwkvforge dashboard (Streamlit): Runs, Compare, Data, Chat and System pages, in
English, Chinese or Russian with one switch in the sidebar.

It only reads: run folders, prepared data and models inside the workspace root
(RWKVFORGE_ROOT, see rwkvforge.paths); any other path is refused with a visible message.
Every visible string comes from the catalogues in i18n/ (rwkvforge.dashboard.i18n).

    ./scripts/dashboard.sh                       # = rwkvforge dashboard
    streamlit run src/rwkvforge/dashboard/app.py --server.address 127.0.0.1
"""

from __future__ import annotations

import json
import math
import re
import shlex
import time
from pathlib import Path
from typing import Any, Callable

import altair as alt
import pandas as pd
import streamlit as st

from rwkvforge.dashboard import runs as R
from rwkvforge.dashboard import system as S
from rwkvforge.dashboard.i18n import LANGS, t
from rwkvforge.paths import workspace_root

PAGES = ("runs", "compare", "data", "chat", "system")
METRICS = ("loss", "val_loss", "lr", "tokens_per_s", "mem_mb", "grad_norm", "dpo_loss",
           "reward_acc", "val_reward_acc", "reward_margin")  # the last four: DPO runs
SYSTEM_SECTIONS = ("gpu", "torch", "memory", "python", "bitsandbytes", "os", "disk", "packages")
REFRESH_S = 2.0  # live-curve refresh period while a run is running
IDLE_REFRESH_S = 10.0  # the Runs page's look for a newly started run while none is running
MAX_POINTS = 2000  # per curve
NONE = "—"  # a missing value in a table (st.dataframe would write "None")
ss = st.session_state


# ---- state and text helpers ----------------------------------------------------------------------

def lang() -> str:
    return ss.get("lang", "en")


def tr(key: str, **kw: Any) -> str:
    return t(lang(), key, **kw)


def persisted(widget: Callable[..., Any], key: str, default: Any,
              options: list | tuple | None = None, **kwargs: Any) -> Any:
    """A widget whose value lives under the plain session key `key`, so it survives the
    widget being re-created (language switch, page switch). The widget itself uses
    `w.<key>`; its labels may change freely between reruns."""
    wkey = f"w.{key}"
    if key not in ss:
        ss[key] = default
    if options is not None:
        options = list(options)
        kwargs["options"] = options
        if widget is st.multiselect:
            ss[key] = [v for v in ss[key] if v in options]
        elif ss[key] not in options:
            ss[key] = options[0] if options else None
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    if lo is not None and hi is not None:  # e.g. a document index from a larger dataset
        for k in (key, wkey):
            if k in ss and not lo <= ss[k] <= hi:
                ss[k] = lo
    # The browser keeps a choice widget's value as the label it showed. When the labels change
    # (a language switch), the value is sent again, so the browser marks the same option in its
    # new label (without this, a radio / selectbox showed no option selected after a switch).
    fmt = kwargs.get("format_func")
    labels = [str(fmt(o)) for o in options] if fmt is not None and options is not None else None
    relabelled = labels is not None and ss.get(f"shown.{key}", labels) != labels
    if labels is not None:
        ss[f"shown.{key}"] = labels
    if wkey not in ss or relabelled:
        ss[wkey] = ss[key]
    elif options is not None and widget is st.multiselect:
        ss[wkey] = [v for v in ss[wkey] if v in options]
    elif options is not None and ss[wkey] not in options:
        ss[wkey] = ss[key]
    value = widget(key=wkey, **kwargs)
    ss[key] = value
    return value


def fmt_num(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return NONE
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def shown(x: Any) -> str:
    """A value read from a run's files as table text: "—" for a missing one (null in the
    JSON, or no key), never the word None."""
    if x is None or x == "":
        return NONE
    return x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)


def rel(path: Path | str) -> str:
    """A path shown relative to the workspace root when inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(workspace_root()))
    except ValueError:
        return str(p)


def line_chart(df: pd.DataFrame, y_title: str, series_title: str, height: int = 220) -> None:
    """Lines of every column of `df` against its index (the step). Built with Altair so
    that every axis, legend and tooltip title comes from the catalogue (st.line_chart
    shows its own English "value" / "color" tooltips)."""
    step = tr("metric.step")
    if len(df) > MAX_POINTS:  # thin long runs out: the browser draws every point
        df = df.iloc[::-(-len(df) // MAX_POINTS)]
    long = (df.rename_axis("x").reset_index()
            .melt(id_vars="x", var_name="series", value_name="y").dropna())
    chart = alt.Chart(long).mark_line(point=len(df) < 50).encode(
        # steps are whole numbers: ticks only at integers (a 3-step run had 0.5, 1.5 ...)
        x=alt.X("x:Q", title=step, axis=alt.Axis(format="d", tickMinStep=1)),
        y=alt.Y("y:Q", title=y_title, scale=alt.Scale(zero=False)),
        # one name per line, never cut (Vega's default cuts legend labels at 160 px, which
        # left ~24 characters of a run name): labelLimit 0 is "no limit"
        color=alt.Color("series:N", title=series_title,
                        legend=alt.Legend(orient="bottom", columns=1, labelLimit=0)),
        tooltip=[alt.Tooltip("x:Q", title=step, format="d"),
                 alt.Tooltip("series:N", title=series_title),
                 alt.Tooltip("y:Q", title=y_title, format=".5g")],
    ).properties(height=height)
    st.altair_chart(chart, width="stretch")


def labeler(prefix: str) -> Callable[[Any], str]:
    """A widget format_func giving the catalogue text `prefix + option` in the current
    language. The language is captured now: format functions are also called outside a
    script run (AppTest, reruns), where session state is not available."""
    code = lang()
    return lambda option: t(code, f"{prefix}{option}")


def tuned_labeler(code: str) -> Callable[[str], str]:
    def label(opt: str) -> str:
        if opt == "none":
            return t(code, "chat.tuned_none")
        kind, _, path = opt.partition(":")
        return t(code, f"chat.tuned_{kind}", path=path)

    return label


def status_label(status: str) -> str:
    return tr(f"status.{status}")


def refuse(err: R.PathRefused) -> None:
    st.error(tr("error.outside", path=err.path, root=err.root))


# ---- sidebar -------------------------------------------------------------------------------------

def sidebar() -> tuple[str, Path | None]:
    """Language switch, page choice and the runs folder. Returns (page, runs_dir)."""
    with st.sidebar:
        st.title(tr("app.title"))
        persisted(st.selectbox, "lang", "en", options=LANGS, label=tr("sidebar.language"),
                  format_func=lambda code: t(code, f"lang.{code}"))
        page = persisted(st.radio, "page", "runs", options=PAGES, label=tr("sidebar.page"),
                         format_func=labeler("page."))
        root = workspace_root()
        st.caption(tr("sidebar.workspace", path=str(root)))
        text = persisted(st.text_input, "runs_dir", default_runs_dir(),
                         label=tr("sidebar.runs_dir"), help=tr("sidebar.runs_dir_help"))
        try:
            runs_dir: Path | None = R.check_inside(text or "runs", root)
        except R.PathRefused as e:
            refuse(e)
            runs_dir = None
    return page, runs_dir


@st.cache_data(ttl=30)
def default_runs_dir() -> str:
    """RUNS_DIR of the resolved workspace settings ("runs" when they cannot be read)."""
    try:
        from rwkvforge.config import resolve

        return resolve(env={}).settings.runs_dir or "runs"
    except Exception:  # noqa: BLE001 - a broken workspace.env must not take the dashboard down
        return "runs"


# ---- Runs page -----------------------------------------------------------------------------------

def runs_table(runs: list[R.RunInfo]) -> pd.DataFrame:
    return pd.DataFrame({
        tr("col.run"): [r.name for r in runs],
        tr("col.status"): [status_label(r.status) for r in runs],
        tr("col.profile"): [shown(r.profile) for r in runs],
        tr("col.model"): [shown(r.model) for r in runs],
        tr("col.steps"): [f"{r.step}/{r.max_steps}" if r.max_steps else str(r.step)
                          for r in runs],
        tr("col.best_loss"): [r.best_loss for r in runs],
        tr("col.last_loss"): [r.last_loss for r in runs],
        tr("col.checkpoints"): [sum(c.complete for c in r.checkpoints) for r in runs],
        tr("col.started"): [shown(r.started_at) for r in runs],
    })


def metrics_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Metrics rows -> a frame indexed by step, one column per known metric."""
    recs = [r for r in rows if isinstance(r.get("step"), int)]
    if not recs:
        return pd.DataFrame()
    df = pd.DataFrame.from_records(recs)
    df = df.drop_duplicates("step", keep="last").set_index("step").sort_index()
    keep = [m for m in METRICS if m in df.columns]
    return df[keep].apply(pd.to_numeric, errors="coerce")


def curve(df: pd.DataFrame, columns: list[str]) -> None:
    """One chart: the given metric columns against the step, with translated names."""
    cols = [c for c in columns if c in df.columns and df[c].notna().any()]
    st.markdown(f"**{tr(f'metric.{columns[0]}')}**")
    if not cols:
        st.caption(tr("runs.no_metric"))
        return
    data = df[cols].rename(columns={c: tr(f"metric.{c}") for c in cols})
    line_chart(data, y_title=tr(f"metric.{columns[0]}"), series_title=tr("chart.series"))


def run_curves(run_dir: Path) -> None:
    rows = R.run_metrics(run_dir)
    df = metrics_frame(rows)
    if df.empty:
        st.info(tr("runs.no_metrics"))
        return
    c1, c2 = st.columns(2)
    with c1:
        curve(df, ["loss", "dpo_loss", "val_loss"])  # dpo_loss: DPO runs (without DPO_FTX)
        curve(df, ["tokens_per_s"])
    with c2:
        curve(df, ["lr"])
        curve(df, ["mem_mb"])
    if "reward_acc" in df.columns:  # a DPO run
        c1, c2 = st.columns(2)
        with c1:
            curve(df, ["reward_acc", "val_reward_acc"])
        with c2:
            curve(df, ["reward_margin"])


def md_literal(text: str) -> str:
    """`text` shown as itself in Markdown (a run name with *, _, $ ... is not formatting)."""
    return re.sub(r"([\\`*_\[\]#$<>~|])", r"\\\1", text)


def run_detail(run: R.RunInfo) -> None:
    st.subheader(tr("runs.detail", run=md_literal(run.name)))
    if run.status == "running":
        st.success(tr("runs.is_running", step=run.step, max_steps=run.max_steps))
    elif run.status == "resumable":
        last = max(c.step for c in run.checkpoints if c.complete)
        st.warning(tr("runs.is_resumable", step=last,
                      command=f"rwkvforge train --resume {shlex.quote(rel(run.path))}"))
    elif run.status == "failed":
        st.error(tr("runs.is_failed"))
        if not run.error:  # nothing in status.json nor at the end of train.log
            st.caption(tr("runs.no_reason"))
    elif run.status == "finished":
        st.success(tr("runs.is_finished", step=run.step))
    else:
        st.info(tr("runs.is_unknown"))
    if run.error:
        st.code(str(run.error), language=None)

    m = st.columns(4)
    m[0].metric(tr("col.steps"), f"{run.step}/{run.max_steps}" if run.max_steps else run.step)
    m[1].metric(tr("col.best_loss"), fmt_num(run.best_loss))
    m[2].metric(tr("col.last_loss"), fmt_num(run.last_loss))
    m[3].metric(tr("col.checkpoints"), sum(c.complete for c in run.checkpoints))

    tabs = st.tabs([tr("tab.curves"), tr("tab.config"), tr("tab.checkpoints"), tr("tab.log")])
    with tabs[0]:
        if run.status == "running":
            st.caption(tr("runs.live", seconds=REFRESH_S))
        run_curves(run.path)
    with tabs[1]:
        config_tab(run.path)
    with tabs[2]:
        checkpoints_tab(run)
    with tabs[3]:
        log = run.path / "train.log"
        if log.is_file() and R.is_within(log, workspace_root()):
            lines = log.read_text(encoding="utf-8", errors="replace").splitlines()[-200:]
            st.caption(tr("runs.log_tail", n=len(lines), path=rel(log)))
            st.code("\n".join(lines) or " ", language=None)
        else:
            st.info(tr("runs.no_log"))


def config_tab(run_dir: Path) -> None:
    path = run_dir / "config.json"
    if not R.is_within(path, workspace_root()):
        st.info(tr("runs.no_config"))
        return
    rows = R.config_rows(run_dir)
    if not rows:
        st.info(tr("runs.bad_config") if path.is_file() else tr("runs.no_config"))
        return
    record = R.read_json(path) or {}
    files = record.get("files")
    st.caption(tr("runs.config_caption"))
    st.dataframe(pd.DataFrame(rows, columns=[tr("col.key"), tr("col.value"),
                                             tr("col.source")]),
                 hide_index=True, width="stretch", placeholder=NONE)
    facts = [
        (tr("fact.git_sha"), shown(record.get("git_sha"))),
        (tr("fact.started"), shown(record.get("started_at"))),
        (tr("fact.model"), shown(record.get("model"))),
        (tr("fact.data"), shown(record.get("data"))),
        (tr("fact.hardware"), shown(record.get("hardware"))),
        (tr("fact.versions"), shown(record.get("versions"))),
        (tr("fact.files"), ", ".join(str(f) for f in files) if isinstance(files, list)
         else shown(files)),
    ]
    st.dataframe(pd.DataFrame(facts, columns=[tr("col.key"), tr("col.value")]),
                 hide_index=True, width="stretch", placeholder=NONE)


def checkpoints_tab(run: R.RunInfo) -> None:
    if not run.checkpoints:
        st.info(tr("runs.no_checkpoints"))
    else:
        st.dataframe(pd.DataFrame({
            tr("col.step"): [c.step for c in run.checkpoints],
            tr("col.complete"): [tr("yes") if c.complete else tr("no") for c in run.checkpoints],
            tr("col.size_mb"): [round(c.size_mb, 2) for c in run.checkpoints],
            tr("col.path"): [rel(c.path) for c in run.checkpoints],
            tr("col.time"): [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.mtime))
                             for c in run.checkpoints],
        }), hide_index=True, width="stretch", placeholder=NONE)
    if run.has_adapter:
        st.caption(tr("runs.adapter_at", path=rel(run.path / "adapter")))
    for p in run.merged:
        st.caption(tr("runs.merged_at", path=rel(p)))


def page_runs(runs_dir: Path | None) -> None:
    st.header(tr("page.runs"))
    st.info(tr("welcome"))
    if runs_dir is None:
        return
    live = any(r.status == "running" for r in R.list_runs(runs_dir))

    # While a run is going, the table, its status and curves re-read the run folders every
    # REFRESH_S seconds (only this part reruns, the rest of the page stays); while none is,
    # every IDLE_REFRESH_S seconds, so that a run started after the page opened shows up.
    @st.fragment(run_every=REFRESH_S if live else IDLE_REFRESH_S)
    def body() -> None:
        runs = R.list_runs(runs_dir)
        if live != any(r.status == "running" for r in runs):
            st.rerun(scope="app")  # a run started or the last one ended: switch the pace
        if not runs:
            st.info(tr("runs.none", path=rel(runs_dir)))
            return
        st.caption(tr("runs.count", n=len(runs), path=rel(runs_dir)))
        st.dataframe(runs_table(runs), hide_index=True, width="stretch", placeholder=NONE)
        names = [r.name for r in runs]
        name = persisted(st.selectbox, "runs.selected", names[0], options=names,
                         label=tr("runs.pick"))
        run_detail(next(r for r in runs if r.name == name))

    body()


# ---- Compare page --------------------------------------------------------------------------------

def page_compare(runs_dir: Path | None) -> None:
    st.header(tr("page.compare"))
    if runs_dir is None:
        return
    runs = R.list_runs(runs_dir)
    names = [r.name for r in runs]
    if len(names) < 2:
        st.info(tr("compare.need_two", n=len(names)))
        return
    chosen = persisted(st.multiselect, "compare.selected", names[:2], options=names,
                       label=tr("compare.pick"))
    if len(chosen) < 2:
        st.info(tr("compare.pick_more"))
        return
    picked = [r for r in runs if r.name in chosen]
    metric = persisted(st.radio, "compare.metric", "loss", options=METRICS,
                       label=tr("compare.metric"), format_func=labeler("metric."),
                       horizontal=True)
    series = {}
    for r in picked:
        df = metrics_frame(R.run_metrics(r.path))
        if metric in df.columns and df[metric].notna().any():
            series[r.name] = df[metric]
    st.subheader(tr("compare.curves", metric=tr(f"metric.{metric}")))
    if series:
        line_chart(pd.DataFrame(series), y_title=tr(f"metric.{metric}"),
                   series_title=tr("col.run"), height=320)
    else:
        st.caption(tr("runs.no_metric"))

    st.subheader(tr("compare.summary"))
    st.dataframe(runs_table(picked), hide_index=True, width="stretch", placeholder=NONE)

    st.subheader(tr("compare.configs"))
    only_diff = persisted(st.checkbox, "compare.only_diff", True, label=tr("compare.only_diff"))
    table: dict[str, dict[str, str]] = {}
    for r in picked:
        for key, value, _src in R.config_rows(r.path):
            table.setdefault(key, {})[r.name] = value
    frame = pd.DataFrame.from_dict(table, orient="index", columns=[r.name for r in picked])
    if only_diff and not frame.empty:
        frame = frame[frame.nunique(axis=1, dropna=False) > 1]
    if frame.empty:
        st.caption(tr("compare.same"))
    else:
        frame.index.name = tr("col.key")
        st.dataframe(frame, width="stretch", placeholder=NONE)


# ---- Data page -----------------------------------------------------------------------------------

def page_data() -> None:
    from rwkvforge.dashboard import datasets as D

    st.header(tr("page.data"))
    root = workspace_root()
    found = D.find_datasets(root)
    if not found:
        st.info(tr("data.none", path=rel(root / "data" / "processed")))
        return
    labels = [rel(p) for p in found]
    chosen = persisted(st.selectbox, "data.dataset", labels[0], options=labels,
                       label=tr("data.pick"))
    try:
        path = R.check_inside(chosen, root)
    except R.PathRefused as e:
        refuse(e)
        return
    splits = D.splits_of(path)
    split = persisted(st.radio, "data.split", splits[0], options=splits,
                      label=tr("data.split"), format_func=labeler("data.split."),
                      horizontal=True)
    try:
        ds = D.open_dataset(path, split)
    except D.DatasetError as e:
        st.error(tr("data.unreadable", path=chosen))
        st.code(str(e), language=None)
        return
    lengths = ds.lengths
    m = st.columns(4)
    m[0].metric(tr("data.documents"), f"{len(lengths):,}")
    m[1].metric(tr("data.tokens"), f"{int(sum(lengths)):,}")
    m[2].metric(tr("data.mean_len"), fmt_num(float(sum(lengths)) / max(len(lengths), 1)))
    m[3].metric(tr("data.max_len"), f"{max(lengths) if lengths else 0:,}")
    st.caption(tr("data.kind", kind=tr(f"data.kind.{ds.data_type}")
                  if ds.data_type in ("text", "sft", "dpo") else ds.data_type))

    st.subheader(tr("data.histogram"))
    hist = pd.DataFrame(D.histogram(lengths), columns=["bin", "count"])
    bars = alt.Chart(hist).mark_bar().encode(
        x=alt.X("bin:N", title=tr("data.length"), sort=None),
        y=alt.Y("count:Q", title=tr("data.count")),
        tooltip=[alt.Tooltip("bin:N", title=tr("data.length")),
                 alt.Tooltip("count:Q", title=tr("data.count"))],
    ).properties(height=240)
    st.altair_chart(bars, width="stretch")

    st.subheader(tr("data.sample"))
    if not lengths:
        return
    idx = persisted(st.number_input, "data.doc", 0, label=tr("data.doc_index"),
                    min_value=0, max_value=len(lengths) - 1, step=1)
    boundaries = persisted(st.checkbox, "data.boundaries", False,
                           label=tr("data.boundaries"))
    ids, mask = ds.document(int(idx))
    st.caption(tr("data.doc_caption", i=int(idx), n=len(ids)))
    if len(ids) > D.MAX_SHOWN_TOKENS:
        st.caption(tr("data.cut", n=D.MAX_SHOWN_TOKENS))
    if mask is not None:
        st.caption(tr("data.mask_legend", trained=sum(mask), masked=len(mask) - sum(mask)))
    else:
        st.caption(tr("data.no_mask"))
    st.markdown(D.render_tokens_html(ds.tokenizer, ids, mask, tr("data.eot"), boundaries),
                unsafe_allow_html=True)


# ---- Chat page -----------------------------------------------------------------------------------

@st.cache_resource(max_entries=2, show_spinner=False)
def _engine(model_path: str, adapter: str | None, state: str | None = None):
    from rwkvforge.dashboard import chat as C

    return C.load_engine(Path(model_path), Path(adapter) if adapter else None,
                         Path(state) if state else None)


def page_chat(runs_dir: Path | None) -> None:
    from rwkvforge.dashboard import chat as C

    st.header(tr("page.chat"))
    root = workspace_root()
    models = [rel(p) for p in R.find_models(root)]
    if not models:
        st.info(tr("chat.no_models", path=rel(root / "models")))
        return
    base = persisted(st.selectbox, "chat.base", models[0], options=models,
                     label=tr("chat.base"))
    tuned_opts = ["none"]
    if runs_dir is not None:
        tuned_opts += [f"adapter:{rel(p)}" for p in R.find_adapters(runs_dir, root)]
        tuned_opts += [f"state:{rel(p)}" for p in R.find_states(runs_dir, root)]
    tuned_opts += [f"merged:{m}" for m in models if m != base]

    tuned_label = tuned_labeler(lang())
    tuned = persisted(st.selectbox, "chat.tuned", "none", options=tuned_opts,
                      label=tr("chat.tuned"), format_func=tuned_label)
    system = persisted(st.text_input, "chat.system", "", label=tr("chat.system"))
    defaults = {t(code, "chat.default_prompt") for code in LANGS}
    for k in ("chat.prompt", "w.chat.prompt"):  # an untouched default follows the language
        if ss.get(k) in defaults:
            ss[k] = tr("chat.default_prompt")
    prompt = persisted(st.text_area, "chat.prompt", tr("chat.default_prompt"),
                       label=tr("chat.prompt"), height=100)
    c = st.columns(4)
    d = C.ChatRequest("", "")  # the page's defaults (sampling: generate.CHAT_DEFAULTS)
    with c[0]:
        max_tokens = persisted(st.number_input, "chat.max_tokens", d.max_tokens,
                               label=tr("chat.max_tokens"), min_value=1, max_value=1024)
    with c[1]:
        temperature = persisted(st.number_input, "chat.temperature", d.temperature,
                                label=tr("chat.temperature"), min_value=0.0, max_value=3.0,
                                step=0.1)
    with c[2]:
        top_p = persisted(st.number_input, "chat.top_p", d.top_p, label=tr("chat.top_p"),
                          min_value=0.0, max_value=1.0, step=0.05)
    with c[3]:
        seed = persisted(st.number_input, "chat.seed", d.seed, label=tr("chat.seed"),
                         min_value=0, max_value=2**31 - 1)

    if st.button(tr("chat.generate"), key="chat.go", type="primary"):
        try:
            base_path = R.check_inside(base, root)
            tuned_model, adapter, state = base_path, None, None
            if tuned.startswith("adapter:"):
                adapter = R.check_inside(tuned.partition(":")[2], root)
            elif tuned.startswith("state:"):
                state = R.check_inside(tuned.partition(":")[2], root)
            elif tuned.startswith("merged:"):
                tuned_model = R.check_inside(tuned.partition(":")[2], root)
        except R.PathRefused as e:
            refuse(e)
            return
        req = C.ChatRequest(system=system, prompt=prompt, max_tokens=int(max_tokens),
                            temperature=float(temperature), top_p=float(top_p),
                            seed=int(seed))
        answers = {}
        with st.spinner(tr("chat.generating")):
            try:
                answers["base"] = C.answer(_engine(str(base_path), None), req)
                if tuned != "none":
                    answers["tuned"] = C.answer(_engine(
                        str(tuned_model), str(adapter) if adapter else None,
                        str(state) if state else None), req)
            except Exception as e:  # noqa: BLE001 - show the engine's own error to the user
                ss["chat.error"] = f"{type(e).__name__}: {e}"
                answers = {}
            else:
                ss["chat.error"] = None
        ss["chat.answers"] = answers
        ss["chat.asked"] = {"prompt": prompt, "base": base, "tuned": tuned}

    if ss.get("chat.error"):
        st.error(tr("chat.failed"))
        st.code(ss["chat.error"], language=None)
    answers = ss.get("chat.answers") or {}
    if answers:
        asked = ss.get("chat.asked", {})
        left, right = st.columns(2)
        with left:
            st.markdown(f"**{tr('chat.base_answer', model=asked.get('base', ''))}**")
            st.code(answers["base"].text or " ", language=None, wrap_lines=True)
            st.caption(tr("chat.stats", n=answers["base"].n_tokens,
                          tps=fmt_num(answers["base"].tokens_per_s, 3)))
        with right:
            if "tuned" in answers:
                st.markdown(f"**{tr('chat.tuned_answer', model=tuned_label(asked['tuned']))}**")
                st.code(answers["tuned"].text or " ", language=None, wrap_lines=True)
                st.caption(tr("chat.stats", n=answers["tuned"].n_tokens,
                              tps=fmt_num(answers["tuned"].tokens_per_s, 3)))
            else:
                st.caption(tr("chat.no_tuned"))


# ---- System page ---------------------------------------------------------------------------------

@st.cache_data(ttl=60, show_spinner=False)
def _system_report() -> dict[str, Any]:
    return S.report()


def page_system() -> None:
    st.header(tr("page.system"))
    if st.button(tr("system.refresh"), key="system.refresh"):
        _system_report.clear()
    rep = _system_report()
    if rep.get("source") == "torch":
        st.warning(tr("system.fallback"))
        if rep.get("doctor_error"):
            st.code(rep["doctor_error"], language=None)
    else:
        st.caption(tr("system.from_doctor"))
        status = rep.get("status", "unknown")
        if status not in ("ready", "warnings", "blocked"):
            status = "unknown"
        {"ready": st.success, "warnings": st.warning, "blocked": st.error,
         "unknown": st.info}[status](tr(f"system.status.{status}"))
    findings = rep.get("findings") or []
    if findings:
        st.subheader(tr("system.findings"))
        counts = {lvl: sum(f.get("level") == lvl for f in findings) for lvl in ("ok", "warn",
                                                                                  "block")}
        st.caption(tr("system.counts", ok=counts["ok"], warn=counts["warn"],
                      block=counts["block"]))
        # st.table, not st.dataframe: its cells wrap, so a long fix is read in full (the
        # grid of st.dataframe cut it at the column's edge)
        st.table(pd.DataFrame({
            tr("col.level"): [tr(f"level.{f.get('level', 'warn')}") for f in findings],
            tr("col.check"): [check_name(f) for f in findings],
            tr("col.message"): [S.finding_text(f, "message", lang()) for f in findings],
            tr("col.fix"): [S.finding_text(f, "fix", lang()) or tr("system.no_fix")
                            for f in findings],
        }), hide_index=True)
    for section in SYSTEM_SECTIONS:
        data = rep.get(section)
        if data in (None, {}, []):
            continue
        st.subheader(tr(f"system.{section}"))
        st.dataframe(pd.DataFrame(flatten(data), columns=[tr("col.key"), tr("col.value")]),
                     hide_index=True, width="stretch", placeholder=NONE)


def check_name(finding: dict[str, Any]) -> str:
    """A healthcheck finding's check in the page language: "check.<group>" of its text key
    ("wkv_cpu.native" -> check.wkv_cpu), with the device number of a per-GPU check ("gpu1");
    its id when the catalogue has no name for it (a check newer than the catalogue)."""
    fid, key = str(finding.get("id", "")), finding.get("key")
    group = key.partition(".")[0] if isinstance(key, str) else fid
    try:
        name = tr(f"check.{group}")
    except KeyError:
        return fid
    index = re.match(r"gpu(\d+)", fid)
    return tr("check.gpu_n", name=name, i=index.group(1)) if index else name


def flatten(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dict / list -> (dotted key, value text) rows for a two-column table."""
    rows: list[tuple[str, str]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            rows += flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        for i, v in enumerate(data):
            rows += flatten(v, f"{prefix}[{i}]")
    else:
        text = (NONE if data is None else json.dumps(data, ensure_ascii=False)
                if isinstance(data, list) else str(data))
        rows.append((prefix or "-", text))
    return rows


# ---- main ----------------------------------------------------------------------------------------

def sync_widget_values() -> None:
    """Copy widget values (changed by the user before this rerun) to their plain keys first,
    so text rendered above a widget (e.g. the title above the language switch) already uses
    the new value."""
    for key in list(ss.keys()):
        if isinstance(key, str) and key.startswith("w."):
            ss[key[2:]] = ss[key]


def main() -> None:
    st.set_page_config(page_title="rwkvforge", layout="wide")
    sync_widget_values()
    page, runs_dir = sidebar()
    if page == "runs":
        page_runs(runs_dir)
    elif page == "compare":
        page_compare(runs_dir)
    elif page == "data":
        page_data()
    elif page == "chat":
        page_chat(runs_dir)
    else:
        page_system()


if __name__ == "__main__":
    main()
