"""The command line: `pipebuild make|list|status|clean|gc`, in-process and as a subprocess.

Oracles: the exit statuses of pipebuild/cli.py (0 success, 1 a task failed, 2 a usage or
definition error, always one line and never a traceback), the reasons of rebuild.Reason,
and the bytes the bash commands are known to write.
"""

import fcntl
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipebuild.cli import app

PIPEBUILD = str(Path(sys.executable).parent / "pipebuild")
LAUNCHERS = {
    "module": [sys.executable, "-m", "pipebuild"],
    "script": [PIPEBUILD],
}
TIMEOUT = 30

# Three tasks: upper (in.txt -> out/x.txt), count (upper's file -> out/count.txt) and an
# independent task other (-> out/other.txt). Created in that order.
DEMO = """\
from pipebuild import Pipeline

p = Pipeline(name="demo")
src = p.read_input("in.txt")
upper = p.new_task(name="upper")
upper.command(f"{upper_cmd} < {{src}} > {{upper.ofile}}")
p.write_output(upper.ofile, "out/x.txt")
count = p.new_task(name="count")
count.command(f"wc -c < {{upper.ofile}} > {{count.ofile}}")
p.write_output(count.ofile, "out/count.txt")
other = p.new_task(name="other")
other.command(f"echo other > {{other.ofile}}")
p.write_output(other.ofile, "out/other.txt")
"""

# bad fails (unless FLAG exists), down reads bad's file, good is independent and created
# last, so with -j1 the order is bad, then good: good is queued behind the failure.
FAILING = """\
from pipebuild import Pipeline

p = Pipeline(name="failing")
bad = p.new_task(name="bad")
bad.command(f"if ! test -e {flag}; then echo boom >&2; exit 3; fi; echo fixed > {{bad.ofile}}")
p.write_output(bad.ofile, "out/bad.txt")
down = p.new_task(name="down")
down.command(f"cat {{bad.ofile}} > {{down.ofile}}")
p.write_output(down.ofile, "out/down.txt")
good = p.new_task(name="good")
good.command(f"echo good > {{good.ofile}}")
p.write_output(good.ofile, "out/good.txt")
"""


def demo(upper_cmd: str = "tr a-z A-Z") -> str:
    """The DEMO Pipefile's text."""
    return DEMO.format(upper_cmd=upper_cmd)


def failing(flag: Path) -> str:
    """The FAILING Pipefile's text; its task bad succeeds once `flag` exists."""
    return FAILING.format(flag=str(flag))


def write_demo(root: Path, text: str | None = None, name: str = "Pipefile.py") -> None:
    """A demo project in `root`: in.txt and a Pipefile."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "in.txt").write_text("hello\n")
    (root / name).write_text(text if text is not None else demo())


class Cli:
    """Runs `pipebuild ...` in-process from a fixed directory, restoring it afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runner = CliRunner()

    def __call__(self, *args: str, cwd: Path | None = None):  # type: ignore[no-untyped-def]
        os.chdir(cwd or self.root)
        try:
            result = self.runner.invoke(app, list(args))
        finally:
            os.chdir(self.root)
        exc = result.exception
        if exc is not None and not isinstance(exc, SystemExit):
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            raise AssertionError(f"pipebuild {' '.join(args)} raised instead of exiting:\n{tb}")
        return result


@pytest.fixture
def cli(workdir):  # type: ignore[no-untyped-def]
    """`cli('make', ...)` runs the CLI in-process in the test's directory."""
    return Cli(workdir)


