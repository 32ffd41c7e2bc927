"""Build events -> plain lines, a live display on a terminal, or JSON lines for tools.

Verbosity: -1 quiet (failures and errors only), 0 normal (a line per task run or
restored, and a summary), 1 verbose (also every skip, with its reason).

Three reporters share one interface (start/started/task/failure/summary/message/warning/
verbose_log/close), which build.py calls:

* `Reporter` writes one plain line per event, as it happens (pipes, CI logs, `-q`).
* `RichReporter` adds a live display below those lines on a terminal: the running tasks
  with their elapsed time, done/total, counts, failures and an ETA. rich costs ~60 ms to
  import, so it is imported only here, only when stdout is a terminal (see `choose`).
* `JsonReporter` writes one JSON object per line on stdout, every event, for tools.

`started` comes from the worker thread that runs the task; the others from whichever thread
holds the scheduler's lock (one at a time: the main thread or a worker).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live


class Reporter:
    """Prints build events as plain lines."""

    def __init__(self, verbosity: int = 0, explain: bool = False, out: TextIO | None = None, err: TextIO | None = None):
        self.verbosity = verbosity
        self.explain = explain
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.total = 0
        self.done = 0

    def _emit(self, text: str, err: bool = False, style: str = "", flush: bool = False) -> None:
        """Write one line (or block) of text; the live display overrides this."""
        print(text, file=self.err if err else self.out, flush=flush)

    def start(self, total: int) -> None:
        """A build of `total` tasks begins."""
        self.total = total
        self.done = 0

    def started(self, name: str) -> None:
        """A task's command started (only reporters that show running tasks care)."""

    def message(self, text: str) -> None:
        """A line for the user (e.g. waiting for the lock)."""
        if self.verbosity >= 0:
            self._emit(text, err=True, flush=True)

    def warning(self, text: str) -> None:
        """A one-line warning, shown even when quiet."""
        self._emit(text, err=True, style="yellow", flush=True)

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
        self._emit(line, style=_STYLES.get(action, ""))

    def failure(self, name: str, detail: str, log: str | None, tail: list[str]) -> None:
        """The report for one failed task."""
        lines = [f"pipebuild: task {name} failed: {detail}"]
        if log:
            lines.append(f"  log: {log}")
        lines.extend("  | " + t for t in tail)
        self._emit("\n".join(lines), err=True, style="red", flush=True)

    def summary(self, ran: int, restored: int, up_to_date: int, failed: int, not_run: int, seconds: float) -> None:
        """The closing line of a build."""
        if self.verbosity < 0 and not failed:
            return
        text = f"pipebuild: {ran} ran, {restored} restored, {up_to_date} up to date, {failed} failed"
        if not_run:
            text += f", {not_run} not run"
        self._emit(f"{text} ({seconds:.2f}s)", style="bold red" if failed else "bold", flush=True)

    def verbose_log(self, name: str, path: str) -> None:
        """Show a task's stdout (Pipeline.run(verbose=True))."""
        text = _read(path)
        if text:
            self._emit(f"--- {name} stdout ---\n" + text.removesuffix("\n"))

    def close(self) -> None:
        """The build is over, however it ended (e.g. Ctrl-C): release the terminal."""


_STYLES = {"ran": "green", "restored": "cyan", "skipped": "dim", "failed": "bold red", "not run": "yellow"}


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


