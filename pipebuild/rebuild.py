"""The rebuilder: constructive traces (Build Systems à la Carte, §4.3).

`check(node, key, ...)` decides, for a task whose inputs are known, whether to SKIP it
(this exact work was done and its outputs are in place), RESTORE it (done before, but a
destination is missing or was edited: copy it back from the content store) or RUN it,
always with a reason from a small fixed set. The action cache is consulted only when the
task's last trace does not match, so a no-op build issues no query per task.
"""

from __future__ import annotations

import os
import stat
import time
from enum import Enum
from typing import TYPE_CHECKING

from .cas import ContentStore
from .graph import Node, show_path
from .hashing import hash_file
from .store import FileRow, Store, TaskRecord

if TYPE_CHECKING:
    from .remote import RemoteCache


class Action(Enum):
    """What the build does with a task."""

    SKIP = "up to date"
    RESTORE = "restore"
    RUN = "run"


class Reason:
    """The reasons a decision can carry (`--explain`)."""

    UP_TO_DATE = "up to date"
    NEVER_BUILT = "never built"
    INPUT_CHANGED = "input changed"  # + ": PATH"
    COMMAND_CHANGED = "command changed"
    OUTPUT_MISSING = "output missing"  # + ": PATH"
    OUTPUT_CHANGED = "output changed"  # + ": PATH"
    FAILED_LAST_TIME = "failed last time"
    FORCED = "forced"
    REMOTE_HIT = "remote cache hit"
    ALWAYS_RUN = "always_run"
    UPSTREAM_FAILED = "a dependency failed"
    STOPPED = "the build stopped after a failure"


class Decision:
    """An action, its reason, and for SKIP/RESTORE the outputs found in the cache."""

    __slots__ = ("action", "reason", "outputs", "restore", "record")

    def __init__(
        self,
        action: Action,
        reason: str,
        outputs: dict[str, str] | None = None,
        restore: list[tuple[str, str]] | None = None,
        record: bool = False,
    ) -> None:
        self.action = action
        self.reason = reason
        self.outputs = outputs or {}
        self.restore = restore or []  # (digest, destination) pairs to copy back
        self.record = record  # the task's trace must be rewritten (key changed)

    def __repr__(self) -> str:
        return f"Decision({self.action.name}, {self.reason!r})"


RACY_NS = 100_000_000  # 100 ms, well above the kernel's coarse clock tick


class StatCache:
    """Digests of source files and destinations, re-hashed only when stat data changes."""

    def __init__(self, rows: dict[str, FileRow]) -> None:
        self.rows = rows
        self.dirty: dict[str, tuple[str, int, int, int, str]] = {}
        self.hashed = 0  # files hashed in this build (tests count these)

    def digest(self, path: str) -> str | None:
        """The file's digest, or None if it does not exist (or is not a file)."""
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        row = self.rows.get(path)
        if row is not None and row[0] == st.st_size and row[1] == st.st_mtime_ns and row[2] == st.st_ino:
            return row[3]
        if not stat.S_ISREG(st.st_mode):
            return None
        d = hash_file(path)
        self.hashed += 1
        # A file written in the same clock tick as this stat could change again without
        # moving its mtime (the file system clock is coarse): do not trust such a row.
        racy = time.time_ns() - st.st_mtime_ns < RACY_NS
        self.update(path, st.st_size, st.st_mtime_ns, -1 if racy else st.st_ino, d)
        return d

    def update(self, path: str, size: int, mtime_ns: int, ino: int, digest: str) -> None:
        """Remember a file's stat data and digest (written with the next transaction)."""
        self.rows[path] = (size, mtime_ns, ino, digest)
        self.dirty[path] = (path, size, mtime_ns, ino, digest)

    def take_dirty(self) -> list[tuple[str, int, int, int, str]]:
        """The rows changed since the last call."""
        rows = list(self.dirty.values())
        self.dirty.clear()
        return rows