def run(launcher: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`pipebuild ...` as a subprocess."""
    return subprocess.run(
        [*LAUNCHERS[launcher], *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def err_lines(text: str) -> list[str]:
    """The non-empty lines of an error stream."""
    return [line for line in text.splitlines() if line.strip()]


def summary(stdout: str) -> str:
    """The build's closing summary line."""
    lines = [line for line in stdout.splitlines() if re.match(r"pipebuild: \d+ ran", line)]
    assert len(lines) == 1, stdout
    return lines[0]


def read(path: Path) -> str:
    """A file's text."""
    return path.read_text()


def blobs(root: Path) -> list[Path]:
    """The files in the content store."""
    cas = root / ".pipebuild" / "cas"
    return [p for p in cas.rglob("*") if p.is_file() and "tmp" not in p.relative_to(cas).parts]


# --------------------------------------------------------------------------------------
# Exit statuses, in-process and as a subprocess


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize(
    "case, code",
    [("ok", 0), ("task fails", 1), ("definition error", 2), ("unknown target", 2)],
)
def test_subprocess_exit_status(tmp_path, launcher, case, code):
    """Given a build that succeeds, fails a task, or is ill-defined, we should exit 0, 1 or 2 without a traceback."""
    args = ["make", "-j1"]
    if case == "ok":
        write_demo(tmp_path)
    elif case == "task fails":
        (tmp_path / "Pipefile.py").write_text(failing(tmp_path / "flag"))
    elif case == "definition error":
        (tmp_path / "Pipefile.py").write_text("from pipebuild import Pipeline\np = Pipeline()\n1/0\n")
    else:
        write_demo(tmp_path)
        args.append("out/nope.txt")
    proc = run(launcher, *args, cwd=tmp_path)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    if code == 2:
        assert len(err_lines(proc.stderr)) == 1, proc.stderr
    if case == "ok":
        assert read(tmp_path / "out" / "x.txt") == "HELLO\n"


@pytest.mark.parametrize("case, code", [("ok", 0), ("task fails", 1), ("definition error", 2)])
def test_in_process_exit_status(cli, workdir, case, code):
    """Given a build that succeeds, fails a task, or is ill-defined, we should exit 0, 1 or 2 in-process too."""
    if case == "ok":
        write_demo(workdir)
    elif case == "task fails":
        (workdir / "Pipefile.py").write_text(failing(workdir / "flag"))
    else:
        (workdir / "Pipefile.py").write_text("from pipebuild import Pipeline\np = Pipeline()\n1/0\n")
    result = cli("make", "-j1")
    assert result.exit_code == code, result.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["make", "-j", "0"], "-j"),
        (["make", "-C", "no-such-dir"], "no-such-dir"),
        (["make", "-f", "nofile.py"], "nofile.py"),
        (["gc", "--max-size", "banana"], "banana"),
    ],
)
def test_usage_error_is_one_line_and_exit_2(cli, workdir, args, needle):
    """Given a bad command line, we should exit 2 with one line naming the problem and no traceback."""
    write_demo(workdir)
    result = cli(*args)
    assert result.exit_code == 2, result.output
    lines = err_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------------------
# make: targets, files, directories


def test_make_without_target_builds_everything(cli, workdir):
    """Given no target, we should run every task and publish every destination."""
    write_demo(workdir)
    result = cli("make", "-j1")
    assert result.exit_code == 0, result.output
    assert read(workdir / "out" / "x.txt") == "HELLO\n"
    assert read(workdir / "out" / "count.txt").strip() == "6"
    assert read(workdir / "out" / "other.txt") == "other\n"
    assert summary(result.stdout).startswith("pipebuild: 3 ran, 0 restored")


def test_make_destination_builds_only_its_cone(cli, workdir):
    """Given a destination as target, we should build only the tasks it needs."""
    write_demo(workdir)
    result = cli("make", "out/x.txt")
    assert result.exit_code == 0, result.output
    assert read(workdir / "out" / "x.txt") == "HELLO\n"
    assert not (workdir / "out" / "other.txt").exists()
    assert not (workdir / "out" / "count.txt").exists()
    assert "other" not in result.stdout
    assert summary(result.stdout).startswith("pipebuild: 1 ran")


def test_make_task_name_builds_it_and_its_upstream(cli, workdir):
    """Given a task name as target, we should build that task and what it reads, nothing else."""
    write_demo(workdir)
    result = cli("make", "count")
    assert result.exit_code == 0, result.output
    assert read(workdir / "out" / "x.txt") == "HELLO\n"
    assert read(workdir / "out" / "count.txt").strip() == "6"
    assert not (workdir / "out" / "other.txt").exists()
    assert summary(result.stdout).startswith("pipebuild: 2 ran")


