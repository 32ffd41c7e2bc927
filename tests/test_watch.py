"""`pipebuild watch`: real file events, a real `pipebuild watch` subprocess.

Each test starts `pipebuild watch` in a tmp project, edits files the way people and
editors do (write in place, bursts of writes, save-by-rename), and waits on the output
with bounded polling: generous timeouts, never a fixed sleep standing in for "it was
fast enough". The oracles are the bytes the commands are known to write, and the
watcher's own lines: one "changed: ..." line per rebuild it decides on, one summary per
build.
"""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipebuild.watch import Watched, signature, wait_for_change

PIPEBUILD = str(Path(sys.executable).parent / "pipebuild")
TIMEOUT = 30.0

# The output lands beside the input, in the same (watched) directory, on purpose.
PIPEFILE = """\
from pipebuild import Pipeline
from helper import CMD

p = Pipeline(name="watched")
src = p.read_input("in.txt")
t = p.new_task(name="convert")
t.command(f"{CMD} < {src} > {t.ofile}")
p.write_output(t.ofile, "out.txt")
"""

SUMMARY = re.compile(r"^pipebuild: \d+ ran, \d+ restored, \d+ up to date, \d+ failed")
WATCHING = re.compile(r"^pipebuild: watching \d+ files? for changes")


def project(root: Path, pipefile: str = PIPEFILE) -> Path:
    """A project whose Pipefile imports a local module for its command."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "in.txt").write_text("hello\n")
    (root / "helper.py").write_text('CMD = "tr a-z A-Z"\n')
    (root / "Pipefile.py").write_text(pipefile)
    return root


def eventually(check: Callable[[], object], what: str | Callable[[], str], timeout: float = TIMEOUT) -> object:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.02)


def text_of(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


class Watcher:
    """`pipebuild watch ARGS` in `cwd`, its stdout and stderr collected line by line."""

    def __init__(self, cwd: Path, *args: str) -> None:
        env = {**os.environ, "CI": "true"}
        self.proc = subprocess.Popen(
            [PIPEBUILD, "watch", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def count(self, pattern: re.Pattern[str] | str) -> int:
        """Lines so far matching `pattern` (a regex, or an exact line)."""
        if isinstance(pattern, str):
            return sum(1 for line in list(self.lines) if line == pattern)
        return sum(1 for line in list(self.lines) if pattern.search(line))

    def wait_for(self, pattern: re.Pattern[str] | str, n: int = 1) -> None:
        """Wait until `pattern` has matched `n` lines."""
        eventually(lambda: self.count(pattern) >= n, lambda: f"{n} x {pattern!r} in:\n{self.output}")

    def idle(self, n: int) -> None:
        """Wait until the watcher is waiting for changes for the n-th time."""
        self.wait_for(WATCHING, n)

    def interrupt(self) -> int:
        """Ctrl-C; the exit status."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=TIMEOUT)
        self._reader.join(timeout=TIMEOUT)
        return code

    def close(self) -> None:
        """Kill the watcher if it still runs, and release its pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
        self._reader.join(timeout=TIMEOUT)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def watch(tmp_path):  # type: ignore[no-untyped-def]
    """`watch(cwd, *args)` starts a Watcher; all are killed at the end of the test."""
    started: list[Watcher] = []

    def start(cwd: Path, *args: str) -> Watcher:
        w = Watcher(cwd, *args)
        started.append(w)
        return w

    yield start
    for w in started:
        w.close()


def save_by_rename(path: Path, text: str) -> None:
    """Save the way many editors do: write a temporary file beside it, then rename it over."""
    tmp = path.with_name("." + path.name + ".swp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------


def test_builds_then_rebuilds_when_an_input_is_saved(tmp_path, watch):
    """Given a watched project, we should build at once, then rebuild after each save of the input,
    in place or by rename, and exit 130 on Ctrl-C without a traceback."""
    root = project(tmp_path / "p")
    w = watch(root)
    w.idle(1)
    assert text_of(root / "out.txt") == "HELLO\n"
    (root / "in.txt").write_text("bye\n")
    eventually(lambda: text_of(root / "out.txt") == "BYE\n", "out.txt == BYE")
    w.idle(2)
    save_by_rename(root / "in.txt", "renamed\n")
    eventually(lambda: text_of(root / "out.txt") == "RENAMED\n", "out.txt == RENAMED")
    w.idle(3)
    assert w.count("pipebuild: changed: in.txt") == 2
    assert w.interrupt() == 130
    assert "pipebuild: interrupted" in w.lines
    assert "Traceback" not in w.output


def test_a_burst_of_saves_is_one_rebuild_and_own_outputs_never_trigger(tmp_path, watch):
    """Given ten writes 50 ms apart and a save-by-rename to the input, we should rebuild once, with the
    last content; the build's own writes (out.txt beside the input, .pipebuild/, the input hard-linked
    into the task directory) should never trigger another build."""
    root = project(tmp_path / "p")
    w = watch(root, "--settle", "0.5")
    w.idle(1)
    for i in range(10):  # an editor's autosave: writes 50 ms apart, well inside the 0.5 s settle time
        (root / "in.txt").write_text(f"draft {i}\n")
        time.sleep(0.05)
    save_by_rename(root / "in.txt", "final\n")
    eventually(lambda: text_of(root / "out.txt") == "FINAL\n", "out.txt == FINAL")
    w.idle(2)
    # A sentinel change: if anything of our own had triggered a rebuild, its "changed" line would
    # come before this one, or be merged into it.
    (root / "helper.py").write_text('CMD = "rev"\n')
    eventually(lambda: text_of(root / "out.txt") == "lanif\n", "out.txt == lanif")
    w.idle(3)
    changed = [line for line in w.lines if line.startswith("pipebuild: changed:")]
    assert changed == ["pipebuild: changed: in.txt", "pipebuild: changed: helper.py"], w.output
    assert w.count(SUMMARY) == 3
    assert w.interrupt() == 130


def test_pipefile_and_imported_module_edits_rebuild(tmp_path, watch):
    """Given an edit to the module the Pipefile imports, then to the Pipefile, we should reload
    both (not a cached import) and rebuild with the new commands and destinations."""
    root = project(tmp_path / "p")
    w = watch(root)
    w.idle(1)
    (root / "helper.py").write_text('CMD = "rev"\n')
    eventually(lambda: text_of(root / "out.txt") == "olleh\n", "out.txt == olleh")
    w.idle(2)
    (root / "Pipefile.py").write_text(PIPEFILE.replace('"out.txt"', '"renamed.txt"'))
    eventually(lambda: text_of(root / "renamed.txt") == "olleh\n", "renamed.txt")
    w.idle(3)
    assert w.count("pipebuild: changed: helper.py") == 1
    assert w.count("pipebuild: changed: Pipefile.py") == 1
    assert w.interrupt() == 130


def test_a_pipefile_that_stops_loading_is_one_line_and_watching_goes_on(tmp_path, watch):
    """Given a syntax error in the Pipefile, then a broken imported module, we should print each
    error in one line, keep watching, and build again once each is fixed."""
    root = project(tmp_path / "p")
    w = watch(root)
    w.idle(1)
    good = (root / "Pipefile.py").read_text()
    (root / "Pipefile.py").write_text(good + "p = (\n")
    w.wait_for(re.compile(r"^pipebuild: Pipefile\.py:9: syntax error"))
    w.idle(2)
    (root / "in.txt").write_text("while broken\n")  # still watched: the next load says the same
    w.idle(3)
    assert w.count(re.compile("syntax error")) == 2
    (root / "Pipefile.py").write_text(good)
    eventually(lambda: text_of(root / "out.txt") == "WHILE BROKEN\n", "out.txt after the fix")
    w.idle(4)
    (root / "helper.py").write_text("CMD = undefined_name\n")
    w.wait_for(re.compile(r"^pipebuild: Pipefile\.py:2: NameError: name 'undefined_name' is not defined$"))
    w.idle(5)
    (root / "helper.py").write_text('CMD = "rev"\n')
    eventually(lambda: text_of(root / "out.txt") == "nekorb elihw\n", "out.txt after fixing the module")
    w.idle(6)
    assert w.proc.poll() is None
    assert "Traceback" not in w.output
    assert w.interrupt() == 130


def test_a_pipefile_broken_from_the_start_is_watched_until_it_loads(tmp_path, watch):
    """Given a Pipefile that never loaded, watch should report it, wait, and build once it is fixed."""
    root = project(tmp_path / "p", PIPEFILE + "p = (\n")
    w = watch(root)
    w.wait_for(re.compile(r"^pipebuild: Pipefile\.py:9: syntax error"))
    w.idle(1)
    save_by_rename(root / "Pipefile.py", PIPEFILE)
    eventually(lambda: text_of(root / "out.txt") == "HELLO\n", "out.txt once the Pipefile loads")
    assert w.interrupt() == 130


def test_a_missing_input_is_reported_and_its_creation_builds(tmp_path, watch):
    """Given an input that does not exist yet (in a directory that does not exist yet), we should
    say so in one line, keep watching, and build once it is created."""
    root = project(tmp_path / "p", PIPEFILE.replace('"in.txt"', '"data/in.txt"'))
    w = watch(root)
    w.wait_for(re.compile(r"^pipebuild: Pipefile\.py:5: input file data/in\.txt does not exist$"))
    w.idle(1)
    (root / "data").mkdir()
    w.idle(2)  # the directory's creation re-plans, which now watches data/
    (root / "data" / "in.txt").write_text("late\n")
    eventually(lambda: text_of(root / "out.txt") == "LATE\n", "out.txt once the input exists")
    assert w.interrupt() == 130


def test_a_build_in_progress_finishes_before_the_next_starts(tmp_path, watch):
    """Given a save while a task is running, the running build should finish (its summary printed)
    before the rebuild starts, and the rebuild should use the new content."""
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    started, release = ctl / "started", ctl / "release"
    blocking = PIPEFILE.replace(
        't.command(f"{CMD} < {src} > {t.ofile}")',
        f't.command(f"echo >> {started}; while [ ! -e {release} ]; do sleep 0.02; done; {{CMD}} < {{src}} > {{t.ofile}}")',
    )
    root = project(tmp_path / "p", blocking)
    w = watch(root)
    eventually(started.exists, "the first build's task to start")
    save_by_rename(root / "in.txt", "second\n")
    release.write_text("")
    eventually(lambda: text_of(root / "out.txt") == "SECOND\n", "out.txt == SECOND")
    w.idle(2)
    summaries = [i for i, line in enumerate(w.lines) if SUMMARY.search(line)]
    changed = w.lines.index("pipebuild: changed: in.txt")
    assert len(summaries) == 2 and summaries[0] < changed < summaries[1], w.output
    assert not any("waiting for another pipebuild" in line for line in w.lines)
    assert started.read_text().count("\n") == 2  # the task ran once per build, never twice at once
    assert w.interrupt() == 130


def test_ctrl_c_during_a_build_stops_the_task_and_exits_130(tmp_path, watch):
    """Given Ctrl-C while a task runs, watch should stop the task's process and exit 130 cleanly."""
    pidfile = tmp_path / "pid"
    long = PIPEFILE.replace(
        't.command(f"{CMD} < {src} > {t.ofile}")',
        f't.command(f"echo $$ > {pidfile}; sleep 60; cat {{src}} > {{t.ofile}}")',
    )
    root = project(tmp_path / "p", long)
    w = watch(root)
    pid = int(eventually(lambda: (text_of(pidfile) or "").strip(), "the task to start"))  # type: ignore[arg-type]
    assert w.interrupt() == 130
    assert "Traceback" not in w.output

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    eventually(gone, f"task process {pid} to stop")


