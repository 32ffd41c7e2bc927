"""Crash safety: `kill -9` of `pipebuild make` at many moments, and Ctrl-C (SIGINT) of a running build.

Invariant (ARCHITECTURE.md §3.6): a failed, interrupted or killed task never enters the
cache and never clobbers a good output; after a `kill -9` at any moment the next `make`
finishes the build, redoing only the unfinished tasks, and leaves every destination
byte-identical to a clean build (the oracle: a clean build of a copy of the project).

Trials: `PIPEBUILD_CRASH_TRIALS` (default 12, the CI mode; 100+ for a slow soak) and
`PIPEBUILD_CRASH_SEED` (default fixed) choose where each kill lands: trial i kills after a
delay drawn from the i-th of TRIALS equal slices of the measured build time, so the kills
are spread over the whole build (start-up, scheduling, running, publishing, recording).
"""

import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

PIPEBUILD = os.path.join(os.path.dirname(sys.executable), "pipebuild")
TRIALS = int(os.environ.get("PIPEBUILD_CRASH_TRIALS", "12"))
SEED = int(os.environ.get("PIPEBUILD_CRASH_SEED", "20240611"))
JOBS = 2
TIMEOUT = 120  # a guard against a hung build, never a speed assertion

# Twelve tasks: a fan-in DAG with a resource group, an output published twice, a 4.5 MB
# output (hashing and publishing take a while), and an input file published as is.
PIPEFILE = r"""
from pipebuild import Pipeline

p = Pipeline(name="crash")
a = p.read_input("src/a.txt")
b = p.read_input("src/b.txt")
c = p.read_input("src/c.txt")


def task(name, cmd, dest):
    t = p.new_task(name=name)
    t.command(cmd(t))
    p.write_output(t.ofile, dest)
    return t


upper_a = task("upper_a", lambda t: f"sleep 0.03; tr a-z A-Z < {a} > {t.ofile}", "out/upper_a.txt")
upper_b = task("upper_b", lambda t: f"sleep 0.05; tr a-z A-Z < {b} > {t.ofile}", "out/upper_b.txt")
stats = p.new_task(name="stats_c")
stats.declare_resource_group(st={"lines": "{root}.lines", "words": "{root}.words"})
stats.command(f"sleep 0.02; wc -l < {c} | tr -d ' ' > {stats.st.lines}; wc -w < {c} | tr -d ' ' > {stats.st.words}")
p.write_output(stats.st, "out/stats_c")
words = task("words_c", lambda t: f"sleep 0.06; tr -s ' ' '\\n' < {c} > {t.ofile}", "out/words_c.txt")
join = task("join_ab", lambda t: f"sleep 0.04; cat {upper_a.ofile} {upper_b.ofile} > {t.ofile}", "out/join_ab.txt")
srt = task("sorted_ab", lambda t: f"sleep 0.03; LC_ALL=C sort {join.ofile} > {t.ofile}", "out/sorted_ab.txt")
p.write_output(srt.ofile, "out/copies/sorted_ab.txt")
count = task(
    "count_words", lambda t: f"sleep 0.02; LC_ALL=C sort -u {words.ofile} | wc -l | tr -d ' ' > {t.ofile}",
    "out/count_words.txt",
)
rev = task("rev_ab", lambda t: f"sleep 0.05; tac {srt.ofile} > {t.ofile}", "out/rev_ab.txt")
mix = task("mix", lambda t: f"sleep 0.04; cat {rev.ofile} {stats.st.lines} {count.ofile} > {t.ofile}", "out/mix.txt")
head = task("head_mix", lambda t: f"sleep 0.03; head -n 3 {mix.ofile} > {t.ofile}", "out/head_mix.txt")
big = task(
    "big", lambda t: f"sleep 0.02; seq 1 50000 | sed \"s/^/$(tr '\\n' ' ' < {srt.ofile})/\" > {t.ofile}",
    "out/big.txt",
)
final = task(
    "final", lambda t: f"sleep 0.05; {{ cksum < {big.ofile}; cat {head.ofile} {stats.st.words}; }} > {t.ofile}",
    "out/final.txt",
)
p.write_output(a, "out/copies/a.txt")
"""

