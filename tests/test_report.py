"""Progress reporting: plain lines, the live display on a terminal, JSON lines.

Oracles: the plain line formats pipebuild printed before the live display existed (so
scripts that read them keep working), rich's own rendering of the display into a
recording console, `json.loads` on every `--json` line, and `sys.modules` for what a
no-op build imports.
"""

import io
import json
import os
import pty
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from pipebuild import build
from pipebuild.cli import app
from pipebuild.load import load
from pipebuild.report import JsonReporter, Reporter, RichReporter, choose, live_wanted

PIPEBUILD = str(Path(sys.executable).parent / "pipebuild")
TIMEOUT = 30

# a -> b (reads a's file), and c, which fails when FAIL exists
PIPEFILE = """\
from pipebuild import Pipeline

p = Pipeline(name="rep")
a = p.new_task(name="a")
a.command(f"echo a > {a.ofile}")
p.write_output(a.ofile, "out/a.txt")
b = p.new_task(name="b")
b.command(f"cat {a.ofile} > {b.ofile}; echo said b")
p.write_output(b.ofile, "out/b.txt")
c = p.new_task(name="c")
c.command(f"if test -e FAIL_FLAG; then echo broken >&2; exit 4; fi; echo c > {c.ofile}")
p.write_output(c.ofile, "out/c.txt")
"""


def project(root: Path, fail: bool = False) -> Path:
    """A three-task project in `root`; task c fails when `fail`."""
    root.mkdir(parents=True, exist_ok=True)
    text = PIPEFILE.replace("FAIL_FLAG", str(root / "fail-flag"))
    (root / "Pipefile.py").write_text(text)
    if fail:
        (root / "fail-flag").write_text("")
    return root


