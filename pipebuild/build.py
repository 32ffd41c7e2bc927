"""The build: wires graph, store, content store, rebuilder, scheduler and executor.

    plan (graph.py) -> lock the workspace -> load traces (2 queries) -> digest sources
    (stat cache) -> schedule: for each ready task compute its action key, ask the
    rebuilder, run/restore/skip -> one transaction per finished task -> summary.

Workspace layout, `.pipebuild/` beside the Pipefile (or in `LocalBackend(cache_dir=)`):
`cache.sqlite`, `cas/`, `tmp/<task>/` (task directories; emptied after a success and kept
in `spares/` for the next task, spares.py), `logs/<task>.out|.err`, `lock`. It is
disposable: deleting it costs a rebuild.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import gc as pygc
import json
import os
import shlex
import shutil
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

from . import noop
from .cas import ContentStore, link_or_copy
from .exceptions import BuildFailed, DefinitionError, MissingInputError, UsageError
from .executors import STOPPED, Executor, Job, JobResult
from .executors.local import LocalExecutor
from .gcs import is_gs, stat_cache
from .graph import Graph, Node, plan, resolve, show_path
from .hashing import action_key, digest_str, hash_file, recipe
from .pipeline import Pipeline
from .rebuild import Action, Decision, Reason, Rebuilder
from .remote import RemoteCache
from .remote import settings as remote_settings
from .report import Reporter
from .resource import InputResourceFile, safe_name
from .schedule import Scheduler
from .spares import Spares
from .store import Store, TaskRecord
from .workspace import STATE_DIR, Workspace, tmp_name, unlink_quiet

STDERR_TAIL = 10
MAKE_AHEAD = 64  # a task with this many input directories has its directory made ahead (spares.py)


def _subdirs(relpaths: Iterable[str]) -> set[str]:
    """The directories a new task directory has: out/, and in/ (in/1/ ...) for its inputs."""
    dirs = {"out"}
    for relpath in relpaths:
        d = os.path.dirname(relpath)
        while d and d not in dirs:
            dirs.add(d)
            d = os.path.dirname(d)
    return dirs


@dataclass
class Options:
    """How to build: where, how many at once, what to force, who reports."""

    workspace: str  # relative paths in the pipeline resolve against this directory
    cache_dir: str | None = None  # where .pipebuild/ lives (default: workspace)
    jobs: int = 1
    keep_going: bool = False
    verbose: bool = False  # Pipeline.run(verbose=True): show each task's stdout
    delete_scratch: bool = True
    explain: bool = False
    verbosity: int = 0
    targets: list[str] | None = None
    force_all: bool = False
    force: list[str] = field(default_factory=list)  # targets whose tasks must rerun
    wait: bool = True  # wait for the workspace lock (else WorkspaceBusy)
    executor: Executor | None = None
    reporter: Reporter | None = None
    remote_cache: str | None = None  # gs://BUCKET/PREFIX (see remote.py); None: see remote.settings
    remote_cache_read_only: bool = False
    noop_fp: str | None = None  # the no-op fingerprint, when the caller computed it (fastmake)

    @property
    def state_dir(self) -> str:
        """The `.pipebuild` directory."""
        return os.path.join(os.path.abspath(self.cache_dir or self.workspace), STATE_DIR)


@dataclass
class TaskFailure:
    """One failed task, as reported."""

    name: str
    detail: str
    log: str | None = None
    tail: list[str] = field(default_factory=list)


@dataclass
class BuildResult:
    """What a build did; `raise_for_failure` turns failures into a BuildFailed."""

    ran: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    failed: list[TaskFailure] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    hashed: int = 0
    queries: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True if no task failed or was left out because of a failure."""
        return not self.failed and not self.not_run

    def raise_for_failure(self) -> None:
        """Raise BuildFailed naming the failed tasks, if any."""
        if self.failed or self.not_run:
            names = [f.name for f in self.failed]
            detail = "; ".join(f"{f.name}: {f.detail}" for f in self.failed)
            raise BuildFailed(names, f"{len(names)} task(s) failed: {detail}")


def publish(src: str, dest: str) -> tuple[str, int, int, int]:
    """Copy `src` to `dest` atomically (temp name, then rename); returns dest's stat data."""
    if is_gs(dest):
        from . import gcs

        return gcs.upload(src, dest)
    tmp = tmp_name(dest)
    try:
        try:
            st = _copy(src, tmp)
        except FileNotFoundError:  # usually the destination's directory: make it, once
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            st = _copy(src, tmp)
    except BaseException:
        unlink_quiet(tmp)  # e.g. a full disk: the old destination stays as it was
        raise
    try:
        os.replace(tmp, dest)  # keeps the inode and mtime that _copy saw
    except IsADirectoryError:
        os.unlink(tmp)
        raise OSError(f"destination {dest} is a directory") from None
    return (dest, st.st_size, st.st_mtime_ns, st.st_ino)


def _copy(src: str, dst: str) -> os.stat_result:
    """Copy a file's bytes in the kernel; returns the copy's stat data (~6 calls fewer than
    shutil.copyfile and a stat, which publishing does once per output)."""
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            size = os.fstat(fin).st_size
            done = 0
            while True:
                try:
                    n = os.sendfile(fout, fin, done, max(size - done, 1 << 20))
                except OSError as e:
                    if done or e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    with open(fin, "rb", closefd=False) as r, open(fout, "wb", closefd=False) as w:
                        shutil.copyfileobj(r, w)  # a file system without sendfile
                    break
                if n == 0:
                    break
                done += n
                if done >= size:
                    break  # the size fstat gave: no further call only to see the end of the file
            return os.fstat(fout)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


# -- target selection ------------------------------------------------------------------


