"""Rich progress bars that disappear in tests and when output is not a terminal."""

from __future__ import annotations

from typing import Iterable, Sequence, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def progress_iter(items: Sequence[T], description: str, enabled: bool = True) -> Iterable[T]:
    if not enabled:
        yield from items
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    ) as bar:
        task = bar.add_task(description, total=len(items))
        for item in items:
            yield item
            bar.advance(task)
