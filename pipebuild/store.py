"""The trace store: `.pipebuild/cache.sqlite`.

Tables (created through sqlite-utils, once per cache; everything else uses the sqlite3
module directly, because importing sqlite_utils costs ~60 ms, a quarter of a
10,000-task no-op):

    meta     key -> value                  schema version
    files    path -> size, mtime_ns, ino, digest
                                           stat cache for sources and published outputs
    tasks    name -> key, recipe, inputs, outputs, status, finished, duration
                                           the last build of each task (for explain)
    actions  key -> outputs                the action cache: key -> {relpath: digest}
    blobs    digest -> size, used          content-store entries, for gc (LRU)

Read once at start (two queries), then one small transaction per finished task. WAL with
synchronous=NORMAL: a kill -9 can lose at most the transaction in flight, never corrupt
the file, and a commit costs no fsync. A database from another schema version, or one
that is not a database at all, is replaced with a one-line warning.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from . import noop
from .exceptions import CacheError

SCHEMA_VERSION = "1"
READ_CACHE_KIB = 256  # SQLite page cache while the build only reads (see Store._open)
WRITE_CACHE_KIB = 2000  # SQLite's default, once it writes

FileRow = tuple[int, int, int, str]
T = TypeVar("T")  # size, mtime_ns, ino, digest


class TaskRecord:
    """The last recorded build of one task."""

    __slots__ = ("key", "recipe", "inputs", "outputs", "status", "finished", "duration")

    def __init__(
        self,
        key: str,
        recipe: str | None,
        inputs: str | None,
        outputs: str,
        status: str,
        finished: float,
        duration: float,
    ) -> None:
        self.key = key
        self.recipe = recipe  # None until Store.detail (load_tasks(full=False))
        self.inputs = inputs  # JSON {relpath: [display, digest]}, parsed on demand; None as recipe
        self.outputs = outputs  # JSON {relpath: digest}
        self.status = status
        self.finished = finished
        self.duration = duration

    def output_digests(self) -> dict[str, str]:
        """{relpath: digest} of the recorded outputs."""
        result: dict[str, str] = json.loads(self.outputs)
        return result

    def input_digests(self) -> dict[str, list[str]]:
        """{relpath: [display, digest]} of the recorded inputs."""
        result: dict[str, list[str]] = json.loads(self.inputs or "{}")
        return result


class Store:
    """The SQLite trace store; `path=None` keeps it in memory (tests)."""

    def __init__(self, path: str | None, warn: Callable[[str], None] = print) -> None:
        self.path = path
        self._warn = warn
        self.queries = 0  # statements issued, so tests can count work
        self._writing = False  # the page cache is small until the first write (see _open)
        self._voided = False  # the no-op certificate is removed on the first write (noop.py)
        try:
            try:
                self.db = self._open()
            except sqlite3.DatabaseError as e:
                if path is None or _unwritable(e):
                    raise
                warn(f"pipebuild: warning: cache {path} is unreadable ({e}); starting a fresh cache")
                self._remove_files()
                self.db = self._open()
        except (sqlite3.DatabaseError, OSError) as e:
            if path is None or not (isinstance(e, OSError) or _unwritable(e)):
                raise
            raise CacheError(f"cannot use the cache {path}: {e}") from None

    def _void_certificate(self) -> None:
        """Remove the no-op certificate, which stands for the traces as they were (noop.py)."""
        if not self._voided and self.path is not None:
            noop.void(os.path.dirname(self.path))
            self._voided = True

    def _remove_files(self) -> None:
        assert self.path is not None
        self._void_certificate()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(self.path + suffix)
            except FileNotFoundError:
                pass

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path or ":memory:", isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.OperationalError:
            row = None  # no meta table: a new database
        if row is not None and row[0] != SCHEMA_VERSION:
            self._warn(
                f"pipebuild: warning: cache {self.path} has schema {row[0]}, expected "
                f"{SCHEMA_VERSION}; starting a fresh cache"
            )
            db.close()
            self._remove_files()
            db = sqlite3.connect(self.path or ":memory:", isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            row = None
        if row is None:
            _create_schema(db)
        else:
            # A truncated or damaged file can open and still fail here.
            db.execute("SELECT count(*) FROM tasks").fetchone()
        # Reading goes through each table once (load_files, load_tasks), which a page cache
        # does not speed up; with SQLite's default of 2 MiB it kept ~1.5 MiB of pages through
        # a 10,000-task no-op. Writes, which revisit index pages, get the default back.
        db.execute(f"PRAGMA cache_size=-{READ_CACHE_KIB}")
        self._writing = False
        return db

    # -- reading -----------------------------------------------------------------------

    def _guard(self, fn: Callable[[], T]) -> T:
        """Run `fn`; if the database turns out to be damaged, start a fresh one and rerun it.

        Opening checks only what opening reads; a damaged page elsewhere shows up on first
        use, and must cost a warning and a rebuild, never a crash.
        """
        try:
            return fn()
        except sqlite3.DatabaseError as e:
            if self.path is not None and _unwritable(e):
                # Read-only or full: stop with one line; what is published stays correct,
                # and the tasks whose traces were not written simply run again next time.
                raise CacheError(f"cannot write the cache {self.path}: {e}") from None
            if self.path is None or not _damaged(e):
                raise
            self._warn(f"pipebuild: warning: cache {self.path} is damaged ({e}); starting a fresh cache")
            try:
                self.db.close()
            except sqlite3.Error:
                pass
            self._remove_files()
            self.db = self._open()
            return fn()

    def load_files(self) -> dict[str, FileRow]:
        """The whole stat cache."""
        self.queries += 1
        sql = "SELECT path, size, mtime_ns, ino, digest FROM files"
        return self._guard(lambda: {r[0]: (r[1], r[2], r[3], r[4]) for r in self.db.execute(sql)})

    def load_tasks(self, full: bool = True) -> dict[str, TaskRecord]:
        """The last build of every task.

        With `full=False` (the build), only what deciding needs: key, outputs and status.
        Recipe and inputs say why a task is stale, which `detail` reads for that one task;
        leaving them out saves ~5 MiB and ~10 ms on a 10,000-task no-op.
        """
        self.queries += 1
        if full:
            sql = "SELECT name, key, recipe, inputs, outputs, status, finished, duration FROM tasks"
            return self._guard(lambda: {r[0]: TaskRecord(*r[1:]) for r in self.db.execute(sql)})
        status: dict[str, str] = {}  # one string per status, not one per row
        sql = "SELECT name, key, outputs, status FROM tasks"
        return self._guard(
            lambda: {
                r[0]: TaskRecord(r[1], None, None, r[2], status.setdefault(r[3], r[3]), 0.0, 0.0)
                for r in self.db.execute(sql)
            }
        )

    def detail(self, name: str, task: TaskRecord) -> None:
        """Fill in the recipe and inputs of a record loaded with `load_tasks(full=False)`."""
        if task.recipe is not None:
            return
        self.queries += 1
        row = self._guard(lambda: self.db.execute("SELECT recipe, inputs FROM tasks WHERE name=?", (name,)).fetchone())
        task.recipe, task.inputs = row if row is not None else ("", "{}")

    def action(self, key: str) -> dict[str, str] | None:
        """The outputs recorded for an action key, or None."""
        self.queries += 1
        row = self._guard(lambda: self.db.execute("SELECT outputs FROM actions WHERE key=?", (key,)).fetchone())
        if row is None:
            return None
        result: dict[str, str] = json.loads(row[0])
        return result

    # -- writing -----------------------------------------------------------------------

    def record(
        self,
        name: str | None = None,
        task: TaskRecord | None = None,
        action: tuple[str, dict[str, str]] | None = None,
        blobs: Iterable[tuple[str, int]] = (),
        files: Iterable[tuple[str, int, int, int, str]] = (),
        forget_files: Iterable[str] = (),
    ) -> None:
        """One transaction: a task's trace, its action-cache entry, blobs and stat rows."""
        self._void_certificate()
        self.queries += 1
        blobs, files, forget_files = list(blobs), list(files), list(forget_files)
        self._guard(lambda: self._record(name, task, action, blobs, files, forget_files))

    def _record(
        self,
        name: str | None,
        task: TaskRecord | None,
        action: tuple[str, dict[str, str]] | None,
        blobs: list[tuple[str, int]],
        files: list[tuple[str, int, int, int, str]],
        forget_files: list[str],
    ) -> None:
        now = time.time()
        db = self.db
        if not self._writing:
            db.execute(f"PRAGMA cache_size=-{WRITE_CACHE_KIB}")
            self._writing = True
        db.execute("BEGIN")
        try:
            if name is not None and task is not None:
                db.execute(
                    "INSERT OR REPLACE INTO tasks VALUES (?,?,?,?,?,?,?,?)",
                    (name, task.key, task.recipe, task.inputs, task.outputs, task.status, task.finished, task.duration),
                )
            if action is not None:
                db.execute(
                    "INSERT OR REPLACE INTO actions VALUES (?,?,?)",
                    (action[0], json.dumps(action[1], sort_keys=True), now),
                )
            if blobs:  # (empty statements skipped: this runs once per finished task)
                db.executemany("INSERT OR REPLACE INTO blobs VALUES (?,?,?)", ((d, s, now) for d, s in blobs))
            if files:
                db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?)", files)
            if forget_files:
                db.executemany("DELETE FROM files WHERE path=?", ((p,) for p in forget_files))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    def touch_blobs(self, digests: Iterable[str]) -> None:
        """Mark blobs as used now (for LRU garbage collection)."""
        now = time.time()
        self.queries += 1
        self.db.executemany("UPDATE blobs SET used=? WHERE digest=?", ((now, d) for d in digests))

    def forget_blob(self, digest: str) -> None:
        """Drop a blob's row (it was missing or damaged)."""
        self._void_certificate()
        self.queries += 1
        self.db.execute("DELETE FROM blobs WHERE digest=?", (digest,))

    def blobs_by_age(self) -> list[tuple[str, int, float]]:
        """(digest, size, last used), least recently used first."""
        self.queries += 1
        return list(self.db.execute("SELECT digest, size, used FROM blobs ORDER BY used"))

    def forget_action(self, key: str) -> None:
        """Drop an action-cache entry (its outputs can no longer be had)."""
        self._void_certificate()
        self.queries += 1
        self._guard(lambda: self.db.execute("DELETE FROM actions WHERE key=?", (key,)))

    def forget_tasks(self, names: Iterable[str]) -> None:
        """Drop the traces of some tasks (after `clean`)."""
        self._void_certificate()
        self.queries += 1
        self.db.executemany("DELETE FROM tasks WHERE name=?", ((n,) for n in names))

    def close(self) -> None:
        """Close the connection."""
        self.db.close()


