"""The local executor: bash on this machine, one process group per job."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

from . import STOPPED, Job, JobResult, long_script_file


class LocalExecutor:
    """Runs each job as `bash -c SCRIPT` in its task directory."""

    def __init__(self) -> None:
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._cancelled = False
        self._stopped: set[int] = set()
        self._stop_gen = 0  # bumped by stop_running: a job begun before it must not outlive it

    def run(self, job: Job) -> JobResult:
        """Run the job; kill its process group when it exceeds its timeout."""
        env = dict(os.environ)
        env.update(job.env)
        env["PIPEBUILD_TASK_DIR"] = job.dir
        path = long_script_file(job)
        argv = ["bash", path] if path else ["bash", "-c", job.script]
        gen = self._stop_gen
        with open(job.stdout, "wb") as out, open(job.stderr, "wb") as err:
            with self._lock:
                if self._cancelled:
                    return JobResult(130, error="interrupted")
                try:
                    p = subprocess.Popen(
                        argv, cwd=job.dir, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                        env=env, start_new_session=True,
                    )  # fmt: skip
                except OSError as e:
                    return JobResult(127, error=f"cannot start bash: {e}")
                self._procs[p.pid] = p
                if gen != self._stop_gen:  # stop_running came while this job was starting
                    self._stopped.add(p.pid)
                    _killpg(p.pid)
            # If pipebuild itself is killed (-9), the next build finds this file and stops
            # the orphaned task before it reuses its directory (build.Workspace.recover).
            pidfile = job.dir + ".pid"
            with open(pidfile, "w") as f:
                f.write(str(p.pid))
            try:
                try:
                    code = p.wait(timeout=job.timeout)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    _killpg(p.pid)
                    code = p.wait()
                    timed_out = True
            finally:
                with self._lock:
                    self._procs.pop(p.pid, None)
                try:
                    os.unlink(pidfile)
                except FileNotFoundError:
                    pass
        if self._cancelled and code != 0:
            return JobResult(code, error="interrupted")
        with self._lock:
            if p.pid in self._stopped:
                self._stopped.discard(p.pid)
                return JobResult(code, error=STOPPED)
        return JobResult(code, timed_out=timed_out)

    def stop_running(self) -> None:
        """Kill the jobs running now; later jobs still start."""
        with self._lock:
            self._stop_gen += 1
            procs = list(self._procs.values())
            self._stopped.update(p.pid for p in procs)
        for p in procs:
            _killpg(p.pid)

    def cancel_all(self) -> None:
        """Kill every running job's process group; no new job starts afterwards."""
        with self._lock:
            self._cancelled = True
            procs = list(self._procs.values())
        for p in procs:
            _killpg(p.pid)


def stop_orphans(tmp_dir: str) -> int:
    """Kill the process groups of tasks left running by a pipebuild that was killed.

    A pid is only trusted when that process still runs with PIPEBUILD_TASK_DIR set to the
    task's directory, so a recycled pid is never signalled. Returns how many were stopped.
    """
    stopped = 0
    try:
        names = os.listdir(tmp_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        if not name.endswith(".pid"):
            continue
        task_dir = os.path.join(tmp_dir, name[:-4])
        try:
            with open(os.path.join(tmp_dir, name)) as f:
                pid = int(f.read().strip() or 0)
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"PIPEBUILD_TASK_DIR={task_dir}".encode() in environ:
            _killpg(pid)
            stopped += 1
    return stopped


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
