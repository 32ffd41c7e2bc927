"""The incremental engine: scenarios from the peer benchmark, keys, failures, laziness."""

from __future__ import annotations

import json
import os
import shlex
import sqlite3
import subprocess
import sys

import pytest
from conftest import no_process

from pipebuild import LocalBackend, Pipeline, PipelineException
from pipebuild.build import Options, build
from pipebuild.executors import FakeExecutor, Job
from pipebuild.graph import show_path


def write(path, text):
    """Write a file, dated a minute ago as a file edited before the build would be."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    past = os.stat(path).st_mtime_ns - 60 * 10**9
    os.utime(path, ns=(past, past))


def read(path):
    with open(path) as f:
        return f.read()


def layers(root, extra_task=False, dep_edge=False):
    """Sources a, b; x = strip(a), y = strip(b); z = cksum-ish(x, y); z2 = z + a."""
    p = Pipeline(name="layers")
    a = p.read_input(os.path.join(root, "src/a.txt"))
    b = p.read_input(os.path.join(root, "src/b.txt"))
    x = p.new_task("x")
    x.command(f"grep -v '^#' {a} > {x.ofile}")
    y = p.new_task("y")
    y.command(f"grep -v '^#' {b} > {y.ofile}")
    z = p.new_task("z")
    z.command(f"cat {x.ofile} {y.ofile} | wc -c > {z.ofile}")
    z2 = p.new_task("z2")
    z2.command(f"cat {z.ofile} {a} > {z2.ofile}")
    if extra_task:
        u = p.new_task("unrelated")
        u.command(f"echo hi > {u.ofile}")
        p.write_output(u.ofile, os.path.join(root, "out/u"))
    if dep_edge:
        z.depends_on(y)
    for t, name in ((x, "x"), (y, "y"), (z, "z"), (z2, "z2")):
        p.write_output(t.ofile, os.path.join(root, "out", name))
    return p


@pytest.fixture
def ws(tmp_path):
    write(str(tmp_path / "src/a.txt"), "alpha\n")
    write(str(tmp_path / "src/b.txt"), "beta\n")
    return tmp_path


def do(root, **kw):
    return build(layers(str(root), **kw), Options(workspace=str(root), verbosity=-1))


def test_clean_build_runs_all_then_noop_runs_nothing_and_hashes_nothing(ws):
    """Given a built workspace, we should run 0 tasks, hash 0 files and issue few queries."""
    first = do(ws)
    assert sorted(first.ran) == ["x", "y", "z", "z2"]
    assert read(ws / "out/z") == "11\n"
    second = do(ws)
    assert second.ran == [] and sorted(second.up_to_date) == ["x", "y", "z", "z2"]
    assert second.hashed == 0
    assert second.queries <= 3


def test_file_changed_within_the_clock_tick_is_rehashed(ws):
    """Given a source written just now (racy stat data), we should re-hash it rather than trust its stat."""
    with open(ws / "src/a.txt", "w") as f:
        f.write("alpha\n")
    do(ws)
    assert do(ws).hashed == 1


def test_touch_reruns_nothing(ws):
    """Given a source touched with identical bytes, we should run nothing."""
    do(ws)
    os.utime(ws / "src/a.txt", ns=(1, 1))
    assert do(ws).ran == []


def test_comment_edit_stops_at_direct_consumer(ws):
    """Given a comment appended to a source, only its direct consumers rerun (early cutoff)."""
    do(ws)
    with open(ws / "src/b.txt", "a") as f:
        f.write("# a comment\n")
    r = do(ws)
    assert r.ran == ["y"]
    assert r.reasons["y"] == "input changed: " + str(ws / "src/b.txt")


def test_content_edit_reruns_exact_cone(ws):
    """Given a content edit of b, we should rerun its whole downstream cone (y, z, z2) and not x."""
    do(ws)
    write(str(ws / "src/b.txt"), "beta beta\n")
    r = do(ws)
    assert sorted(r.ran) == ["y", "z", "z2"]
    assert read(ws / "out/z") == "16\n"


def test_revert_restores_without_running(ws):
    """Given edit, build, revert, build, the second build should run 0 tasks and restore outputs."""
    do(ws)
    write(str(ws / "src/a.txt"), "ALPHA!\n")
    do(ws)
    write(str(ws / "src/a.txt"), "alpha\n")
    r = do(ws)
    assert r.ran == []
    assert sorted(r.restored) == ["x", "z", "z2"]
    assert read(ws / "out/z2") == "11\nalpha\n"


def test_destination_deleted_or_edited_is_restored(ws):
    """Given destinations deleted and edited by hand, we should restore them without running."""
    do(ws)
    os.unlink(ws / "out/x")
    write(str(ws / "out/y"), "vandalised\n")
    r = do(ws)
    assert r.ran == [] and sorted(r.restored) == ["x", "y"]
    assert r.reasons["x"] == "output missing: " + show_path(str(ws / "out/x"))
    assert r.reasons["y"].startswith("output changed: ")
    assert read(ws / "out/y") == "beta\n"


def test_keys_are_stable_across_checkouts_and_unrelated_tasks(ws, tmp_path_factory):
    """Given a second checkout elsewhere with one more task, every shared task keeps its key."""
    do(ws)
    other = tmp_path_factory.mktemp("elsewhere") / "renamed project"
    write(str(other / "src/a.txt"), "alpha\n")
    write(str(other / "src/b.txt"), "beta\n")
    do(other, extra_task=True, dep_edge=True)

    def keys(root):
        db = sqlite3.connect(root / ".pipebuild/cache.sqlite")
        try:
            return dict(db.execute("SELECT name, key FROM tasks"))
        finally:
            db.close()

    a, b = keys(ws), keys(other)
    assert set(b) == set(a) | {"unrelated"}
    assert all(a[n] == b[n] for n in a)


def test_depends_on_never_enters_a_key(ws):
    """Given an added depends_on edge, we should run nothing."""
    do(ws)
    assert do(ws, dep_edge=True).ran == []


def test_failed_task_is_not_cached_and_keeps_previous_output(tmp_path):
    """Given a task that fails after a success, the old destination survives and the next build reruns it."""
    write(str(tmp_path / "in.txt"), "one\n")

    def pipeline(fail):
        p = Pipeline()
        i = p.read_input(str(tmp_path / "in.txt"))
        t = p.new_task("t")
        t.command(f"cat {i} > {t.ofile}; {'false' if fail else 'true'}")
        p.write_output(t.ofile, str(tmp_path / "out.txt"))
        return p

    opts = Options(workspace=str(tmp_path), verbosity=-1)
    assert build(pipeline(False), opts).ran == ["t"]
    write(str(tmp_path / "in.txt"), "two\n")
    r = build(pipeline(True), opts)
    assert [f.name for f in r.failed] == ["t"] and r.failed[0].detail == "exit code 1"
    assert read(tmp_path / "out.txt") == "one\n"
    with pytest.raises(PipelineException, match="t"):
        r.raise_for_failure()
    r = build(pipeline(True), opts)
    assert r.reasons["t"] == "failed last time"
    r = build(pipeline(False), opts)
    assert r.ran == ["t"] and read(tmp_path / "out.txt") == "two\n"


def test_scheduler_runs_exact_jobs_in_order_with_fake_executor(ws):
    """Given -j1 and a fake executor, we should see exactly the stale jobs, in dependency order."""

    def handler(job: Job) -> int:
        with open(os.path.join(job.dir, "out/ofile"), "w") as f:
            f.write(job.name)
        return 0

    fake = FakeExecutor(handler)
    build(layers(str(ws)), Options(workspace=str(ws), executor=fake, verbosity=-1))
    assert [j.name for j in fake.jobs] == ["x", "y", "z", "z2"]
    assert fake.jobs[2].script.endswith("cat in/ofile in/1/ofile | wc -c > out/ofile\n")
    assert fake.jobs[0].script.startswith("set -euo pipefail\n")


def test_the_scheduler_decides_only_as_far_ahead_as_the_slots_need():
    """Given 100 independent ready tasks and 2 slots, the first work item should run after
    at most 2 decisions (not 100); every task is still decided and run once, in order.
    Given the same tasks all up to date, all 100 are decided in one pass without the pool."""
    from pipebuild.schedule import Scheduler

    decided: list[int] = []
    decided_when_first_ran: list[int] = []

    def decide(i: int):
        decided.append(i)

        def work() -> bool:
            if not decided_when_first_ran:
                decided_when_first_ran.append(len(decided))
            return True

        return work

    n = 100
    sched = Scheduler([[] for _ in range(n)], [True] * n, jobs=2, slots=2)
    sched.run(decide, lambda i, ok: ok)
    assert decided_when_first_ran[0] <= 2
    assert decided == list(range(n)) and sched.not_run == []

    skipped: list[int] = []
    sched = Scheduler([[] for _ in range(n)], [True] * n, jobs=2, slots=2)
    sched.run(lambda i: skipped.append(i), lambda i, ok: ok)  # None: up to date
    assert skipped == list(range(n)) and sched.not_run == []


@pytest.fixture
def thread_starts(monkeypatch):
    """Call it to count threading.Thread.start calls from then on, in the list it returns;
    with `fail_at=N`, the Nth call raises as at a thread limit."""
    import threading

    def count(fail_at: int = 0) -> list[int]:
        starts = [0]
        start = threading.Thread.start

        def counting_start(self: threading.Thread) -> None:
            starts[0] += 1
            if starts[0] == fail_at:
                raise RuntimeError("can't start new thread")
            start(self)

        monkeypatch.setattr(threading.Thread, "start", counting_start)
        return starts

    return count


def test_workers_complete_and_decide_without_handing_back_to_the_calling_thread(thread_starts):
    """Given 100 independent tasks and 2 slots, the calling thread should only make the
    first decisions: every completion, and every later decision, happens on one of at
    most 2 worker threads, one call at a time. Given them all up to date, no thread at all."""
    import threading
    import time

    from pipebuild.schedule import Scheduler

    main = threading.get_ident()
    deciders: list[int] = []
    completers: list[int] = []
    inside = [0, 0]  # calls in progress now, most at once

    def call(record: list[int]) -> None:
        inside[0] += 1
        inside[1] = max(inside)
        record.append(threading.get_ident())
        time.sleep(0.0005)  # long enough for an unlocked second call to overlap
        inside[0] -= 1

    def decide(i: int):
        call(deciders)
        return lambda: time.sleep(0.001)

    def complete(i: int, result) -> bool:
        call(completers)
        return True

    n = 100
    sched = Scheduler([[] for _ in range(n)], [True] * n, jobs=2, slots=2)
    sched.run(decide, complete)
    assert sched.not_run == [] and len(completers) == n
    assert main not in completers and len(set(completers)) <= 2
    assert deciders[:2] == [main, main] and main not in deciders[2:]
    assert inside[1] == 1

    starts = thread_starts()
    sched = Scheduler([[] for _ in range(n)], [True] * n, jobs=2, slots=2)
    sched.run(lambda i: None, lambda i, ok: ok)
    assert starts == [0] and sched.not_run == []


def test_a_spine_with_a_leaf_on_each_node_starts_no_more_threads_than_slots(thread_starts):
    """Given 200 spine nodes each with a leaf (both ready at once when the spine node ends)
    and 2 slots, every node should run on at most 2 threads: a worker with nothing to take
    waits for work instead of exiting and having a thread started for the next leaf."""
    import threading
    import time

    from pipebuild.schedule import Scheduler

    starts = thread_starts()
    deps: list[list[int]] = []
    for k in range(200):
        deps.append([2 * k - 2] if k else [])  # spine
        deps.append([2 * k])  # its leaf
    ran: list[int] = []
    lock = threading.Lock()

    def decide(i: int):
        def work() -> None:
            time.sleep(0.0002 if i % 2 else 0.001)  # the leaf ends first; its worker finds nothing
            with lock:
                ran.append(i)

        return work

    sched = Scheduler(deps, [True] * len(deps), jobs=2, slots=2)
    sched.run(decide, lambda i, r: True)
    assert sorted(ran) == list(range(len(deps))) and sched.not_run == []
    assert starts[0] <= 2, starts


def test_an_error_in_complete_stops_the_work_in_flight_through_on_error():
    """Given complete() raising while another task's work is still running, on_error
    should be called (to stop it) once, before run() waits for that work."""
    import threading

    from pipebuild.schedule import Scheduler

    released = threading.Event()  # what on_error does: the running work is killed
    calls: list[str] = []

    def decide(i: int):
        def work() -> str:
            if i == 1:
                return "killed" if released.wait(10) else "ran to its end"
            return "done"

        return work

    def complete(i: int, result) -> bool:
        calls.append(f"{i} {result}")
        if i == 0:
            raise RuntimeError("cannot write the cache")
        return True

    def on_error() -> None:
        calls.append("on_error")
        released.set()

    sched = Scheduler([[], []], [True, True], jobs=2, slots=2)
    with pytest.raises(RuntimeError, match="cannot write the cache"):
        sched.run(decide, complete, on_error=on_error)
    assert calls == ["0 done", "on_error"], calls  # task 1's result is dropped


def test_a_first_thread_that_cannot_start_stops_the_one_started_before_it(thread_starts):
    """Given the calling thread starting the first two workers and the second failing to
    start (a thread limit), the first one's work should be stopped through on_error, not
    waited for, and run() should raise the error."""
    import threading

    from pipebuild.schedule import Scheduler

    thread_starts(fail_at=2)
    stopped = threading.Event()
    results: list[bool] = []

    def decide(i: int):
        return lambda: results.append(stopped.wait(10))

    with pytest.raises(RuntimeError, match="can't start new thread"):
        Scheduler([[], []], [True, True], jobs=2, slots=2).run(decide, lambda i, r: True, on_error=stopped.set)
    assert results == [True]


def test_an_error_in_complete_is_raised_after_the_work_in_flight_and_nothing_more_starts():
    """Given complete() raising on the 5th task of 50 (say, the cache cannot be written),
    run() should raise that error on the calling thread once the work in flight has
    ended, with no work started after it."""
    import threading
    import time

    from pipebuild.schedule import Scheduler

    started: list[tuple[int, bool]] = []  # (task, whether complete() had already raised)
    running = [0]
    lock = threading.Lock()
    raised = threading.Event()
    in_4 = threading.Event()  # task 4's work has begun
    beside_4 = threading.Event()  # the other worker is inside a task begun after that

    def decide(i: int):
        def work() -> None:
            with lock:
                started.append((i, raised.is_set()))
                running[0] += 1
            if i == 4:
                in_4.set()
                beside_4.wait(10)
            elif in_4.is_set():
                # Hold the other worker inside work it began before the raise, so any work
                # begun after the raise was taken after it.
                beside_4.set()
                raised.wait(10)
            else:
                time.sleep(0.002)
            with lock:
                running[0] -= 1

        return work

    def complete(i: int, result) -> bool:
        if i == 4:
            raised.set()
            raise RuntimeError("cannot write the cache")
        return True

    sched = Scheduler([[] for _ in range(50)], [True] * 50, jobs=2, slots=2)
    with pytest.raises(RuntimeError, match="cannot write the cache"):
        sched.run(decide, complete)
    assert running[0] == 0  # the work in flight had ended
    assert {0, 1, 2, 3, 4} <= {i for i, _ in started} and beside_4.is_set()
    assert not [i for i, after in started if after], started  # none began after the raise
    assert len(started) < 50


def test_on_stop_comes_before_any_work_taken_after_the_failure():
    """Given task 0 failing and three always_run tasks depending on it, on_stop (which
    kills whatever runs at that moment) should be called before any of their work starts,
    and on_stop raising should be raised by run(), not hang it or lose the error."""
    import threading

    from pipebuild.schedule import Scheduler

    events: list[str] = []
    lock = threading.Lock()

    def decide(i: int):
        def work() -> None:
            with lock:
                events.append(f"start {i}")

        return work

    def on_stop() -> None:
        with lock:
            events.append("on_stop")

    for _ in range(20):
        events.clear()
        deps: list[list[int]] = [[], [0], [0], [0]]
        sched = Scheduler(deps, [True] * 4, jobs=4, slots=8, always_run=[False, True, True, True])
        sched.run(decide, lambda i, r: i != 0, on_stop=on_stop)
        assert events[:2] == ["start 0", "on_stop"] and len(events) == 5, events

    def failing_stop() -> None:
        raise ConnectionError("docker went away")

    sched = Scheduler([[], [0], [0]], [True] * 3, jobs=2, slots=4, always_run=[False, True, True])
    with pytest.raises(ConnectionError):
        sched.run(lambda i: lambda: None, lambda i, r: i != 0, on_stop=failing_stop)


def test_ctrl_c_during_a_slow_decision_stops_the_work_at_once():
    """Given a worker deciding a task for a long time under the scheduler's lock (e.g. a
    remote cache lookup that retries), Ctrl-C meanwhile should reach on_interrupt at once,
    while the decision still runs, and no work should start after it."""
    import os
    import signal
    import threading

    from pipebuild.schedule import Scheduler

    log: list[str] = []
    deciding = threading.Event()
    interrupted = threading.Event()
    seen_while_deciding: list[bool] = []

    def decide(i: int):
        if i == 1:
            deciding.set()
            seen_while_deciding.append(interrupted.wait(10))  # (10 s if Ctrl-C waits for the lock)
        return lambda: log.append(f"work {i}")

    def ctrl_c() -> None:
        deciding.wait(10)
        os.kill(os.getpid(), signal.SIGINT)

    def on_interrupt() -> None:
        log.append("on_interrupt")
        interrupted.set()

    threading.Thread(target=ctrl_c, daemon=True).start()
    sched = Scheduler([[], [0], [1], [1]], [True] * 4, jobs=2, slots=2)
    with pytest.raises(KeyboardInterrupt):
        sched.run(decide, lambda i, r: True, on_interrupt=on_interrupt)
    assert log == ["work 0", "on_interrupt"], log
    assert seen_while_deciding == [True]


def test_a_thread_that_cannot_start_is_an_error_not_a_hang(thread_starts):
    """Given the second worker thread failing to start (a thread limit) when a worker
    starts it, run() should raise that error once the first worker's work has ended,
    rather than wait forever."""
    import threading

    from pipebuild.schedule import Scheduler

    start = threading.Thread.start  # (for the thread that drives the scheduler)
    thread_starts(fail_at=2)
    result: list[BaseException | None] = []

    def drive() -> None:
        try:
            deps: list[list[int]] = [[], [0], [0], [0]]  # the worker that ends 0 starts a second
            Scheduler(deps, [True] * 4, jobs=2, slots=2).run(lambda i: lambda: None, lambda i, r: True)
            result.append(None)
        except RuntimeError as e:
            result.append(e)

    t = threading.Thread(target=drive, daemon=True)
    start(t)
    t.join(10)
    assert not t.is_alive(), "run() hung"
    assert result and isinstance(result[0], RuntimeError), result


def test_keep_going_runs_everything_not_downstream_of_a_failure(tmp_path):
    """Given x fails, with keep_going y still runs and z, z2 are reported as not run."""
    write(str(tmp_path / "src/a.txt"), "alpha\n")
    write(str(tmp_path / "src/b.txt"), "beta\n")

    def handler(job: Job) -> int:
        if job.name == "x":
            return 2
        with open(os.path.join(job.dir, "out/ofile"), "w") as f:
            f.write(job.name)
        return 0

    fake = FakeExecutor(handler)
    r = build(layers(str(tmp_path)), Options(workspace=str(tmp_path), executor=fake, verbosity=-1, keep_going=True))
    assert [f.name for f in r.failed] == ["x"] and r.ran == ["y"] and sorted(r.not_run) == ["z", "z2"]
    fake = FakeExecutor(handler)
    r = build(layers(str(tmp_path)), Options(workspace=str(tmp_path), executor=fake, verbosity=-1))
    assert [j.name for j in fake.jobs] == ["x"], "without -k nothing new starts after the failure"


def _independent(root: str, n: int) -> Pipeline:
    p = Pipeline(name="independent")
    for i in range(n):
        t = p.new_task(name=f"t{i}")
        t.command(f"echo {i} > {t.ofile}")
        p.write_output(t.ofile, os.path.join(root, f"out/{i}.txt"))
    return p


def test_at_most_jobs_commands_run_at_once(tmp_path):
    """Given -j2 and ten independent tasks, more work may be in flight (file work beside
    commands), but we should never see more than two commands running at once."""
    import threading
    import time

    lock = threading.Lock()
    running = [0, 0, 0]  # now, most seen, calls
    two_at_once = threading.Barrier(2, timeout=10)  # the first two commands overlap

    def handler(job: Job) -> int:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
            running[2] += 1
            first_two = running[2] <= 2
        if first_two:
            two_at_once.wait()
        time.sleep(0.02)
        with open(os.path.join(job.dir, "out/ofile"), "w") as f:
            f.write(job.name)
        with lock:
            running[0] -= 1
        return 0

    fake = FakeExecutor(handler)
    r = build(_independent(str(tmp_path), 10), Options(workspace=str(tmp_path), executor=fake, jobs=2, verbosity=-1))
    assert r.ok and len(r.ran) == 10
    assert running[1] == 2


def test_a_command_slot_given_back_goes_to_the_task_waiting_longest():
    """Given one command slot held and a task waiting for it, the holder giving it back
    and asking again at once should wait behind that task, not take the slot again."""
    import threading
    import time

    from pipebuild.build import CommandSlots

    slots = CommandSlots(1)
    slots.get()
    order: list[str] = []

    def waiter() -> None:
        slots.get()
        order.append("waiter")
        slots.put()

    t = threading.Thread(target=waiter)
    t.start()
    deadline = time.monotonic() + 10
    while not slots._waiting and time.monotonic() < deadline:  # until it waits
        time.sleep(0.001)
    slots.put()
    slots.get()
    order.append("holder again")
    t.join(10)
    assert order == ["waiter", "holder again"]


def test_no_command_starts_after_a_failure_with_spare_work_in_flight(tmp_path):
    """Given -j2 without -k, tasks already prepared when a command fails must not start.

    The first command to start fails after 0.3 s while the other slot runs 50 ms tasks;
    of 30 tasks, those not started by then never start (one may pass the gate as the
    failure returns). (Which task starts first is not fixed: the command slots are not
    handed out in order.)"""
    import threading
    import time

    lock = threading.Lock()
    events: list[str] = []

    def handler(job: Job) -> int:
        with lock:
            events.append("start " + job.name)
            first = len(events) == 1
        if first:
            time.sleep(0.3)
            with lock:
                events.append("failed")
            return 1
        time.sleep(0.05)
        with open(os.path.join(job.dir, "out/ofile"), "w") as f:
            f.write(job.name)
        return 0

    fake = FakeExecutor(handler)
    r = build(_independent(str(tmp_path), 30), Options(workspace=str(tmp_path), executor=fake, jobs=2, verbosity=-1))
    assert [f.name for f in r.failed] == [events[0].removeprefix("start ")]
    after = [e for e in events[events.index("failed") + 1 :] if e.startswith("start")]
    assert len(after) <= 1, events
    assert len(r.ran) + len(r.not_run) == 29 and len(r.not_run) >= 15, (r.ran, r.not_run)


def test_reused_task_directories_look_new(tmp_path):
    """Given tasks run one after another (directories are reused), each should see only
    what a new directory holds: in/ only with inputs, nothing a previous task left."""
    write(str(tmp_path / "src/a.txt"), "alpha\n")
    p = Pipeline(name="reuse")
    a = p.new_task(name="a")
    a.command(f"cat {p.read_input(str(tmp_path / 'src/a.txt'))} > {a.ofile}; touch stray")
    b = p.new_task(name="b")
    b.command(f"cat {a.ofile} > {b.ofile}")
    c = p.new_task(name="c")
    c.command(f"ls -A > {c.ofile}; ls -A in out >> {c.ofile} 2>&1 || true")
    d = p.new_task(name="d")
    d.command(f"ls -A . in out > {d.ofile}; cat {b.ofile} >> {d.ofile}")
    d.depends_on(c)
    for t in (c, d):
        p.write_output(t.ofile, str(tmp_path / f"out/{t.name}"))
    r = build(p, Options(workspace=str(tmp_path), jobs=1, verbosity=-1))
    assert r.ok, r.failed
    assert read(str(tmp_path / "out/c")).splitlines()[0] == "out"  # no in/: c reads nothing
    assert read(str(tmp_path / "out/d")) == ".:\nin\nout\n\nin:\nofile\n\nout:\nofile\nalpha\n"
    assert os.listdir(tmp_path / ".pipebuild/tmp") == []


def test_a_process_a_task_leaves_behind_cannot_write_into_the_next_task(tmp_path):
    """Given task a leaving a background writer in its directory, task b (run next, -j1)
    should publish its own bytes: a's directory is deleted, not reused for b."""
    p = Pipeline(name="leftover")
    a = p.new_task(name="a")
    a.command(f"echo a > {a.ofile}; (sleep 0.5; echo 'written by a' > {a.ofile}; touch stray) >/dev/null 2>&1 &")
    b = p.new_task(name="b")
    b.command(f"echo b > {b.ofile}; sleep 1.5; ls -A >&2")
    b.depends_on(a)
    p.write_output(b.ofile, str(tmp_path / "b.txt"))
    r = build(p, Options(workspace=str(tmp_path), jobs=1, verbosity=-1))
    assert r.ok, r.failed
    assert read(str(tmp_path / "b.txt")) == "b\n"
    assert read(str(tmp_path / ".pipebuild/logs/b.err")) == "out\n"


