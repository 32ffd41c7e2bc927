"""The local executor's shells, forked from long-lived bash servers (executors/local.py).

Oracle: what `bash -c SCRIPT` in the task directory would give: exit codes, the working
directory, the environment, stdin from /dev/null, nothing of the server in the shell's
variables, a timeout that kills the whole process group, scripts of any length.
"""

import os
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import no_process

from pipebuild.executors import STOPPED, Job, JobResult
from pipebuild.executors.local import LocalExecutor, needs_own_bash, stop_orphans


def job(tmp_path: Path, name: str, body: str, **kw: object) -> Job:
    d = tmp_path / "tmp" / name
    d.mkdir(parents=True)
    return Job(
        name=name, dir=str(d), script="set -euo pipefail\n" + body + "\n",
        stdout=str(tmp_path / f"{name}.out"), stderr=str(tmp_path / f"{name}.err"), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_job_shell_is_what_bash_c_gives(tmp_path: Path) -> None:
    ex = LocalExecutor()
    try:
        j = job(
            tmp_path, "a",
            'pwd; echo "$PIPEBUILD_TASK_DIR"; echo "${EXTRA}"; cat; echo "${__pb_f:-none} ${__pb_s:-none}"; '
            "echo err >&2; ps -o pgid= -p $BASHPID",
            env={"EXTRA": "x y"},
        )  # fmt: skip
        r = ex.run(j)
        assert (r.exit_code, r.timed_out, r.error) == (0, False, None)
        out = Path(j.stdout).read_text().splitlines()
        assert out[:4] == [j.dir, j.dir, "x y", "none none"]
        assert int(out[4]) != os.getpgid(0)  # a process group of its own
        assert Path(j.stderr).read_text() == "err\n"
        # Exit codes and errexit, as bash -c reports them; servers are reused.
        assert ex.run(job(tmp_path, "b", "exit 7")).exit_code == 7
        assert ex.run(job(tmp_path, "c", "false | true; echo no")).exit_code == 1
        d = job(tmp_path, "d", "no-such-command-here")
        assert ex.run(d).exit_code == 127
        assert Path(d.stderr).read_text() == "bash: line 2: no-such-command-here: command not found\n"
        assert len(ex._shells) == 1
    finally:
        ex.close()
    assert sorted(os.listdir(tmp_path / "tmp")) == ["a", "b", "c", "d"]  # no .shell<n>.req/.pid left


def test_a_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    ex = LocalExecutor()
    marker = f"sleep 37.{os.getpid()}{time.time_ns() % 1000}"
    try:
        t0 = time.monotonic()
        r = ex.run(job(tmp_path, "slow", f"{marker} & {marker}; wait", timeout=0.5))
        assert r.timed_out and time.monotonic() - t0 < 10
        assert no_process(marker)
        assert ex.run(job(tmp_path, "after", "true")).exit_code == 0  # the server lives on
    finally:
        ex.close()


def test_a_long_script_runs(tmp_path: Path) -> None:
    ex = LocalExecutor()
    try:
        lines = "\n".join(f"echo {i}" for i in range(30000))  # > 128 KiB, more than one argument takes
        j = job(tmp_path, "long", lines)
        assert ex.run(j).exit_code == 0
        assert Path(j.stdout).read_text().split() == [str(i) for i in range(30000)]
    finally:
        ex.close()


@pytest.mark.parametrize("how", ["e", "c"], ids=["forked", "own-bash"])
def test_stop_orphans_recognises_a_server_forked_shell(tmp_path: Path, how: str) -> None:
    # Given a server running a job (its .shell<n>.pid names the job's shell, written before
    # the pid is reported), stop_orphans kills the job's group, as after a kill -9 of pipebuild.
    ex = LocalExecutor()
    marker = f"sleep 38.{os.getpid()}{time.time_ns() % 1000}"
    j = job(tmp_path, "orphan", marker)
    shell = ex._shell(os.path.dirname(j.dir))
    try:
        pid = shell.start(j, how)
        if how == "c":  # wait for the exec: from then on /proc/PID/environ lacks PIPEBUILD_TASKS
            deadline = time.monotonic() + 10
            while b"PIPEBUILD_TASKS=" in Path(f"/proc/{pid}/environ").read_bytes():
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert Path(shell.pidfile).read_text().strip() == str(pid)
        assert stop_orphans(str(tmp_path / "tmp")) == 1
        assert int(shell.line(time.monotonic() + 10)) == 137
    finally:
        ex.close()


# What a script can observe of its shell. The first block never mentions what
# needs_own_bash looks for (so it runs in the forked shell); PROBE_OWN adds `$$` (so it
# runs in a bash of its own).
PROBE = r"""echo "argc=$# args=$*"
echo "oldpwd=${OLDPWD-<unset>}"
declare -p OLDPWD 2>&1 | sed 's/=.*//' || true
echo "seconds<2: $((SECONDS < 2)) shlvl=$SHLVL zero=$0 opts=${-//c/}"
echo "tasks=${PIPEBUILD_TASKS-<unset>}"
trap 'echo "exit trap $?"' EXIT
env | grep -v -e '^_=' -e '^PIPEBUILD_TASK_DIR=' | sort
"""
PROBE_OWN = (
    PROBE
    + r"""echo "subshell=$BASH_SUBSHELL"
[ "$$" = "$BASHPID" ] && echo "dollar is the shell" || echo "dollar is another process"
"""
)


@pytest.mark.parametrize("body", [PROBE, PROBE_OWN], ids=["forked", "own-bash"])
def test_what_a_script_sees_equals_bash_c(tmp_path: Path, body: str) -> None:
    # Oracle: the same script under `bash -c` in the same directory and environment.
    assert needs_own_bash(body) == (body is PROBE_OWN)
    j = job(tmp_path, "probe", body)
    env = dict(os.environ, PIPEBUILD_TASK_DIR=j.dir)
    want = subprocess.run(
        ["bash", "-c", j.script], cwd=j.dir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    ex = LocalExecutor()
    try:
        # The server has run a job before, and is 2 s old: SECONDS must start from 0 again
        # (compared as "< 2", so that a second boundary crossed during the script is no failure).
        ex.run(job(tmp_path, "warm-up", "cd /; sleep 2.1"))
        r = ex.run(j)
    finally:
        ex.close()
    assert r.exit_code == want.returncode == 0
    assert Path(j.stdout).read_text() == want.stdout
    assert Path(j.stderr).read_text() == want.stderr


def test_each_job_has_its_own_dollar_dollar(tmp_path: Path) -> None:
    # Given jobs run one after another on one server, `$$` differs between them and is
    # each job's own shell: `kill -TERM $$` reaches the job's trap, not the server.
    ex = LocalExecutor()
    try:
        pids = []
        for i in range(3):
            j = job(tmp_path, f"p{i}", 'mkdir "scratch.$$"; echo $$ $BASHPID')
            assert ex.run(j).exit_code == 0
            dollar, bashpid = Path(j.stdout).read_text().split()
            assert dollar == bashpid
            pids.append(dollar)
        assert len(set(pids)) == 3
        t = job(tmp_path, "selfterm", 'trap "echo caught >&2; exit 3" TERM; kill -TERM $$; sleep 5')
        assert ex.run(t).exit_code == 3
        assert Path(t.stderr).read_text() == "caught\n"
        assert len(ex._shells) == 1  # the server survived
    finally:
        ex.close()


def test_a_long_script_in_its_own_bash_runs_and_leaves_no_file(tmp_path: Path) -> None:
    ex = LocalExecutor()
    try:
        lines = "\n".join(f"echo {i}" for i in range(30000)) + "\necho $$ >/dev/null"
        j = job(tmp_path, "long", lines)
        assert ex.run(j).exit_code == 0
        assert Path(j.stdout).read_text().split() == [str(i) for i in range(30000)]
        assert not os.path.exists(j.dir + ".sh")
    finally:
        ex.close()


def test_a_server_killed_while_idle_is_replaced(tmp_path: Path) -> None:
    ex = LocalExecutor()
    try:
        assert ex.run(job(tmp_path, "a", "true")).exit_code == 0
        (shell,) = ex._shells
        os.killpg(shell.proc.pid, signal.SIGKILL)
        shell.proc.wait()
        r = ex.run(job(tmp_path, "b", "echo ok"))
        assert (r.exit_code, r.error) == (0, None)
        assert (tmp_path / "b.out").read_text() == "ok\n"
    finally:
        ex.close()


def test_a_process_left_running_is_reported(tmp_path: Path) -> None:
    # Given a job that leaves a background process behind, the result says so (the build
    # then deletes its directory instead of handing it to the next task).
    ex = LocalExecutor()
    marker = f"sleep 39.{os.getpid()}{time.time_ns() % 1000}"
    try:
        assert not ex.run(job(tmp_path, "clean", "sleep 0.01 & wait")).left_running
        r = ex.run(job(tmp_path, "leaves", f"{marker} >/dev/null 2>&1 &"))
        assert r.exit_code == 0 and r.left_running
    finally:
        ex.close()
        subprocess.run(["pkill", "-f", marker])


def _wait_until(cond: Callable[[], object]) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _one_running_then_waiting(
    ex: LocalExecutor, pool: ThreadPoolExecutor, first: Job, *waiting: Job
) -> list[Future[JobResult]]:
    """Start `first`, and once it runs, the `waiting` jobs, which all wait for its place."""
    futures = [pool.submit(ex.run, first)]
    _wait_until(lambda: ex._procs)
    futures += [pool.submit(ex.run, j) for j in waiting]
    _wait_until(lambda: len(ex._waiters) == len(waiting))
    return futures


def test_a_limit_keeps_that_many_jobs_running_and_starts_each_next_one(tmp_path: Path) -> None:
    # Given limit(2) and six jobs from six threads, at most two run at once, and all run.
    ex = LocalExecutor()
    ex.limit(2)
    log = tmp_path / "log"
    try:
        jobs = [job(tmp_path, f"j{i}", f"echo s >> {log}; sleep 0.2; echo e >> {log}") for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(ex.run, jobs))
        assert [r.exit_code for r in results] == [0] * 6
        running, most = 0, 0
        for line in log.read_text().split():
            running += 1 if line == "s" else -1
            most = max(most, running)
        assert most == 2
        assert len(ex._shells) == 2  # each next job went to a server that was free
    finally:
        ex.close()


def test_a_job_waiting_for_a_place_does_not_start_after_a_failure_stops_the_build(tmp_path: Path) -> None:
    # Given limit(1) and a build that stops at the first failure, the jobs waiting when the
    # running one fails do not start, except one that must run whatever happens.
    ex = LocalExecutor()
    stopped: list[str] = []
    ex.limit(1, may_start=lambda j: not stopped or j.always_run, failed=lambda j: stopped.append(j.name))
    try:
        with ThreadPoolExecutor(3) as pool:
            bad, queued, always = _one_running_then_waiting(
                ex, pool, job(tmp_path, "bad", "sleep 0.5; exit 3"),
                job(tmp_path, "queued", f"touch {tmp_path}/queued-ran"),
                job(tmp_path, "always", f"touch {tmp_path}/always-ran", always_run=True),
            )  # fmt: skip
            assert bad.result().exit_code == 3
            assert queued.result().error == STOPPED
            assert always.result().exit_code == 0
        assert stopped == ["bad"]
        assert not (tmp_path / "queued-ran").exists()
        assert (tmp_path / "always-ran").exists()
        ex.limit(None)  # the limit lifted, the build's hooks forgotten
        assert ex.run(job(tmp_path, "later", "true")).exit_code == 0
    finally:
        ex.close()


def test_a_failure_hands_the_place_on_when_the_build_keeps_going(tmp_path: Path) -> None:
    # Given limit(1) and -k (may_start always true), the job waiting behind a failure runs.
    ex = LocalExecutor()
    ex.limit(1)
    try:
        with ThreadPoolExecutor(2) as pool:
            bad, nxt = _one_running_then_waiting(
                ex, pool, job(tmp_path, "bad", "sleep 0.3; exit 3"), job(tmp_path, "next", "echo ran")
            )
            assert bad.result().exit_code == 3
            assert (nxt.result().exit_code, nxt.result().error) == (0, None)
        assert (tmp_path / "next.out").read_text() == "ran\n"
    finally:
        ex.close()


def test_a_waiting_job_that_cannot_be_sent_fails_alone_and_frees_its_place(tmp_path: Path) -> None:
    # Given limit(1) and a waiting job whose request cannot be encoded, that job fails with
    # an error, the one before it succeeds, and the place is free for the next job.
    ex = LocalExecutor()
    ex.limit(1)
    try:
        with ThreadPoolExecutor(2) as pool:
            first, odd = _one_running_then_waiting(
                ex, pool, job(tmp_path, "first", "sleep 0.3"), job(tmp_path, "odd", "echo \ud800")
            )
            assert first.result(timeout=10).exit_code == 0
            r = odd.result(timeout=10)
            assert r.exit_code == 127 and r.error and "cannot start bash" in r.error
        assert ex.run(job(tmp_path, "next", "true")).exit_code == 0
        assert ex._places == 0
    finally:
        ex.close()