class Tty(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plain_lines(verbosity: int, explain: bool) -> tuple[str, str]:
    """Play a fixed sequence of events into a plain Reporter; (stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    r = Reporter(verbosity, explain, out, err)
    r.message("pipebuild: waiting")
    r.start(4)
    r.task("a", "ran", "never built", 0.5)
    r.task("b", "skipped", "up to date")
    r.task("c", "failed", "exit code 4 (ran because: never built)", 0.1)
    r.failure("c", "exit code 4", ".pipebuild/logs/c.err", ["broken"])
    r.task("d", "not run", "a dependency failed")
    r.summary(1, 0, 1, 1, 1, 1.25)
    r.close()
    return out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------------------
# The plain reporter keeps its format


def test_plain_reporter_prints_the_same_lines_as_before():
    """Given the same events, the plain reporter should print exactly the lines it always printed."""
    out, err = plain_lines(0, False)
    assert out == (
        "[1/4] ran a (0.50s)\n"
        "[3/4] failed c: exit code 4\n"
        "[4/4] not run d: a dependency failed\n"
        "pipebuild: 1 ran, 0 restored, 1 up to date, 1 failed, 1 not run (1.25s)\n"
    )
    assert err == (
        "pipebuild: waiting\npipebuild: task c failed: exit code 4\n  log: .pipebuild/logs/c.err\n  | broken\n"
    )


def test_quiet_prints_failures_only_and_verbose_adds_skips():
    """Given -q we should print only the failure; given -v also every skip with its reason."""
    out, err = plain_lines(-1, False)
    assert out == (
        "[3/4] failed c: exit code 4\npipebuild: 1 ran, 0 restored, 1 up to date, 1 failed, 1 not run (1.25s)\n"
    )
    assert "waiting" not in err and "task c failed" in err
    out, _ = plain_lines(1, False)
    assert "[2/4] skipped b: up to date\n" in out
    out, _ = plain_lines(0, True)
    assert "[1/4] ran a: never built (0.50s)\n" in out
    assert "[3/4] failed c: exit code 4 (ran because: never built)\n" in out


def test_verbose_log_shows_a_tasks_stdout(tmp_path):
    """Given Pipeline.run(verbose=True), the task's stdout should follow a header line, exactly once."""
    log = tmp_path / "a.out"
    log.write_text("one\ntwo\n")
    out = io.StringIO()
    Reporter(out=out).verbose_log("a", str(log))
    Reporter(out=out).verbose_log("a", str(tmp_path / "missing"))
    assert out.getvalue() == "--- a stdout ---\none\ntwo\n"


# --------------------------------------------------------------------------------------
# Which reporter


@pytest.mark.parametrize(
    "tty, env, verbosity, as_json, expected",
    [
        (False, {}, 0, False, Reporter),
        (True, {}, 0, False, RichReporter),
        (True, {"CI": "true"}, 0, False, Reporter),
        (True, {"TERM": "dumb"}, 0, False, Reporter),
        (True, {}, -1, False, Reporter),
        (True, {}, 1, False, RichReporter),
        (True, {}, 0, True, JsonReporter),
        (False, {"CI": "true"}, -1, True, JsonReporter),
    ],
)
def test_choose_picks_live_only_on_an_interactive_terminal(tty, env, verbosity, as_json, expected):
    """Given where stdout goes, CI, -q and --json, we should pick the matching reporter."""
    out = Tty() if tty else io.StringIO()
    r = choose(verbosity, False, as_json, out=out, env=env)
    assert type(r) is expected
    assert live_wanted(out, env) == (tty and not env)


# --------------------------------------------------------------------------------------
# The live display


def rendered(r: RichReporter, width: int = 100) -> str:
    """The live display as plain text."""
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(r.render())
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_live_display_shows_running_tasks_counts_and_eta():
    """Given two running tasks and one done, the display should list the running ones with their
    elapsed time, done/total, the counts, and an ETA from the pace so far."""
    clock = Clock()
    out = io.StringIO()
    console = Console(file=out, width=100, color_system=None, force_terminal=False)
    r = RichReporter(console=console, out=out, err=out, clock=clock)
    r.start(4)
    r.started("align")
    clock.now += 2
    r.started("sort")
    assert "ETA -" in rendered(r)  # nothing finished yet: no guess
    clock.now += 1.5
    r.task("align", "ran", "never built", 3.5)
    r.task("index", "skipped", "up to date")
    text = rendered(r)
    assert "running sort  1.5s" in text
    assert "align" not in text.split("\n", 1)[1]  # finished: no longer listed as running
    assert "2/4" in text and "1 ran" in text and "1 up to date" in text
    assert "· 0:04," in text  # elapsed, rounded
    assert "ETA ~0:07" in text  # 3.5 s for one task that did work, 2 tasks left
    r.task("sort", "failed", "exit code 1 (ran because: never built)", 0.2)
    assert "1 failed" in rendered(r)
    assert "[1/4] ran align (3.50s)" in out.getvalue()
    assert "[3/4] failed sort: exit code 1" in out.getvalue()
    assert "skipped" not in out.getvalue()  # not verbose


def test_live_display_lists_a_dozen_running_tasks_then_counts_the_rest():
    """Given 20 running tasks, the display should stay short: 12 named, then 'and 8 more'."""
    r = RichReporter(console=Console(file=io.StringIO(), force_terminal=False), clock=Clock())
    r.start(20)
    for i in range(20):
        r.started(f"t{i}")
    text = rendered(r)
    assert text.count("running t") == 12
    assert "and 8 more running" in text


def test_live_display_on_a_terminal_starts_and_is_removed_by_the_summary():
    """Given a terminal, start() should open a live display, lines should print above it, and
    summary() should take it down and leave the plain summary line."""
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system=None)
    r = RichReporter(console=console, out=out, err=out)
    r.start(1)
    assert r._live is not None
    r.task("a", "ran", "never built", 0.1)
    r.summary(1, 0, 0, 0, 0, 0.2)
    assert r._live is None
    r.close()  # idempotent
    text = out.getvalue()
    assert "[1/1] ran a (0.10s)" in text
    assert text.rstrip().endswith("pipebuild: 1 ran, 0 restored, 0 up to date, 0 failed (0.20s)")


def test_build_tells_the_reporter_when_each_task_starts(workdir):
    """Given a build, the reporter should hear `started` for each task that runs, before its
    `task` event, and nothing for a task that is up to date."""
    project(workdir)

    class Recorder(Reporter):
        def __init__(self) -> None:
            super().__init__(out=io.StringIO(), err=io.StringIO())
            self.events: list[tuple[str, str]] = []

        def started(self, name: str) -> None:
            self.events.append(("started", name))

        def task(self, name: str, action: str, reason: str, seconds: float | None = None) -> None:
            self.events.append((action, name))

    def run(reporter: Recorder) -> None:
        opts = build.Options(workspace=str(workdir), jobs=1, reporter=reporter)
        build.build(load(str(workdir / "Pipefile.py")), opts)

    first = Recorder()
    run(first)
    for name in "abc":
        assert first.events.index(("started", name)) < first.events.index(("ran", name)), first.events
    second = Recorder()
    run(second)
    assert sorted(second.events) == [("skipped", "a"), ("skipped", "b"), ("skipped", "c")]


# --------------------------------------------------------------------------------------
# JSON lines