def test_make_file_option_uses_another_pipefile(cli, workdir):
    """Given -f other.py and no Pipefile.py, we should load and build other.py."""
    write_demo(workdir, name="other.py")
    assert cli("make").exit_code == 2  # no Pipefile.py here
    result = cli("make", "-f", "other.py")
    assert result.exit_code == 0, result.output
    assert read(workdir / "out" / "x.txt") == "HELLO\n"
    listing = cli("list", "--file", "other.py")
    assert listing.exit_code == 0, listing.output
    assert "upper" in listing.stdout


def test_make_directory_option_builds_in_that_directory(cli, workdir):
    """Given -C dir, we should build the Pipefile there, with destinations and cache inside dir."""
    proj = workdir / "proj"
    write_demo(proj)
    result = cli("make", "-C", "proj")
    assert result.exit_code == 0, result.output
    assert read(proj / "out" / "x.txt") == "HELLO\n"
    assert (proj / ".pipebuild").is_dir()
    assert not (workdir / "out").exists()
    assert not (workdir / ".pipebuild").exists()
    again = cli("make", "--directory", str(proj))
    assert again.exit_code == 0, again.output
    assert summary(again.stdout).startswith("pipebuild: 0 ran")


def test_second_make_runs_nothing(cli, workdir):
    """Given a finished build and no change, we should run nothing the second time."""
    write_demo(workdir)
    assert cli("make").exit_code == 0
    result = cli("make")
    assert result.exit_code == 0, result.output
    assert summary(result.stdout).startswith("pipebuild: 0 ran, 0 restored, 3 up to date, 0 failed")
    assert "ran upper" not in result.stdout


# --------------------------------------------------------------------------------------
# Dry run, explain, force


@pytest.mark.parametrize("flag", ["-n", "--dry-run"])
def test_dry_run_lists_work_and_prints_a_script_without_building(cli, workdir, flag):
    """Given -n, we should list what would run and print a working script, creating no destination."""
    write_demo(workdir)
    result = cli("make", flag)
    assert result.exit_code == 0, result.output
    assert re.search(r"^run\s+upper\s+never built$", result.stdout, re.M), result.stdout
    assert re.search(r"^run\s+other\s+never built$", result.stdout, re.M), result.stdout
    assert re.search(r"^\S.*\bcount\b", result.stdout, re.M), result.stdout
    assert "3 of 3 tasks would run" in result.stdout
    assert not (workdir / "out").exists()
    script = result.stdout[result.stdout.index("#!/usr/bin/env bash") :]
    assert "set -euo pipefail" in script
    # The script builds the same outputs without pipebuild.
    (workdir / "build.sh").write_text(script)
    subprocess.run(["bash", str(workdir / "build.sh")], cwd=workdir, check=True, timeout=TIMEOUT)
    assert read(workdir / "out" / "x.txt") == "HELLO\n"
    assert read(workdir / "out" / "count.txt").strip() == "6"


def test_dry_run_after_a_build_would_run_nothing(cli, workdir):
    """Given an up-to-date build, we should have -n report zero tasks to run."""
    write_demo(workdir)
    assert cli("make").exit_code == 0
    result = cli("make", "-n")
    assert result.exit_code == 0, result.output
    assert "0 of 3 tasks would run" in result.stdout