class Rebuilder:
    """Decides SKIP / RESTORE / RUN for each task from its traces."""

    def __init__(
        self,
        store: Store,
        cas: ContentStore,
        stats: StatCache,
        traces: dict[str, TaskRecord],
        forced: set[str] | None = None,
        remote: RemoteCache | None = None,
    ) -> None:
        self.store = store
        self.cas = cas
        self.stats = stats
        self.traces = traces
        self.forced = forced or set()
        # With a remote cache, blobs missing here are fetched when needed (build.py), so
        # their absence does not make a task run; the remote is asked only on a local miss.
        self.remote = remote

    def check(self, node: Node, key: str, recipe: str, inputs: list[tuple[str, str, str]]) -> Decision:
        """Decide for `node`, whose action key is `key`; inputs are (relpath, display, digest).

        Each task is decided once per build, so its trace is taken out of `traces` here:
        the traces are freed as the build goes, while the outputs it records take their
        place (~3 MiB less at the end of a 10,000-task no-op).
        """
        if node.name in self.forced:
            return Decision(Action.RUN, Reason.FORCED)
        if node.always_run:
            return Decision(Action.RUN, Reason.ALWAYS_RUN)
        last = self.traces.pop(node.name, None)
        same = last is not None and last.key == key and last.status == "ok"
        outs = last.output_digests() if same and last is not None else self.store.action(key)
        remote_hit = False
        if outs is None and self.remote is not None:
            outs = self.remote.lookup(key)
            remote_hit = outs is not None
        if outs is not None:
            decision = self._verify(node, outs)
            if decision is not None:
                decision.record = not same
                if remote_hit:
                    decision.reason = Reason.REMOTE_HIT
                return decision
            return Decision(Action.RUN, self._missing_reason(node, outs))
        if last is not None and last.status == "ok":
            self.store.detail(node.name, last)  # only now: says which input or command changed
        return Decision(Action.RUN, self._why_stale(last, recipe, inputs))

    def _verify(self, node: Node, outs: dict[str, str]) -> Decision | None:
        """SKIP or RESTORE when the cached outputs can be put in place; None to RUN."""
        restore: list[tuple[str, str]] = []
        reason = ""
        for o in node.outputs:
            d = outs.get(o.relpath)
            if d is None:
                if o.required:
                    return None
                continue
            for dest in o.dests:
                if self.stats.digest(dest) != d:
                    restore.append((d, dest))
                    if not reason:
                        what = Reason.OUTPUT_CHANGED if os.path.exists(dest) else Reason.OUTPUT_MISSING
                        reason = f"{what}: {show_path(dest)}"
            if o.required and not o.dests and not self._has(d):
                return None
        for d, _ in restore:
            if not self._has(d):
                return None
        if restore:
            return Decision(Action.RESTORE, reason, outs, restore)
        return Decision(Action.SKIP, Reason.UP_TO_DATE, outs)

    def _has(self, digest: str) -> bool:
        """True if the blob is here, or may be fetched from the remote cache when needed."""
        return self.remote is not None or self.cas.has(digest)

    @staticmethod
    def _missing_reason(node: Node, outs: dict[str, str]) -> str:
        for o in node.outputs:
            if o.required and o.relpath not in outs:
                return f"{Reason.OUTPUT_MISSING}: {o.relpath}"
        for o in node.outputs:
            if o.dests:
                return f"{Reason.OUTPUT_MISSING}: {show_path(o.dests[0])}"
        return f"{Reason.OUTPUT_MISSING}: {node.outputs[0].relpath if node.outputs else '?'}"

    @staticmethod
    def _why_stale(last: TaskRecord | None, recipe: str, inputs: list[tuple[str, str, str]]) -> str:
        if last is None:
            return Reason.NEVER_BUILT
        if last.status != "ok":
            return Reason.FAILED_LAST_TIME
        if last.recipe != recipe:
            return Reason.COMMAND_CHANGED
        before = last.input_digests()
        for relpath, display, digest in inputs:
            old = before.get(relpath)
            if old is None or old[1] != digest:
                return f"{Reason.INPUT_CHANGED}: {display}"
        return Reason.COMMAND_CHANGED
