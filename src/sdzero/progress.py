"""Progress of long work, on stderr: a bar on a terminal, a log line now and then otherwise.

Work that can take more than a few seconds (query points fitted, support images sampled,
prototype features, windows of an image) runs inside ``with progress(desc, total, unit) as p``
and calls ``p.advance(n)`` as units finish; ``p.note(text)`` adds a short status (``2/3 points
fitted``). Where it goes (``SDZERO_PROGRESS``):

- ``bar`` (the default when stderr is a terminal): a tqdm bar with rate and ETA, shown once the
  work has run :data:`BAR_DELAY` s, nested under any open bar (Lightning's included), erased
  when done;
- ``log`` (the default otherwise: a pipe, a file, a batch job): an INFO line of logger
  ``sdzero.progress`` every ``SDZERO_PROGRESS_EVERY`` seconds (default 30) with done/total, the
  elapsed time and the ETA, and one at the end if any was written;
- ``off``: nothing.

Under DDP only rank 0 reports. :func:`observe` hands every tick of every report to a callback
(tests; a program embedding sdzero).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MODE_ENV = "SDZERO_PROGRESS"
EVERY_ENV = "SDZERO_PROGRESS_EVERY"
MODES = ("bar", "log", "off")
BAR_DELAY = 2.0  # seconds before a bar appears: quick work draws nothing


@dataclass(frozen=True)
class Tick:
    """One report: ``done`` of ``total`` ``unit`` of the work ``desc`` (``note``: its status)."""

    desc: str
    done: int
    total: int
    unit: str
    note: str


_observers: list[Callable[[Tick], None]] = []


@contextlib.contextmanager
def observe(callback: Callable[[Tick], None] | None = None) -> Iterator[list[Tick]]:
    """Collect every :class:`Tick` reported inside the block (and pass it to ``callback``)."""
    ticks: list[Tick] = []

    def record(tick: Tick) -> None:
        ticks.append(tick)
        if callback is not None:
            callback(tick)

    _observers.append(record)
    try:
        yield ticks
    finally:
        _observers.remove(record)


def _mode() -> str:
    mode = os.environ.get(MODE_ENV, "").strip().lower()
    if mode not in MODES:
        mode = "bar" if sys.stderr.isatty() else "log"
    rank_zero = sys.modules.get("lightning_fabric.utilities.rank_zero")  # loaded by any run
    rank = getattr(getattr(rank_zero, "rank_zero_only", None), "rank", 0)
    return mode if rank == 0 else "off"


def _every() -> float:
    try:
        return max(0.0, float(os.environ.get(EVERY_ENV, "30")))
    except ValueError:
        return 30.0


def clock(seconds: float) -> str:
    """``H:MM:SS`` (``M:SS`` under an hour)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """One piece of work of ``total`` units; see the module docstring for where it reports."""

    def __init__(self, desc: str, total: int, unit: str = "it") -> None:
        self.desc, self.total, self.unit = desc, int(total), unit
        self.done = 0
        self.status = ""
        self.start = time.monotonic()
        self.mode = _mode()
        self.every = _every()
        self._last_log = self.start
        self._logged = False
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                desc=desc,
                unit=unit,
                leave=False,
                file=sys.stderr,
                delay=BAR_DELAY,
                dynamic_ncols=True,
            )

    def eta(self) -> float | None:
        """Seconds left at the rate so far (None before the first unit)."""
        if self.done <= 0:
            return None
        elapsed = time.monotonic() - self.start
        return elapsed / self.done * max(0, self.total - self.done)

    def line(self) -> str:
        """``desc: done/total unit (p%), elapsed, ETA [note]``."""
        share = 100 * self.done / self.total if self.total else 100.0
        eta = self.eta()
        text = (
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({share:.0f}%), "
            f"{clock(time.monotonic() - self.start)} elapsed, "
            f"ETA {'?' if eta is None else clock(eta)}"
        )
        return f"{text} [{self.status}]" if self.status else text

    def advance(self, n: int = 1) -> None:
        """``n`` more units are done."""
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(int(n))
        elif self.mode == "log" and time.monotonic() - self._last_log >= self.every:
            log.info(self.line())
            self._last_log, self._logged = time.monotonic(), True
        self._tell()

    def note(self, text: str) -> None:
        """A short status shown beside the count (e.g. ``2/3 points fitted``)."""
        self.status = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
        self._tell()

    def _tell(self) -> None:
        tick = Tick(self.desc, self.done, self.total, self.unit, self.status)
        for observer in list(_observers):
            observer(tick)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._logged:
            log.info("%s: done in %s", self.desc, clock(time.monotonic() - self.start))


@contextlib.contextmanager
def progress(desc: str, total: int, unit: str = "it") -> Iterator[Progress]:
    """Report the work done inside the block: ``advance`` it as its ``total`` units finish."""
    report = Progress(desc, total, unit)
    try:
        yield report
    finally:
        report.close()