def test_explain_gives_each_reason(cli, workdir):
    """Given builds after no change, an edited input, a deleted output and a new command, we should explain each."""
    write_demo(workdir)
    first = cli("make", "-j1", "--explain")
    assert first.exit_code == 0, first.output
    assert "ran upper: never built" in first.stdout
    assert "ran other: never built" in first.stdout

    second = cli("make", "--explain")
    assert "skipped upper: up to date" in second.stdout
    assert "skipped other: up to date" in second.stdout

    (workdir / "in.txt").write_text("hello again\n")
    third = cli("make", "--explain")
    assert third.exit_code == 0, third.output
    assert "ran upper: input changed: in.txt" in third.stdout
    assert "skipped other: up to date" in third.stdout
    assert read(workdir / "out" / "x.txt") == "HELLO AGAIN\n"

    (workdir / "out" / "other.txt").unlink()
    fourth = cli("make", "--explain")
    assert fourth.exit_code == 0, fourth.output
    assert "other: output missing: out/other.txt" in fourth.stdout
    assert read(workdir / "out" / "other.txt") == "other\n"

    (workdir / "Pipefile.py").write_text(demo("tr ln LN"))
    fifth = cli("make", "--explain")
    assert fifth.exit_code == 0, fifth.output
    assert "ran upper: command changed" in fifth.stdout
    assert read(workdir / "out" / "x.txt") == "heLLo agaiN\n"


@pytest.mark.parametrize("flag", ["-B", "--force"])
def test_force_reruns_everything(cli, workdir, flag):
    """Given an up-to-date build and -B, we should run every task again."""
    write_demo(workdir)
    assert cli("make").exit_code == 0
    result = cli("make", flag, "--explain")
    assert result.exit_code == 0, result.output
    assert summary(result.stdout).startswith("pipebuild: 3 ran, 0 restored, 0 up to date")
    assert "ran upper: forced" in result.stdout


# --------------------------------------------------------------------------------------
# status, list, clean, gc


def test_status_shows_stale_and_up_to_date_without_running(cli, workdir):
    """Given status before and after a build, we should report stale and up-to-date tasks and run nothing."""
    write_demo(workdir)
    before = cli("status")
    assert before.exit_code == 0, before.output
    assert re.search(r"^stale\s+upper\s+never built$", before.stdout, re.M), before.stdout
    assert "3 of 3 tasks stale" in before.stdout
    assert not (workdir / "out").exists()

    assert cli("make").exit_code == 0
    after = cli("status")
    assert re.search(r"^up to date\s+upper$", after.stdout, re.M), after.stdout
    assert "0 of 3 tasks stale" in after.stdout

    (workdir / "in.txt").write_text("changed!\n")
    changed = cli("status")
    assert re.search(r"^stale\s+upper\s+input changed: in.txt$", changed.stdout, re.M), changed.stdout
    assert re.search(r"^up to date\s+other\b", changed.stdout, re.M), changed.stdout
    assert read(workdir / "out" / "x.txt") == "HELLO\n"  # nothing ran