def test_pipeline_run_twice_runs_nothing_the_second_time(tmp_path, capsys):
    """Given a hail-style script run twice, the second p.run() should run nothing."""
    counter = tmp_path / "counter"

    def script():
        p = Pipeline(backend=LocalBackend(cache_dir=str(tmp_path)))
        t = p.new_task("hello")
        t.command(f"echo x >> {counter}; echo hello > {t.ofile}")
        p.write_output(t.ofile, str(tmp_path / "hello.txt"))
        p.run()

    script()
    script()
    assert read(counter) == "x\n"
    assert "Pipeline completed successfully!" in capsys.readouterr().out


def test_timeout_and_always_run_work_locally(tmp_path):
    """Given a timeout on a slow task and an always_run task, we should fail the first and always run the second."""
    p = Pipeline()
    slow = p.new_task("slow").timeout(0.5)
    slow.command(f"sleep 5; echo > {slow.ofile}")
    always = p.new_task("always").always_run()
    always.command(f"date +%s%N > {always.ofile}")
    p.write_output(slow.ofile, str(tmp_path / "slow"))
    p.write_output(always.ofile, str(tmp_path / "always"))
    opts = Options(workspace=str(tmp_path), verbosity=-1, keep_going=True)
    r = build(p, opts)
    assert r.failed[0].name == "slow" and r.failed[0].detail == "timed out after 0.5 s"
    assert r.ran == ["always"]
    assert build(p, opts).ran == ["always"]


