"""The progress display of long commands: a bar on a terminal, plain lines in a log."""

import io

from tvm_fused.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_at_each_tenth():
    log = io.StringIO()
    progress = Progress(25, "fuzz", stream=log)
    for _ in range(25):
        progress.advance(note="0 failed")
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in log.getvalue()
    assert lines[-1].startswith("fuzz: 25/25 (") and lines[-1].endswith(" 0 failed")


def test_a_terminal_gets_one_bar_redrawn_in_place():
    terminal = Terminal()
    progress = Progress(4, "suite", stream=terminal)
    for steps in (2, 1, 1):
        progress.advance(steps)
    text = terminal.getvalue()
    assert text.count("\r[") == 3 and text.endswith("\033[K\n") and text.count("\n") == 1
    assert f"[{'#' * 30}] suite: 4/4" in text