def test_list_shows_tasks_and_targets(cli, workdir):
    """Given the demo Pipefile, we should list each task with its destinations."""
    write_demo(workdir)
    result = cli("list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for name, target in [("upper", "out/x.txt"), ("count", "out/count.txt"), ("other", "out/other.txt")]:
        assert any(line.startswith(name) and target in line for line in lines), result.stdout
    assert not (workdir / "out").exists()


def test_clean_removes_destinations_and_make_restores_them(cli, workdir):
    """Given a build then clean, we should remove the destinations, and the next make should restore them."""
    write_demo(workdir)
    assert cli("make").exit_code == 0
    result = cli("clean")
    assert result.exit_code == 0, result.output
    assert "removed 3 output(s)" in result.stdout
    for name in ("x.txt", "count.txt", "other.txt"):
        assert not (workdir / "out" / name).exists()
    again = cli("make", "--explain")
    assert again.exit_code == 0, again.output
    assert "restored upper" in again.stdout
    assert summary(again.stdout).startswith("pipebuild: 0 ran, 3 restored")
    assert read(workdir / "out" / "x.txt") == "HELLO\n"
    assert read(workdir / "out" / "count.txt").strip() == "6"


def test_gc_max_size_zero_empties_the_store_and_make_still_works(cli, workdir):
    """Given gc --max-size 0, we should empty the content store and later builds should still succeed."""
    write_demo(workdir)
    assert cli("make").exit_code == 0
    assert blobs(workdir)
    result = cli("gc", "--max-size", "0")
    assert result.exit_code == 0, result.output
    assert blobs(workdir) == []

    assert cli("make").exit_code == 0
    # count's cached output is gone, and so is upper's blob, which count reads.
    (workdir / "out" / "count.txt").unlink()
    rebuilt = cli("make")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert read(workdir / "out" / "count.txt").strip() == "6"

    assert cli("clean").exit_code == 0
    assert cli("gc", "--max-size", "0").exit_code == 0
    again = cli("make")
    assert again.exit_code == 0, again.output
    assert read(workdir / "out" / "x.txt") == "HELLO\n"
    assert read(workdir / "out" / "other.txt") == "other\n"


# --------------------------------------------------------------------------------------
# Unknown targets and definition errors


@pytest.mark.parametrize("target, suggestion", [("out/x.tx", "out/x.txt"), ("uper", "upper")])
def test_unknown_target_suggests_a_close_match(cli, workdir, target, suggestion):
    """Given a misspelt target, we should exit 2 with one line naming a close match."""
    write_demo(workdir)
    result = cli("make", target)
    assert result.exit_code == 2, result.output
    lines = err_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert f"'{target}'" in lines[0]
    assert f"'{suggestion}'" in lines[0]
    assert "Traceback" not in result.output
    assert not (workdir / "out").exists()


# Each case: Pipefile text (lines marked `# <-` are acceptable places), words the message must hold.
DEFINITION_ERRORS = {
    "syntax error": (
        """\
        from pipebuild import Pipeline
        p = Pipeline()
        x = (  # <-
        """,
        ["syntax error"],
    ),
    "exception at load": (
        """\
        from pipebuild import Pipeline
        p = Pipeline()
        1/0  # <-
        """,
        ["ZeroDivisionError"],
    ),
    "cycle": (
        """\
        from pipebuild import Pipeline
        p = Pipeline()
        alpha = p.new_task(name="alpha")  # <-
        alpha.command("echo a")
        beta = p.new_task(name="beta")  # <-
        beta.command("echo b")
        alpha.depends_on(beta)  # <-
        beta.depends_on(alpha)  # <-
        """,
        ["cycle detected in dependency graph", "alpha", "beta"],
    ),
    "missing input file": (
        """\
        from pipebuild import Pipeline
        p = Pipeline()
        x = p.read_input("nope/missing.txt")  # <-
        a = p.new_task(name="a")
        a.command(f"cat {x} > {a.ofile}")
        p.write_output(a.ofile, "out.txt")
        """,
        ["nope/missing.txt"],
    ),
    "undefined resource": (
        """\
        from pipebuild import Pipeline
        p = Pipeline()
        t1 = p.new_task(name="t1")
        t2 = p.new_task(name="t2")
        t1.command(f"cat {t2.later} > {t1.ofile}")  # <-
        t2.command(f"echo hi > {t2.later}")
        """,
        ["undefined resource", "'later'"],
    ),
    "task from another pipeline": (
        """\
        from pipebuild import Pipeline
        p = Pipeline()
        mine = p.new_task(name="mine")  # <-
        mine.command("echo a")
        def helper():
            q = Pipeline()
            foreign = q.new_task(name="foreign")
            foreign.command("echo b")
            return foreign
        mine.depends_on(helper())  # <-
        """,
        ["another pipeline", "mine", "foreign"],
    ),
    "duplicate destination": (
        """\
        from pipebuild import Pipeline
        p = Pipeline()
        a = p.new_task(name="a")  # <-
        a.command(f"echo a > {a.ofile}")
        b = p.new_task(name="b")  # <-
        b.command(f"echo b > {b.ofile}")
        p.write_output(a.ofile, "out/same.txt")  # <-
        p.write_output(b.ofile, "out/same.txt")  # <-
        """,
        ["duplicate output destination", "out/same.txt"],
    ),
    "destination inside .pipebuild": (
        """\
        from pipebuild import Pipeline
        p = Pipeline()
        a = p.new_task(name="a")  # <-
        a.command(f"echo a > {a.ofile}")
        p.write_output(a.ofile, ".pipebuild/evil.txt")  # <-
        """,
        [".pipebuild"],
    ),
    "no pipeline": ("x = 1\n", ["no Pipeline"]),
}


@pytest.mark.parametrize("case", list(DEFINITION_ERRORS))
def test_definition_error_is_one_line_with_place(cli, workdir, case):
    """Given an ill-defined Pipefile, we should exit 2 with one line naming Pipefile.py:<line>, no traceback."""
    text, words = DEFINITION_ERRORS[case]
    text = textwrap.dedent(text)
    (workdir / "Pipefile.py").write_text(text)
    result = cli("make", "-j1")
    assert result.exit_code == 2, result.output
    lines = err_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert "Traceback" not in result.output
    for word in words:
        assert word in line, line
    places = [i for i, src in enumerate(text.splitlines(), 1) if "# <-" in src]
    if places:
        m = re.search(r"Pipefile\.py:(\d+)", line)
        assert m is not None, f"no Pipefile.py:<line> in {line!r}"
        assert int(m.group(1)) in places, f"{line!r} should point at one of lines {places}"
    assert not (workdir / "out").exists()
    assert not (workdir / "out.txt").exists()


def test_no_pipefile_in_directory_is_one_line_exit_2(cli, workdir):
    """Given a directory without Pipefile.py, we should exit 2 with one line saying so."""
    result = cli("make")
    assert result.exit_code == 2, result.output
    lines = err_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "no Pipefile.py" in lines[0]
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------------------
# Failures


def test_failed_task_report_names_task_exit_code_log_and_stderr(cli, workdir):
    """Given a task that prints boom and exits 3, we should exit 1 and report its name, code, log and stderr."""
    (workdir / "Pipefile.py").write_text(failing(workdir / "flag"))
    result = cli("make", "-j1")
    assert result.exit_code == 1, result.output
    assert any("bad" in line and "exit code 3" in line for line in result.stderr.splitlines()), result.stderr
    log = os.path.join(".pipebuild", "logs", "bad.err")
    assert log in result.stderr
    assert "boom" in result.stderr
    assert "boom" in read(workdir / log)
    assert "Traceback" not in result.output
    assert not (workdir / "out" / "bad.txt").exists()
    assert not (workdir / "out" / "down.txt").exists()


def test_failure_without_keep_going_starts_no_queued_task(cli, workdir):
    """Given -j1 and a failure, we should not start the independent task queued after it."""
    (workdir / "Pipefile.py").write_text(failing(workdir / "flag"))
    result = cli("make", "-j1")
    assert result.exit_code == 1, result.output
    assert not (workdir / "out" / "good.txt").exists()
    assert not (workdir / ".pipebuild" / "logs" / "good.out").exists()
    assert "ran good" not in result.stdout


def test_keep_going_runs_independent_tasks_not_downstream(cli, workdir):
    """Given -k and a failure, we should run the independent task and report the downstream one as not run."""
    (workdir / "Pipefile.py").write_text(failing(workdir / "flag"))
    result = cli("make", "-j1", "-k")
    assert result.exit_code == 1, result.output
    assert read(workdir / "out" / "good.txt") == "good\n"
    assert not (workdir / "out" / "down.txt").exists()
    assert not (workdir / "out" / "bad.txt").exists()
    assert re.search(r"not run down\b", result.stdout), result.stdout
    assert "1 not run" in summary(result.stdout)
    assert "1 failed" in summary(result.stdout)


def test_next_make_reruns_only_failed_task_and_downstream(cli, workdir):
    """Given a failed build then a fix outside the key, we should rerun only the failed task and its downstream."""
    flag = workdir / "flag"
    (workdir / "Pipefile.py").write_text(failing(flag))
    assert cli("make", "-j1", "-k").exit_code == 1
    flag.write_text("")
    result = cli("make", "-j1", "--explain")
    assert result.exit_code == 0, result.output
    assert "ran bad: failed last time" in result.stdout
    assert "ran down" in result.stdout
    assert "skipped good: up to date" in result.stdout
    assert summary(result.stdout).startswith("pipebuild: 2 ran, 0 restored, 1 up to date, 0 failed")
    assert read(workdir / "out" / "bad.txt") == "fixed\n"
    assert read(workdir / "out" / "down.txt") == "fixed\n"


def test_status_after_failure_says_failed_last_time(cli, workdir):
    """Given a failed build, we should show the failed task as stale because it failed last time."""
    (workdir / "Pipefile.py").write_text(failing(workdir / "flag"))
    assert cli("make", "-j1", "-k").exit_code == 1
    result = cli("status")
    assert result.exit_code == 0, result.output
    assert re.search(r"^stale\s+bad\s+failed last time$", result.stdout, re.M), result.stdout
    assert re.search(r"^up to date\s+good\b", result.stdout, re.M), result.stdout


# --------------------------------------------------------------------------------------
# Pipefiles that also run as scripts


@pytest.mark.parametrize("guarded", [True, False], ids=["main-guard", "bare-run"])
def test_loading_does_not_run_the_pipeline_but_python_does(cli, workdir, guarded):
    """Given a Pipefile that calls p.run(), we should not build when loading it, and python Pipefile.py should."""
    run_line = 'if __name__ == "__main__":\n    p.run()\n' if guarded else "p.run()\n"
    write_demo(workdir, demo() + run_line)
    listing = cli("list")
    assert listing.exit_code == 0, listing.output
    assert "upper" in listing.stdout
    assert not (workdir / "out").exists()
    assert not (workdir / ".pipebuild").exists()
    status = cli("status")
    assert status.exit_code == 0, status.output
    assert not (workdir / "out").exists()

    proc = subprocess.run(
        [sys.executable, "Pipefile.py"], cwd=workdir, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert read(workdir / "out" / "x.txt") == "HELLO\n"
    assert read(workdir / "out" / "other.txt") == "other\n"


# --------------------------------------------------------------------------------------
# The workspace lock


class HeldLock:
    """Holds `.pipebuild/lock` the way another pipebuild would."""

    def __init__(self, root: Path) -> None:
        self.fd = os.open(root / ".pipebuild" / "lock", os.O_RDWR)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def test_no_wait_exits_2_while_another_build_holds_the_lock(cli, workdir):
    """Given the workspace lock held elsewhere, we should exit 2 at once with one line about another pipebuild."""
    write_demo(workdir)
    assert cli("make").exit_code == 0
    (workdir / "in.txt").write_text("locked out\n")
    lock = HeldLock(workdir)
    try:
        t0 = time.monotonic()
        result = cli("make", "--no-wait")
        assert time.monotonic() - t0 < 10
        proc = run("script", "make", "--no-wait", cwd=workdir)
    finally:
        lock.release()
    assert result.exit_code == 2, result.output
    lines = err_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "another pipebuild" in lines[0]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert len(err_lines(proc.stderr)) == 1, proc.stderr
    assert "another pipebuild" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert read(workdir / "out" / "x.txt") == "HELLO\n"  # nothing ran
    after = cli("make", "--no-wait")
    assert after.exit_code == 0, after.output
    assert read(workdir / "out" / "x.txt") == "LOCKED OUT\n"


def test_make_waits_for_the_lock_then_finishes(cli, workdir):
    """Given the workspace lock held elsewhere, we should print 'waiting', wait, and build once it is released."""
    write_demo(workdir)
    assert cli("make").exit_code == 0
    (workdir / "in.txt").write_text("waited\n")
    lock = HeldLock(workdir)
    proc = subprocess.Popen([PIPEBUILD, "make"], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    waiting = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)
            if "waiting" in line:
                waiting.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert waiting.wait(TIMEOUT), f"no 'waiting' message: {err}"
        time.sleep(0.3)
        assert proc.poll() is None, "make did not wait for the lock"
        assert read(workdir / "out" / "x.txt") == "HELLO\n"
        lock.release()
        code = proc.wait(timeout=TIMEOUT)
    finally:
        lock.release()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(TIMEOUT)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    proc.stderr.close()  # type: ignore[union-attr]
    assert code == 0, (out, err)
    assert "another pipebuild" in "".join(err)
    assert read(workdir / "out" / "x.txt") == "WAITED\n"