def select(graph: Graph, targets: list[str] | None) -> list[int]:
    """Node indices for the targets (task names or destinations); all nodes when none."""
    if not targets:
        return list(range(len(graph.nodes)))
    roots: list[int] = []
    copies = {d for _, dests in graph.input_copies for d in dests}
    for t in targets:
        n = graph.by_name.get(t)
        if n is None:
            try:
                n = graph.by_dest.get(resolve(t, graph.workspace))
            except Exception:  # noqa: BLE001 - an unparsable target is simply unknown
                n = None
            if n is None and resolve(t, graph.workspace) in copies:
                continue
        if n is None:
            raise UsageError(_unknown_target(graph, t))
        roots.append(n.index)
    return roots


def _unknown_target(graph: Graph, target: str) -> str:
    candidates = list(graph.by_name) + [os.path.relpath(d, graph.workspace) for d in graph.by_dest]
    close = difflib.get_close_matches(target, candidates, n=3, cutoff=0.5)
    msg = f"unknown target '{target}'"
    if close:
        msg += "; did you mean " + ", ".join(f"'{c}'" for c in close) + "?"
    else:
        msg += " (see 'pipebuild list')"
    return msg


# -- the build -------------------------------------------------------------------------


class _Outcome:
    """What a task's work hands to `_complete`."""

    __slots__ = ("ok", "ran", "outputs", "blobs", "files", "failure", "seconds")

    def __init__(self) -> None:
        self.ok = False
        self.ran = False  # a restore that had to run the task (a remote blob was unusable)
        self.outputs: dict[str, str] = {}
        self.blobs: list[tuple[str, int]] = []
        self.files: list[tuple[str, int, int, int, str]] = []
        self.failure: TaskFailure | None = None
        self.seconds = 0.0


class CommandSlots:
    """A counting semaphore that serves waiters in the order they came: a slot given back
    goes to the longest waiter, never to whichever thread asks next. (queue.SimpleQueue
    as a token pool let a worker that gave a slot back and went on to its next task take
    it again, so a ready task could wait behind 15 later ones at -j2; threading's
    Semaphore is no fairer, and slower.)"""

    def __init__(self, n: int) -> None:
        self._lock = threading.Lock()
        self._free = n  # (> 0 only when nobody waits)
        self._waiting: deque[threading.Lock] = deque()  # each held until its slot is handed over

    def get(self) -> None:
        """Take a slot, waiting for one if none is free."""
        with self._lock:
            if self._free:
                self._free -= 1
                return
            gate = threading.Lock()
            gate.acquire()
            self._waiting.append(gate)
        gate.acquire()  # released by put(): the slot is ours

    def put(self) -> None:
        """Give a slot back: to the longest waiter, if any."""
        with self._lock:
            if self._waiting:
                self._waiting.popleft().release()
            else:
                self._free += 1


class _InputLost(Exception):
    pass