TASK_DESTS = {
    "upper_a": ["out/upper_a.txt"],
    "upper_b": ["out/upper_b.txt"],
    "stats_c": ["out/stats_c.lines", "out/stats_c.words"],
    "words_c": ["out/words_c.txt"],
    "join_ab": ["out/join_ab.txt"],
    "sorted_ab": ["out/sorted_ab.txt", "out/copies/sorted_ab.txt"],
    "count_words": ["out/count_words.txt"],
    "rev_ab": ["out/rev_ab.txt"],
    "mix": ["out/mix.txt"],
    "head_mix": ["out/head_mix.txt"],
    "big": ["out/big.txt"],
    "final": ["out/final.txt"],
}
N_TASKS = len(TASK_DESTS)

SOURCES_A = {
    "src/a.txt": "the quick brown fox\njumps over\nthe lazy dog\n",
    "src/b.txt": "pack my box\nwith five dozen\nliquor jugs\n",
    "src/c.txt": "a b c d e\nf g a b\nsome more words here\n",
}
# The edit: b changes (8 tasks downstream); c changes so that stats_c and count_words
# rerun but write the same bytes (early cutoff).
SOURCES_B = {
    "src/a.txt": SOURCES_A["src/a.txt"],
    "src/b.txt": "sphinx of black quartz\njudge my vow\n",
    "src/c.txt": "a b c d x\nf g a b\nsome more words here\n",
}

SUMMARY = re.compile(r"^pipebuild: (\d+) ran, (\d+) restored, (\d+) up to date, (\d+) failed", re.M)
TASK_LINE = re.compile(r"^\[\d+/\d+\] (ran|restored|skipped|failed|not run) (\S+?):?(?: |$)", re.M)


# --------------------------------------------------------------------------------------
# Helpers


def write_project(root: Path, sources: dict[str, str], pipefile: str = PIPEFILE) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Pipefile.py").write_text(pipefile)
    write_sources(root, sources)


def write_sources(root: Path, sources: dict[str, str]) -> None:
    for rel, text in sources.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def make(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PIPEBUILD, "make", *args], cwd=root, capture_output=True, text=True, timeout=TIMEOUT, start_new_session=True
    )


def summary(out: str) -> tuple[int, int, int, int]:
    found = SUMMARY.findall(out)
    assert len(found) == 1, f"expected one summary line in:\n{out}"
    ran, restored, up_to_date, failed = (int(x) for x in found[0])
    return ran, restored, up_to_date, failed


def task_lines(out: str, action: str) -> list[str]:
    return [name for act, name in TASK_LINE.findall(out) if act == action]


def read_tree(root: Path, sub: str = "out") -> dict[str, bytes]:
    base = root / sub
    result = {}
    for dirpath, _, names in os.walk(base):
        for n in names:
            p = Path(dirpath) / n
            result[str(p.relative_to(root))] = p.read_bytes()
    return result


def temp_leftovers(root: Path) -> list[str]:
    """Every `*.pipebuild-tmp` file anywhere under root (hidden names included)."""
    found = []
    for dirpath, dirnames, names in os.walk(root):
        found += [os.path.join(dirpath, n) for n in names + dirnames if n.endswith(".pipebuild-tmp")]
    return found


def traces(root: Path, scratch: Path) -> dict[str, tuple[str, str]] | None:
    """{task: (key, status)} from a copy of the cache (never touching the original), None if absent."""
    db = root / ".pipebuild" / "cache.sqlite"
    if not db.exists():
        return None
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    for suffix in ("", "-wal"):
        if Path(str(db) + suffix).exists():
            shutil.copyfile(str(db) + suffix, scratch / ("cache.sqlite" + suffix))
    conn = sqlite3.connect(scratch / "cache.sqlite")
    try:
        try:
            rows = conn.execute("SELECT name, key, status FROM tasks").fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return None  # killed before the schema was complete
            raise
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    return {name: (key, status) for name, key, status in rows}