# --------------------------------------------------------------------------------------
# The event filter, without a watcher process


def test_event_filter_keeps_real_changes_only(tmp_path):
    """Given queued events for a destination, .pipebuild/, an untouched input (a read or a hard
    link), an unwatched file and a changed input, only the changed input should count."""
    state = tmp_path / ".pipebuild"
    state.mkdir()
    same, edited, dest = tmp_path / "same.txt", tmp_path / "edited.txt", tmp_path / "out.txt"
    for f in (same, edited, dest):
        f.write_text("x\n")
    snapshot = {str(f): signature(str(f)) for f in (same, edited)}
    os.link(same, tmp_path / "link")  # changes ctime and the link count, not size/mtime/inode
    save_by_rename(edited, "y\n")
    watched = Watched(frozenset({str(same), str(edited)}), frozenset(), frozenset(), frozenset({str(dest)}), str(state))
    events: queue.Queue[tuple[str, ...]] = queue.Queue()
    for paths in [(str(dest),), (str(state / "cache.sqlite"),), (str(same),), (str(tmp_path / "other"),)]:
        events.put(paths)
    events.put((str(tmp_path / ".edited.txt.swp"), str(edited)))
    assert wait_for_change(events, watched, snapshot, settle=0.0, max_settle=0.0) == [str(edited)]


