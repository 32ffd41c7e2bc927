"""`pipebuild log TASK` and `pipebuild explain [TARGET...]`.

Oracles: the bytes the tasks' commands are known to write to stdout and stderr, the
reasons of rebuild.Reason, and the store's recorded finish time and duration.
"""

import os
import re
import sqlite3
import time

from typer.testing import CliRunner

from pipebuild.cli import app

PIPEFILE = """\
from pipebuild import Pipeline

p = Pipeline(name="logs")
src = p.read_input("in.txt")
up = p.new_task(name="up")
up.command(f"echo to-stdout; echo to-stderr >&2; tr a-z A-Z < {src} > {up.ofile}")
p.write_output(up.ofile, "out/up.txt")
count = p.new_task(name="count")
count.command(f"wc -c < {up.ofile} > {count.ofile}")
p.write_output(count.ofile, "out/count.txt")
bad = p.new_task(name="bad job")
bad.command("echo partial; echo 'it broke' >&2; exit 5")
"""


def invoke(*args: str):  # type: ignore[no-untyped-def]
    """Run the CLI in-process (the cwd is restored afterwards)."""
    cwd = os.getcwd()
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        os.chdir(cwd)


def built(root):  # type: ignore[no-untyped-def]
    """The project, built once (bad job fails)."""
    (root / "in.txt").write_text("hello\n")
    (root / "Pipefile.py").write_text(PIPEFILE)
    assert invoke("make", "-k", "-j1").exit_code == 1
    return root


def test_log_shows_both_streams_of_the_last_run(workdir):
    """Given a task that ran, `log TASK` should print its stdout and stderr under headers naming the files."""
    built(workdir)
    result = invoke("log", "up")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert re.search(r"^==> \.pipebuild/logs/up\.out \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\) <==\nto-stdout\n", text, re.M)
    assert re.search(r"^==> \.pipebuild/logs/up\.err \([^)]*\) <==\nto-stderr\n", text, re.M)
    assert text.index("to-stdout") < text.index("to-stderr")


def test_log_of_a_failed_task_by_name_with_a_space_and_one_stream(workdir):
    """Given a failed task named 'bad job', --stderr should print exactly its stderr, --stdout its stdout."""
    built(workdir)
    assert invoke("log", "bad job", "--stderr").stdout == "it broke\n"
    assert invoke("log", "bad job", "--stdout").stdout == "partial\n"


def test_log_accepts_a_destination(workdir):
    """Given the destination a task publishes, `log` should show that task's log."""
    built(workdir)
    assert invoke("log", "out/up.txt", "--stdout").stdout == "to-stdout\n"


def test_log_is_the_last_run_not_an_older_one(workdir):
    """Given a task that reran after its input changed, the log should be the new run's."""
    built(workdir)
    (workdir / "Pipefile.py").write_text(PIPEFILE.replace("echo to-stdout", "echo second-run"))
    invoke("make", "out/up.txt")
    assert invoke("log", "up", "--stdout").stdout == "second-run\n"


def test_log_of_an_unknown_or_never_run_task_is_one_line_exit_2(workdir):
    """Given a task that does not exist, or has not run, `log` should exit 2 with one line."""
    (workdir / "in.txt").write_text("hello\n")
    (workdir / "Pipefile.py").write_text(PIPEFILE)
    result = invoke("log", "up")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["pipebuild: no log for task up: it has not run in this workspace"]
    result = invoke("log", "upp")
    assert result.exit_code == 2
    assert "unknown target 'upp'; did you mean 'up'" in result.stderr


def test_explain_says_why_and_when_and_how_long(workdir):
    """Given an input change, explain should say which task would run and why, which would run
    only if an upstream output changes, which is up to date, and each one's last build."""
    built(workdir)
    db = sqlite3.connect(workdir / ".pipebuild" / "cache.sqlite")
    finished = time.time() - 600
    db.execute("UPDATE tasks SET finished=?, duration=12.5 WHERE name='up'", (finished,))
    db.commit()
    db.close()
    (workdir / "in.txt").write_text("changed\n")
    result = invoke("explain")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(finished))
    i = lines.index("up: would run: input changed: in.txt")
    assert lines[i + 1] == f"  last built {when} (10 min ago), took 12.50s"
    i = lines.index("count: would run only if up writes different output (up is stale)")
    assert lines[i + 1].startswith("  last built ")
    i = lines.index("bad job: would run: failed last time")
    assert re.fullmatch(r"  last failed \S+ \S+ \(\d+s ago\), took \d+\.\d\ds", lines[i + 1]), lines[i + 1]


def test_explain_a_target_covers_its_cone_only(workdir):
    """Given a target, explain should cover it and its upstream tasks, and say 'never built' before a build."""
    (workdir / "in.txt").write_text("hello\n")
    (workdir / "Pipefile.py").write_text(PIPEFILE)
    result = invoke("explain", "out/count.txt")
    assert result.stdout.splitlines() == [
        "up: would run: never built",
        "  never built in this workspace",
        "count: would run only if up writes different output (up is stale)",
        "  never built in this workspace",
    ]
    invoke("make", "out/count.txt")
    lines = invoke("explain", "count").stdout.splitlines()
    assert lines[0] == "up: up to date: would not run" and lines[2] == "count: up to date: would not run"
