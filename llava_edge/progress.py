"""Progress for long steps: a live bar in a terminal, plain timestamped lines when output is redirected.

Why both: a rich bar draws nothing into a log file or a pipe, so `quantize > log` looked dead for
minutes. Off a terminal we write a line at the start, then at most every `every_s` seconds (and for
the last item), which keeps a CI log or `nohup` file readable and shows the run is alive. Lines go to
stderr so stdout stays the command's result (JSON, a table).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterable, Iterator, Sequence, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

T = TypeVar("T")
EVERY_S = 5.0


def _console(console: Console | None) -> Console:
    return console or Console(stderr=True)


def _line(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def progress_iter(items: Sequence[T], description: str, enabled: bool = True, console: Console | None = None,
                  every_s: float = EVERY_S) -> Iterable[T]:
    """Yield `items`, showing how many are done: a bar in a terminal, else a line every `every_s`."""
    if not enabled:
        yield from items
        return
    console = _console(console)
    if console.is_terminal:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True, console=console) as bar:
            task = bar.add_task(description, total=len(items))
            for item in items:
                yield item
                bar.advance(task)
        return
    t0 = last = time.monotonic()
    _line(console, f"{description}: 0/{len(items)}")
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s or i == len(items):
            _line(console, f"{description}: {i}/{len(items)} ({now - t0:.0f} s)")
            last = now


class Stages:
    """Named steps one after another (load, export vision, verify, ...): a spinner per step in a
    terminal, else a line when each starts and how long the one before took."""

    def __init__(self, console: Console | None = None):
        self.console = _console(console)
        self._progress: Progress | None = None
        self._task = None
        self._name: str | None = None
        self._t0 = 0.0

    def __call__(self, name: str) -> None:
        self._finish()
        self._name, self._t0 = name, time.monotonic()
        if self._progress is not None:
            self._task = self._progress.add_task(name, total=None)
        else:
            _line(self.console, f"{name} ...")

    def _finish(self) -> None:
        if self._name is None:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=1, total=1)
        else:
            _line(self.console, f"{self._name}: done in {time.monotonic() - self._t0:.1f} s")
        self._name = None

    @contextlib.contextmanager
    def running(self) -> Iterator["Stages"]:
        if not self.console.is_terminal:
            try:
                yield self
            finally:
                self._finish()
            return
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=self.console,
                      transient=False) as progress:
            self._progress = progress
            try:
                yield self
            finally:
                self._finish()
                self._progress = None
