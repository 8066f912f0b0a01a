"""Translation catalogues of the dashboard: one flat JSON object per language in i18n/.

Every string the dashboard shows comes from here: `t(lang, "runs.title")`, with `{name}`
placeholders filled by `str.format`. Every catalogue is complete: it has exactly the keys of
the English one, with the same placeholders (check_catalogues; tests/test_dashboard.py). A
language is offered only with a complete catalogue: there is no silent fallback to English.

The healthcheck's finding texts ("doctor.<key>.message" / ".fix") are written once, in English,
in rwkvforge.doctor.TEXTS (the CLI prints them): the English catalogue adds them to en.json,
which therefore does not repeat them; zh-CN.json and ru.json translate them like any other key.

    python -m rwkvforge.dashboard.i18n      # checks the catalogues, prints key counts
"""

from __future__ import annotations

import json
import re
import string
import sys
from functools import lru_cache
from pathlib import Path

CATALOGUE_DIR = Path(__file__).resolve().parent / "i18n"
LANGS = ("en", "zh-CN", "ru")  # the language switch's options; each catalogue is complete
REFERENCE = "en"  # the catalogue every other one must match key for key


class CatalogueError(ValueError):
    """A broken or incomplete translation catalogue."""


@lru_cache(maxsize=None)
def catalogue(lang: str) -> dict[str, str]:
    """The {key: text} catalogue of `lang`, read once."""
    if lang not in LANGS:
        raise CatalogueError(f"unknown language {lang!r}; known: {', '.join(LANGS)}")
    path = CATALOGUE_DIR / f"{lang}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CatalogueError(f"{path}: cannot read the catalogue ({e}).") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in data.items()):
        raise CatalogueError(f"{path}: must be one JSON object of string keys and values.")
    if lang == "en":
        data = _with_doctor_texts(data, path)
    return data


def _with_doctor_texts(data: dict[str, str], path: Path) -> dict[str, str]:
    """en.json plus the healthcheck's English texts, which live in rwkvforge.doctor."""
    from rwkvforge.doctor import catalogue_entries

    doctor_texts = catalogue_entries()
    twice = sorted(set(data) & set(doctor_texts))
    if twice:
        raise CatalogueError(f"{path}: {', '.join(twice)} must not be here: the English text "
                             "of these keys is rwkvforge.doctor.TEXTS.")
    return {**data, **doctor_texts}


def t(lang: str, key: str, /, **kwargs: object) -> str:
    """The text of `key` in `lang`, formatted with kwargs."""
    cat = catalogue(lang)
    if key not in cat:
        raise KeyError(f"translation key {key!r} missing from {CATALOGUE_DIR / (lang + '.json')}")
    return cat[key].format(**kwargs) if kwargs else cat[key]


def placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def template_regex(text: str) -> re.Pattern[str]:
    """A regex matching `text` with every `{placeholder}` filled by any value."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(text):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(r"(?s:.*?)")
    return re.compile("".join(parts) + r"\Z", re.S)


def check_catalogues() -> list[str]:
    """Problems with the catalogues (empty when they are consistent)."""
    problems = []
    ref = catalogue(REFERENCE)
    for lang in LANGS:
        if lang == REFERENCE:
            continue
        cat = catalogue(lang)
        problems += [f"key {k!r} missing from {lang}.json" for k in sorted(set(ref) - set(cat))]
        problems += [f"key {k!r} missing from {REFERENCE}.json (it is in {lang}.json)"
                     for k in sorted(set(cat) - set(ref))]
        for k in sorted(set(ref) & set(cat)):
            if placeholders(ref[k]) != placeholders(cat[k]):
                problems.append(f"key {k!r}: placeholders differ: {REFERENCE} "
                                f"{sorted(placeholders(ref[k]))} vs {lang} "
                                f"{sorted(placeholders(cat[k]))}")
    return problems


def main(argv: list[str] | None = None) -> int:  # noqa: ARG001 - the stage signature; no arguments yet
    problems = check_catalogues()
    for p in problems:
        print(f"i18n: {p}", file=sys.stderr)
    for lang in LANGS:
        print(f"{lang}: {len(catalogue(lang))} keys")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
