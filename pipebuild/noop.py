"""The no-op certificate: a whole build shown to be up to date with one stat per file.

A build that ends with every selected task done (up to date, run or restored) writes
`.pipebuild/noop`: a fingerprint of the pipeline's definition, the names of the selected
tasks, and the stat data (size, mtime_ns, inode) under which the build verified every file
its decisions read: the sources, the input copies, the destinations, and the store blobs of
outputs that are kept only in the store. Those stat data are the stat cache's own rows,
taken when the bytes were hashed or written, never a later stat (a store blob never
changes: its stat is taken when the certificate is written). A build in which a file it
reads is also written (a task reading an input copy's destination, a copy of a copy)
writes none: that file's row would be the write's, not the one the decision read.

The next build with the same fingerprint stats those files first. If every one is exactly
as recorded, every file has the bytes the last build saw, every task has the same recipe
and inputs, so every key and trace is the same and every task would be skipped: the build
reports them up to date without laying out the graph or reading the trace store. If any
differs (an edit, a `touch`, a deleted output), the full build runs as always, and writes
a new certificate when it ends.

The certificate is void, and the full build runs, when:

* anything writes the trace store (`Store` removes the file on its first write), or a
  full build starts (it removes the file before doing anything);
* a build is under way or was killed (the `building` marker exists);
* `cache.sqlite` has changed since (another inode, size or mtime: deleted, replaced or
  overwritten);
* a task has an image (its key holds the image ID Docker resolves on each build), is
  `always_run`, or runs on a remote executor; a path is in Google Cloud Storage;
* `--force`/`-B` is given.

The fingerprint is a digest of the pipeline's state as the build reads it: every task's
name, commands, dependencies, inputs and own resources (names, extensions, destinations),
every input file's path as written, plus the workspace, the home directory `~` expands to
(a `~user` path gets no certificate), the targets, the remote-cache setting and the stat
data of pipebuild's own source files (a new version may lay paths out differently).
`tests/test_noop.py` checks that every attribute of the API objects, on the instance or as
a class default, is either in it or listed here as not read by the build's decisions.
"""

from __future__ import annotations

import os
import re
import struct
import time
from array import array
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .hashing import digest_str

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .report import Reporter

FILE = "noop"
UP_TO_DATE = "up to date"  # rebuild.Reason.UP_TO_DATE (not imported: see make())
MAGIC = b"pipebuild-noop 2\n"
# the fingerprint, the trace store's stat data (inode, size, mtime_ns), then the sizes of
# the names, paths and stats parts
_HEAD = struct.Struct("<32sqqqQQQ")
DB = "cache.sqlite"
_OTHER_HOME = re.compile(r"""['"]~[^/'"]""")  # a quoted path that starts with ~user

# Attributes of the API objects that the build's decisions do not read (checked by a test):
# where the call was made (error messages), resources (the executors' sizing), user
# metadata, the pipeline back-reference, and sets derived from the commands.
NOT_READ = {
    "Task": {
        "_pipeline", "_where", "attributes", "_cpu", "_memory", "_storage",
        "_mentioned", "_resources_inverse",
    },
    "ResourceFile": {"_where", "_has_extension", "_name"},
}  # fmt: skip


def path(state_dir: str) -> str:
    """Where the certificate lives."""
    return os.path.join(state_dir, FILE)


def void(state_dir: str) -> None:
    """Remove the certificate (something may change what it certifies)."""
    try:
        os.unlink(path(state_dir))
    except FileNotFoundError:
        pass


