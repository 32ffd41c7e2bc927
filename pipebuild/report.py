"""Build events -> plain text: one line per event, written as it happens.

Verbosity: -1 quiet (failures and errors only), 0 normal (a line per task run or
restored, and a summary), 1 verbose (also every skip, with its reason).
"""

from __future__ import annotations

import sys
from typing import TextIO


class Reporter:
    """Prints build events as plain lines."""

    def __init__(self, verbosity: int = 0, explain: bool = False, out: TextIO | None = None, err: TextIO | None = None):
        self.verbosity = verbosity
        self.explain = explain
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.total = 0
        self.done = 0

    def start(self, total: int) -> None:
        """A build of `total` tasks begins."""
        self.total = total
        self.done = 0

    def message(self, text: str) -> None:
        """A line for the user (e.g. waiting for the lock)."""
        if self.verbosity >= 0:
            print(text, file=self.err, flush=True)

    def warning(self, text: str) -> None:
        """A one-line warning, shown even when quiet."""
        print(text, file=self.err, flush=True)

    def task(self, name: str, action: str, reason: str, seconds: float | None = None) -> None:
        """A task finished: action is 'ran', 'restored', 'skipped', 'failed' or 'not run'."""
        self.done += 1
        if action == "skipped" and not (self.explain or self.verbosity > 0):
            return
        if self.verbosity < 0 and action != "failed":
            return
        line = f"[{self.done}/{self.total}] {action} {name}"
        if action == "failed" and not self.explain:
            reason = reason.split(" (ran because:")[0]
        if self.explain or action in ("skipped", "not run", "failed"):
            line += f": {reason}"
        if seconds is not None and action == "ran":
            line += f" ({seconds:.2f}s)"
        print(line, file=self.out)

    def failure(self, name: str, detail: str, log: str | None, tail: list[str]) -> None:
        """The report for one failed task."""
        lines = [f"pipebuild: task {name} failed: {detail}"]
        if log:
            lines.append(f"  log: {log}")
        lines.extend("  | " + t for t in tail)
        print("\n".join(lines), file=self.err, flush=True)

    def summary(self, ran: int, restored: int, up_to_date: int, failed: int, not_run: int, seconds: float) -> None:
        """The closing line of a build."""
        if self.verbosity < 0 and not failed:
            return
        text = f"pipebuild: {ran} ran, {restored} restored, {up_to_date} up to date, {failed} failed"
        if not_run:
            text += f", {not_run} not run"
        print(f"{text} ({seconds:.2f}s)", file=self.out, flush=True)

    def verbose_log(self, name: str, path: str) -> None:
        """Show a task's stdout (Pipeline.run(verbose=True))."""
        try:
            with open(path, errors="replace") as f:
                text = f.read()
        except OSError:
            return
        if text:
            print(f"--- {name} stdout ---\n{text}", end="" if text.endswith("\n") else "\n", file=self.out)