class RichReporter(Reporter):
    """The plain lines, plus a live display of the build below them (on a terminal)."""

    MAX_RUNNING = 12  # running tasks listed; the rest are counted

    def __init__(
        self,
        verbosity: int = 0,
        explain: bool = False,
        out: TextIO | None = None,
        err: TextIO | None = None,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(verbosity, explain, out, err)
        from rich.console import Console

        self.console = console or Console(file=self.out)
        self.clock = clock
        self._lock = threading.Lock()
        self._live: Live | None = None
        self.running: dict[str, float] = {}  # name -> when it started (clock)
        self.counts = dict.fromkeys(("ran", "restored", "skipped", "failed", "not run"), 0)
        self.t0 = clock()
        # stderr lines go through the live console when both streams are the terminal,
        # so they appear above the display instead of being drawn over.
        self._err_is_terminal = _isatty(self.err)

    def start(self, total: int) -> None:
        """Start the live display."""
        super().start(total)
        with self._lock:
            self.running.clear()
            self.counts = dict.fromkeys(self.counts, 0)
        self.t0 = self.clock()
        if self._live is None and self.console.is_terminal:
            from rich.live import Live

            self._live = Live(console=self.console, get_renderable=self.render, refresh_per_second=8, transient=True)
            self._live.start()

    def started(self, name: str) -> None:
        """Show the task as running (called from the worker thread)."""
        with self._lock:
            self.running[name] = self.clock()

    def task(self, name: str, action: str, reason: str, seconds: float | None = None) -> None:
        """Count the task, drop it from the running list, print its line."""
        with self._lock:
            self.running.pop(name, None)
            self.counts[action] = self.counts.get(action, 0) + 1
        super().task(name, action, reason, seconds)
        if self._live is not None and action != "skipped":
            self._live.refresh()  # else the display under the new line shows the old counts for a moment

    def summary(self, ran: int, restored: int, up_to_date: int, failed: int, not_run: int, seconds: float) -> None:
        """Remove the live display, then print the closing line."""
        self.close()
        super().summary(ran, restored, up_to_date, failed, not_run, seconds)

    def close(self) -> None:
        """Stop the live display (idempotent)."""
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def _emit(self, text: str, err: bool = False, style: str = "", flush: bool = False) -> None:
        from rich.text import Text

        if err and not self._err_is_terminal:
            print(text, file=self.err, flush=True)
            return
        if self._live is None and err:
            from rich.console import Console

            Console(file=self.err).print(Text(text, style), highlight=False, soft_wrap=True)
            return
        # a Text, not print(style=): that style would also paint the live display below
        self.console.print(Text(text, style), highlight=False, soft_wrap=True)

    def eta(self, now: float) -> float | None:
        """Seconds left, guessed from the pace of the tasks that did work so far."""
        with self._lock:
            worked = self.counts["ran"] + self.counts["restored"] + self.counts["failed"]
        left = self.total - self.done
        if worked == 0 or left <= 0:
            return None
        return (now - self.t0) / worked * left

    def render(self) -> RenderableType:
        """The live display: progress, counts, times, running tasks."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        now = self.clock()
        with self._lock:
            running = sorted(self.running.items(), key=lambda kv: kv[1])
            c = dict(self.counts)
        eta = self.eta(now)
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(f"{self.done}/{self.total}", "bold")
        line.append(f" · {_clock(now - self.t0)}, ETA {'~' + _clock(eta) if eta is not None else '-'}")
        for key, label, style in (
            ("ran", "ran", "green"), ("restored", "restored", "cyan"), ("skipped", "up to date", "dim"),
            ("failed", "failed", "bold red"),
        ):  # fmt: skip
            if c[key]:
                line.append(f" · {c[key]} {label}", style)
        head = Table.grid(padding=(0, 1))
        head.add_column(no_wrap=True)
        head.add_column(no_wrap=True, overflow="ellipsis")
        head.add_row(ProgressBar(total=max(self.total, 1), completed=self.done, width=20), line)
        rows: list[RenderableType] = [head]
        for name, since in running[: self.MAX_RUNNING]:
            rows.append(Text.assemble(("  running ", "yellow"), (name, "bold"), (f"  {now - since:.1f}s", "dim")))
        if len(running) > self.MAX_RUNNING:
            rows.append(Text(f"  … and {len(running) - self.MAX_RUNNING} more running", "yellow"))
        return Group(*rows)


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class JsonReporter(Reporter):
    """Every event as one JSON object per line on stdout (`--json`), whatever the verbosity.

    Each object has "event" (start, started, task, failure, summary, message, warning,
    stdout) and "time" (Unix seconds), plus the event's own fields.
    """

    def __init__(self, out: TextIO | None = None, clock: Callable[[], float] = time.time):
        super().__init__(1, True, out, None)
        self._lock = threading.Lock()
        self.clock = clock

    def event(self, kind: str, **fields: Any) -> None:
        """Write one event line."""
        line = json.dumps({"event": kind, "time": round(self.clock(), 3), **fields}, ensure_ascii=False)
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()

    def start(self, total: int) -> None:
        """start: total."""
        super().start(total)
        self.event("start", total=total)

    def started(self, name: str) -> None:
        """started: name."""
        self.event("started", name=name)

    def message(self, text: str) -> None:
        """message: text."""
        self.event("message", text=text)

    def warning(self, text: str) -> None:
        """warning: text."""
        self.event("warning", text=text)

    def task(self, name: str, action: str, reason: str, seconds: float | None = None) -> None:
        """task: name, action, reason, seconds, done, total."""
        self.done += 1
        secs = None if seconds is None else round(seconds, 3)
        self.event("task", name=name, action=action, reason=reason, seconds=secs, done=self.done, total=self.total)

    def failure(self, name: str, detail: str, log: str | None, tail: list[str]) -> None:
        """failure: name, detail, log, tail."""
        self.event("failure", name=name, detail=detail, log=log, tail=tail)

    def summary(self, ran: int, restored: int, up_to_date: int, failed: int, not_run: int, seconds: float) -> None:
        """summary: the counts and seconds."""
        self.event(
            "summary", ran=ran, restored=restored, up_to_date=up_to_date, failed=failed, not_run=not_run,
            seconds=round(seconds, 3),
        )  # fmt: skip

    def verbose_log(self, name: str, path: str) -> None:
        """stdout: name, text."""
        self.event("stdout", name=name, text=_read(path))


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def live_wanted(out: TextIO | None = None, env: Mapping[str, str] | None = None) -> bool:
    """True when `out` is a terminal worth a live display: not CI, not a dumb terminal."""
    env = os.environ if env is None else env
    if env.get("CI", "").lower() in ("true", "1", "yes") or env.get("TERM") == "dumb":
        return False
    return _isatty(out or sys.stdout)


def choose(
    verbosity: int = 0,
    explain: bool = False,
    as_json: bool = False,
    out: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> Reporter:
    """The reporter for a command line: JSON if asked, live on a terminal unless quiet, else plain."""
    if as_json:
        return JsonReporter(out)
    if verbosity >= 0 and live_wanted(out, env):
        return RichReporter(verbosity, explain, out)
    return Reporter(verbosity, explain, out)
