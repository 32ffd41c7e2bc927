"""Shell completion: the scripts in `completions/`, and task names and targets from the Pipefile.

The scripts are generated from the command line itself (typer's bash, zsh and fish
classes, driven by the `_PIPEBUILD_COMPLETE` environment variable); each one calls
`pipebuild` back to complete a word, so commands and options never go stale in them.
Regenerate them with `python -m pipebuild.completion` (a test fails when they differ).

A TARGET completes to task names and to `write_output` destinations relative to the
Pipefile's directory (the directory `make` resolves targets in, which is the current one
unless `-C` is given). The Pipefile is loaded with its output hidden; any error means no
completions, never a message in the middle of the user's command line.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator

COMPLETE_VAR = "_PIPEBUILD_COMPLETE"
SCRIPTS = {"bash": "pipebuild.bash", "zsh": "_pipebuild", "fish": "pipebuild.fish"}


def init() -> None:
    """Register typer's completion classes (typer does it only with add_completion=True)."""
    from typer._completion_classes import completion_init

    completion_init()


def candidates(file: str | None, directory: str | None) -> list[str]:
    """Task names, then destinations, of the Pipefile that `make -f FILE -C DIR` would use."""
    from . import load
    from .build import Options
    from .graph import plan

    cwd = os.getcwd()
    path = load.find(file, directory)
    workspace = os.path.dirname(path)
    with _silenced():
        os.chdir(workspace)  # as make does: relative paths in the Pipefile resolve here
        try:
            pipeline = load.load(path)
            graph = plan(pipeline, workspace, Options(workspace=workspace).state_dir)
        finally:
            os.chdir(cwd)
    names = [n.name for n in graph.nodes]
    dests = sorted(os.path.relpath(d, workspace) for d in graph.by_dest if not d.startswith("gs://"))
    return names + dests


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Hide whatever the Pipefile prints, from Python or from a child process: the shell reads
    this process's stdout as the list of completions."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def complete_targets(ctx: object, incomplete: str) -> list[str]:
    """The autocompletion callback of TARGET arguments."""
    params = getattr(ctx, "params", {}) or {}
    try:
        found = candidates(params.get("file"), params.get("directory"))
    except Exception:  # noqa: BLE001 - a broken Pipefile just completes nothing
        return []
    return [c for c in found if c.startswith(incomplete)]


def script(shell: str) -> str:
    """The completion script for `shell`, exactly as `_PIPEBUILD_COMPLETE=source_SHELL pipebuild` prints it."""
    env = dict(os.environ, **{COMPLETE_VAR: f"source_{shell}"})
    proc = subprocess.run(
        [sys.executable, "-m", "pipebuild"], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return proc.stdout.strip("\n") + "\n"


def write_all(directory: str) -> list[str]:
    """(Re)write every script into `directory`; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for shell, name in SCRIPTS.items():
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(script(shell))
        paths.append(path)
    return paths


if __name__ == "__main__":
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "completions")
    for p in write_all(sys.argv[1] if len(sys.argv) > 1 else here):
        print(p)
