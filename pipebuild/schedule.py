"""The scheduler: runs nodes in dependency order, `jobs` at a time.

It knows nothing of stores or executors. For each node whose dependencies are done it
asks `decide(i)`, which either finishes the node at once (returns None: up to date) or
returns work to run on a worker thread; `complete(i, result)` then says whether the node
succeeded. After a failure no new work starts unless `keep_going`; then everything not
downstream of a failure still runs.

The worker that finishes a piece of work completes it, decides what became ready, and
takes the next piece itself, all under the scheduler's lock; the calling thread decides
the first nodes (so a no-op build never starts a thread) and then only waits. Handing
each result to the calling thread and each new piece of work back to a worker woke a
thread twice per task, and on this project's VMs a wake-up costs ~15-30 us with the GIL
held (the futex wake of another CPU traps to the hypervisor): a 10,000-task fan at -j2
went from ~13.5 s to ~13.0 s on tmpfs, with half the context switches, when workers
stopped handing off.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

Work = Callable[[], Any]


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
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        """Run every selected node; returns when nothing more can run.

        `decide` and `complete` are called one at a time, under the scheduler's lock, on
        the calling thread (the first decisions) or a worker thread. An exception from
        them, from work or from starting a thread ends the run: `on_error` is called once,
        on the thread that met it, before the work in flight is waited for (so that it
        can be stopped), and the error is raised here once that work has ended. `on_stop`
        is called once, at the first failure when not keep_going, so that work still
        running can be stopped; `on_interrupt` at Ctrl-C, before the work in flight is
        waited for.
        A worker that finds nothing to take while other work runs parks until it is given
        some or the run ends, so at most `slots` threads are ever started.
        """
        lock = threading.Lock()  # the state below, and every call of decide and complete
        ready = deque(i for i in range(self.n) if self.selected[i] and self.pending[i] == 0)
        runq: deque[tuple[int, Work]] = deque()  # decided, not yet taken by a worker
        running = 0  # work items taken by workers
        halted = False  # an interrupt or an error: workers take no more work
        stop_called = False
        erred = False  # on_error has been called
        idle: list[tuple[threading.Lock, list[tuple[int, Work]]]] = []  # parked: a held gate, a box
        errors: list[BaseException] = []
        finished = threading.Event()  # nothing runs and nothing more will
        threads: list[threading.Thread] = []

        def fill() -> None:
            # Decide only as far ahead as the free slots need: the first command starts
            # after a few decisions, not after all of them (a fan's 10,000 ready tasks),
            # and the rest are decided while commands run. Skips add nothing to runq, so a
            # no-op still decides everything in one pass; after a failure (without
            # keep_going) everything ready is decided, as before.
            nonlocal runq
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

        def start_workers() -> None:  # (under the lock)
            nonlocal running
            while runq and running < self.slots and not halted:
                if idle:  # wake a parked worker: cheaper than starting a thread
                    gate, box = idle.pop()
                    box.append(runq.popleft())
                    running += 1
                    gate.release()
                    continue
                t = threading.Thread(target=worker, args=(runq[0],), name=f"pipebuild_{len(threads)}")
                t.daemon = True
                t.start()  # may raise (can't start new thread): nothing counted yet
                runq.popleft()
                running += 1
                threads.append(t)

        def release_idle() -> None:  # (under the lock) the run is over: parked workers exit
            while idle:
                idle.pop()[0].release()

        def stop_on_error() -> None:  # (not under the lock) an error ends the run: stop what runs
            try:
                on_error()
            except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
                with lock:
                    errors.append(e)

        def worker(item: tuple[int, Work] | None) -> None:
            nonlocal running, halted, stop_called, erred
            while item is not None:
                i, work = item
                try:
                    result, exc = work(), None
                except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
                    result, exc = None, e
                park: tuple[threading.Lock, list[tuple[int, Work]]] | None = None
                first_error = False
                with lock:
                    running -= 1
                    item = None
                    try:
                        if exc is not None:
                            raise exc
                        if not halted:  # (else its result is dropped, as the build stops)
                            ok = complete(i, result)
                            if not ok:
                                self.failed = True
                            self._finish(i, ok, ready)
                            if self.failed and not self.keep_going and not stop_called:
                                stop_called = True
                                on_stop()  # before any work is taken after the failure
                            fill()
                            if runq and not halted:
                                running += 1
                                item = runq.popleft()
                                start_workers()  # for what else became ready
                    except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
                        errors.append(e)
                        halted = True
                        first_error, erred = not erred, True
                        if item is not None:
                            running -= 1
                            item = None
                    if item is None:
                        if running == 0:
                            finished.set()
                            release_idle()
                        elif not halted:
                            # Work still runs and may make more ready: wait to be given
                            # some, rather than exit and have a new thread started for it
                            # (on a spine with a leaf on each node, a thread per task).
                            park = (threading.Lock(), [])
                            park[0].acquire()
                            idle.append(park)
                if first_error:
                    stop_on_error()
                if park is not None:
                    park[0].acquire()  # released by start_workers (an item) or release_idle
                    item = park[1][0] if park[1] else None

        try:
            with lock:
                fill()
                start_workers()
                if running == 0:
                    finished.set()
            finished.wait()
        except KeyboardInterrupt:
            self.interrupted = True
            halted = True  # at once, without the lock a worker may hold for a long decision
            on_interrupt()
            raise
        except Exception:  # from the first decisions, or a first thread that cannot start
            with lock:
                halted = True
                first_error, erred = not erred, True
            if first_error:
                stop_on_error()  # the threads started before it run work that can be stopped
            raise
        finally:
            with lock:
                halted = True
                release_idle()
            for t in threads:
                t.join()  # each finishes the work it has; results after an interrupt are dropped
        if errors:
            raise errors[0]
        self.not_run = [i for i in range(self.n) if self.selected[i] and not self.done[i]]

    def _finish(self, i: int, ok: bool, ready: deque[int]) -> None:
        self.done[i] = ok
        for c in self.consumers[i]:
            if not ok:
                self.blocked[c] = True
            self.pending[c] -= 1
            if self.pending[c] == 0:
                ready.append(c)