def test_odd_names_stay_inside_the_task_directory(tmp_path):
    """Given resource names with /, .., spaces, quotes, $ and newlines, nothing escapes and commands work."""
    p = Pipeline()
    t = p.new_task("odd")
    names = ["../escape", "a b", "q'uo\"te", "$HOME", "new\nline", "/abs"]
    for n in names:
        t.command(f"echo {shlex.quote(n)} > {t[n]}")
    u = p.new_task("use")
    u.command("cat " + " ".join(str(t[n]) for n in names) + f" > {u.ofile}")
    p.write_output(u.ofile, str(tmp_path / "all.txt"))
    r = build(p, Options(workspace=str(tmp_path), verbosity=-1))
    assert r.ran == ["odd", "use"], r.failed
    assert read(tmp_path / "all.txt") == "".join(f"{n}\n" for n in names)
    assert sorted(os.listdir(tmp_path)) == [".pipebuild", "all.txt"]


def test_noop_imports_nothing_heavy(tmp_path):
    """Given a built Pipefile, a no-op `make` should not import docker, google, watchdog or sqlite_utils."""
    write(str(tmp_path / "Pipefile.py"), "from pipebuild import Pipeline\np = Pipeline()\nt = p.new_task('t')\n"
          "t.command(f'echo hi > {t.ofile}')\np.write_output(t.ofile, 'hi.txt')\n")  # fmt: skip
    code = (
        "import sys; from pipebuild.cli import app\n"
        "try:\n    app(['make', '-q'])\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('docker', 'google', 'watchdog', 'sqlite_utils')]\n"
        "print(','.join(bad))\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_always_run_task_runs_after_a_failed_dependency_without_keep_going(tmp_path):
    """Given an always_run task downstream of a failure, we should still run it (as hail did)."""
    p = Pipeline()
    bad = p.new_task("bad")
    bad.command(f"echo partial > {bad.ofile}; exit 4")
    report = p.new_task("report").always_run()
    report.command(f"ls in > {report.ofile} 2>&1 || true; : {bad.ofile}")
    p.write_output(report.ofile, str(tmp_path / "report.txt"))
    r = build(p, Options(workspace=str(tmp_path), verbosity=-1))
    assert [f.name for f in r.failed] == ["bad"] and r.ran == ["report"]


def test_gc_removes_blobs_of_old_builds_before_current_ones(ws):
    """Given a store over its size limit, gc should drop blobs no current trace uses first."""
    from pipebuild.build import gc

    do(ws)
    write(str(ws / "src/b.txt"), "a much longer beta, so its blobs are bigger\n")
    do(ws)
    opts = Options(workspace=str(ws), verbosity=-1)
    db = sqlite3.connect(ws / ".pipebuild/cache.sqlite")
    sizes = dict(db.execute("SELECT digest, size FROM blobs"))
    current = {d for (outs,) in db.execute("SELECT outputs FROM tasks") for d in json.loads(outs).values()}
    db.close()
    old = set(sizes) - current
    assert old, "the edit should have left blobs of the old build"
    removed, freed = gc(opts, sum(sizes[d] for d in current))
    assert removed == len(old) and freed == sum(sizes[d] for d in old)
    assert do(ws).ran == []


def test_a_definition_error_at_build_time_leaves_no_crash_marker(tmp_path):
    """Given a missing input, the build fails before running and leaves .pipebuild clean."""
    p = Pipeline()
    t = p.new_task("t")
    t.command(f"cat {p.read_input(str(tmp_path / 'missing'))} > {t.ofile}")
    p.write_output(t.ofile, str(tmp_path / "o"))
    with pytest.raises(PipelineException, match="missing"):
        build(p, Options(workspace=str(tmp_path), verbosity=-1))
    assert not (tmp_path / ".pipebuild/building").exists()


def test_a_failure_without_keep_going_stops_tasks_still_running(tmp_path):
    """Given -j2 with one task failing while another sleeps, we should stop the sleeper and
    record nothing for it; what comes after the sleeper was stopped too, and only what
    comes after the failed task is not run because a dependency failed."""
    marker = f"sleep 37.{os.getpid()}"
    p = Pipeline()
    bad = p.new_task("bad")
    bad.command(f"sleep 0.3; echo > {bad.ofile}; exit 1")
    slow = p.new_task("slow")
    slow.command(f"{marker}; echo > {slow.ofile}")
    after = p.new_task("after")
    after.command(f"cat {slow.ofile} > {after.ofile}")
    child = p.new_task("child")
    child.command(f"cat {bad.ofile} {after.ofile} > {child.ofile}")
    for t in (bad, slow, after, child):
        p.write_output(t.ofile, str(tmp_path / t.name))
    r = build(p, Options(workspace=str(tmp_path), verbosity=-1, jobs=2))
    assert [f.name for f in r.failed] == ["bad"] and r.not_run == ["slow", "after", "child"]
    assert r.reasons["slow"] == r.reasons["after"] == "the build stopped after a failure"
    assert r.reasons["child"] == "a dependency failed"
    assert no_process(marker)
    db = sqlite3.connect(tmp_path / ".pipebuild/cache.sqlite")
    try:
        assert [n for (n,) in db.execute("SELECT name FROM tasks")] == ["bad"]
    finally:
        db.close()


@pytest.mark.parametrize(
    ("ending", "detail"),
    [("echo > {out}; exit 1", "exit code 1"), (": {out}", "the command did not write it")],
    ids=["exit-1", "output-not-written"],
)
def test_tasks_waiting_for_a_command_slot_at_j2_do_not_start_after_a_failure(tmp_path, ending, detail):
    """Given -j2, one slot busy with a sleeper and the other failing, we should start none of the tasks still waiting."""
    marker = f"sleep 38.{os.getpid()}"
    p = Pipeline()
    slow = p.new_task("slow")
    slow.command(f"{marker}; echo > {slow.ofile}")
    bad = p.new_task("bad")
    bad.command(f"sleep 0.5; date +%s%N > {tmp_path}/bad-ended; " + ending.format(out=bad.ofile))
    tasks = [slow, bad]
    for i in range(4):  # whichever of these gets a slot before slow and bad runs at once
        t = p.new_task(f"q{i}")
        t.command(
            f"date +%s%N > {tmp_path}/q{i}-started; sleep 0.1; echo > {t.ofile}"
        )  # (bad gets a slot before all 4 run)
        tasks.append(t)
    for t in tasks:
        p.write_output(t.ofile, str(tmp_path / t.name))
    r = build(p, Options(workspace=str(tmp_path), verbosity=-1, jobs=2))
    assert [f.name for f in r.failed] == ["bad"] and detail in r.failed[0].detail
    assert "slow" in r.not_run and len(r.ran) + len(r.not_run) == 5
    started = [int(read(tmp_path / f)) for f in os.listdir(tmp_path) if f.endswith("-started")]
    assert all(t < int(read(tmp_path / "bad-ended")) for t in started)  # (a task started late is killed)
    assert len(r.ran) < 4  # at least one task was still waiting when bad failed
    assert no_process(marker)


def test_an_always_run_task_waiting_for_a_command_slot_at_j2_runs_after_a_failure(tmp_path):
    """Given -j2, both slots busy (a sleeper, a task about to fail), we should start and finish the waiting always_run task."""
    p = Pipeline()
    first = p.new_task("first")  # makes `always` ready only once slow and bad have their slots
    first.command(f"echo > {first.ofile}")
    slow = p.new_task("slow")
    slow.command(f"sleep 1.5; echo > {slow.ofile}")
    bad = p.new_task("bad")
    bad.command("sleep 0.4; exit 1")
    always = p.new_task("always")
    always.always_run()
    always.depends_on(first)
    always.command(f"sleep 0.2; echo hi > {always.ofile}")
    for t in (slow, first, always):
        p.write_output(t.ofile, str(tmp_path / t.name))
    r = build(p, Options(workspace=str(tmp_path), verbosity=-1, jobs=2))
    assert [f.name for f in r.failed] == ["bad"]
    assert "always" in r.ran, r.reasons
    assert read(tmp_path / "always") == "hi\n"


def test_tasks_waiting_for_a_command_slot_at_j2_run_after_a_failure_with_keep_going(tmp_path):
    """Given -j2 -k and a failing task, we should run every independent task waiting for a slot."""
    p = Pipeline()
    bad = p.new_task("bad")
    bad.command(f"sleep 0.3; echo > {bad.ofile}; exit 1")
    tasks = [bad]
    for i in range(5):
        t = p.new_task(f"q{i}")
        t.command(f"sleep 0.1; echo {i} > {t.ofile}")
        tasks.append(t)
    for t in tasks:
        p.write_output(t.ofile, str(tmp_path / t.name))
    r = build(p, Options(workspace=str(tmp_path), verbosity=-1, jobs=2, keep_going=True))
    assert [f.name for f in r.failed] == ["bad"]
    assert sorted(r.ran) == ["q0", "q1", "q2", "q3", "q4"]
    assert read(tmp_path / "q4") == "4\n"


def _fail_bad_layout_at_once_and_hear_of_it_late(monkeypatch) -> None:
    """Task `bad` fails to lay out its inputs at once (an I/O error); every other task
    takes 0.2 s per input to lay out; the scheduler takes 0.6 s to hear of a failure (as
    if writing its record waited for the disk)."""
    import errno
    import time

    from pipebuild import build as build_module

    real_link = build_module.link_or_copy

    def link(src: str, dst: str) -> None:
        if f"{os.sep}bad{os.sep}" in dst:
            raise OSError(errno.EIO, "Input/output error")
        time.sleep(0.2)
        real_link(src, dst)

    real_complete = build_module._Build._complete

    def complete(self, i, outcome):
        if not outcome.ok:
            time.sleep(0.6)
        return real_complete(self, i, outcome)

    monkeypatch.setattr(build_module, "link_or_copy", link)
    monkeypatch.setattr(build_module._Build, "_complete", complete)


def test_a_failure_laying_out_inputs_stops_commands_at_once_not_when_the_scheduler_hears(tmp_path, monkeypatch):
    """Given -j2, `bad` failing to lay out its inputs at once and q0-q2 each taking 0.2 s to
    lay out theirs, with the scheduler taking 0.6 s to hear of bad's failure, no q command
    should start: the failure stops commands where it happens."""

    src = tmp_path / "in.txt"
    src.write_text("x\n")
    p = Pipeline()
    tasks = []
    for name in ("bad", "q0", "q1", "q2"):
        t = p.new_task(name)
        t.command(f"date +%s%N > {tmp_path}/{name}-started; cat {p.read_input(str(src))} > {t.ofile}")
        p.write_output(t.ofile, str(tmp_path / f"{name}.out"))
        tasks.append(t)
    _fail_bad_layout_at_once_and_hear_of_it_late(monkeypatch)
    r = build(p, Options(workspace=str(tmp_path), verbosity=-1, jobs=2))
    assert [f.name for f in r.failed] == ["bad"] and "Input/output error" in r.failed[0].detail
    assert not list(tmp_path.glob("*-started")), r.ran
    assert sorted(r.not_run) == ["q0", "q1", "q2"]


def test_an_error_that_ends_the_build_stops_the_commands_running(tmp_path, monkeypatch):
    """Given -j2 and the cache failing to record `quick` while `slow` (3 s) runs, the build
    should raise the cache's error once slow's command has been stopped, not after it ends."""
    from pipebuild import store

    marker = f"sleep 3.{os.getpid()}"
    p = Pipeline()
    slow = p.new_task("slow")
    slow.command(f"{marker}; touch {tmp_path}/slow-ended; echo > {slow.ofile}")
    quick = p.new_task("quick")
    quick.command(f"echo > {quick.ofile}")
    for t in (slow, quick):
        p.write_output(t.ofile, str(tmp_path / t.name))

    def fail(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store.Store, "_record", fail)
    with pytest.raises(Exception, match="database or disk is full"):
        build(p, Options(workspace=str(tmp_path), verbosity=-1, jobs=2))
    assert not (tmp_path / "slow-ended").exists()
    assert no_process(marker)


def test_an_executor_passed_in_options_serves_the_next_build_after_an_error(tmp_path, monkeypatch):
    """Given a LocalExecutor passed in Options and a build ended by the cache failing, the
    next build with the same executor should run its task (the error must not leave the
    executor refusing jobs, as Ctrl-C's cancel_all does)."""
    from pipebuild import store
    from pipebuild.executors.local import LocalExecutor

    p = Pipeline()
    t = p.new_task("t")
    t.command(f"echo hi > {t.ofile}")
    p.write_output(t.ofile, str(tmp_path / "t.out"))
    ex = LocalExecutor()

    def fail(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store.Store, "_record", fail)
    with pytest.raises(Exception, match="database or disk is full"):
        build(p, Options(workspace=str(tmp_path), verbosity=-1, jobs=1, executor=ex))
    monkeypatch.undo()
    r = build(p, Options(workspace=str(tmp_path), verbosity=-1, jobs=1, executor=ex))
    assert r.ran == ["t"] and read(tmp_path / "t.out") == "hi\n"


def test_an_always_run_command_started_after_a_failure_laying_out_inputs_runs_to_its_end(tmp_path, monkeypatch):
    """Given -j2, `bad` failing to lay out its inputs at once and the always_run task taking
    0.2 s to lay out its own (so its command starts after the failure, before the scheduler
    hears of it 0.6 s later), the always_run task should run to its end, as it does after a
    failing command."""

    src = tmp_path / "in.txt"
    src.write_text("x\n")
    p = Pipeline()
    bad = p.new_task("bad")
    bad.command(f"cat {p.read_input(str(src))} > {bad.ofile}")
    p.write_output(bad.ofile, str(tmp_path / "bad.out"))
    always = p.new_task("always").always_run()
    always.command(f"cat {p.read_input(str(src))} > /dev/null; sleep 0.5; echo hi > {always.ofile}")
    p.write_output(always.ofile, str(tmp_path / "always.out"))
    _fail_bad_layout_at_once_and_hear_of_it_late(monkeypatch)
    r = build(p, Options(workspace=str(tmp_path), verbosity=-1, jobs=2))
    assert [f.name for f in r.failed] == ["bad"] and r.ran == ["always"], r.reasons
    assert read(tmp_path / "always.out") == "hi\n"


def test_a_script_longer_than_one_argument_runs_from_a_file(tmp_path):
    """Given a command over Linux's 128 KiB argument cap, we should still run it (via a script file)."""
    p = Pipeline()
    t = p.new_task("long")
    t.command(": " + "x" * 200_000)
    t.command(f"echo ran > {t.ofile}")
    p.write_output(t.ofile, str(tmp_path / "long.txt"))
    r = build(p, Options(workspace=str(tmp_path), verbosity=-1))
    assert r.ran == ["long"], r.failed
    assert read(tmp_path / "long.txt") == "ran\n"


def test_a_task_cannot_alter_its_source_input_in_place(tmp_path):
    """Given a command that rewrites its input in place (sort -o f f), the user's file should stay as it was."""
    write(str(tmp_path / "data.txt"), "c\nb\na\n")
    p = Pipeline()
    d = p.read_input(str(tmp_path / "data.txt"))
    t = p.new_task("sortit")
    t.command(f"sort -o {d} {d} 2>/dev/null || true; cat {d} > {t.ofile}")
    p.write_output(t.ofile, str(tmp_path / "out.txt"))
    opts = Options(workspace=str(tmp_path), verbosity=-1)
    assert build(p, opts).ran == ["sortit"]
    assert read(tmp_path / "data.txt") == "c\nb\na\n"
    assert build(p, opts).ran == [], "the source did not change, so nothing reruns"


def test_a_source_edited_after_it_was_hashed_is_not_built_under_the_old_key(tmp_path):
    """Given a source rewritten between hashing and the task's start, the task should fail, not cache new bytes."""
    write(str(tmp_path / "src.txt"), "old\n")
    p = Pipeline()
    first = p.new_task("first")
    first.command(f"printf new > {tmp_path / 'src.txt'}; echo > {first.ofile}")
    use = p.new_task("use").depends_on(first)
    use.command(f"cat {p.read_input(str(tmp_path / 'src.txt'))} > {use.ofile}")
    p.write_output(use.ofile, str(tmp_path / "out.txt"))
    p.write_output(first.ofile, str(tmp_path / "first.txt"))
    r = build(p, Options(workspace=str(tmp_path), verbosity=-1, jobs=1))
    assert [f.name for f in r.failed] == ["use"] and "changed during the build" in r.failed[0].detail
    assert not (tmp_path / "out.txt").exists()
    r = build(p, Options(workspace=str(tmp_path), verbosity=-1, jobs=1))
    assert read(tmp_path / "out.txt") == "new"


def test_reading_another_tasks_destination_is_a_definition_error(tmp_path):
    """Given read_input of a path a task publishes, we should say to use the task's resource instead."""
    p = Pipeline()
    a = p.new_task("a")
    a.command(f"echo x > {a.ofile}")
    p.write_output(a.ofile, str(tmp_path / "mid.txt"))
    b = p.new_task("b")
    b.command(f"cat {p.read_input(str(tmp_path / 'mid.txt'))} > {b.ofile}")
    p.write_output(b.ofile, str(tmp_path / "final.txt"))
    with pytest.raises(PipelineException, match="is an output of task 'a'"):
        build(p, Options(workspace=str(tmp_path), verbosity=-1))


def test_copying_an_input_onto_a_directory_is_a_one_line_error(tmp_path):
    """Given write_output of an input onto an existing directory, we should raise a DefinitionError, not crash."""
    from pipebuild.exceptions import DefinitionError

    write(str(tmp_path / "data.txt"), "x\n")
    (tmp_path / "outdir.txt").mkdir()
    p = Pipeline()
    p.write_output(p.read_input(str(tmp_path / "data.txt")), str(tmp_path / "outdir.txt"))
    with pytest.raises(DefinitionError, match="cannot copy input"):
        build(p, Options(workspace=str(tmp_path), verbosity=-1))


def test_a_workspace_that_is_a_file_is_a_usage_error(tmp_path):
    """Given .pipebuild existing as a plain file, we should raise a one-line UsageError, not crash."""
    from pipebuild.exceptions import UsageError

    (tmp_path / ".pipebuild").write_text("not a directory")
    p = Pipeline()
    t = p.new_task("t")
    t.command(f"echo > {t.ofile}")
    p.write_output(t.ofile, str(tmp_path / "o"))
    with pytest.raises(UsageError, match="cannot use the workspace directory"):
        build(p, Options(workspace=str(tmp_path), verbosity=-1))


def test_a_target_build_makes_only_the_input_copies_it_names(tmp_path):
    """Given make TASK, an unrelated input copy (even of a missing file) should be left alone."""
    p = Pipeline()
    p.write_output(p.read_input(str(tmp_path / "missing.txt")), str(tmp_path / "copy.txt"))
    t = p.new_task("t")
    t.command(f"echo hi > {t.ofile}")
    p.write_output(t.ofile, str(tmp_path / "o"))
    r = build(p, Options(workspace=str(tmp_path), verbosity=-1, targets=["t"]))
    assert r.ran == ["t"] and not (tmp_path / "copy.txt").exists()


def test_plan_keeps_one_copy_of_each_relative_path_and_source(tmp_path):
    """Counts objects, not time: tasks that see the same paths share one string for each
    (a 10,000-task plan held ~5 MiB of copies); inputs are still named task:out/file."""
    from pipebuild.graph import plan

    p = Pipeline()
    src = p.read_input(str(tmp_path / "s.txt"))
    ts = []
    for i in range(3):
        t = p.new_task(f"t{i}")
        t.command(f"cat {src} > {t.ofile}")
        ts.append(t)
    g = p.new_task("g")
    g.command("cat " + " ".join(t.ofile for t in ts) + f" > {g.ofile}")
    nodes = {n.name: n for n in plan(p, str(tmp_path), str(tmp_path / ".pipebuild")).nodes}
    ups = [nodes[f"t{i}"] for i in range(3)]
    assert len({id(n.outputs[0].relpath) for n in ups}) == 1
    assert len({id(n.inputs[0].relpath) for n in ups}) == 1
    assert len({id(n.inputs[0].source) for n in ups}) == 1
    assert ups[0].inputs[0].display == str(tmp_path / "s.txt")
    assert [i.relpath for i in nodes["g"].inputs] == ["in/ofile", "in/1/ofile", "in/2/ofile"]
    assert [i.display for i in nodes["g"].inputs] == ["t0:out/ofile", "t1:out/ofile", "t2:out/ofile"]
    assert nodes["g"].commands == ["cat in/ofile in/1/ofile in/2/ofile > out/ofile"]
