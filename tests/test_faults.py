"""Injected faults: a full disk while publishing, outputs of several GiB."""

from __future__ import annotations

import errno
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from pipebuild import Pipeline
from pipebuild import build as build_module
from pipebuild.build import Options, build


def pipeline(root, text):
    p = Pipeline()
    t = p.new_task("t")
    t.command(f"printf '{text}' > {t.ofile}")
    p.write_output(t.ofile, os.path.join(root, "out/result.txt"))
    return p


def test_disk_full_while_publishing_keeps_the_previous_output(tmp_path, monkeypatch):
    """Given ENOSPC halfway through copying a new output, the old destination should survive intact."""
    opts = Options(workspace=str(tmp_path), verbosity=-1)
    assert build(pipeline(tmp_path, "good"), opts).ran == ["t"]
    real_copy = build_module._copy  # what publish copies with

    def full_disk(src, dst, *a, **kw):
        with open(dst, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build_module, "_copy", full_disk)
    r = build(pipeline(tmp_path, "better"), opts)
    assert [f.name for f in r.failed] == ["t"] and "No space left on device" in r.failed[0].detail
    assert (tmp_path / "out/result.txt").read_text() == "good"
    assert not [n for n in os.listdir(tmp_path / "out") if n != "result.txt"], "a temp file was left behind"
    monkeypatch.setattr(build_module, "_copy", real_copy)
    r = build(pipeline(tmp_path, "better"), opts)
    assert r.ran == ["t"] and (tmp_path / "out/result.txt").read_text() == "better"


def test_outputs_of_several_gib_are_streamed(tmp_path):
    """Given a 3 GiB (sparse) output, pipebuild should hash, store and publish it in bounded memory."""
    (tmp_path / "Pipefile.py").write_text(
        "from pipebuild import Pipeline\n"
        "p = Pipeline()\n"
        "t = p.new_task('big')\n"
        "t.command(f'truncate -s 3G {t.ofile}')\n"
        "p.write_output(t.ofile, 'big.bin')\n"
    )
    code = (
        "import resource, subprocess, sys\n"
        "subprocess.run([sys.executable, '-m', 'pipebuild', 'make', '-q'], check=True)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    peak_kib = int(out.stdout.split()[-1])
    assert os.path.getsize(tmp_path / "big.bin") == 3 << 30
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib} KiB: the output was read into memory"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 2 << 20  # the test itself stayed small too


PIPEFILE = (
    "from pipebuild import Pipeline\n"
    "p = Pipeline()\n"
    "a = p.new_task('a')\n"
    "a.command(f'echo one > {a.ofile}')\n"
    "b = p.new_task('b')\n"
    "b.command(f'tr a-z A-Z < {a.ofile} > {b.ofile}')\n"
    "p.write_output(a.ofile, 'out/a.txt')\n"
    "p.write_output(b.ofile, 'out/b.txt')\n"
)


@pytest.mark.parametrize(
    "message", ["attempt to write a readonly database", "database or disk is full", "disk I/O error"]
)
@pytest.mark.parametrize("when", ["open", "write"])
def test_an_unwritable_cache_is_one_line_and_no_wrong_output(tmp_path, monkeypatch, message, when):
    """Given a cache that cannot be written (read-only, full disk), make should exit 2 with one line, no traceback."""
    from typer.testing import CliRunner

    from pipebuild import store
    from pipebuild.cli import app

    (tmp_path / "Pipefile.py").write_text(PIPEFILE)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["make", "-q", "-j1"]).exit_code == 0
    (tmp_path / "Pipefile.py").write_text(PIPEFILE.replace("echo one", "echo two"))

    def fail(*args, **kwargs):
        raise sqlite3.OperationalError(message)

    monkeypatch.setattr(store.Store, "_open" if when == "open" else "_record", fail)
    r = runner.invoke(app, ["make", "-q", "-j1"])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot" in lines[0] and "cache" in lines[0] and message in lines[0], r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    for name in ("a", "b"):  # each destination is either the old or the new, complete
        assert (tmp_path / f"out/{name}.txt").read_text() in ("one\n", "ONE\n", "two\n", "TWO\n")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["make", "-q", "-j1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out/a.txt").read_text() == "two\n" and (tmp_path / "out/b.txt").read_text() == "TWO\n"


def test_make_while_watch_builds_refuses_or_waits_and_loses_nothing(tmp_path):
    """Given `watch` in the middle of a build, make --no-wait should refuse in one line, and make afterwards do nothing."""
    marker = f"sleep 3.{os.getpid()}"
    (tmp_path / "Pipefile.py").write_text(
        "from pipebuild import Pipeline\n"
        "p = Pipeline()\n"
        "t = p.new_task('slow')\n"
        f"t.command(f'{marker}; echo done > {{t.ofile}}')\n"
        "p.write_output(t.ofile, 'out.txt')\n"
    )
    watch = subprocess.Popen(
        [sys.executable, "-m", "pipebuild", "watch", "-q"], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode != 0:
            assert watch.poll() is None, "watch exited"
            assert time.monotonic() < deadline, "watch never started its build"
            time.sleep(0.05)
        make = [sys.executable, "-m", "pipebuild", "make"]
        r = subprocess.run([*make, "--no-wait"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "another pipebuild" in r.stderr, r.stdout + r.stderr
        assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1
        r = subprocess.run(make, cwd=tmp_path, capture_output=True, text=True, timeout=60)  # waits for watch
        assert r.returncode == 0, r.stdout + r.stderr
        assert "0 ran" in r.stdout and (tmp_path / "out.txt").read_text() == "done\n"
    finally:
        watch.send_signal(signal.SIGINT)
        try:
            watch.wait(timeout=30)
        except subprocess.TimeoutExpired:
            watch.kill()
    assert watch.returncode == 130
