"""What the last builds left behind: task logs (`pipebuild log`) and traces (`pipebuild explain`).

Logs are `.pipebuild/logs/<safe name>.out|.err`, overwritten each time a task runs, so they
are always the last run's (a skip or a restore leaves them alone). Traces come from the
store's `tasks` table: the status, finish time and duration of each task's last build.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from .exceptions import UsageError
from .resource import safe_name

if TYPE_CHECKING:
    from .build import Options
    from .pipeline import Pipeline
    from .store import TaskRecord


def log_paths(state_dir: str, name: str) -> tuple[str, str]:
    """The stdout and stderr log files of the task called `name`."""
    base = os.path.join(state_dir, "logs", safe_name(name))
    return base + ".out", base + ".err"


def has_log(state_dir: str, name: str) -> bool:
    """True if the task called `name` has run in this workspace."""
    return any(os.path.exists(p) for p in log_paths(state_dir, name))


def task_for(pipeline: Pipeline, options: Options, target: str) -> str:
    """The name of the task that is `target` (a task name) or publishes it (a destination)."""
    from .build import select
    from .graph import plan

    graph = plan(pipeline, options.workspace, options.state_dir)
    return graph.nodes[select(graph, [target])[0]].name


def show_log(state_dir: str, name: str, streams: tuple[str, ...] = ("out", "err")) -> str:
    """The last run's log of a task; with one stream, its bytes as they are, else both under headers."""
    from .graph import show_path

    out, err = log_paths(state_dir, name)
    paths = {"out": out, "err": err}
    if not has_log(state_dir, name):
        raise UsageError(f"no log for task {name}: it has not run in this workspace")
    if len(streams) == 1:
        return _read(paths[streams[0]])
    parts = []
    for kind in streams:
        path = paths[kind]
        if not os.path.exists(path):
            continue
        text = _read(path)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(path)))
        parts.append(f"==> {show_path(path)} ({when}{', empty' if not text else ''}) <==\n")
        if text:
            parts.append(text if text.endswith("\n") else text + "\n")
    return "".join(parts)


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def ago(seconds: float) -> str:
    """'5s', '3 min', '2 h', '4 days' ago."""
    if seconds < 60:
        return f"{max(seconds, 0):.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def last_built(rec: TaskRecord | None, now: float) -> str:
    """One line about a task's last recorded build."""
    if rec is None:
        return "never built in this workspace"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.finished))
    outcome = "failed" if rec.status != "ok" else "built"
    return f"last {outcome} {when} ({ago(now - rec.finished)}), took {rec.duration:.2f}s"


def explain(pipeline: Pipeline, options: Options, now: float | None = None) -> list[str]:
    """For every task of the targets' cone: what make would do and why, and its last build."""
    from .build import preview
    from .store import Store

    rows = preview(pipeline, options)
    db = os.path.join(options.state_dir, "cache.sqlite")
    traces: dict[str, TaskRecord] = {}
    if os.path.exists(db):
        store = Store(db, warn=lambda _: None)
        try:
            traces = store.load_tasks()
        finally:
            store.close()
    now = time.time() if now is None else now
    lines = []
    for name, what, reason in rows:
        if what == "skip":
            verdict = "up to date: would not run"
        elif what == "restore":
            verdict = f"would be restored from the cache, not run: {reason}"
        elif what == "may run":
            upstream = reason.removeprefix("after ")
            verdict = f"would run only if {upstream} writes different output ({upstream} is stale)"
        elif what == "cannot run":
            verdict = f"cannot run: {reason}"
        else:
            verdict = f"would run: {reason}"
        lines.append(f"{name}: {verdict}")
        lines.append(f"  {last_built(traces.get(name), now)}")
    return lines