def _unwritable(e: sqlite3.DatabaseError) -> bool:
    """True for errors that mean the database cannot be written: read-only, full, I/O."""
    name = str(getattr(e, "sqlite_errorname", ""))
    if name:
        return name.startswith(("SQLITE_READONLY", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_PERM"))
    text = str(e)
    return any(t in text for t in ("readonly", "disk is full", "disk I/O error", "unable to open"))


def _damaged(e: sqlite3.DatabaseError) -> bool:
    """True for errors that mean the file is damaged (not a locked or read-only database)."""
    name = getattr(e, "sqlite_errorname", "")
    if name:
        return str(name).startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
    text = str(e)
    return "malformed" in text or "not a database" in text


def _create_schema(db: sqlite3.Connection) -> None:
    import sqlite_utils

    sdb = sqlite_utils.Database(db)
    tables: dict[str, tuple[dict[str, Any], str]] = {
        "meta": ({"key": str, "value": str}, "key"),
        "files": ({"path": str, "size": int, "mtime_ns": int, "ino": int, "digest": str}, "path"),
        "tasks": (
            {
                "name": str,
                "key": str,
                "recipe": str,
                "inputs": str,
                "outputs": str,
                "status": str,
                "finished": float,
                "duration": float,
            },
            "name",
        ),  # fmt: skip
        "actions": ({"key": str, "outputs": str, "created": float}, "key"),
        "blobs": ({"digest": str, "size": int, "used": float}, "digest"),
    }
    for name, (columns, pk) in tables.items():
        sdb[name].create(columns, pk=pk, if_not_exists=True)  # type: ignore[union-attr]
    sdb["meta"].insert({"key": "schema_version", "value": SCHEMA_VERSION}, replace=True)  # type: ignore[union-attr]
