"""The `.pipebuild` directory: its layout, its lock, and recovery after a killed build."""

from __future__ import annotations

import fcntl
import os
import shutil
from typing import TYPE_CHECKING

from .exceptions import UsageError, WorkspaceBusy
from .spares import Spare, adopt

if TYPE_CHECKING:
    from .graph import Graph
    from .report import Reporter

STATE_DIR = ".pipebuild"
TMP_SUFFIX = ".pipebuild-tmp"


class Workspace:
    """The `.pipebuild` directory and its lock."""

    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        self.db = os.path.join(state_dir, "cache.sqlite")
        self.cas = os.path.join(state_dir, "cas")
        self.tmp = os.path.join(state_dir, "tmp")
        self.spares = os.path.join(state_dir, "spares")  # emptied task directories (spares.py)
        self.kept_spares: list[Spare] = []  # those the last build left, adopted by recover
        self.logs = os.path.join(state_dir, "logs")
        self.dirty = os.path.join(state_dir, "building")
        self._lock_fd: int | None = None

    def lock(self, wait: bool, reporter: Reporter) -> None:
        """Take the workspace lock, waiting (with a message) or raising WorkspaceBusy."""
        try:
            os.makedirs(self.dir, exist_ok=True)
            ignore = os.path.join(self.dir, ".gitignore")
            if not os.path.exists(ignore):
                with open(ignore, "w") as f:
                    f.write("*\n")
            fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"cannot use the workspace directory {self.dir}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            where = os.path.dirname(self.dir)
            if not wait:
                os.close(fd)
                raise WorkspaceBusy(f"another pipebuild (pid {holder}) is building in {where}") from None
            reporter.message(f"pipebuild: waiting for another pipebuild (pid {holder}) building in {where}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def recover(self, graph: Graph) -> None:
        """Remove what an interrupted build left: task directories and temp outputs.
        Spare task directories are kept if the last build ended (it listed them)."""
        ended = not os.path.exists(self.dirty)
        if os.path.exists(self.tmp):
            from .executors.local import stop_orphans

            stop_orphans(self.tmp)
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.kept_spares = adopt(self.spares, trusted=ended)
        cas_tmp = os.path.join(self.cas, "tmp")
        if os.path.exists(cas_tmp):
            shutil.rmtree(cas_tmp, ignore_errors=True)
        if os.path.exists(self.dirty):
            self.remove_temps(graph)
        os.makedirs(self.tmp, exist_ok=True)
        os.makedirs(self.spares, exist_ok=True)
        os.makedirs(self.logs, exist_ok=True)
        with open(self.dirty, "w"):
            pass

    def remove_temps(self, graph: Graph) -> None:
        """Delete the temporary names that publishing may have left beside destinations."""
        for n in graph.nodes:
            for o in n.outputs:
                for d in o.dests:
                    unlink_quiet(tmp_name(d))
        for _, dests in graph.input_copies:
            for d in dests:
                unlink_quiet(tmp_name(d))

    def finish(self) -> None:
        """Mark the build as ended cleanly."""
        unlink_quiet(self.dirty)


def tmp_name(dest: str) -> str:
    d, b = os.path.split(dest)
    return os.path.join(d, "." + b + TMP_SUFFIX)


def unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        pass