def _code_stamp() -> str:
    """Stat data of pipebuild's own modules: another version may lay out paths differently."""
    here = os.path.dirname(os.path.abspath(__file__))
    parts = []
    for d in (here, os.path.join(here, "executors")):
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.name.endswith(".py"):
                        st = e.stat()
                        parts.append(f"{e.path}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(d + ":?")
    parts.sort()
    return "\1".join(parts)


def fingerprint(
    pipeline: Pipeline, workspace: str, state_dir: str, targets: Iterable[str] | None, remote: str | None, ro: bool
) -> str | None:
    """The digest the certificate must match, or None when it cannot apply (see above).

    A definition it cannot read (a mistake the full build reports in one line, such as a
    task's dependency that is not a task) has none, rather than a traceback here.
    """
    try:
        return _fingerprint(pipeline, workspace, state_dir, targets, remote, ro)
    except Exception:  # noqa: BLE001 - the full build checks the definition and says what is wrong
        return None


def _fingerprint(
    pipeline: Pipeline, workspace: str, state_dir: str, targets: Iterable[str] | None, remote: str | None, ro: bool
) -> str | None:
    """See `fingerprint`.

    Built column by column (one comprehension per attribute over all tasks), ~3x faster
    than a loop over tasks. Lists of user text go in through `repr`, which quotes and
    escapes, so the encoding is unambiguous; uids need no quoting.
    """
    from .resource import ResourceFile, ResourceGroup

    if getattr(pipeline._backend, "_executor", None) is not None:  # a remote executor
        return None
    tasks = pipeline._tasks
    if [t for t in tasks if t._image is not None or t._always_run]:
        return None
    owned = [r for t in tasks for r in t._resources.values()]
    groups = [r for r in owned if type(r) is ResourceGroup]
    files: list[ResourceFile] = [r for r in owned if type(r) is not ResourceGroup]  # type: ignore[misc]
    for g in groups:
        files.extend(g._resources.values())
    inputs = pipeline._input_resources
    paths = repr([r._output_paths for r in files] + [g._output_paths for g in groups]) + repr(
        [(r._input_path, r._output_paths) for r in inputs]
    )
    if "'gs://" in paths or '"gs://' in paths:
        return None
    # `~` in a path expands to the home directory (a part of the fingerprint below); `~user`
    # to a user's, which is not, so such a path (or target) gets no certificate.
    if _OTHER_HOME.search(paths) or any(_OTHER_HOME.match(repr(t)) for t in targets or ()):
        return None
    # Each task's inputs, dependencies and resources: one flat column and the counts per task.
    # A task's internal and external outputs follow from the other tasks' inputs and from
    # the destinations, so they are not repeated.
    parts = [
        MAGIC.decode(),
        _code_stamp(),
        repr((workspace, state_dir, targets, remote, ro, os.path.expanduser("~"))),
        "\1".join([t._uid for t in tasks]),
        repr([t.name for t in tasks]),
        repr([t._timeout for t in tasks]),
        repr([t._command for t in tasks]),
        repr([len(t._dependencies) for t in tasks]),
        "\1".join([d._uid for t in tasks for d in t._dependencies]),
        repr([len(t._inputs) for t in tasks]),
        "\1".join([r for t in tasks for r in t._inputs]),  # a file is a str whose value is its uid
        repr([len(t._resources) for t in tasks]),
        repr([i for t in tasks for i in t._resources]),
        "\1".join([r._uid for r in owned]),
        repr([r in t._valid for t in tasks for r in t._resources.values()]),
        # groups (task-owned): root, files, and which files the task mentioned
        repr([(g._uid, g._root, list(g._resources), [f._uid for f in g._resources.values()]) for g in groups]),
        repr([f in g._source._valid for g in groups if g._source is not None for f in g._resources.values()]),
        # every file's name and extension, in the order of `files`
        "\1".join(files),
        repr([(r._value, r._extension) for r in files]),
        # input files and their groups
        "\1".join(inputs),
        repr([(r._value, r._extension) for r in inputs]),
        repr([None if (rg := r._resource_group) is None else (rg._uid, rg._root) for r in inputs]),
        paths,
    ]
    return digest_str("\0".join(parts))


def _db_stat(state_dir: str) -> tuple[int, int, int]:
    """The trace store's inode, size and mtime: a build writes it (and closes it, so SQLite
    has moved the write-ahead log into it) before it writes a certificate, and nothing
    writes it until the next build voids the certificate anyway."""
    st = os.stat(os.path.join(state_dir, DB))
    return st.st_ino, st.st_size, st.st_mtime_ns


def check(state_dir: str, fp: str) -> list[str] | None:
    """The selected tasks' names if the certificate holds for `fp`, else None."""
    if os.path.exists(os.path.join(state_dir, "building")):
        return None  # a build is under way or was killed: it must recover first
    try:
        with open(path(state_dir), "rb") as f:
            data = f.read()
    except OSError:
        return None
    head_end = len(MAGIC) + _HEAD.size
    if not data.startswith(MAGIC) or len(data) < head_end:
        return None
    recorded, *db, n_names, n_paths, n_stats = _HEAD.unpack_from(data, len(MAGIC))
    if recorded != fp.encode() or len(data) != head_end + n_names + n_paths + n_stats:
        return None
    try:  # the traces it stands for are still there, unchanged (not deleted or replaced)
        if _db_stat(state_dir) != tuple(db):
            return None
    except OSError:
        return None
    at = head_end
    names = data[at : at + n_names].decode("utf-8", "surrogateescape").split("\0") if n_names else []
    at += n_names
    paths = data[at : at + n_paths].decode("utf-8", "surrogateescape").split("\0") if n_paths else []
    at += n_paths
    stats = array("q")
    stats.frombytes(data[at : at + n_stats])
    if len(stats) != 3 * len(paths):
        return None
    stat = os.stat
    i = 0
    for p in paths:
        try:
            st = stat(p)
        except OSError:
            return None
        if st.st_size != stats[i] or st.st_mtime_ns != stats[i + 1] or st.st_ino != stats[i + 2]:
            return None
        i += 3
    return names


def write(state_dir: str, fp: str, names: list[str], files: dict[str, tuple[int, int, int]]) -> bool:
    """Write the certificate for `fp`: the selected tasks and each file's verified stat data.

    Returns False (and leaves none) when a row cannot be trusted: a file hashed in the
    same clock tick as it was written (inode recorded as -1) could change without its stat.
    """
    void(state_dir)  # whatever happens below, no older certificate stays
    if any("\0" in n for n in names):
        return False  # (a task name cannot hold a NUL in practice; the format would break)
    stats = array("q")
    for size, mtime_ns, ino in files.values():
        if ino < 0:
            return False
        stats.extend((size, mtime_ns, ino))
    names_b = "\0".join(names).encode("utf-8", "surrogateescape")
    paths_b = "\0".join(files).encode("utf-8", "surrogateescape")
    stats_b = stats.tobytes()
    target = path(state_dir)
    tmp = target + ".tmp"
    try:
        head = MAGIC + _HEAD.pack(fp.encode(), *_db_stat(state_dir), len(names_b), len(paths_b), len(stats_b))
        with open(tmp, "wb") as f:
            f.write(head + names_b + paths_b + stats_b)
        os.replace(tmp, target)
    except OSError:
        void(state_dir)
        return False
    return True


def report(names: list[str], reporter: Reporter, t0: float) -> None:
    """Report a certified build as the full one reports a no-op: every task skipped."""
    reporter.start(len(names))
    for name in names:
        reporter.task(name, "skipped", UP_TO_DATE)
    reporter.summary(0, 0, len(names), 0, 0, time.perf_counter() - t0)


def make(
    pipeline: Pipeline, workspace: str, targets: list[str] | None, wait: bool, reporter: Reporter, t0: float
) -> tuple[bool, str | None]:
    """`pipebuild make` without importing the build engine: (True, fp) if the certificate
    holds (the build is reported), else (False, fp) and the full build must run. `fp` is the
    fingerprint if it was computed (the full build then need not compute it again)."""
    from .remote import settings
    from .workspace import STATE_DIR, Workspace

    state_dir = os.path.join(workspace, STATE_DIR)
    if not os.path.exists(path(state_dir)):
        return False, None  # no certificate: no fingerprint to compute, no lock to take
    url, read_only = settings(None, False, pipeline._backend)
    fp = fingerprint(pipeline, workspace, state_dir, targets, url, read_only)
    if fp is None:
        return False, None
    ws = Workspace(state_dir)
    ws.lock(wait, reporter)
    try:
        names = check(state_dir, fp)
    finally:
        ws.unlock()
    if names is None:
        return False, fp
    report(names, reporter, t0)
    return True, fp
