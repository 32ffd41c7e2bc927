"""The local executor: bash on this machine, one process group per job.

Each job runs in a shell forked from a long-lived bash (`_Shell`, one per job running at
once), not in a new `bash -c` process: starting bash (exec, dynamic linking, start-up)
costs ~0.8 ms of CPU per task, a third of what a one-line task costs in all, and that
server forks in ~0.1 ms. The forked shell is made to look like `bash -c`: its own process
group (timeouts and Ctrl-C kill the whole group), the task directory as working
directory, stdin from /dev/null, stdout and stderr to the log files, PIPEBUILD_TASK_DIR
and the job's environment exported, no positional parameters, OLDPWD, SHLVL and SECONDS
as a new bash has them, and nothing of the server left in its variables
(tests/test_local_executor.py compares the two). A fork cannot change `$$` (it stays
the server's pid) or BASH_SUBSHELL, so a script that mentions them, or that runs other
code with `source`, `.` or `eval`, gets a bash of its own, exec'd from the fork
(`needs_own_bash`). Still different: `$-` lacks `c`, a syntax error is reported as
`bash: eval: line N` rather than `bash: -c: line N`, and a job killed by a signal
reports exit code 128+N as a shell does (a child of Python saw -N).

A request is written to a file (bash reads a pipe one byte at a time, a file in blocks);
one byte on the server's stdin says "go", and it answers with the job's pid, then its exit
status. Servers see EOF and exit when pipebuild exits; `close` stops them sooner.
"""

from __future__ import annotations

import collections
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from . import STOPPED, Job, JobResult, long_script_file

# The server loop, on one line: the script is evaluated on line 1 of bash -c's string, so
# an error in its line N says `bash: line N:`, as under `bash -c SCRIPT`. Fields of a
# request, NUL-terminated: task directory, stdout, stderr, how to run the script (`e`: eval
# it in the forked shell; `c`: exec `bash -c SCRIPT`; else exec `bash FILE`, see
# needs_own_bash), the number of environment entries, the entries (NAME=VALUE), the
# script. The forked shell gets the server's OLDPWD back after its `cd`, and SECONDS from 0.
_LOOP = (
    r"""set -m; while IFS= read -r -n 1 __pb_go; do mapfile -d '' -t __pb_f < "$1" || exit 1; """
    r"""( set +m; __pb_o=${OLDPWD-}; __pb_os=${OLDPWD+1}; cd -- "${__pb_f[0]}" || exit 126; """
    r"""if [ -n "$__pb_os" ]; then OLDPWD=$__pb_o; else unset OLDPWD; declare -x OLDPWD; fi; """
    r"""exec </dev/null >"${__pb_f[1]}" 2>"${__pb_f[2]}" || exit 126; """
    r"""export PIPEBUILD_TASK_DIR="${__pb_f[0]}"; unset PIPEBUILD_TASKS; SECONDS=0; """
    r"""for ((__pb_i = 5; __pb_i < 5 + __pb_f[4]; __pb_i++)); do export "${__pb_f[__pb_i]}"; done; """
    r"""__pb_s=${__pb_f[__pb_i]}; case ${__pb_f[3]} in """
    r"""e) eval "unset __pb_go __pb_f __pb_i __pb_s __pb_rc __pb_o __pb_os; set --; $__pb_s" ;; """
    r"""c) SHLVL=$((SHLVL - 1)) exec bash -c "$__pb_s" ;; *) SHLVL=$((SHLVL - 1)) exec bash -- "${__pb_f[3]}" ;; """
    r"""esac ) & """
    r"""printf '%10d\n' "$!" 1<>"$2"; echo "$!"; wait "$!"; __pb_rc=$?; printf '%10s\n' '' 1<>"$2"; """
    r"""echo "$__pb_rc"; done"""
)
# What a script can use to tell a shell forked from the server from `bash -c`: `$$` (the
# server's pid there) and ${!name} (indirect, maybe to `$`), BASH_SUBSHELL (1, not 0),
# BASH_EXECUTION_STRING, and whatever `source`, `.` or `eval` runs. A script that mentions
# one runs in a bash of its own (exec'd from the fork: ~1 ms more CPU), as under `bash -c`.
_OWN_BASH = re.compile(
    r"\$\$|\$\{[#!]?\$|\$\{!|BASH_SUBSHELL|BASH_EXECUTION_STRING|\bsource\b|\beval\b"
    r"|(?:^|[;&|(){}!`]|\b(?:then|do|else|time|command|builtin))[ \t]*\.[ \t]",
    re.MULTILINE,
)