class _Build:
    def __init__(self, graph: Graph, selected: list[bool], options: Options, ws: Workspace, reporter: Reporter):
        self.graph = graph
        self.nodes = graph.nodes
        self.selected = selected
        self.options = options
        self.ws = ws
        self.reporter = reporter
        self.executor: Executor = options.executor or _default_executor(None)
        self.result = BuildResult()
        n = len(graph.nodes)
        self.outputs: list[dict[str, str] | None] = [None] * n
        self.pending: dict[int, tuple[str, str, list[tuple[str, str, str]], Decision]] = {}
        self.remote: RemoteCache | None = None
        if options.remote_cache:
            self.remote = RemoteCache(options.remote_cache, options.remote_cache_read_only, reporter.warning)
            known = getattr(self.executor, "remote_blobs", None)  # what a remote executor stored there
            if known is not None and getattr(self.executor, "cache_url", None) == self.remote.url:
                self.remote.present = known
        self._redo_lock = threading.RLock()  # a rerun producer may need its own producer rerun
        self.docker_flags = str(getattr(self.executor, "flags", "") or "")
        self.default_image: str | None = getattr(self.executor, "default_image", None)
        if hasattr(self.executor, "warn"):  # an executor with things to say (Cloud Batch) says them here
            setattr(self.executor, "warn", reporter.warning)  # noqa: B010
        self.keys: list[str | None] = [None] * n
        # At most `jobs` commands run at once; preparing a task directory and publishing
        # and cleaning up after a command (~2.5 ms per task, mostly file system calls) run
        # outside this limit, beside other tasks' commands. A failure without -k sets
        # `stopping` before the slot is released, so no command starts after it. Slots go to
        # waiting tasks in the order they asked (see CommandSlots). Where the local executor
        # keeps the limit itself (_limit_commands), in order too, there are none.
        self.command_slots: CommandSlots | None = None
        self.stopping = False
        self.halting = False  # an error ends the build (_halt)
        self._stopped = False  # _stop was called
        self._stop_lock = threading.Lock()
        self._limited: LocalExecutor | None = None
        # Emptied task directories for reuse; as many as could be in use at once are kept
        # for the next build (spares.py).
        self.spares = Spares(ws.spares, ws.kept_spares, keep=2 * options.jobs + 2)
        # Producers whose recorded output could not be found or remade: their traces and
        # action-cache rows are dropped at the end, so the next build runs them.
        self.stale: set[int] = set()
        self.noop_fp: str | None = None  # set: write a no-op certificate if every task ends done

    def run(self) -> BuildResult:
        t0 = time.perf_counter()
        opts, ws = self.options, self.ws
        self.store = Store(ws.db, warn=self.reporter.warning)
        try:
            self.images = _resolve_images(self.executor, self.graph, self.selected, ws.dir)
            self._limit_commands()
            if self._limited is None:
                self.command_slots = CommandSlots(max(1, opts.jobs))
            self.cas = ContentStore(ws.cas)
            self.stats = stat_cache(self.store.load_files(), self.graph, self.cas, fetch=True)
            traces = self.store.load_tasks(full=False)
            if opts.delete_scratch:  # directories for wide tasks that have not run before
                self.spares.make_ahead(
                    [
                        dirs
                        for node in self.nodes
                        if self.selected[node.index] and len(node.inputs) >= MAKE_AHEAD and node.name not in traces
                        for dirs in [frozenset(_subdirs(i.relpath for i in node.inputs))]
                        if len(dirs) >= MAKE_AHEAD
                    ]
                )
            self.src = self._digest_sources()
            self._copy_inputs()
            forced = _forced(self.graph, self.selected, opts)
            self.rebuilder = Rebuilder(self.store, self.cas, self.stats, traces, forced, self.remote)
            self.reporter.start(sum(self.selected))
            sched = Scheduler(
                [n.deps for n in self.nodes],
                self.selected,
                opts.jobs,
                opts.keep_going,
                [n.always_run for n in self.nodes],
                slots=2 * opts.jobs if opts.jobs > 1 else 1,  # -j1 keeps its strict order
            )
            try:
                sched.run(
                    self._decide,
                    self._complete,
                    on_interrupt=self.executor.cancel_all,
                    on_stop=self._stop,  # a failure without -k stops the rest
                    on_error=self._halt,  # e.g. the cache cannot be written
                )
            finally:
                dirty = self.stats.take_dirty()
                if dirty:
                    self.store.record(files=dirty)
                for i in self.stale:
                    key = self.keys[i]
                    self.store.forget_tasks([self.nodes[i].name])
                    if key is not None:
                        self.store.forget_action(key)
            failed = {f.name for f in self.result.failed}
            downstream: set[int] = set()  # of a failure; not of a task merely stopped (not_run is in order)
            for i in sched.not_run:
                name = self.nodes[i].name
                if name in failed:
                    continue
                if sched.blocked[i] and any(
                    self.nodes[d].name in failed or d in downstream for d in self.nodes[i].deps
                ):
                    downstream.add(i)
                why = Reason.UPSTREAM_FAILED if i in downstream else Reason.STOPPED
                self.result.not_run.append(name)
                self.result.reasons[name] = why
                self.reporter.task(name, "not run", why)
        finally:
            if self._limited is not None:
                self._limited.limit(None)
            self.spares.close()
            close = getattr(self.executor, "close", None)  # e.g. LocalExecutor's bash servers
            if close is not None:
                close()
            self.result.hashed = self.stats.hashed if hasattr(self, "stats") else 0
            self.result.queries = self.store.queries
            self.store.close()
        r = self.result
        done = len(r.ran) + len(r.restored) + len(r.up_to_date) == sum(self.selected)
        if self.noop_fp is not None and r.ok and done and not self.stale:  # (stale: traces dropped)
            self._certify(self.noop_fp)
        r.seconds = time.perf_counter() - t0
        self.reporter.summary(len(r.ran), len(r.restored), len(r.up_to_date), len(r.failed), len(r.not_run), r.seconds)
        return r

    def _limit_commands(self) -> None:
        """Let the local executor limit commands to -j, if it runs them all (then the build
        needs no command slots of its own: the scheduler's `2 * jobs` work items are
        `jobs` tasks in their command and `jobs` waiting in the executor)."""
        jobs = max(1, self.options.jobs)
        host = getattr(self.executor, "host", self.executor)  # DispatchExecutor's
        if jobs == 1 or not isinstance(host, LocalExecutor):
            return
        if any(n.image for n in self.nodes if self.selected[n.index]):
            return  # containers count against -j too, and they run elsewhere
        host.limit(jobs, self._may_start, self._job_failed)
        self._limited = host

    def _stop(self) -> None:
        """A failure without -k (or an error): no command starts after this but always_run
        ones, and the commands running now are stopped. Once per build, so that an
        always_run command started after it is never stopped by a second call."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = self.stopping = True  # (stopping already, if a command failed)
        self.executor.stop_running()

    def _halt(self) -> None:
        """An error ends the build: stop what runs, and start nothing more, always_run
        tasks included. (Not the executor's cancel_all, as Ctrl-C: that refuses jobs
        for good, and an executor passed in Options may serve another build.)"""
        self.halting = True
        self._stop()

    def _may_start(self, job: Job) -> bool:
        return not self.halting and (not self.stopping or job.always_run)

    def _job_failed(self, job: Job) -> bool:
        if not self.options.keep_going:
            self.stopping = True
        return self.stopping

    def _digest_sources(self) -> dict[str, str]:
        src: dict[str, str] = {}
        for node, sel in zip(self.nodes, self.selected, strict=True):
            if not sel:
                continue
            for inp in node.inputs:
                if inp.source is not None and inp.source not in src:
                    d = self.stats.digest(inp.source)
                    if d is None:
                        what = "is a directory" if os.path.isdir(inp.source) else "does not exist"
                        raise MissingInputError(f"input file {inp.display} {what}", inp.where or node.where)
                    src[inp.source] = d
        return src

    def _copies(self) -> Iterator[tuple[InputResourceFile, str, list[str]]]:
        """(input, source, destinations) for the input copies this build makes: with
        targets, only the copies that are targets themselves."""
        wanted = None
        if self.options.targets:
            wanted = set()
            for t in self.options.targets:
                try:
                    wanted.add(resolve(t, self.graph.workspace))
                except DefinitionError:
                    pass
        for r, all_dests in self.graph.input_copies:
            dests = [d for d in all_dests if wanted is None or d in wanted]
            if dests:
                yield r, resolve(r._input_path, self.graph.workspace), dests

    def _copy_inputs(self) -> None:
        """write_output of an input file: keep each destination a copy of the source."""
        for r, source, dests in self._copies():
            d = self.stats.digest(source)
            if d is None:
                raise MissingInputError(f"input file {r._input_path} does not exist", r._where)
            for dest in dests:
                if self.stats.digest(dest) != d:
                    try:
                        path, size, mtime, ino = publish(_local(self.cas, source, d), dest)
                    except OSError as e:
                        raise DefinitionError(f"cannot copy input {r._input_path} to {dest}: {e}", r._where) from None
                    self.stats.update(path, size, mtime, ino, d)

    def _certify(self, fp: str) -> None:
        """Write the no-op certificate (noop.py): the stat data under which this build
        verified every file its decisions read. Written only when each has a trusted row,
        and never when a file read (a source) is also written in the build (a destination):
        its row would then be the one the write left, not the one the decision read."""
        rows = self.stats.rows
        read = list(self.src)  # hashed at the start: the selected tasks' sources (then the copies')
        written: list[str] = []  # verified or published: destinations
        blobs: dict[str, tuple[int, int, int]] = {}  # outputs kept only in the store
        for node, sel in zip(self.nodes, self.selected, strict=True):
            if not sel:
                continue
            outs = self.outputs[node.index] or {}
            for o in node.outputs:
                written.extend(o.dests)
                if o.required and not o.dests and self.remote is None:
                    digest = outs.get(o.relpath)
                    if digest is None:
                        return
                    blob = self.cas.path(digest)  # a store file never changes: its stat now
                    try:
                        st = os.stat(blob)
                    except OSError:
                        return
                    blobs[blob] = (st.st_size, st.st_mtime_ns, st.st_ino)
        for _, source, dests in self._copies():
            read.append(source)
            written.extend(dests)
        if not set(read).isdisjoint(written):
            return
        files: dict[str, tuple[int, int, int]] = {}
        for path in read + written:
            row = rows.get(path)
            if row is None:
                return
            files[path] = row[:3]
        files.update(blobs)
        noop.write(self.ws.dir, fp, [n.name for n in self.nodes if self.selected[n.index]], files)

    # -- decisions and records (one thread at a time, under the scheduler's lock) ----

    def _decide(self, i: int) -> Callable[[], _Outcome] | None:
        node = self.nodes[i]
        inputs: list[tuple[str, str, str]] = []
        for inp in node.inputs:
            if inp.source is not None:
                d: str | None = self.src[inp.source]
            else:
                outs = self.outputs[inp.producer]
                d = outs.get(inp.producer_relpath) if outs else None
                if d is None:
                    continue  # the producer failed and this task is always_run
            inputs.append((inp.relpath, inp.display, d))  # type: ignore[arg-type]
        rdigest, key = _keys(node, _image(self.images, node, self.docker_flags, self.default_image), inputs)
        self.keys[i] = key
        dec = self.rebuilder.check(node, key, rdigest, inputs)
        self.result.reasons[node.name] = dec.reason
        if dec.action is Action.SKIP:
            self.outputs[i] = dec.outputs
            self.result.up_to_date.append(node.name)
            if dec.record:
                self._record_ok(node, key, rdigest, inputs, dec.outputs, 0.0, [], [])
            self.reporter.task(node.name, "skipped", dec.reason)
            return None
        self.pending[i] = (key, rdigest, inputs, dec)
        if dec.action is Action.RESTORE:
            return partial(self._attempt, partial(self._restore, node, dec, key))
        return partial(self._attempt, partial(self._execute, node, key))

    def _attempt(self, work: Callable[[], _Outcome]) -> _Outcome:
        """A task's work, on a worker thread. Any failure without -k (laying out inputs,
        a command, publishing, restoring) stops the build at once, not only once the
        scheduler has taken its outcome."""
        out = work()
        if out.failure is not None and not self.options.keep_going:
            self._stop()
        return out

    def _record_ok(
        self,
        node: Node,
        key: str,
        rdigest: str,
        inputs: list[tuple[str, str, str]],
        outputs: dict[str, str],
        seconds: float,
        blobs: list[tuple[str, int]],
        files: list[tuple[str, int, int, int, str]],
        action: bool = False,
    ) -> None:
        for row in files:
            self.stats.rows[row[0]] = row[1:]
        rec = TaskRecord(
            key, rdigest, json.dumps({r: [disp, d] for r, disp, d in inputs}), json.dumps(outputs, sort_keys=True),
            "ok", time.time(), seconds,
        )  # fmt: skip
        self.store.record(node.name, rec, (key, outputs) if action else None, blobs, files + self.stats.take_dirty())

    def _complete(self, i: int, outcome: _Outcome) -> bool:
        node = self.nodes[i]
        key, rdigest, inputs, dec = self.pending.pop(i)
        if outcome.ok:
            self.outputs[i] = outcome.outputs
            ran = dec.action is Action.RUN or outcome.ran
            self._record_ok(
                node, key, rdigest, inputs, outcome.outputs, outcome.seconds, outcome.blobs, outcome.files, ran
            )
            (self.result.ran if ran else self.result.restored).append(node.name)
            self.reporter.task(node.name, "ran" if ran else "restored", dec.reason, outcome.seconds)
            if self.options.verbose and ran:
                self.reporter.verbose_log(node.name, self._log(node, "out"))
            return True
        failure = outcome.failure or TaskFailure(node.name, "failed")
        if failure.detail == STOPPED:
            return False  # stopped after another task failed: no trace, reported as not run
        rec = TaskRecord(
            key,
            rdigest,
            json.dumps({r: [disp, d] for r, disp, d in inputs}),
            "{}",
            "failed",
            time.time(),
            outcome.seconds,
        )
        self.store.record(node.name, rec, files=self.stats.take_dirty())
        self.result.failed.append(failure)
        self.reporter.task(node.name, "failed", f"{failure.detail} (ran because: {dec.reason})")
        self.reporter.failure(failure.name, failure.detail, failure.log, failure.tail)
        return False

    # -- worker threads ------------------------------------------------------------

    def _log(self, node: Node, kind: str) -> str:
        return os.path.join(self.ws.logs, safe_name(node.name) + "." + kind)

    def _restore(self, node: Node, dec: Decision, key: str | None = None) -> _Outcome:
        out = _Outcome()
        if self.remote is not None:  # fetch what is not here; if that fails, do the work again
            for digest in dict.fromkeys(d for d, _ in dec.restore):
                if not self.cas.has(digest):
                    size = self.remote.fetch(digest, self.cas)
                    if size is None:
                        rerun = self._execute(node, key)
                        rerun.ran = True
                        return rerun
                    out.blobs.append((digest, size))
        try:
            for digest, dest in dec.restore:
                path, size, mtime, ino = publish(self.cas.path(digest), dest)
                out.files.append((path, size, mtime, ino, digest))
        except OSError as e:
            out.failure = TaskFailure(node.name, f"cannot restore output: {e}")
            return out
        out.outputs = dec.outputs
        out.ok = True
        return out

    def _execute(self, node: Node, key: str | None = None) -> _Outcome:
        out = _Outcome()
        workdir = os.path.join(self.ws.tmp, safe_name(node.name))
        staged: list[tuple[str, str]] = []
        try:
            out.blobs.extend(self._prepare(node, workdir, staged))
        except (_InputLost, OSError) as e:
            out.failure = TaskFailure(node.name, str(e))
            return out
        slots = self.command_slots
        if slots is not None:
            slots.get()
        try:
            if self.halting or (self.stopping and not node.always_run):
                out.failure = TaskFailure(node.name, STOPPED)
                return out
            if self._limited is None:  # (else the executor says when the command starts)
                self.reporter.started(node.name)  # worker thread: the live display lists running tasks
            reusable = self._run_command(node, workdir, out, staged, key)
            if out.failure is not None and not self.options.keep_going:
                self.stopping = True
        finally:
            if slots is not None:
                slots.put()
        if out.failure is None:
            try:
                self._publish(node, out)
            except OSError as e:
                out.failure = TaskFailure(node.name, f"cannot store outputs: {e}", show_path(self._log(node, "err")))
                return out
            out.ok = True
            if self.options.delete_scratch:
                if reusable:
                    self._finish_dir(node, workdir)
                else:
                    shutil.rmtree(workdir, ignore_errors=True)
            if key is not None and self.remote is not None:
                self.remote.upload(key, out.outputs, self.cas)  # a failure is a warning
        return out

    def _run_command(
        self, node: Node, workdir: str, out: _Outcome, staged: list[tuple[str, str]], key: str | None
    ) -> bool:
        """Run the task's command in `workdir` and move its outputs into the store. Returns
        False if the directory must not be reused (a process the task started still runs)."""
        t0 = time.perf_counter()
        opts = self.options
        task = node.task
        collected = False

        def after() -> bool:  # the local executor stores the outputs before the slot is free
            nonlocal collected
            collected = True
            out.seconds = time.perf_counter() - t0
            try:
                self._collect(node, workdir, out)
            except OSError as e:
                out.failure = TaskFailure(node.name, f"cannot store outputs: {e}", show_path(job.stderr))
            return out.failure is None  # (an output the command did not write is a failure too)

        job = Job(
            name=node.name,
            dir=workdir,
            script=task_script(node, opts.verbose),
            stdout=self._log(node, "out"),
            stderr=self._log(node, "err"),
            timeout=node.timeout,
            image=node.image,
            inputs=staged,
            outputs=[o.relpath for o in node.outputs],
            cpu=task._cpu,
            memory=task._memory,
            storage=task._storage,
            key=key,
            always_run=node.always_run,
            after=after,
            on_start=partial(self.reporter.started, node.name) if self._limited is not None else None,
        )
        res: JobResult = self.executor.run(job)
        if not collected:
            out.seconds = time.perf_counter() - t0
        if out.failure is not None:  # from after()
            return False
        if res.exit_code != 0 or res.timed_out or res.error:
            if res.timed_out:
                detail = f"timed out after {node.timeout:g} s"
            elif res.error:
                detail = res.error
            else:
                detail = f"exit code {res.exit_code}"
            out.failure = TaskFailure(node.name, detail, show_path(job.stderr), _tail(job.stderr))
            return False
        if not collected:
            after()
        return not res.left_running

    def _prepare(self, node: Node, workdir: str, staged: list[tuple[str, str]]) -> list[tuple[str, int]]:
        """Lay out the task directory; returns the blobs it added to the store, and appends
        each input's (relpath, digest) to `staged`.

        A source file is copied into the store (once per content) and the task gets a link
        to that read-only copy, never to the user's file: a command that writes into its
        input cannot alter the source, and the copy is hashed as it is made, so a file
        edited since the build hashed it is caught instead of built under the old key.
        """
        added: list[tuple[str, int]] = []
        links: list[tuple[str, str]] = []  # (blob, relpath)
        for inp in node.inputs:
            if inp.source is not None:
                digest = self.src[inp.source]
                if not self.cas.has(digest):
                    size = self.cas.copy_in(_local(self.cas, inp.source, digest), digest)
                    if size is None:
                        raise _InputLost(f"input {inp.display} changed during the build; run again")
                    added.append((digest, size))
                src = self.cas.path(digest)
            else:
                outs = self.outputs[inp.producer]
                d = outs.get(inp.producer_relpath) if outs else None
                if d is None:
                    continue
                src = self._blob_for(inp.producer, inp.producer_relpath, d)
                digest = d
            staged.append((inp.relpath, digest))
            links.append((src, inp.relpath))
        dirs = _subdirs(relpath for _, relpath in links)
        if not self.spares.take(workdir, dirs):
            try:
                os.mkdir(workdir)  # the common case, in one call (makedirs stats each level)
            except FileExistsError:
                shutil.rmtree(workdir)
                os.mkdir(workdir)
            except FileNotFoundError:
                os.makedirs(workdir)
            for d in sorted(dirs, key=len):
                os.mkdir(os.path.join(workdir, d))
        for src, relpath in links:
            link_or_copy(src, os.path.join(workdir, relpath))
        return added

    def _finish_dir(self, node: Node, workdir: str) -> None:
        """After a success: empty the task directory and keep it as a spare, else delete it."""
        try:
            for inp in node.inputs:
                os.unlink(os.path.join(workdir, inp.relpath))
            # Only the (empty) directories _prepare made may be left, as it made them: anything
            # the command wrote, or a chmod of its directory, sends the directory to rmtree.
            if self.spares.give_if_new(workdir, _subdirs(inp.relpath for inp in node.inputs)):
                return
        except OSError:
            pass
        shutil.rmtree(workdir, ignore_errors=True)

    def _blob_for(self, producer: int, relpath: str, digest: str) -> str:
        """The store path of an upstream output, re-stored from a destination if need be."""
        if self.cas.has(digest):
            return self.cas.path(digest)
        for o in self.nodes[producer].outputs:
            if o.relpath == relpath:
                for dest in o.dests:
                    if os.path.isfile(dest) and self.cas.put_copy(dest, digest):
                        return self.cas.path(digest)
        if self.remote is not None:
            if self.remote.fetch(digest, self.cas) is not None:
                return self.cas.path(digest)
            with self._redo_lock:  # the remote copy is missing or bad: run the producer again
                if not self.cas.has(digest):
                    self._execute(self.nodes[producer])
            if self.cas.has(digest):
                return self.cas.path(digest)
        self.stale.add(producer)
        raise _InputLost(f"input {relpath} of {self.nodes[producer].name} is missing from the content store; run again")

    def _collect(self, node: Node, workdir: str, out: _Outcome) -> None:
        missing = []
        for o in node.outputs:
            path = os.path.join(workdir, o.relpath)
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                if o.required:
                    missing.append(o.relpath)
                continue
            size = st.st_size
            d = hash_file(path)
            self.cas.put(path, d)
            out.outputs[o.relpath] = d
            out.blobs.append((d, size))
        if missing:
            out.failure = TaskFailure(
                node.name,
                f"{Reason.OUTPUT_MISSING}: {', '.join(missing)} (the command did not write it)",
                show_path(self._log(node, "err")),
                _tail(self._log(node, "err")),
            )

    def _publish(self, node: Node, out: _Outcome) -> None:
        """Copy each stored output to its destinations."""
        for o in node.outputs:
            digest = out.outputs.get(o.relpath)
            if digest is None:
                continue
            for dest in o.dests:
                path, size, mtime, ino = publish(self.cas.path(digest), dest)
                out.files.append((path, size, mtime, ino, digest))


def _keys(node: Node, image: str | None, inputs: list[tuple[str, str, str]]) -> tuple[str, str]:
    """(digest of the task's recipe, its action key) for inputs given as (relpath, display, digest)."""
    rdigest = digest_str(recipe(node.commands, image, {}, [o.relpath for o in node.outputs]))
    return rdigest, action_key(rdigest, [(r, d) for r, _, d in inputs])


def _forced(graph: Graph, selected: list[bool], options: Options) -> set[str]:
    """Names of the tasks that must run whatever their traces say (-B / --force)."""
    if options.force_all:
        return {n.name for n, s in zip(graph.nodes, selected, strict=True) if s}
    return {graph.nodes[i].name for i in select(graph, options.force)} if options.force else set()


def task_script(node: Node, trace: bool = False) -> str:
    """The bash script a task runs: strict mode, then its commands, one per line."""
    head = "set -euxo pipefail" if trace else "set -euo pipefail"
    return head + "\n" + "\n".join(node.commands) + "\n"


def _default_executor(pipeline: Pipeline | None) -> Executor:
    """The backend's own executor (BatchBackend), else bash on the host and Docker for tasks
    with an image (settings from a LocalBackend)."""
    backend = pipeline._backend if pipeline is not None else None
    own = getattr(backend, "_executor", None)
    if own is not None:
        executor: Executor = own()
        return executor
    from .executors.docker import default_executor

    return default_executor(backend)


def _resolve_images(executor: Executor, graph: Graph, selected: list[bool], workspace: str | None) -> dict[str, str]:
    """Let the executor check what the selected tasks need before any runs: {image: image ID}."""
    prepare = getattr(executor, "prepare", None)
    remote = getattr(executor, "default_image", None) is not None  # every task has an image there
    nodes = [n for n in graph.nodes if (n.image or remote) and selected[n.index]]
    if prepare is None or not nodes:
        return {}
    images: dict[str, str] = prepare(nodes, workspace)
    return images


def _image(images: dict[str, str], node: Node, flags: str = "", default: str | None = None) -> str | None:
    """What the action key says of the task's image: its ID where known, else its name, and
    the extra `docker run` flags (an `-e VAR=...` there can change what the task writes).
    `default` is the image an executor runs imageless tasks in (Cloud Batch), if any."""
    image = node.image or default
    if not image:
        return None
    base = images.get(image, image)
    return f"{base} {flags}" if flags else base


def _local(cas: ContentStore, source: str, digest: str) -> str:
    """A local path with the source's bytes: the file itself, or a gs:// object's blob."""
    if is_gs(source):
        from . import gcs

        return gcs.local_copy(cas, source, digest)
    return source


def _tail(path: str, n: int = STDERR_TAIL) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            data = f.read().decode(errors="replace")
    except OSError:
        return []
    return data.splitlines()[-n:]


def _reporter(options: Options) -> Reporter:
    return options.reporter or Reporter(options.verbosity, options.explain)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: a build allocates ~10 objects per task and no
    cycles worth collecting, and collection passes cost ~40% of a 10,000-task no-op."""
    was = pygc.isenabled()
    pygc.disable()
    try:
        yield
    finally:
        if was:
            pygc.enable()


@paused_gc()
def build(pipeline: Pipeline, options: Options) -> BuildResult:
    """Build the selected targets of `pipeline` incrementally."""
    t0 = time.perf_counter()
    reporter = _reporter(options)
    ws = Workspace(options.state_dir)
    url, read_only = remote_settings(
        options.remote_cache, options.remote_cache_read_only, getattr(pipeline, "_backend", None)
    )
    options = dataclasses.replace(options, remote_cache=url, remote_cache_read_only=read_only)
    fp = options.noop_fp if options.noop_fp is not None else _noop_fingerprint(pipeline, options)
    locked = False
    # The no-op certificate (noop.py): all up to date, shown by a stat per file. Without one
    # (its file is absent), the lock is taken after planning, as a definition error comes first.
    if fp is not None and os.path.exists(noop.path(ws.dir)):
        ws.lock(options.wait, reporter)
        locked = True
        try:
            names = noop.check(ws.dir, fp)
        except BaseException:
            ws.unlock()
            raise
        if names is not None:
            ws.unlock()
            return _all_up_to_date(names, reporter, t0)
    try:
        graph = plan(pipeline, options.workspace, ws.dir)
        roots = select(graph, options.targets)
        selected = graph.cone(roots)
        if options.executor is None:
            options = dataclasses.replace(options, executor=_default_executor(pipeline))
        if not locked:
            ws.lock(options.wait, reporter)
            locked = True
        noop.void(ws.dir)  # before anything changes: a killed build must leave none behind
        ws.recover(graph)
        try:
            b = _Build(graph, selected, options, ws, reporter)
            b.noop_fp = fp
            recover = getattr(b.executor, "recover", None)  # jobs a killed build left on a remote executor
            if recover is not None:
                recover(ws.dir)
            result = b.run()
        except BaseException:
            ws.remove_temps(graph)  # still alive: clean up now rather than next time
            raise
        finally:
            ws.finish()
        return result
    finally:
        if locked:
            ws.unlock()


def _noop_fingerprint(pipeline: Pipeline, options: Options) -> str | None:
    """What a no-op certificate must match for this build, or None when none can apply."""
    if options.force_all or options.force:
        return None
    executor = options.executor
    if executor is not None and getattr(executor, "default_image", None) is not None:
        return None  # every task runs in an image there (Cloud Batch)
    return noop.fingerprint(
        pipeline,
        options.workspace,
        options.state_dir,
        options.targets,
        options.remote_cache,
        options.remote_cache_read_only,
    )


def _all_up_to_date(names: list[str], reporter: Reporter, t0: float) -> BuildResult:
    """The result of a build the no-op certificate showed to be up to date."""
    noop.report(names, reporter, t0)
    result = BuildResult(up_to_date=names, reasons=dict.fromkeys(names, Reason.UP_TO_DATE))
    result.seconds = time.perf_counter() - t0
    return result


# -- previews: dry run, status ---------------------------------------------------------


def preview(pipeline: Pipeline, options: Options) -> list[tuple[str, str, str]]:
    """(task, would-do, reason) for the selected tasks, without running or writing."""
    ws = Workspace(options.state_dir)
    graph = plan(pipeline, options.workspace, ws.dir)
    selected = graph.cone(select(graph, options.targets))
    executor = options.executor or _default_executor(pipeline)
    images = _resolve_images(executor, graph, selected, None)
    flags = str(getattr(executor, "flags", "") or "")
    store = Store(ws.db if os.path.exists(ws.db) else None)
    try:
        cas = ContentStore(ws.cas)
        stats = stat_cache(store.load_files(), graph, cas, fetch=False)
        traces = store.load_tasks()
        url, read_only = remote_settings(
            options.remote_cache, options.remote_cache_read_only, getattr(pipeline, "_backend", None)
        )
        remote = RemoteCache(url, True, _reporter(options).warning) if url else None  # asked, never written
        rebuilder = Rebuilder(store, cas, stats, traces, _forced(graph, selected, options), remote)
        outputs: list[dict[str, str] | None] = [None] * len(graph.nodes)
        stale_by: list[str | None] = [None] * len(graph.nodes)
        rows: list[tuple[str, str, str]] = []
        for node in graph.nodes:
            if not selected[node.index]:
                continue
            upstream = next((stale_by[d] for d in node.deps if stale_by[d]), None)
            if upstream is not None:
                stale_by[node.index] = upstream
                rows.append((node.name, "may run", f"after {upstream}"))
                continue
            inputs: list[tuple[str, str, str]] = []
            missing = None
            for inp in node.inputs:
                if inp.source is not None:
                    d = stats.digest(inp.source)
                    if d is None:
                        missing = inp.display
                        break
                else:
                    outs = outputs[inp.producer] or {}
                    d = outs.get(inp.producer_relpath)
                    if d is None:
                        continue
                inputs.append((inp.relpath, inp.display, d))
            if missing is not None:
                stale_by[node.index] = node.name
                rows.append((node.name, "cannot run", f"input file {missing} does not exist"))
                continue
            rdigest, key = _keys(node, _image(images, node, flags, getattr(executor, "default_image", None)), inputs)
            dec = rebuilder.check(node, key, rdigest, inputs)
            if dec.action is Action.RUN:
                stale_by[node.index] = node.name
                rows.append((node.name, "run", dec.reason))
            else:
                outputs[node.index] = dec.outputs
                rows.append((node.name, "restore" if dec.action is Action.RESTORE else "skip", dec.reason))
        return rows
    finally:
        store.close()


def script(pipeline: Pipeline, options: Options) -> str:
    """A bash script that builds the pipeline from scratch, without pipebuild."""
    ws = Workspace(options.state_dir)
    graph = plan(pipeline, options.workspace, ws.dir)
    selected = graph.cone(select(graph, options.targets))
    q = shlex.quote
    lines = [
        "#!/usr/bin/env bash",
        f"# Generated by pipebuild: builds {pipeline.name or 'the pipeline'} from scratch, in dependency order.",
        "# Each task runs in its own directory with the same relative paths pipebuild uses.",
        "set -euo pipefail",
        f"cd {q(options.workspace)}",
        f"S={q(os.path.join(ws.dir, 'script'))}",
        'rm -rf "$S" && mkdir -p "$S"',
    ]

    def publish_lines(src: str, dest: str) -> list[str]:
        if is_gs(dest):
            return [f"gcloud storage cp {src} {q(dest)}"]
        tmp = tmp_name(dest)
        cp = "gcloud storage cp" if is_gs(src) else "cp"
        return [f"mkdir -p {q(os.path.dirname(dest))}", f"{cp} {src} {q(tmp)} && mv {q(tmp)} {q(dest)}"]

    for r, dests in graph.input_copies:
        for dest in dests:
            lines += publish_lines(q(resolve(r._input_path, graph.workspace)), dest)
    for node in graph.nodes:
        if not selected[node.index]:
            continue
        d = f'"$S"/{q(safe_name(node.name))}'
        lines.append("")
        lines.append(f"# task {node.name}")
        dirs = sorted({os.path.dirname(i.relpath) for i in node.inputs} | {"out"})
        lines.append("mkdir -p " + " ".join(f"{d}/{x}" for x in dirs))
        for inp in node.inputs:
            if inp.source is not None:
                src = q(inp.source)
            else:
                src = f'"$S"/{q(safe_name(graph.nodes[inp.producer].name))}/{inp.producer_relpath}'
            cp = "gcloud storage cp" if is_gs(src) else "cp"
            lines.append(f"{cp} {src} {d}/{inp.relpath}")
        body = task_script(node)
        if node.image:
            run = f'docker run --rm -u "$(id -u):$(id -g)" -v "$PWD:$PWD" -w "$PWD" -e PIPEBUILD_TASK_DIR="$PWD" {q(node.image)}'
            lines.append(f"(cd {d} && {run} bash -c {q(body)})")
        else:
            lines.append(f'(cd {d} && PIPEBUILD_TASK_DIR="$PWD" bash -c {q(body)})')
        for o in node.outputs:
            for dest in o.dests:
                lines += publish_lines(f"{d}/{o.relpath}", dest)
    return "\n".join(lines) + "\n"


# -- housekeeping ----------------------------------------------------------------------


def clean(pipeline: Pipeline, options: Options, everything: bool = False) -> list[str]:
    """Remove the published outputs of the selected tasks; `everything` drops .pipebuild too."""
    reporter = _reporter(options)
    ws = Workspace(options.state_dir)
    graph = plan(pipeline, options.workspace, ws.dir)
    selected = graph.cone(select(graph, options.targets)) if options.targets else [True] * len(graph.nodes)
    removed: list[str] = []
    ws.lock(options.wait, reporter)
    try:
        names = []
        for node in graph.nodes:
            if not selected[node.index]:
                continue
            names.append(node.name)
            for o in node.outputs:
                for dest in o.dests:
                    if os.path.isfile(dest):
                        os.unlink(dest)
                        removed.append(dest)
        if everything:
            for entry in os.listdir(ws.dir):
                if entry not in ("lock", ".gitignore"):
                    p = os.path.join(ws.dir, entry)
                    shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        elif os.path.exists(ws.db):
            store = Store(ws.db, warn=reporter.warning)
            store.forget_tasks(names)
            store.record(forget_files=removed)
            store.close()
    finally:
        ws.unlock()
    return removed


def parse_size(text: str) -> int:
    """Bytes in '500M', '2G', '1.5GiB', '1024' (K/M/G/T powers of 1024)."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    mult = 1
    if s and s[-1] in units:
        mult = units[s[-1]]
        s = s[:-1]
    try:
        value = float(s)
    except ValueError:
        raise UsageError(f"not a size: '{text}' (use e.g. 500M or 2G)") from None
    if value < 0:
        raise UsageError(f"not a size: '{text}'")
    return int(value * mult)


def gc(options: Options, max_size: int) -> tuple[int, int]:
    """Trim the content store to `max_size` bytes, least recently used first."""
    reporter = _reporter(options)
    ws = Workspace(options.state_dir)
    if not os.path.exists(ws.db):
        return (0, 0)
    ws.lock(options.wait, reporter)
    try:
        store = Store(ws.db, warn=reporter.warning)
        cas = ContentStore(ws.cas)
        # Blobs that no task's last build produced go first, oldest first; then the rest.
        current = {d for rec in store.load_tasks().values() for d in rec.output_digests().values()}
        rows = sorted(store.blobs_by_age(), key=lambda row: row[0] in current)
        total = sum(size for _, size, _ in rows)
        removed = freed = 0
        for digest, size, _ in rows:
            if total <= max_size:
                break
            freed += cas.remove(digest)
            store.forget_blob(digest)
            total -= size
            removed += 1
        store.close()
        return (removed, freed)
    finally:
        ws.unlock()
