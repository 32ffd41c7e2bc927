"""The scheduler: runs nodes in dependency order, `jobs` at a time.

It knows nothing of stores or executors. For each node whose dependencies are done it
asks `decide(i)`, which either finishes the node at once (returns None: up to date) or
returns work to run on a worker thread; `complete(i, result)` then says whether the node
succeeded. Decisions happen on the calling thread as soon as a node is ready, so a no-op
build never touches the thread pool. After a failure no new work starts unless
`keep_going`; then everything not downstream of a failure still runs.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

Work = Callable[[], Any]


class _Pool:
    """Worker threads that run work items and hand back (item, result, exception).

    Two C-level queues and nothing else: concurrent.futures' pool makes a Future, and its
    `wait` a waiter, an Event and a Condition, for every task, and at 10,000 one-line
    tasks that machinery was a third of the build's Python time.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.todo: queue.SimpleQueue[tuple[int, Work] | None] = queue.SimpleQueue()
        self.done: queue.SimpleQueue[tuple[int, Any, BaseException | None]] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.idle = 0  # workers waiting for an item (only the scheduler's thread counts)

    def submit(self, i: int, work: Work) -> None:
        if self.idle:
            self.idle -= 1
        elif len(self.threads) < self.size:  # started as needed, like ThreadPoolExecutor's
            t = threading.Thread(target=self._worker, name=f"pipebuild_{len(self.threads)}", daemon=True)
            self.threads.append(t)
            t.start()
        self.todo.put((i, work))

    def _worker(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                return
            i, work = item
            try:
                self.done.put((i, work(), None))
            except BaseException as e:  # noqa: BLE001 - re-raised on the scheduler's thread
                self.done.put((i, None, e))

    def result(self) -> tuple[int, Any, BaseException | None]:
        """The next finished item (blocks); its worker is idle from then on."""
        item = self.done.get()
        self.idle += 1
        return item

    def shutdown(self) -> None:
        """Let each worker finish its item and exit; returns when they have."""
        for _ in self.threads:
            self.todo.put(None)
        for t in self.threads:
            t.join()


class Scheduler:
    """Dependency-ordered execution over nodes 0..n-1 (given in topological order)."""

    def __init__(
        self,
        deps: Sequence[Sequence[int]],
        selected: Sequence[bool],
        jobs: int,
        keep_going: bool = False,
        always_run: Sequence[bool] | None = None,
        slots: int | None = None,
    ) -> None:
        self.n = len(deps)
        self.selected = selected
        self.jobs = max(1, jobs)
        # Work items in flight at once (default `jobs`). The build asks for more than `jobs`
        # and limits the commands themselves to `jobs` (build._Build._execute), so its own
        # per-task file work overlaps with running commands instead of idling a job slot.
        self.slots = max(self.jobs, slots or 0)
        self.keep_going = keep_going
        self.always_run = always_run or [False] * self.n
        self.consumers: list[list[int]] = [[] for _ in range(self.n)]
        self.pending = [0] * self.n
        for i, ds in enumerate(deps):
            if not selected[i]:
                continue
            for d in ds:
                self.consumers[d].append(i)
                self.pending[i] += 1
        self.blocked = [False] * self.n  # a dependency failed
        self.done = [False] * self.n
        self.not_run: list[int] = []  # selected nodes that never ran, in order
        self.failed = False
        self.interrupted = False

    def run(
        self,
        decide: Callable[[int], Work | None],
        complete: Callable[[int, Any], bool],
        on_interrupt: Callable[[], None] = lambda: None,
        on_stop: Callable[[], None] = lambda: None,
    ) -> None:
        """Run every selected node; returns when nothing more can run.

        `on_stop` is called once, at the first failure when not keep_going, so that work
        still running can be stopped.
        """
        stop_called = False
        ready = deque(i for i in range(self.n) if self.selected[i] and self.pending[i] == 0)
        runq: deque[tuple[int, Work]] = deque()
        running = 0
        pool = _Pool(self.slots)
        try:
            while True:
                # Decide only as far ahead as the free slots need: the first command starts
                # after a few decisions, not after all of them (a fan's 10,000 ready tasks),
                # and the rest are decided while commands run. Skips
                # add nothing to runq, so a no-op still decides everything in one pass; after
                # a failure (without keep_going) everything ready is decided, as before.
                while ready and (len(runq) < self.slots or (self.failed and not self.keep_going)):
                    i = ready.popleft()
                    if self.blocked[i] and not self.always_run[i]:
                        self._finish(i, False, ready)
                        continue
                    work = decide(i)
                    if work is None:
                        self._finish(i, True, ready)
                    else:
                        runq.append((i, work))
                if self.failed and not self.keep_going:
                    # Stop starting work, except tasks that must run whatever happens.
                    runq = deque(item for item in runq if self.always_run[item[0]])
                while runq and running < self.slots:
                    pool.submit(*runq.popleft())
                    running += 1
                if not running:
                    break
                i, result, exc = pool.result()
                running -= 1
                if exc is not None:
                    raise exc
                ok = complete(i, result)
                if not ok:
                    self.failed = True
                self._finish(i, ok, ready)
                if self.failed and not self.keep_going and not stop_called:
                    stop_called = True
                    on_stop()
        except KeyboardInterrupt:
            self.interrupted = True
            on_interrupt()
            raise
        finally:
            pool.shutdown()  # waits for the work items still running; their results are dropped
        self.not_run = [i for i in range(self.n) if self.selected[i] and not self.done[i]]

    def _finish(self, i: int, ok: bool, ready: deque[int]) -> None:
        self.done[i] = ok
        for c in self.consumers[i]:
            if not ok:
                self.blocked[c] = True
            self.pending[c] -= 1
            if self.pending[c] == 0:
                ready.append(c)