def start_make(root: Path, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(
            [PIPEBUILD, "make", *args], cwd=root, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for_work(root: Path, proc: subprocess.Popen) -> float | None:
    """Wait until the build starts work on the workspace; the time it did, or None if it exited first.

    build.py's Workspace.recover creates `.pipebuild/building` once the lock is held, before
    the cache is opened; it is removed when a build ends cleanly. Kills are timed from it, so
    they land in the build proper rather than in the interpreter's start-up.
    """
    marker = root / ".pipebuild" / "building"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if marker.exists():
            return time.monotonic()
        if proc.poll() is not None:
            return None
        time.sleep(0.001)
    raise AssertionError("the build never started")


def timed_make(root: Path, log: Path, *args: str) -> tuple[str, float, float]:
    """Run make to completion: (output, seconds until work started, seconds of work)."""
    t0 = time.monotonic()
    proc = start_make(root, log, *args)
    started = wait_for_work(root, proc)
    code = proc.wait(timeout=TIMEOUT)
    end = time.monotonic()
    out = log.read_text()
    assert code == 0, out
    if started is None:  # a no-op can begin and end between two polls: its work took ~0 s
        started = end
    return out, started - t0, end - started


def kill_group_after(proc: subprocess.Popen, delay: float) -> bool:
    """SIGKILL the process group of `proc` after `delay` s; True if it was still running."""
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
    alive = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=TIMEOUT)
    return alive


def kill_make(root: Path, log: Path, phase: str, delay: float) -> bool:
    """Start `make -jJOBS`, SIGKILL its process group `delay` s after it starts (phase 'start') or
    after it starts work (phase 'work'); True if the kill hit a running build."""
    proc = start_make(root, log, f"-j{JOBS}")
    if phase == "work" and wait_for_work(root, proc) is None:
        proc.wait(timeout=TIMEOUT)
        return False
    return kill_group_after(proc, delay)


def assert_clean_workspace(root: Path) -> None:
    assert temp_leftovers(root) == []
    tmp = root / ".pipebuild" / "tmp"
    assert not tmp.exists() or os.listdir(tmp) == [], f"task directories left in .pipebuild/tmp: {os.listdir(tmp)}"
    cas_tmp = root / ".pipebuild" / "cas" / "tmp"
    assert not cas_tmp.exists() or os.listdir(cas_tmp) == [], os.listdir(cas_tmp)


# --------------------------------------------------------------------------------------
# The oracle


class Oracle:
    """Clean builds of both source versions (the expected bytes), a built workspace to copy,
    and how long each kind of build takes (to spread the kills over)."""

    def __init__(self, base: Path):
        a = base / "a"
        write_project(a, SOURCES_A)
        out, self.startup_seconds, self.clean_seconds = timed_make(a, base / "a.log", f"-j{JOBS}")
        assert summary(out) == (N_TASKS, 0, 0, 0), out
        self.expected_a = read_tree(a)
        assert set(self.expected_a) == {d for ds in TASK_DESTS.values() for d in ds} | {"out/copies/a.txt"}
        self.prebuilt = base / "prebuilt"
        shutil.copytree(a, self.prebuilt, symlinks=True)
        out, _, self.noop_seconds = timed_make(a, base / "a.log", f"-j{JOBS}")
        assert summary(out) == (0, 0, N_TASKS, 0), out
        # Clean build of the edited sources.
        b = base / "b"
        write_project(b, SOURCES_B)
        r = make(b, f"-j{JOBS}")
        assert r.returncode == 0, r.stdout + r.stderr
        self.expected_b = read_tree(b)
        # The incremental build after the same edit: its duration, and (invariant 1) the same bytes.
        write_sources(a, SOURCES_B)
        out, _, self.incremental_seconds = timed_make(a, base / "a.log", f"-j{JOBS}")
        assert read_tree(a) == self.expected_b
        assert set(task_lines(out, "ran")) == {
            "upper_b", "join_ab", "sorted_ab", "rev_ab", "big", "mix", "head_mix", "final",
            "stats_c", "words_c", "count_words",
        }, out  # fmt: skip
        assert self.expected_b["out/stats_c.lines"] == self.expected_a["out/stats_c.lines"]
        assert self.expected_b["out/count_words.txt"] == self.expected_a["out/count_words.txt"]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return Oracle(tmp_path_factory.mktemp("oracle"))


# --------------------------------------------------------------------------------------
# kill -9 during a build


def trial_plan(trial: int, oracle: Oracle) -> tuple[str, str, float]:
    """(kind, phase, delay) of a trial.

    Even trials kill a clean build, odd ones an incremental build after an edit. About one
    in six kills lands during start-up (timed from the process start); the others are timed
    from the moment the build starts work, trial i in the i-th equal slice of its duration.
    """
    rng = random.Random(f"{SEED}-{trial}")
    kind = "clean" if trial % 2 == 0 else "incremental"
    if rng.random() < 1 / 6:
        return kind, "start", rng.random() * oracle.startup_seconds
    duration = oracle.clean_seconds if kind == "clean" else oracle.incremental_seconds
    slot, slots = trial // 2, (TRIALS + 1) // 2
    return kind, "work", (slot + rng.random()) / slots * duration * 1.05


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill_9_at_any_moment_then_make_finishes_with_oracle_bytes(oracle, tmp_path, trial):
    """Given a build killed with SIGKILL at a random moment, the next make should finish it exactly.

    It must exit 0, leave every destination byte-identical to a clean build, leave no temp
    files or task directories, redo no task whose trace had been recorded, and a third make
    must run nothing.
    """
    kind, phase, delay = trial_plan(trial, oracle)
    since = "its start" if phase == "start" else "it started work"
    where = f"(seed {SEED}, trial {trial}: {kind} build killed {delay:.3f}s after {since})"
    root = tmp_path / "proj"
    if kind == "clean":
        write_project(root, SOURCES_A)
        expected = oracle.expected_a
    else:
        shutil.copytree(oracle.prebuilt, root, symlinks=True)  # a built workspace (see the no-op test)
        write_sources(root, SOURCES_B)
        expected = oracle.expected_b

    log = tmp_path / "killed.log"
    kill_make(root, log, phase, delay)
    killed_out = log.read_text(errors="replace")
    at_kill = traces(root, tmp_path / "db-at-kill") or {}
    dests_at_kill = {rel: (root / rel).read_bytes() if (root / rel).is_file() else None for rel in expected}
    complete = {t for t, ds in TASK_DESTS.items() if all(dests_at_kill[d] == expected[d] for d in ds)}

    second = make(root, f"-j{JOBS}")

    assert second.returncode == 0, f"{where}\n{second.stdout}{second.stderr}"
    assert "Traceback" not in second.stderr and "warning" not in second.stderr, f"{where}\n{second.stderr}"
    assert read_tree(root) == expected, where
    assert_clean_workspace(root)
    ran, restored, up_to_date, failed = summary(second.stdout)
    assert (ran + restored + up_to_date, failed) == (N_TASKS, 0), second.stdout
    ran_names = set(task_lines(second.stdout, "ran"))
    assert len(ran_names) == ran, second.stdout

    final = traces(root, tmp_path / "db-final")
    assert final is not None and set(final) == set(TASK_DESTS), final
    assert all(status == "ok" for _, status in final.values()), final
    # A task is done when its trace as of the kill is the one the finished build agrees with.
    done = {t for t, (key, status) in at_kill.items() if status == "ok" and final[t][0] == key}
    assert done <= complete, f"{where}: trace recorded before outputs were in place: {sorted(done - complete)}"
    assert not ran_names & done, f"{where}: redid finished tasks {sorted(ran_names & done)}\n{second.stdout}"
    reported = set(task_lines(killed_out, "ran"))
    assert reported <= done, f"{where}: reported ran but not recorded: {sorted(reported - done)}"
    if kind == "clean":
        # Only tasks without complete outputs rerun, plus at most the JOBS tasks whose outputs
        # were published while their trace was not yet committed.
        incomplete = set(TASK_DESTS) - complete
        assert len(ran_names) <= len(incomplete) + JOBS, f"{where}: ran {sorted(ran_names)}, incomplete {incomplete}"

    if os.environ.get("PIPEBUILD_CRASH_DEBUG"):  # one line per trial with -s
        print(f"\n{where}: traced {len(done)}, complete {len(complete)}, ran {ran}, restored {restored}")
    third = make(root, f"-j{JOBS}")
    assert third.returncode == 0, third.stderr
    assert summary(third.stdout) == (0, 0, N_TASKS, 0), f"{where}\n{third.stdout}"
    assert read_tree(root) == expected


def test_kill_9_during_no_op_builds_leaves_nothing_to_do(oracle, tmp_path):
    """Given a finished build, a kill -9 at any moment of a no-op make should leave nothing to run."""
    root = tmp_path / "proj"
    shutil.copytree(oracle.prebuilt, root, symlinks=True)
    r = make(root, f"-j{JOBS}")
    assert summary(r.stdout) == (0, 0, N_TASKS, 0), r.stdout + r.stderr
    rng = random.Random(f"{SEED}-noop")
    kills = max(4, TRIALS // 3)
    alive = 0
    for k in range(kills):
        # Even trials: the full no-op (its certificate removed, see noop.py), killed during
        # its work. Odd trials: the certified no-op, killed anywhere from its start on.
        full = k % 2 == 0
        if full:
            (root / ".pipebuild" / "noop").unlink(missing_ok=True)
        delay = (k + rng.random()) / kills * oracle.noop_seconds * 1.1
        if full:
            alive += kill_make(root, tmp_path / "killed.log", "work", delay)
        else:
            kill_make(root, tmp_path / "killed.log", "start", oracle.startup_seconds + delay)
        r = make(root, f"-j{JOBS}")
        path = "full" if full else "certified"
        where = f"(seed {SEED}, {path} no-op build killed {delay:.4f}s after it started)"
        assert r.returncode == 0, f"{where}\n{r.stdout}{r.stderr}"
        assert r.stderr == "", f"{where}\n{r.stderr}"
        assert summary(r.stdout) == (0, 0, N_TASKS, 0), f"{where}\n{r.stdout}"
        assert read_tree(root) == oracle.expected_a, where
        assert_clean_workspace(root)
    assert alive >= 1  # at least one kill hit a running full build


# --------------------------------------------------------------------------------------
# Ctrl-C


SIGINT_PIPEFILE = """
from pipebuild import Pipeline

p = Pipeline(name="sigint")
duration = p.read_input("src/duration.txt")
fast = p.new_task(name="fast")
fast.command(f"echo fast > {fast.ofile}")
slow = p.new_task(name="slow")
slow.command(f"cat {fast.ofile} > {slow.ofile}; sleep $(cat {duration}); echo done >> {slow.ofile}")
p.write_output(fast.ofile, "out/fast.txt")
p.write_output(slow.ofile, "out/slow.txt")
"""


def pids_matching(pattern: str) -> list[int]:
    r = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()]


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def interrupt_slow_build(
    root: Path, marker: str, target: str, tmp_path: Path, sig: signal.Signals = signal.SIGINT
) -> tuple[int, str]:
    """Start make, wait until the slow task's `sleep` runs, send `sig`; (exit code, output)."""
    pattern = "sleep " + re.escape(marker)
    log = tmp_path / f"interrupted-{marker}.log"
    proc = start_make(root, log, "-j2")
    try:
        assert wait_until(lambda: pids_matching(pattern)), f"the slow task never started:\n{log.read_text()}"
        if target == "group":  # as a terminal's Ctrl-C does
            os.killpg(proc.pid, sig)
        else:  # kill -INT PID
            os.kill(proc.pid, sig)
        try:
            code = proc.wait(timeout=10)  # the task sleeps 30 s: waiting for it fails this
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pipebuild did not exit within 10 s of {sig.name}:\n{log.read_text()}") from None
        assert wait_until(lambda: not pids_matching(pattern), timeout=5), "the task's sleep is still running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in pids_matching(pattern):
            os.kill(pid, signal.SIGKILL)
    return code, log.read_text(errors="replace")


def unique_marker() -> str:
    """A unique `sleep` argument (30 s and a few more digits), so pgrep finds only this test's task."""
    return f"30.{os.getpid()}{random.Random().randrange(10**9):09d}"


@pytest.mark.parametrize(
    "sig, target",
    [(signal.SIGINT, "process"), (signal.SIGINT, "group"), (signal.SIGTERM, "process")],
    ids=["sigint-process", "sigint-group", "sigterm-process"],
)
def test_sigint_stops_the_running_task_records_nothing_and_exits_130(tmp_path, sig, target):
    """Given SIGINT or SIGTERM while a task sleeps, make should kill it, exit 130, record and publish nothing."""
    root = tmp_path / "proj"
    marker = unique_marker()
    write_project(root, {"src/duration.txt": marker + "\n"}, SIGINT_PIPEFILE)

    code, out = interrupt_slow_build(root, marker, target, tmp_path, sig)

    assert code == 130, out
    assert "interrupted" in out and "Traceback" not in out, out
    assert not (root / "out" / "slow.txt").exists()
    assert (root / "out" / "fast.txt").read_text() == "fast\n"  # finished before the interrupt: kept
    assert temp_leftovers(root) == []
    t = traces(root, tmp_path / "db")
    assert t is not None and set(t) == {"fast"}, t

    # A quick duration: the next make runs slow because it was never built (no failed trace either).
    (root / "src" / "duration.txt").write_text("0\n")
    r = make(root, "--explain")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^\[\d+/2\] ran slow: never built", r.stdout, re.M), r.stdout
    assert re.search(r"^\[\d+/2\] skipped fast: up to date", r.stdout, re.M), r.stdout
    assert (root / "out" / "slow.txt").read_text() == "fast\ndone\n"

    # Interrupting a rebuild keeps the good output and the good trace.
    marker2 = marker + "1"
    (root / "src" / "duration.txt").write_text(marker2 + "\n")
    code, out = interrupt_slow_build(root, marker2, target, tmp_path, sig)
    assert code == 130, out
    assert (root / "out" / "slow.txt").read_text() == "fast\ndone\n"
    assert temp_leftovers(root) == []
    (root / "src" / "duration.txt").write_text("0\n")
    r = make(root, "--explain")
    assert r.returncode == 0, r.stdout + r.stderr
    assert summary(r.stdout) == (0, 0, 2, 0), r.stdout
    assert_clean_workspace(root)


def test_sighup_stops_the_running_task_too(tmp_path):
    """Given SIGHUP (the terminal closed) while a task sleeps, make should exit without leaving the task running.

    The tasks run in sessions of their own, so nothing but pipebuild can stop them.
    """
    root = tmp_path / "proj"
    marker = unique_marker()
    write_project(root, {"src/duration.txt": marker + "\n"}, SIGINT_PIPEFILE)

    code, out = interrupt_slow_build(root, marker, "process", tmp_path, signal.SIGHUP)

    assert code != 0, out
    assert not (root / "out" / "slow.txt").exists()
    t = traces(root, tmp_path / "db")
    assert t is not None and set(t) == {"fast"}, t


def test_kill_9_orphans_are_stopped_by_the_next_build(tmp_path):
    """Given pipebuild killed with -9 while a task runs, the next make should stop that task first."""
    marker = f"sleep 41.{os.getpid()}{time.time_ns() % 1000}"
    (tmp_path / "Pipefile.py").write_text(
        "from pipebuild import Pipeline\n"
        "p = Pipeline()\n"
        "t = p.new_task('slow')\n"
        f"t.command(f'{marker}; echo done > {{t.ofile}}')\n"
        "p.write_output(t.ofile, 'out.txt')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipebuild", "make", "-q"], cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode != 0:
        assert proc.poll() is None, "pipebuild exited before its task started"
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # pipebuild only: its task lives in a session of its own
    proc.wait()
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0
    (tmp_path / "Pipefile.py").write_text((tmp_path / "Pipefile.py").read_text().replace(marker, "true"))
    subprocess.run([sys.executable, "-m", "pipebuild", "make", "-q"], cwd=tmp_path, check=True, timeout=60)
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the orphaned task is still running"
        time.sleep(0.05)
    assert (tmp_path / "out.txt").read_text() == "done\n"