def test_py_files_beside_a_broken_pipefile_count(tmp_path):
    """Given a Pipefile that failed to load, a .py file beside it counts, other files do not."""
    watched = Watched(frozenset(), frozenset({str(tmp_path)}), frozenset(), frozenset(), str(tmp_path / ".pipebuild"))
    assert watched.counts(str(tmp_path / "newmodule.py"))
    assert not watched.counts(str(tmp_path / "notes.txt"))
    assert not watched.counts(str(tmp_path / "sub" / "deep.py"))
    assert not watched.counts(str(tmp_path / ".pipebuild" / "x.py"))


def test_watch_chooses_jobs_backend_and_remote_cache_as_make_does(tmp_path, monkeypatch):
    """Given LocalBackend(jobs=3) in the Pipefile, each build of `watch` gets 3 slots (or -j),
    the --remote-cache flags, and with --backend batch a BatchBackend, as `make` would."""
    from typer.testing import CliRunner

    from pipebuild import cli, load
    from pipebuild import watch as watching

    (tmp_path / "Pipefile.py").write_text(
        "from pipebuild import LocalBackend, Pipeline\np = Pipeline(backend=LocalBackend(jobs=3))\n"
    )
    seen = {}
    monkeypatch.setattr(watching, "run", lambda path, targets, options, reporter, settle: seen.update(locals()))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli.app, ["watch", "--remote-cache", "gs://bucket/ci", "--remote-cache-read-only"])
    assert r.exit_code == 0, r.output
    opts = seen["options"](load.load(seen["path"]))
    assert (opts.jobs, opts.remote_cache, opts.remote_cache_read_only) == (3, "gs://bucket/ci", True)
    r = CliRunner().invoke(cli.app, ["watch", "-j", "2", "--backend", "batch"])
    assert r.exit_code == 0, r.output
    pipeline = load.load(seen["path"])
    opts = seen["options"](pipeline)
    assert opts.jobs == 2 and type(pipeline._backend).__name__ == "BatchBackend"
    r = CliRunner().invoke(cli.app, ["watch", "--remote-cache", "s3://x"])
    assert r.exit_code == 2 and "gs://" in r.output
