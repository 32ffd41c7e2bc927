"""Watch mode: build, wait for a saved input, settle, rebuild, repeat.

One loop on the main thread; watchdog's observer thread only queues raw events, so a
build in progress always finishes before the next starts (events that arrive meanwhile
wait in the queue). What is watched is recomputed after every load of the Pipefile:

* the source files the targets read (`read_input`), minus every `write_output`
  destination and everything under `.pipebuild/`: pipebuild's own writes never trigger;
* the Pipefile and the local modules it imported (files under its directory that are
  not in an installed package); after a failed load, any `.py` beside the Pipefile.

Directories are watched non-recursively (one inotify watch each), never the whole tree:
a project with a large data directory or a busy `.pipebuild/tmp/` costs nothing extra.
An event counts only if the file's (size, mtime, inode) differs from a snapshot taken
before the load, so reads and hard links (inotify IN_ATTRIB) made by the build itself,
and events for changes the build already saw, do not rebuild. Bursts (an editor's
writes, save-by-rename's create+move) settle: the rebuild starts after SETTLE seconds
without a new change, or MAX_SETTLE seconds after the first.
"""

from __future__ import annotations

import importlib
import os
import queue
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import load
from .exceptions import DefinitionError, PipelineException, UsageError

if TYPE_CHECKING:
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers.api import BaseObserver, ObservedWatch

    from .build import Options
    from .pipeline import Pipeline
    from .report import Reporter

SETTLE = 0.2  # seconds of quiet after the last change; editors write in bursts of < 50 ms
MAX_SETTLE = 2.0  # rebuild at the latest this long after the first change of a burst
_TRIGGERS = frozenset({"created", "modified", "moved", "deleted", "closed"})  # not opened/attrib
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

Signature = tuple[int, int, int] | None  # size, mtime_ns, inode; None if missing


def signature(path: str) -> Signature:
    """What tells a changed file from an unchanged one, without reading it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass
class Watched:
    """The paths whose change is worth a rebuild."""

    files: frozenset[str] = frozenset()  # absolute paths
    py_dirs: frozenset[str] = frozenset()  # any *.py directly in these counts (after a failed load)
    missing_dirs: frozenset[str] = frozenset()  # directories that would hold watched files once created
    ignore: frozenset[str] = frozenset()  # destinations: never a trigger
    state_dir: str = ""

    def dirs(self) -> set[str]:
        """The directories to watch (each non-recursively): nearest existing ones."""
        wanted = {os.path.dirname(f) for f in self.files} | set(self.py_dirs)
        result = set()
        for d in wanted:
            while not os.path.isdir(d) and os.path.dirname(d) != d:
                d = os.path.dirname(d)
            result.add(d)
        return result

    def counts(self, path: str) -> bool:
        """True if an event on `path` may be a change worth a rebuild."""
        if path in self.ignore:
            return False
        if self.state_dir and (path == self.state_dir or path.startswith(self.state_dir + os.sep)):
            return False
        if path in self.files or path in self.missing_dirs:
            return True
        return path.endswith(".py") and os.path.dirname(path) in self.py_dirs


class Session:
    """The state of one `pipebuild watch`: what is watched, and what the Pipefile imported."""

    def __init__(
        self,
        pipefile: str,
        targets: list[str] | None,
        options: Callable[[Pipeline], Options],
        reporter: Reporter,
        on_plan: Callable[[Watched], None] = lambda watched: None,
    ) -> None:
        self.pipefile = pipefile
        self.root = os.path.dirname(pipefile)
        self.targets = targets
        self.options = options  # a fresh Options per build, for the pipeline just loaded
        self.reporter = reporter
        self.on_plan = on_plan  # called with the new watch set before the build starts
        self.watched = Watched()
        self.snapshot: dict[str, Signature] = {}  # signatures from before the load
        self.modules: dict[str, str] = {}  # module name -> file, imported from the project

    def cycle(self) -> Watched:
        """Load the Pipefile and build; returns what to watch next. Never raises a user error."""
        from . import build
        from .graph import plan, resolve

        self.snapshot = {f: signature(f) for f in self.watched.files | {self.pipefile}}
        for name in self.modules:
            sys.modules.pop(name, None)  # so an edited local module is imported afresh
        importlib.invalidate_caches()
        before = set(sys.modules)
        try:
            try:
                pipeline = load.load(self.pipefile)
            finally:
                self.modules = self._project_modules(set(sys.modules) - before)
            options = self.options(pipeline)
            graph = plan(pipeline, options.workspace, options.state_dir)
            roots = build.select(graph, self.targets)
        except PipelineException as e:
            self._error(e)
            old = self.watched
            kept = old.files | {self.pipefile} | frozenset(self.modules.values())
            self.watched = Watched(kept, frozenset({self.root}), old.missing_dirs, old.ignore, old.state_dir)
            self._snap(self.watched)
            return self.watched
        selected = graph.cone(roots)
        paths = {self.pipefile, *self.modules.values()}
        for node in graph.nodes:
            if selected[node.index]:
                paths.update(i.source for i in node.inputs if i.source is not None)
        paths.update(resolve(r._input_path, graph.workspace) for r, _ in graph.input_copies)
        ignore = set(graph.by_dest) | {d for _, dests in graph.input_copies for d in dests}
        state_dir = options.state_dir
        files = {  # local files only (not gs:// objects), never pipebuild's own
            f
            for f in map(os.path.normpath, filter(os.path.isabs, paths))
            if f not in ignore and not f.startswith(state_dir + os.sep)
        }
        missing: set[str] = set()
        for f in files:
            d = os.path.dirname(f)
            while not os.path.isdir(d) and os.path.dirname(d) != d:
                missing.add(d)
                d = os.path.dirname(d)
        self.watched = Watched(frozenset(files), frozenset(), frozenset(missing), frozenset(ignore), state_dir)
        self.on_plan(self.watched)
        self._snap(self.watched)
        try:
            build.build(pipeline, options)
        except PipelineException as e:  # a missing input, a busy workspace: say so, go on
            self._error(e)
        return self.watched

    def _snap(self, watched: Watched) -> None:
        """Signatures of newly watched files, taken before the build reads them."""
        for f in watched.files:
            if f not in self.snapshot:
                self.snapshot[f] = signature(f)

    def _error(self, e: PipelineException) -> None:
        if isinstance(e, DefinitionError):
            text = e.one_line()
        elif isinstance(e, UsageError):
            text = e.msg
        else:
            text = e.msg.splitlines()[0] if e.msg else type(e).__name__
        self.reporter.warning(f"pipebuild: {text}")

    def _project_modules(self, names: Iterable[str]) -> dict[str, str]:
        """The modules among `names` whose files live under the Pipefile's directory."""
        root = self.root + os.sep
        skip = {os.path.abspath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, _PACKAGE_DIR)}
        found = dict(self.modules)
        for name in names:
            path = getattr(sys.modules.get(name), "__file__", None)
            if not isinstance(path, str):
                continue
            path = os.path.abspath(path)
            if not path.startswith(root) or any(path.startswith(s) for s in skip):
                continue
            if "site-packages" in path.split(os.sep) or not path.endswith(".py"):
                continue
            found[name] = path
        return found


