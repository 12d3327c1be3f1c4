"""Progress of a long command (tune, fuzz, the benchmark suite) on stderr: on a terminal one
bar redrawn in place, elsewhere (a CI log, a pipe) a plain line at each tenth of the way."""

from __future__ import annotations

import sys
import time

BAR_WIDTH = 30


class Progress:
    """``total`` steps of ``label``; ``advance(steps, note)`` after each piece of work."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.done = max(total, 1), label, 0
        self.stream = stream or sys.stderr
        self.bar = self.stream.isatty()
        self.started = time.monotonic()
        self.next_line = self.total / 10

    def advance(self, steps: int = 1, note: str = "") -> None:
        """Count ``steps`` more steps done; ``note`` says what the last one was."""
        self.done = min(self.done + steps, self.total)
        elapsed = time.monotonic() - self.started
        status = (f"{self.label}: {self.done}/{self.total} ({elapsed:.0f} s)"
                  f"{f' {note}' if note else ''}")
        if self.bar:
            filled = BAR_WIDTH * self.done // self.total
            end = "\n" if self.done == self.total else ""
            self.stream.write(f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {status}"
                              f"\033[K{end}")
        elif self.done >= self.next_line or self.done == self.total:
            self.stream.write(status + "\n")
            while self.next_line <= self.done:
                self.next_line += self.total / 10
        self.stream.flush()
