"""Start-up progress (`deployments/models/progress.py`): a bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import io
import logging

from deployments.models.progress import Progress


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_bar_that_rewrites_itself():
    clock, out = _Clock(), _Terminal()
    p = Progress("building x", 4, unit="epochs", rate_unit="tokens", stream=out, clock=clock)
    clock.now += 2
    p.advance(1, amount=1000, note="loss 2.000")
    clock.now += 2
    p.advance(1, amount=1000)
    p.done()
    assert out.getvalue().split("\r")[1:] == [
        "building x: [######..................] 1/4 epochs, 500 tokens/s, about 6 s left - loss 2.000",
        "building x: [############............] 2/4 epochs, 500 tokens/s, about 4 s left - loss 2.000",
        "building x: [########################] 4/4 epochs, 500 tokens/s, 4.0 s - loss 2.000\n",
    ]


def test_logs_get_plain_lines_at_most_every_few_seconds(caplog):
    clock, out = _Clock(), io.StringIO()
    log = logging.getLogger("tests.progress")
    p = Progress("loading", 10, stream=out, log=log, log_every_s=5, clock=clock)
    with caplog.at_level(logging.INFO, logger="tests.progress"):
        for _ in range(5):
            clock.now += 2
            p.advance()
        p.done()
    assert out.getvalue() == ""  # nothing drawn where there is no terminal
    assert [r.getMessage() for r in caplog.records] == [
        "loading: 3/10 steps (30%), 0.5 steps/s, about 14 s left",  # 6 s in: the first line after 5 s
        "loading: 10/10 steps (100%), 0.5 steps/s, 10.0 s",
    ]
