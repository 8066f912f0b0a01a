"""Progress of a long step, one way everywhere: a tqdm bar on a terminal wide enough for one,
else a plain line every few seconds (a pipe, a log file, a CI console, a 0-column terminal).

    with Progress("merge: verifying logits", total=4, unit="pass") as p:
        for ...:
            ...
            p.update()

A background thread refreshes the bar (its elapsed time moves even while one unit of work
runs for minutes) or prints the plain line, so a step is never silent for longer than `every`
seconds; a step that ends before the first line prints nothing at all. Used by merge's logit
verification, eval's answering, export and the DPO reference pass; training decides between its
bar and its step lines with `bar_fits` too.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import IO, Iterable, Iterator, TypeVar

MIN_COLUMNS = 20  # narrower than this a bar shows nothing useful (0: a terminal without size)
EVERY_S = 5.0  # the longest silence of a running step, in seconds

T = TypeVar("T")


def bar_fits(stream: IO[str] | None = None) -> bool:
    """True when `stream` (default stderr) is a terminal at least MIN_COLUMNS wide."""
    stream = sys.stderr if stream is None else stream
    try:
        if not stream.isatty():
            return False
        return os.get_terminal_size(stream.fileno()).columns >= MIN_COLUMNS
    except (AttributeError, OSError, ValueError):  # closed, no fileno, not a real terminal
        return False


class Progress:
    """A bar (`bar_fits(stream)`, or as `bar` says) or a plain line every `every` s (default
    EVERY_S) on `stream` (default stderr); `enabled=False`: silent."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "step", *,
                 stream: IO[str] | None = None, every: float | None = None,
                 enabled: bool = True, bar: bool | None = None):
        self.desc, self.total, self.unit = desc, total, unit
        self.every = EVERY_S if every is None else every
        self.stream = sys.stderr if stream is None else stream
        self.n = 0
        self.lines = 0  # plain lines printed so far
        self.t0 = time.monotonic()
        self._bar = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if not enabled:
            return
        if bar_fits(self.stream) if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream,
                             dynamic_ncols=True, leave=False)
        self._thread = threading.Thread(target=self._beat, name="rwkvforge-progress",
                                        daemon=True)
        self._thread.start()

    def line(self) -> str:
        """The plain line: what, how far, how long."""
        done = (f"{self.n}/{self.total} {self.unit}" if self.total
                else f"{self.n} {self.unit}" if self.n else "running")
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        return f"{self.desc}: {done}{pct}, {time.monotonic() - self.t0:.0f} s"

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                if self._bar is not None:
                    self._bar.refresh()
                else:
                    print(self.line(), file=self.stream, flush=True)
                    self.lines += 1

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.n += n
            if self._bar is not None:
                self._bar.update(n)

    def set_description(self, desc: str) -> None:
        """A new phase of the same step (e.g. "export: writing" -> "export: verifying")."""
        with self._lock:
            self.desc = desc
            if self._bar is not None:
                self._bar.set_description(desc, refresh=False)

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        """`items`, counting one unit as each is done."""
        for it in items:
            yield it
            self.update()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            elif self.lines:  # the step was long enough to be shown: say that it ended
                print(f"{self.line()}, done", file=self.stream, flush=True)
                self.lines += 1

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
