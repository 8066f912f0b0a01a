"""The one progress display: a bar on a terminal wide enough, plain lines every few seconds on a
pipe or a 0-column terminal (real pseudo-terminals via pty), silence for a step shorter than
the interval, and training's choice between its bar and its step lines on a 0-column terminal."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import termios
import time

import pytest

from rwkvforge import progress as P


def _pty(columns: int):
    """(master fd, slave file) of a real pseudo-terminal `columns` wide."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return master, os.fdopen(slave, "w", buffering=1)


def _read_all(master: int) -> str:
    """Everything written to the pty so far: a pty may hand back one write per read, so read
    until nothing more arrives for a moment (not until the first short read)."""
    import select

    out = b""
    while select.select([master], [], [], 0.2)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out.decode("utf-8", "replace")


@pytest.mark.parametrize("columns,fits", [(0, False), (10, False), (80, True)])
def test_bar_fits_only_a_terminal_wide_enough(columns, fits):
    master, slave = _pty(columns)
    try:
        assert P.bar_fits(slave) is fits
    finally:
        slave.close()
        os.close(master)


def test_bar_fits_never_a_pipe_or_a_closed_stream():
    r, w = os.pipe()
    with os.fdopen(w, "w") as f:
        assert P.bar_fits(f) is False
    os.close(r)
    assert P.bar_fits(io.StringIO()) is False
    closed = open(os.devnull, "w")
    closed.close()
    assert P.bar_fits(closed) is False


def test_plain_lines_while_a_step_runs_and_a_last_one_when_it_ends():
    out = io.StringIO()
    with P.Progress("[x] working", 3, "pass", stream=out, every=0.05) as p:
        for _ in range(3):
            time.sleep(0.12)  # longer than the interval: lines come while a unit runs
            p.update()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 4, lines
    assert all(x.startswith("[x] working: ") for x in lines)
    assert "/3 pass (" in lines[0] and lines[0].endswith(" s")
    assert lines[-1].startswith("[x] working: 3/3 pass (100%), ") and lines[-1].endswith(", done")


def test_a_short_step_prints_nothing_and_disabled_prints_nothing():
    out = io.StringIO()
    with P.Progress("[x] quick", 2, stream=out, every=5.0) as p:
        p.update(2)
    assert out.getvalue() == ""
    with P.Progress("[x] off", 2, stream=out, every=0.01, enabled=False) as p:
        time.sleep(0.05)
        p.update(2)
    assert out.getvalue() == ""


def test_unknown_total_and_a_new_phase():
    out = io.StringIO()
    p = P.Progress("[x] export", unit="steps done", stream=out, every=0.03)
    time.sleep(0.08)
    p.update()
    p.set_description("[x] verify")
    time.sleep(0.08)
    p.close()
    text = out.getvalue()
    assert "[x] export: running, " in text and "[x] verify: 1 steps done, " in text


def test_a_bar_on_a_wide_terminal_and_lines_on_a_0_column_one():
    master, slave = _pty(80)
    try:
        with P.Progress("[x] wide", 2, "pass", stream=slave, every=0.03) as p:
            time.sleep(0.1)
            p.update(2)
        wide = _read_all(master)
    finally:
        slave.close()
        os.close(master)
    assert "\r" in wide and "[x] wide" in wide and "2/2" in wide  # tqdm's redrawn bar
    master, slave = _pty(0)
    try:
        with P.Progress("[x] narrow", 2, "pass", stream=slave, every=0.03) as p:
            time.sleep(0.1)
            p.update(2)
        narrow = _read_all(master)
    finally:
        slave.close()
        os.close(master)
    assert "[x] narrow: 0/2 pass (0%)" in narrow and "2/2 pass (100%)" in narrow


def test_iterate_counts_the_items():
    out = io.StringIO()
    p = P.Progress("[x] it", 3, stream=out, every=60)
    assert list(p.iterate("abc")) == ["a", "b", "c"] and p.n == 3
    p.close()
