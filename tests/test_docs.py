"""The user docs stay true to the workspace: every page has its English / Chinese twin, every
`./scripts/X` a page names exists, every `rwkvforge <cmd>` is a real subcommand, and every
`--flag` written after a command is one that command accepts.

    python -m pytest tests/test_docs.py -q
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest

from rwkvforge.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ZH = ".zh-CN.md"
# pages whose commands are checked: the docs and the front-door READMEs
PAGES = sorted(DOCS.glob("*.md")) + sorted(p for p in ROOT.glob("README*.md"))

FENCE_RE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN_RE = re.compile(r"`([^`\n]+)`")
SCRIPT_RE = re.compile(r"(?<![\w./-])(?:\./)?(scripts/[A-Za-z0-9_./-]*)")
MODULE_RE = re.compile(r"python3?\s+-m\s+(rwkvforge(?:\.[a-z_]+)*)")


def _twin(page: Path) -> Path:
    if page.name.endswith(ZH):
        return page.with_name(page.name[: -len(ZH)] + ".md")
    return page.with_name(page.name[: -len(".md")] + ZH)


def code_snippets(text: str) -> list[str]:
    """Fenced blocks (one logical line per item, `\\` continuations joined) + inline spans."""
    out: list[str] = []
    for block in FENCE_RE.findall(text):
        out += block.replace("\\\n", " ").splitlines()
    text_wo_blocks = FENCE_RE.sub("", text)
    out += SPAN_RE.findall(text_wo_blocks)
    return out


def _strip_comment(line: str) -> str:
    return re.split(r"(?:^|\s)#", line, maxsplit=1)[0]


def command_lines() -> list[tuple[str, list[str]]]:
    """(page, tokens) of every shell command in a code snippet: split at ; | && ||, leading
    VAR=value assignments dropped, kept when it starts with rwkvforge, python or scripts/."""
    out = []
    for page in PAGES:
        for snippet in code_snippets(page.read_text(encoding="utf-8")):
            for piece in re.split(r"\|\||&&|[|;(]", _strip_comment(snippet)):
                try:
                    toks = shlex.split(piece)
                except ValueError:
                    continue
                while toks and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", toks[0]):
                    toks = toks[1:]
                if toks and (toks[0] in ("rwkvforge", "python", "python3")
                             or re.fullmatch(r"(\./)?scripts/[\w.-]+", toks[0])):
                    out.append((page.name, toks))
    return out


def test_pages_exist() -> None:
    for name in ("README.md", "quickstart.md", "troubleshooting.md"):
        assert (DOCS / name).is_file(), f"docs/{name} is missing"


def test_index_lists_every_page() -> None:
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in TWINNED if f"({p.name})" not in index]
    assert not missing, f"docs/README.md does not link {', '.join(missing)}"


# docs/README.md is the index and holds both languages itself
TWINNED = [p for p in sorted(DOCS.glob("*.md")) if p.name != "README.md"]


@pytest.mark.parametrize("page", TWINNED, ids=lambda p: p.name)
def test_every_page_has_its_twin(page: Path) -> None:
    twin = _twin(page)
    assert twin.is_file(), (f"docs/{page.name} has no {'English' if page.name.endswith(ZH) else 'Chinese'} "
                            f"twin docs/{twin.name}: every page exists in both languages")


@pytest.mark.parametrize("page", TWINNED, ids=lambda p: p.name)
def test_twins_link_each_other(page: Path) -> None:
    twin = _twin(page)
    if not twin.is_file():
        pytest.skip("no twin (reported by test_every_page_has_its_twin)")
    assert f"({twin.name})" in page.read_text(encoding="utf-8"), (
        f"docs/{page.name} does not link to its twin {twin.name}")


def _mentions(regex: re.Pattern, snippets_only: bool) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        parts = code_snippets(text) if snippets_only else [text]
        for part in parts:
            for m in regex.finditer(_strip_comment(part) if snippets_only else part):
                found.append((page.name, m.group(1)))
    return found


def test_scripts_mentioned_exist() -> None:
    mentions = _mentions(SCRIPT_RE, snippets_only=False)
    assert any(s.startswith("scripts/quickstart") for _, s in mentions), \
        "the docs should show ./scripts/quickstart.sh"
    missing = sorted({f"{page}: {s}" for page, s in mentions
                      if not (ROOT / s.rstrip("./,;:")).exists()})
    assert not missing, "docs name scripts that do not exist:\n  " + "\n  ".join(missing)


def test_rwkvforge_commands_exist() -> None:
    mentions = [(page, toks[1]) for page, toks in command_lines()
                if toks[0] == "rwkvforge" and len(toks) > 1 and not toks[1].startswith("-")]
    assert len(mentions) > 10, "expected the docs to show rwkvforge commands"
    unknown = sorted({f"{page}: rwkvforge {c}" for page, c in mentions if c not in STAGES})
    assert not unknown, ("docs use subcommands that rwkvforge.cli.STAGES does not have "
                         f"({', '.join(STAGES)}):\n  " + "\n  ".join(unknown))


def test_python_modules_exist() -> None:
    missing = sorted({f"{page}: python -m {m}" for page, m in _mentions(MODULE_RE, True)
                      if importlib.util.find_spec(m) is None})
    assert not missing, "docs run modules that do not exist:\n  " + "\n  ".join(missing)


# ------------------------------------------------------------------ flags
def _script_stage(script: str) -> str | None:
    """The stage a scripts/ entry point runs (read from the script itself), or None."""
    path = ROOT / script
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    stages = set(re.findall(r"run_stage\s+([a-z-]+)", text)
                 + re.findall(r"rwkvforge\.cli\s+([a-z-]+)", text))
    if stages:  # a script that chains several stages (quickstart.sh) has its own options
        return stages.pop() if len(stages) == 1 else None
    m = re.search(r"from rwkvforge\.([\w.]+) import main", text)
    if m:
        mod = f"rwkvforge.{m.group(1)}"
        return next((k for k, (v, _) in STAGES.items() if v == mod), None)
    return None


@lru_cache(maxsize=None)
def _help_text(stage: str, sub: str | None) -> str:
    module = importlib.import_module(STAGES[stage][0])
    buf = io.StringIO()
    argv = ([sub] if sub else []) + ["--help"]
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        module.main(argv)
    return buf.getvalue()


def _commands() -> list[tuple[str, str, list[str]]]:
    """(page, stage, arguments) for every command line that runs a stage."""
    out = []
    for page, toks in command_lines():
        if toks[0] == "python" or toks[0] == "python3":
            toks = toks[1:]
        if not toks:
            continue
        if toks[0] == "rwkvforge" and len(toks) > 1 and toks[1] in STAGES:
            out.append((page, toks[1], toks[2:]))
        elif re.fullmatch(r"(\./)?scripts/[\w.-]+", toks[0]):
            stage = _script_stage(toks[0].removeprefix("./"))
            if stage:
                out.append((page, stage, toks[1:]))
    return out


def test_flags_in_docs_are_accepted() -> None:
    cmds = _commands()
    assert len(cmds) > 10
    bad = []
    for page, stage, rest in cmds:
        sub = rest[0] if stage == "config" and rest and not rest[0].startswith("-") else None
        helptext = _help_text(stage, sub)
        for tok in rest:
            if tok.startswith("--") and len(tok) > 2:
                flag = tok.split("=", 1)[0]
                if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helptext):
                    bad.append(f"{page}: {stage}{' ' + sub if sub else ''} {flag}")
    assert not bad, "docs pass flags the command does not accept:\n  " + "\n  ".join(sorted(set(bad)))


def test_anchors_named_by_the_code_exist() -> None:
    """Messages in src/ point users at docs/<page>.md#<anchor>: the anchor must exist."""
    refs = set()
    for py in (ROOT / "src" / "rwkvforge").rglob("*.py"):
        refs |= set(re.findall(r"docs/([\w.-]+\.md)#([\w-]+)", py.read_text(encoding="utf-8")))
    for page, anchor in sorted(refs):
        text = (DOCS / page).read_text(encoding="utf-8")
        slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                 for h in re.findall(r"^#+\s+(.*)$", text, re.M)}
        ids = set(re.findall(r'<a id="([\w-]+)"', text))
        assert anchor in slugs | ids, f"src/ links to docs/{page}#{anchor}, which does not exist"


@pytest.mark.parametrize("readme,heading", [("README.md", "## Where things live"),
                                            ("README.zh-CN.md", "## 代码地图")])
def test_readme_maps_every_module(readme: str, heading: str) -> None:
    """The README's module map names every module of src/rwkvforge/ once, and only those."""
    text = (ROOT / readme).read_text(encoding="utf-8")
    assert heading in text, f"{readme} has no '{heading}' section"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"^\| `([\w/]+\.py)` \|", section, re.M)
    pkg = ROOT / "src" / "rwkvforge"
    modules = sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
                     if p.name not in ("__init__.py", "__main__.py"))
    assert len(named) == len(set(named)), f"{readme}: a module is listed twice"
    assert sorted(named) == modules, (
        f"{readme} '{heading}': missing {sorted(set(modules) - set(named))}, "
        f"not a module {sorted(set(named) - set(modules))}")