def test_json_writes_one_event_per_line_for_every_task(workdir):
    """Given --json, stdout should be JSON objects only: start, started/task per task, the
    failure report, the stdout of nothing, and the summary with the counts."""
    project(workdir, fail=True)
    result = CliRunner().invoke(app, ["make", "--json", "-k", "-j1"])
    assert result.exit_code == 1, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and events[0]["total"] == 3
    assert kinds[-1] == "summary"
    assert {k: events[-1][k] for k in ("ran", "failed", "up_to_date")} == {"ran": 2, "failed": 1, "up_to_date": 0}
    tasks = {e["name"]: e for e in events if e["event"] == "task"}
    assert {n: t["action"] for n, t in tasks.items()} == {"a": "ran", "b": "ran", "c": "failed"}
    assert tasks["a"]["reason"] == "never built" and tasks["a"]["total"] == 3
    assert sorted(e["name"] for e in events if e["event"] == "started") == ["a", "b", "c"]
    (failure,) = [e for e in events if e["event"] == "failure"]
    assert failure["name"] == "c" and failure["detail"] == "exit code 4" and failure["tail"] == ["broken"]
    assert all(isinstance(e["time"], float) for e in events)
    # a second build: every task is reported, as skipped, even without -v
    result = CliRunner().invoke(app, ["make", "--json", "-q", "a", "b"])
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["name"], e["action"]) for e in events if e["event"] == "task"] == [("a", "skipped"), ("b", "skipped")]


# --------------------------------------------------------------------------------------
# As a user's terminal sees it


def run_on_pty(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run pipebuild with stdout and stderr on a pseudo-terminal; (exit status, what it showed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=TIMEOUT), b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("ci", [False, True])
def test_terminal_gets_the_live_display_unless_ci(tmp_path, ci):
    """Given a terminal, make should draw the live display (cursor control, the display's counts);
    under CI=true it should print the plain lines only."""
    project(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"TERM": "xterm", "COLUMNS": "100"}
    if ci:
        env["CI"] = "true"
    code, shown = run_on_pty([PIPEBUILD, "make", "-j1"], tmp_path, env)
    assert code == 0, shown
    assert "pipebuild: 3 ran, 0 restored, 0 up to date, 0 failed" in shown
    assert "ran a" in shown and "Traceback" not in shown
    hides_cursor = "\x1b[?25l" in shown
    assert hides_cursor is not ci, shown


def test_no_op_build_off_a_terminal_does_not_import_rich_or_watchdog(tmp_path):
    """Given stdout is not a terminal, a build (first or no-op) should never import rich, nor watchdog."""
    project(tmp_path)
    code = textwrap.dedent(
        """
        import sys
        from pipebuild.cli import main
        sys.argv = ["pipebuild", "make", "-j1"]
        for _ in range(2):
            try:
                main()
            except SystemExit as e:
                assert not e.code, e.code
        print("LAZY", sorted(m for m in sys.modules if m.split(".")[0] in ("rich", "watchdog")))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    assert "pipebuild: 0 ran, 0 restored, 3 up to date" in proc.stdout
    assert "LAZY []" in proc.stdout, proc.stdout


def test_at_j2_the_reporter_hears_started_only_for_commands_that_ran(workdir):
    """Given -j2, a sleeper and a failing task in the slots and tasks waiting for them, only tasks whose command ran should be `started`."""
    (workdir / "Pipefile.py").write_text(
        "from pipebuild import Pipeline\n"
        "p = Pipeline()\n"
        "slow = p.new_task('slow')\n"
        "slow.command(f'sleep 1.5; echo > {slow.ofile}')\n"
        "bad = p.new_task('bad')\n"
        "bad.command(f'sleep 0.4; echo > {bad.ofile}; exit 1')\n"
        "tasks = [slow, bad]\n"
        "for i in range(4):\n"
        "    t = p.new_task(f'q{i}')\n"
        "    t.command(f'sleep 0.1; echo {i} > {t.ofile}')\n"  # (bad gets a slot before all 4 run)
        "    tasks.append(t)\n"
        "for t in tasks:\n"
        "    p.write_output(t.ofile, f'out/{t.name}.txt')\n"
    )

    class Recorder(Reporter):
        def __init__(self) -> None:
            super().__init__(out=io.StringIO(), err=io.StringIO())
            self.started_names: list[str] = []

        def started(self, name: str) -> None:
            self.started_names.append(name)

    r = Recorder()
    result = build.build(load(str(workdir / "Pipefile.py")), build.Options(workspace=str(workdir), jobs=2, reporter=r))
    assert [f.name for f in result.failed] == ["bad"] and "slow" in result.not_run
    assert len(result.ran) < 4  # some tasks were still waiting for a slot when bad failed
    assert sorted(r.started_names) == sorted(["slow", "bad", *result.ran])
