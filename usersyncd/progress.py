"""Progress of a long operator command: a live bar on a terminal, a plain line now and then elsewhere.

A CI log or the journal must not get one endless line of carriage-return redraws, so the bar
(rich) is drawn only when the output is a terminal; anywhere else a plain line is printed every
`every` seconds and once at the end.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Self, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

PLAIN_EVERY = 5.0  # seconds between plain progress lines when the output is not a terminal


class Progress:
    """`with Progress("users", total, out) as p: p.update(done, "12 requests")`."""

    def __init__(
        self,
        what: str,
        total: int,
        out: TextIO,
        *,
        every: float = PLAIN_EVERY,
        terminal: bool | None = None,
    ) -> None:
        self.what = what
        self.total = total
        self.out = out
        self.every = every
        self.terminal = out.isatty() if terminal is None else terminal
        self._done = 0
        self._detail = ""
        self._last_line: float | None = None
        self._bar: RichProgress | None = None
        self._task: int | None = None

    def __enter__(self) -> Self:
        if self.terminal:
            console = Console(file=self.out, force_terminal=True)
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total, detail="")
        return self

    def update(self, done: int, detail: str = "") -> None:
        """Where the work stands now; cheap to call often."""
        self._done, self._detail = done, detail
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=min(done, self.total), detail=detail)
            return
        now = time.monotonic()
        if self._last_line is None or now - self._last_line >= self.every:
            self._plain_line()
            self._last_line = now

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
        else:
            self._plain_line()  # the final state, whatever the clock says

    def _plain_line(self) -> None:
        share = f" ({100 * self._done / self.total:.0f} %)" if self.total else ""
        detail = f"  {self._detail}" if self._detail else ""
        print(f"{self._done:,}/{self.total:,} {self.what}{share}{detail}", file=self.out, flush=True)