def describe(paths: list[str], limit: int = 3) -> str:
    """A short list of paths for a message."""
    shown = [os.path.relpath(p) if not os.path.relpath(p).startswith("..") else p for p in paths[:limit]]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(shown) + more


def wait_for_change(
    events: queue.Queue[tuple[str, ...]],
    watched: Watched,
    snapshot: dict[str, Signature],
    settle: float = SETTLE,
    max_settle: float = MAX_SETTLE,
    clock: Callable[[], float] | None = None,
) -> list[str]:
    """Block until a watched file changed, then until the burst settles; the changed paths."""
    now = clock or time.monotonic
    changed: dict[str, None] = {}
    first = last = 0.0
    while True:
        if changed:
            timeout = min(last + settle, first + max_settle) - now()
            if timeout <= 0:
                return list(changed)
        else:
            timeout = 1.0  # wake up now and then so Ctrl-C is noticed promptly everywhere
        try:
            paths = events.get(timeout=timeout)
        except queue.Empty:
            continue
        for path in paths:
            if not watched.counts(path):
                continue
            if path in snapshot and signature(path) == snapshot[path]:
                continue  # read, hard-linked or already built from: not a change
            if not changed:
                first = now()
            last = now()
            changed[path] = None


def _handler(events: queue.Queue[tuple[str, ...]]) -> FileSystemEventHandler:
    from watchdog.events import FileSystemEventHandler

    class Enqueue(FileSystemEventHandler):
        """Runs on the observer thread: queue the paths of events that may be writes."""

        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type not in _TRIGGERS:
                return
            paths = [os.fsdecode(event.src_path)]
            if event.dest_path:
                paths.append(os.fsdecode(event.dest_path))
            events.put(tuple(paths))

    return Enqueue()


def run(
    pipefile: str,
    targets: list[str] | None,
    options: Callable[[Pipeline], Options],
    reporter: Reporter,
    settle: float = SETTLE,
) -> None:
    """Build, then rebuild on every saved change, until Ctrl-C (KeyboardInterrupt)."""
    from watchdog.observers import Observer

    events: queue.Queue[tuple[str, ...]] = queue.Queue()
    handler = _handler(events)
    observer: BaseObserver = Observer()
    scheduled: dict[str, tuple[ObservedWatch, int]] = {}

    def schedule(watched: Watched) -> None:
        dirs = watched.dirs()
        for d in list(scheduled):
            w, ino = scheduled[d]
            if d not in dirs or _ino(d) != ino:  # gone, or deleted and made again
                observer.unschedule(w)
                del scheduled[d]
        for d in dirs - set(scheduled):
            try:
                scheduled[d] = (observer.schedule(handler, d, recursive=False), _ino(d))
            except OSError as e:  # vanished meanwhile: the next cycle tries again; else say why
                if os.path.isdir(d):
                    reporter.warning(f"pipebuild: cannot watch {describe([d])}: {e.strerror or e}")

    session = Session(pipefile, targets, options, reporter, on_plan=schedule)
    dont_write_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # a .pyc written in the same second as an edit could hide it
    observer.start()
    try:
        changed: list[str] = []
        while True:
            if changed:
                reporter.message(f"pipebuild: changed: {describe(changed)}")
            while True:  # events so far are covered by the load and build that follow
                try:
                    events.get_nowait()
                except queue.Empty:
                    break
            watched = session.cycle()
            schedule(watched)
            n = len(watched.files)
            reporter.message(f"pipebuild: watching {n} file{'s' if n != 1 else ''} for changes (Ctrl-C to stop)")
            changed = wait_for_change(events, watched, session.snapshot, settle, max(settle, MAX_SETTLE))
    finally:
        sys.dont_write_bytecode = dont_write_bytecode
        reporter.close()
        observer.stop()
        observer.join(timeout=5)


def _ino(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return -1