def needs_own_bash(script: str) -> bool:
    """True if `script` could see that it was not started as `bash -c` (see _OWN_BASH)."""
    return _OWN_BASH.search(script) is not None


# Set in every server's environment (so in /proc/PID/environ of the job's shell, which
# keeps the environment it was forked with): lets stop_orphans recognise a job. The server
# writes its running job's pid to `.shell<n>.pid` beside the task directories (blank when
# idle), so a build killed with -9 leaves what stop_orphans needs without pipebuild
# writing and deleting a pidfile per task.
#
# Neither file is ever truncated to empty: on this project's ext4 VMs (mounted with
# `discard`) truncating a file frees its block, which costs ~40 us of CPU and ~150 us of
# waiting, three times per task. The pidfile is overwritten in place at a fixed width
# (`1<>`, blank-padded), and the request file is rewritten from offset 0 and shortened
# only when the new request is shorter (which frees no block unless it shrinks by more
# than one).
TASKS_ENV = "PIPEBUILD_TASKS"


class _ShellExited(Exception):
    pass


class _Shell:
    """One server bash; used by one job at a time."""

    def __init__(self, tasks_dir: str, n: int) -> None:
        # Beside the task directories, so a build killed with -9 leaves nothing elsewhere:
        # the next build's Workspace.recover removes them with the rest of tmp/.
        self.tasks_dir = tasks_dir
        self.request = os.path.join(tasks_dir, f".shell{n}.req")
        self.pidfile = os.path.join(tasks_dir, f".shell{n}.pid")
        env = dict(os.environ)
        env[TASKS_ENV] = tasks_dir
        self._request_fd = os.open(self.request, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._request_len = 0
        try:
            self.proc = subprocess.Popen(
                ["bash", "-c", _LOOP, "bash", self.request, self.pidfile], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, start_new_session=True, bufsize=0,
            )  # fmt: skip
        except BaseException:
            os.close(self._request_fd)
            raise
        self._buf = b""

    def start(self, job: Job, how: str) -> int:
        """Fork the job's shell (`how`: see _LOOP); returns its pid (also its process group)."""
        self.send(job, how)
        return int(self.line(None))

    def send(self, job: Job, how: str) -> None:
        """Write the job's request and tell the server to start it; its pid is the next line."""
        fields = [job.dir, job.stdout, job.stderr, how, str(len(job.env))]
        fields += [f"{k}={v}" for k, v in job.env.items()]
        fields.append(job.script)
        data = b"\0".join(f.encode("utf-8", "surrogateescape") for f in fields) + b"\0"
        done = 0
        while done < len(data):
            done += os.pwrite(self._request_fd, data[done:], done)
        if len(data) < self._request_len:
            os.ftruncate(self._request_fd, len(data))
        self._request_len = len(data)
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(b"\n")
        except OSError:
            raise _ShellExited from None

    def line(self, deadline: float | None) -> bytes:
        """The next line from the server; TimeoutError at `deadline` (time.monotonic())."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError
            chunk = os.read(fd, 64)
            if not chunk:
                raise _ShellExited
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def close(self) -> None:
        """Let the server exit (EOF on its stdin) and reap it."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._request_fd >= 0:
            os.close(self._request_fd)
            self._request_fd = -1
        for path in (self.pidfile, self.request):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


class _Waiter:
    """A job waiting for a server while `limit` jobs run; the thread of the job that ends
    next hands it one (see LocalExecutor._hand_on)."""

    __slots__ = ("job", "how", "ready", "shell", "started", "refused", "late")

    def __init__(self, job: Job, how: str) -> None:
        self.job, self.how = job, how
        self.ready = threading.Lock()  # released when the waiter has its answer
        self.ready.acquire()
        self.shell: _Shell | None = None  # None: take an idle server or start one
        self.started = False  # the job was sent to `shell`; its pid is the next line
        self.refused = False  # a failure stopped the build (or Ctrl-C) while it waited
        self.late = False  # allowed to start after the build stopped (always_run): not stopped


class LocalExecutor:
    """Runs each job as a bash shell in its task directory (see the module docstring).

    `limit(jobs, ...)` makes it keep at most `jobs` jobs running, with the next jobs
    waiting here rather than in the build: the thread that reads one job's exit status
    starts the next job on the same server at once. Waking another thread to do that
    cost ~0.3 ms per job in which the server sat idle (thread wake-up and the GIL), ~1.2 s
    of a 10,000-task fan at -j2.
    """

    def __init__(self) -> None:
        # pids (= process groups) of the jobs running now: True for one started after the
        # build stopped (an always_run task), which stop_running leaves running
        self._procs: dict[int, bool] = {}
        self._lock = threading.Lock()
        self._cancelled = False
        self._stopped: set[int] = set()
        self._stop_gen = 0  # bumped by stop_running: a job begun before it must not outlive it
        self._idle: dict[str, list[_Shell]] = {}  # by the directory holding the task directories
        self._shells: list[_Shell] = []
        self._made = 0
        self._limit: int | None = None  # see limit()
        self._may_start: Callable[[Job], bool] = lambda job: True
        self._failed: Callable[[Job], bool] = lambda job: False
        self._halted = False  # the build stopped (a failure, stop_running): see _Waiter.late
        self._places = 0  # jobs holding one of the `limit` places (running or starting)
        self._waiters: collections.deque[_Waiter] = collections.deque()

    def limit(
        self,
        jobs: int | None,
        may_start: Callable[[Job], bool] = lambda job: True,
        failed: Callable[[Job], bool] = lambda job: False,
    ) -> None:
        """Run at most `jobs` jobs at once (None: no limit, the caller limits).

        `failed(job)` is called, before any waiting job is looked at, when a job exits
        non-zero or times out, and says whether the build stops; `may_start(job)` is asked
        before a job starts. Together they let a build that stops at the first failure
        start no command after it but those that must run anyway, which stop_running
        then leaves alone.
        """
        with self._lock:
            self._limit = jobs
            self._may_start, self._failed = may_start, failed
            self._halted = False

    def _shell(self, tasks_dir: str) -> _Shell:
        with self._lock:
            idle = self._idle.get(tasks_dir)
            if idle:
                return idle.pop()
            self._made += 1
            n = self._made  # each server its own request file
        shell = _Shell(tasks_dir, n)
        with self._lock:
            self._shells.append(shell)
        return shell

    def _acquire(self, job: Job, how: str) -> _Waiter:
        """Take one of the `limit` places, waiting for it if all are taken. The answer says
        which server to use (if any) and whether the job was started on it already."""
        w = _Waiter(job, how)
        with self._lock:
            if self._cancelled or not self._may_start(job):
                w.refused = True
                return w
            if self._limit is None or self._places < self._limit:
                self._places += 1
                w.late = self._halted
                return w  # (no shell: _run takes an idle one or starts one)
            self._waiters.append(w)
        w.ready.acquire()
        return w

    def _hand_on(self, shell: _Shell | None, job: Job, failed: bool) -> None:
        """Give up a place (and `shell`, if still usable) after `job`: to a waiting job,
        started on `shell` here and now if it may start, or else to the idle servers."""
        if failed and self._failed(job):  # first: the build stops, and nothing waiting starts
            with self._lock:
                self._halted = True
        while True:
            with self._lock:
                if not self._waiters:
                    self._places -= 1
                    if shell is not None:
                        self._idle.setdefault(shell.tasks_dir, []).append(shell)
                    return
                w = self._waiters.popleft()
                w.refused = self._cancelled or not self._may_start(w.job)
                w.late = self._halted
            try:
                if w.refused:  # the place stays free for the next waiter
                    continue
                if shell is not None and shell.tasks_dir == os.path.dirname(w.job.dir):
                    try:
                        shell.send(w.job, w.how)
                        w.started = True
                    except Exception:  # noqa: BLE001 - the waiter's thread tries again, and reports it
                        pass
                w.shell = shell
                return
            finally:
                w.ready.release()

    def run(self, job: Job) -> JobResult:
        """Run the job; kill its process group when it exceeds its timeout."""
        tasks_dir = os.path.dirname(job.dir)
        gen = self._stop_gen
        if self._cancelled:
            return JobResult(130, error="interrupted")
        how = "e"  # eval in the forked shell
        script_file = None
        if needs_own_bash(job.script):
            script_file = long_script_file(job)
            how = script_file or "c"  # exec bash FILE, or bash -c SCRIPT
        try:
            return self._run(job, tasks_dir, gen, how)
        finally:
            if script_file is not None:
                os.unlink(script_file)

    def _run(self, job: Job, tasks_dir: str, gen: int, how: str) -> JobResult:
        w = self._acquire(job, how)
        if w.refused:
            return JobResult(130, error="interrupted") if self._cancelled else JobResult(1, error=STOPPED)
        shell, started = w.shell, w.started
        error: BaseException | None = None
        for _ in range(2):  # a server found dead (killed while idle) is replaced once
            try:
                if shell is None or shell.tasks_dir != tasks_dir:
                    if shell is not None:  # another build's; this job needs one beside its directory
                        shell.close()
                    shell, started = self._shell(tasks_dir), False
                pid = int(shell.line(None)) if started else shell.start(job, how)
                break
            except (_ShellExited, ValueError, OSError) as e:
                if shell is not None:
                    shell.close()
                shell, started, error = None, False, e
        else:
            self._hand_on(None, job, True)
            return JobResult(127, error=f"cannot start bash: {str(error) or 'the shell exited'}")
        with self._lock:
            self._procs[pid] = w.late
            if self._cancelled or (gen != self._stop_gen and not w.late):  # stopped while starting
                self._stopped.add(pid)
                _killpg(pid)
        if job.on_start is not None:
            job.on_start()
        # If pipebuild itself is killed (-9), the next build finds the server's pidfile and
        # stops the orphaned task before it reuses its directory (build.Workspace.recover).
        try:
            deadline = None if job.timeout is None else time.monotonic() + job.timeout
            timed_out = False
            try:
                code = int(shell.line(deadline))
            except TimeoutError:
                _killpg(pid)
                code = int(shell.line(None))
                timed_out = True
        except BaseException as e:
            with self._lock:
                self._procs.pop(pid, None)
            shell.close()
            _killpg(pid)
            self._hand_on(None, job, True)
            if isinstance(e, (_ShellExited, ValueError)):
                return JobResult(127, error="the bash running the task exited")
            raise
        with self._lock:
            self._procs.pop(pid, None)
        failed = code != 0 or timed_out
        try:
            if not failed and job.after is not None:  # e.g. store the outputs: a failure there
                failed = not job.after()  # must stop the build before the next job starts
        except BaseException:
            failed = True
            raise
        finally:
            self._hand_on(shell, job, failed)
        left_running = _group_alive(pid)  # e.g. `cmd &` not waited for
        if self._cancelled and code != 0:
            return JobResult(code, error="interrupted", left_running=left_running)
        with self._lock:
            if pid in self._stopped:
                self._stopped.discard(pid)
                return JobResult(code, error=STOPPED, left_running=left_running)
        return JobResult(code, timed_out=timed_out, left_running=left_running)

    def close(self) -> None:
        """Stop the idle servers (each exits when its stdin closes)."""
        with self._lock:
            shells, self._shells, self._idle = self._shells, [], {}
        for shell in shells:
            shell.close()

    def stop_running(self) -> None:
        """Kill the jobs running now, but those started after the build stopped (always_run
        tasks, see limit); later jobs still start."""
        with self._lock:
            self._stop_gen += 1
            self._halted = self._limit is not None  # (a limit lasts one build)
            pids = [pid for pid, late in self._procs.items() if not late]
            self._stopped.update(pids)
        for pid in pids:
            _killpg(pid)

    def cancel_all(self) -> None:
        """Kill every running job's process group; no new job starts afterwards."""
        with self._lock:
            self._cancelled = True
            pids = list(self._procs)
        for pid in pids:
            _killpg(pid)


def stop_orphans(tmp_dir: str) -> int:
    """Kill the process groups of tasks left running by a pipebuild that was killed.

    The servers' `.shell<n>.pid` files name them. A pid is only trusted when that process
    still runs with PIPEBUILD_TASKS set to `tmp_dir` (a shell forked by a `_Shell` server)
    or PIPEBUILD_TASK_DIR to a directory in it (one that exec'd its own bash), so a
    recycled pid is never signalled. Returns how many were stopped.
    """
    stopped = 0
    try:
        names = os.listdir(tmp_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        if not name.endswith(".pid"):
            continue
        try:
            with open(os.path.join(tmp_dir, name)) as f:
                pid = int(f.read().strip() or 0)
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        mine = f"PIPEBUILD_TASK_DIR={tmp_dir}{os.sep}".encode()  # a task of ours that exec'd bash
        if f"{TASKS_ENV}={tmp_dir}".encode() in environ or any(e.startswith(mine) for e in environ):
            _killpg(pid)
            stopped += 1
    return stopped


def _group_alive(pgid: int) -> bool:
    """True if a process of the group still exists (its leader, the job's shell, is reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
