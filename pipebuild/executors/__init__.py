"""Executors: what runs one job. `Executor` is the seam; `FakeExecutor` is its test double."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Job:
    """One command to run in a prepared task directory."""

    name: str
    dir: str  # absolute path of the task directory (the working directory)
    script: str  # bash script, starting with `set -euo pipefail`
    stdout: str  # log file paths
    stderr: str
    timeout: float | None = None
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # What a remote executor needs to stage the directory elsewhere (executors/batch.py):
    inputs: list[tuple[str, str]] = field(default_factory=list)  # (relpath in dir, digest)
    outputs: list[str] = field(default_factory=list)  # relpaths the task may write
    cpu: str | float | None = None  # the task's requests, as the user wrote them
    memory: str | float | None = None
    storage: str | float | None = None
    key: str | None = None  # the action key
    always_run: bool = False  # starts even after a failure has stopped the build
    # Called (by an executor that can) right after the command exits 0, on the thread that
    # called run, before another job may take its place; False makes the job a failure.
    after: Callable[[], bool] | None = None
    on_start: Callable[[], None] | None = None  # called, by an executor that can, once it runs


STOPPED = "stopped"

# bash -c takes the script as one argument, and Linux caps one argument at 128 KiB;
# longer scripts (e.g. a gather over 10,000 inputs) go through a file.
MAX_ARG = 100_000


def long_script_file(job: Job) -> str | None:
    """Write the job's script beside its task directory if it is too long for `bash -c`.

    Returns the file's path, or None when the script fits in one argument.
    """
    if len(job.script) < MAX_ARG:
        return None
    path = job.dir + ".sh"
    with open(path, "w") as f:
        f.write(job.script)
    return path


@dataclass
class JobResult:
    """How a job ended: exit code, or a timeout, or an error outside the command."""

    exit_code: int
    timed_out: bool = False
    error: str | None = None
    # A process the job started still runs (in its process group), maybe still writing in
    # the task directory: the directory must be deleted, never reused for another task.
    left_running: bool = False


class Executor(Protocol):
    """Runs jobs; must be safe to call from several threads at once."""

    def run(self, job: Job) -> JobResult:
        """Run the job to completion."""
        ...

    def cancel_all(self) -> None:
        """Stop every running job and refuse new ones (Ctrl-C)."""
        ...

    def stop_running(self) -> None:
        """Stop the jobs running now (a failure without -k); later jobs may still start.

        A job stopped this way ends with `JobResult.error == STOPPED`.
        """
        ...


class FakeExecutor:
    """Records each job and answers with `handler(job)` (an exit code), for tests."""

    def __init__(self, handler: Callable[[Job], int]) -> None:
        self.handler = handler
        self.jobs: list[Job] = []

    def run(self, job: Job) -> JobResult:
        """Record the job, then let the handler play it."""
        self.jobs.append(job)
        return JobResult(self.handler(job))

    def cancel_all(self) -> None:
        """Nothing runs in the background."""

    def stop_running(self) -> None:
        """Nothing runs in the background."""
