"""The local executor's shells, forked from long-lived bash servers (executors/local.py).

Oracle: what `bash -c SCRIPT` in the task directory would give: exit codes, the working
directory, the environment, stdin from /dev/null, nothing of the server in the shell's
variables, a timeout that kills the whole process group, scripts of any length.
"""

import os
import subprocess
import time
from pathlib import Path

from pipebuild.executors import Job
from pipebuild.executors.local import LocalExecutor, stop_orphans


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
        assert subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 1
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


def test_stop_orphans_recognises_a_server_forked_shell(tmp_path: Path) -> None:
    # Given a server running a job (its .shell<n>.pid names the job's shell, written before
    # the pid is reported), stop_orphans kills the job's group, as after a kill -9 of pipebuild.
    ex = LocalExecutor()
    marker = f"sleep 38.{os.getpid()}{time.time_ns() % 1000}"
    j = job(tmp_path, "orphan", marker)
    shell = ex._shell(os.path.dirname(j.dir))
    try:
        pid = shell.start(j)
        assert Path(shell.pidfile).read_text().strip() == str(pid)
        assert stop_orphans(str(tmp_path / "tmp")) == 1
        assert int(shell.line(time.monotonic() + 10)) == 137
    finally:
        ex.close()
