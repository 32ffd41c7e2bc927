"""The typer-free entry point (pipebuild/fastmake.py) parses `make` argv as typer does.

Oracle: the keywords cli.make receives from typer for the same argv, and for argv the fast
path must not take, that it hands them to typer (returns None). A subprocess check makes
sure `pipebuild make` does not import typer at all.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pipebuild import cli, fastmake

PIPEBUILD = str(Path(sys.executable).parent / "pipebuild")

HANDLED = [
    ["make"],
    ["make", "-j", "3"],
    ["make", "-j2", "-q"],
    ["make", "--jobs=4", "-k", "--explain"],
    ["make", "out/a.txt", "-B", "t2"],
    ["make", "-v", "--no-wait", "--json"],
    ["make", "-f", "Other.py", "-C", "sub", "x"],
    ["make", "--file", "P.py", "--directory=d", "--keep-going", "--quiet", "--verbose", "--force"],
    ["make", "-j", "1", "-j", "2"],
]

NOT_HANDLED = [
    [],
    ["list"],
    ["make", "-n"],
    ["make", "--dry-run"],
    ["make", "--remote-cache", "gs://b/p"],
    ["make", "--remote-cache-read-only"],
    ["make", "--backend", "batch"],
    ["make", "--backend=local"],
    ["make", "--help"],
    ["make", "-kq"],
    ["make", "-j", "x"],
    ["make", "-j"],
    ["make", "--unknown"],
    ["make", "--quiet=1"],
    ["make", "--", "x"],
]


@pytest.mark.parametrize("argv", HANDLED, ids=" ".join)
def test_fast_path_parses_make_argv_as_typer_does(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a make argv, typer's parse and the fast parse must agree on every option.
    opts = fastmake.parse(argv)
    assert opts is not None
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(cli, "_load", lambda file, directory: calls.append({"file": file, "directory": directory}))
    monkeypatch.setattr(cli, "default_jobs", lambda pipeline, jobs: jobs)
    monkeypatch.setattr(cli, "_build_options", lambda *a, **k: calls.append({"a": a, "k": k}) or _stop())
    CliRunner().invoke(cli.app, argv)
    typer_load, typer_opts = calls
    jobs, keep_going, explain, verbosity, targets = typer_opts["a"]
    more = typer_opts["k"]
    assert opts.get("jobs") == jobs
    assert bool(opts.get("keep_going")) == keep_going
    assert bool(opts.get("explain")) == explain
    fast_verbosity = -1 if opts.get("quiet") else (1 if opts.get("verbose") else 0)
    assert fast_verbosity == verbosity
    assert (opts["targets"] or None) == targets
    assert opts.get("file") == typer_load["file"]
    assert opts.get("directory") == typer_load["directory"]
    force = bool(opts.get("force"))
    assert (force and not opts["targets"]) == more["force_all"]
    assert (list(opts["targets"]) if force and opts["targets"] else []) == more["force"]  # type: ignore[call-overload]
    assert (not opts.get("no_wait")) == more["wait"]


def _stop() -> None:
    raise SystemExit(0)


@pytest.mark.parametrize("argv", NOT_HANDLED, ids=lambda a: " ".join(a) or "(none)")
def test_fast_path_leaves_other_argv_to_typer(argv: list[str]) -> None:
    assert fastmake.parse(argv) is None


def test_make_does_not_import_typer(tmp_path: Path) -> None:
    # Given a one-task project, `pipebuild make` builds it without importing typer or rich,
    # and the no-op after it imports neither sqlite_utils (only a new cache needs it) nor click.
    (tmp_path / "Pipefile.py").write_text(
        "from pipebuild import Pipeline\n"
        "p = Pipeline()\n"
        "t = p.new_task(name='t')\n"
        "t.command(f'echo hi > {t.ofile}')\n"
        "p.write_output(t.ofile, 'out.txt')\n"
    )
    code = (
        "import sys\n"
        "banned = sys.argv[1:]\n"
        "from pipebuild import fastmake\n"
        "assert fastmake.run(fastmake.parse(['make', '-q'])) == 0\n"  # what main() runs
        "bad = [m for m in banned if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code, "typer", "rich"], cwd=tmp_path, check=True, timeout=60)
    assert (tmp_path / "out.txt").read_text() == "hi\n"
    no_op = [sys.executable, "-c", code, "typer", "rich", "click", "sqlite_utils"]
    subprocess.run(no_op, cwd=tmp_path, check=True, timeout=60)


def test_fast_path_errors_are_one_line(tmp_path: Path) -> None:
    # Given no Pipefile, the fast path says so in one line with exit status 2, as typer's does.
    r = subprocess.run([PIPEBUILD, "make", "-j", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("pipebuild: no Pipefile.py in ") and r.stderr.count("\n") == 1
    r = subprocess.run([PIPEBUILD, "make", "-j", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (2, "pipebuild: -j must be at least 1, not 0\n")


@pytest.mark.parametrize("path", ["fast", "typer"])
def test_make_without_j_takes_jobs_from_the_pipefile_backend(
    path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given LocalBackend(jobs=3) in the Pipefile, both entry points build with 3 slots, and -j wins.
    from pipebuild import build

    (tmp_path / "Pipefile.py").write_text(
        "from pipebuild import LocalBackend, Pipeline\n"
        "p = Pipeline(backend=LocalBackend(jobs=3))\n"
        "t = p.new_task(name='t')\n"
        "t.command(f'echo hi > {t.ofile}')\n"
        "p.write_output(t.ofile, 'out.txt')\n"
    )
    seen: list[int] = []

    class Done:
        def raise_for_failure(self) -> None:
            pass

    monkeypatch.setattr(build, "build", lambda pipeline, opts: seen.append(opts.jobs) or Done())
    monkeypatch.chdir(tmp_path)
    for argv in (["make"], ["make", "-j", "2"]):
        if path == "fast":
            opts = fastmake.parse(argv)
            assert opts is not None
            assert fastmake.run(opts) == 0
        else:
            assert CliRunner().invoke(cli.app, argv).exit_code == 0
    assert seen == [3, 2]


def test_a_closed_stdout_ends_make_quietly(tmp_path: Path) -> None:
    # Given `pipebuild make | head -1`, the fast path exits 1 without a traceback, as typer's does.
    (tmp_path / "Pipefile.py").write_text(
        "from pipebuild import Pipeline\n"
        "p = Pipeline()\n"
        "for i in range(40):\n"
        "    t = p.new_task(name=f't{i}')\n"
        "    t.command(f'sleep 0.02; echo {i} > {t.ofile}')\n"
        "    p.write_output(t.ofile, f'out/{i}.txt')\n"
    )
    r = subprocess.run(
        ["bash", "-c", f'"{PIPEBUILD}" make -j 2 | head -1 >/dev/null; echo "status=${{PIPESTATUS[0]}}" >&2'],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "CI": "true"},
    )  # fmt: skip
    assert r.stderr == "status=1\n"


def test_a_closed_stdout_after_quiet_make_ends_quietly(tmp_path: Path) -> None:
    # Given a Pipefile that prints and `make -q` whose reader is gone before make exits,
    # the output left in the buffer cannot be written: exit 1 without a message, not 120.
    (tmp_path / "Pipefile.py").write_text(
        "from pipebuild import Pipeline\n"
        "print('defining the pipeline')\n"
        "p = Pipeline()\n"
        "t = p.new_task(name='t')\n"
        "t.command(f'echo hi > {t.ofile}')\n"
        "p.write_output(t.ofile, 'out.txt')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    script = f'"{PIPEBUILD}" make -q | (exec 0<&-; sleep 0.5); echo "status=${{PIPESTATUS[0]}}" >&2'
    for _ in range(2):  # a build, then a certified no-op
        r = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
        assert r.stderr == "status=1\n", r.stderr
