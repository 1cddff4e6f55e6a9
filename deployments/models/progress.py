"""Progress of long start-up steps (building the built-in model, loading a replica's engine).

On a terminal it draws one bar that rewrites itself; anywhere else (a replica's log, a CI log, a
pipe) it writes plain log lines, at most one per `log_every_s`, so logs stay readable. Both say
the step, how far it is, its rate and the seconds left, estimated from the rate so far.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, TextIO

_BAR_WIDTH = 24


class Progress:
    """`advance(n)` after each unit of work; `done()` at the end (prints the final line)."""

    def __init__(
        self,
        what: str,
        total: int,
        *,
        unit: str = "steps",
        rate_unit: str | None = None,
        log: logging.Logger | None = None,
        stream: TextIO | None = None,
        log_every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what, self.total, self.unit = what, max(1, total), unit
        self.rate_unit = rate_unit or unit
        self._log = log or logging.getLogger(__name__)
        self._stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._every = log_every_s
        self._clock = clock
        self._start = self._last = clock()
        self.count = 0
        self.amount = 0  # what the rate counts (e.g. tokens), when it is not the steps themselves
        self.note = ""

    def advance(self, steps: int = 1, amount: int | None = None, note: str = "") -> None:
        self.count = min(self.total, self.count + steps)
        self.amount += steps if amount is None else amount
        self.note = note or self.note
        now = self._clock()
        if self._tty:
            self._stream.write("\r" + self.line(now, bar=True))
            self._stream.flush()
        elif now - self._last >= self._every:
            self._last = now
            self._log.info("%s", self.line(now))

    def done(self, note: str = "") -> None:
        self.count = self.total
        self.note = note or self.note
        line = self.line(self._clock(), bar=self._tty)
        if self._tty:
            self._stream.write("\r" + line + "\n")
            self._stream.flush()
        else:
            self._log.info("%s", line)

    def line(self, now: float, bar: bool = False) -> str:
        elapsed = max(now - self._start, 1e-9)
        fraction = self.count / self.total
        rate = self.amount / elapsed
        left = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
        head = f"{self.what}: {self.count}/{self.total} {self.unit} ({fraction:.0%})"
        if bar:
            filled = round(fraction * _BAR_WIDTH)
            head = f"{self.what}: [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {self.count}/{self.total} {self.unit}"
        tail = f"{rate:,.{1 if rate < 10 else 0}f} {self.rate_unit}/s"
        if fraction < 1:
            tail += f", about {left:.0f} s left" if left == left else ""
        else:
            tail += f", {elapsed:.1f} s"
        return f"{head}, {tail}" + (f" - {self.note}" if self.note else "")
