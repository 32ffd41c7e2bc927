"""Spare task directories: reused within a build and kept for the next one (spares.py)."""

from __future__ import annotations

import json
import os
import time

import pytest

from pipebuild import Pipeline
from pipebuild.build import Options, build
from pipebuild.graph import plan
from pipebuild.spares import MANIFEST, Spares, adopt
from pipebuild.workspace import Workspace


def gather(root: str, n: int = 3) -> Pipeline:
    """`n` tasks that each write `ofile`, and a gather of them into all.txt that reports
    the inode numbers of its directory and of in/1/ on stderr."""
    p = Pipeline(name="gather")
    parts = []
    for i in range(n):
        t = p.new_task(name=f"part{i}")
        t.command(f"echo {i} > {t.ofile}")
        parts.append(t.ofile)
    g = p.new_task(name="gather")
    g.command(f"cat {' '.join(parts)} > {g.ofile}; stat -c %i . in/1 >&2")
    p.write_output(g.ofile, os.path.join(root, "all.txt"))
    return p


def manifest(root) -> list:
    return manifest_at(os.path.join(root, ".pipebuild/spares"))


def test_a_gather_run_again_in_the_next_build_gets_its_directory_back(tmp_path):
    """Given a gather of three files all called ofile (in/ofile, in/1/ofile, in/2/ofile),
    run again by the next build, it should get the same directory and subdirectories:
    the build listed it as a spare, and the next one made no new directory for it."""
    root = str(tmp_path)
    r = build(gather(root), Options(workspace=root, verbosity=-1))
    assert r.ok, r.failed
    first = (tmp_path / ".pipebuild/logs/gather.err").read_text().split()
    assert ["in", "in/1", "in/2", "out"] in [dirs for _, dirs in manifest(root)]
    assert os.listdir(tmp_path / ".pipebuild/tmp") == []

    r = build(gather(root), Options(workspace=root, verbosity=-1, force=["gather"]))
    assert r.ran == ["gather"], r.ran
    assert (tmp_path / ".pipebuild/logs/gather.err").read_text().split() == first
    assert (tmp_path / "all.txt").read_text() == "0\n1\n2\n"


def test_a_wide_gather_that_never_ran_finds_its_directory_made(tmp_path, monkeypatch):
    """Given a clean build of a gather of 70 files all called ofile, the gather's task
    directory and its 71 subdirectories should have been made ahead (as a spare) while
    the 70 tasks ran: no mkdir under tmp/gather/ itself."""
    p = gather(str(tmp_path), 70)
    made: list[str] = []
    mkdir = os.mkdir

    def counting_mkdir(path, *args, **kwargs):
        made.append(str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", counting_mkdir)
    r = build(p, Options(workspace=str(tmp_path), verbosity=-1))
    assert r.ok and len(r.ran) == 71
    assert (tmp_path / "all.txt").read_text() == "".join(f"{i}\n" for i in range(70))
    gather_dir = str(tmp_path / ".pipebuild/tmp/gather")
    assert [m for m in made if m == gather_dir or m.startswith(gather_dir + "/")] == []
    assert sum(m.startswith(str(tmp_path / ".pipebuild/spares/")) for m in made) >= 72


def test_a_task_that_needs_a_layout_still_being_made_waits_for_it(tmp_path):
    """Given make_ahead of a layout of 3,000 directories and, at once, a task that needs
    exactly that layout, the task should get that spare (finished by the thread making
    it), not start a directory of its own beside it."""
    spares_dir = tmp_path / "spares"
    spares_dir.mkdir()
    layout = frozenset(["in"] + [f"in/{i}" for i in range(1, 3000)] + ["out"])
    spares = Spares(str(spares_dir), [], keep=4)
    spares.make_ahead([layout])
    workdir = tmp_path / "task"
    assert spares.take(str(workdir), set(layout))
    found = {os.path.relpath(os.path.join(d, n), workdir) for d, names, _ in os.walk(workdir) for n in names}
    assert found == set(layout)
    spares.close()
    assert manifest_at(str(spares_dir)) == []  # the one it made was taken


def test_spares_of_a_build_that_did_not_end_are_removed(tmp_path):
    """Given a build killed with -9 (its `building` marker left), the next build should not
    trust the spares it listed and remove them all; after a build that ended, it keeps them."""
    root = str(tmp_path)
    assert build(gather(root), Options(workspace=root, verbosity=-1)).ok
    ws = Workspace(str(tmp_path / ".pipebuild"))
    names = sorted(name for name, _ in manifest(root))
    ws.recover(plan(gather(root), root, ws.dir))
    assert sorted(os.path.basename(path) for path, _ in ws.kept_spares) == names
    ws.finish()
    assert build(gather(root), Options(workspace=root, verbosity=-1, force=["gather"])).ok  # lists them again
    assert manifest(root)

    (tmp_path / ".pipebuild/building").touch()
    ws.recover(plan(gather(root), root, ws.dir))
    assert ws.kept_spares == [] and os.listdir(tmp_path / ".pipebuild/spares") == []
    ws.finish()
    r = build(gather(root), Options(workspace=root, verbosity=-1, force=["gather"]))
    assert r.ran == ["gather"], r.ran
    assert (tmp_path / "all.txt").read_text() == "0\n1\n2\n"


def test_a_spare_that_is_not_as_listed_is_not_used_as_it_is(tmp_path):
    """Given a listed spare whose in/1/ was removed, the task that takes it should still
    get exactly the directories it needs (a new directory), and build."""
    root = str(tmp_path)
    assert build(gather(root), Options(workspace=root, verbosity=-1)).ok
    [name] = [n for n, dirs in manifest(root) if "in/1" in dirs]
    os.rmdir(tmp_path / ".pipebuild/spares" / name / "in/1")

    p = gather(root)
    r = build(p, Options(workspace=root, verbosity=-1, force=["gather"]))
    assert r.ok and r.ran == ["gather"], (r.ran, r.failed)
    assert (tmp_path / "all.txt").read_text() == "0\n1\n2\n"
    assert os.listdir(tmp_path / ".pipebuild/tmp") == []


MODES = "stat -c '%n %a %F' . in out"


def two_tasks(root: str, first: str, with_b: bool = True) -> Pipeline:
    """Task a runs `first` after writing its output; task b, after it, lists the mode and
    type of its own directory, in/ and out/ into b.txt."""
    p = Pipeline(name="modes")
    src = os.path.join(root, "src.txt")
    with open(src, "w") as f:
        f.write("x\n")
    a = p.new_task(name="a")
    a.command(f"cat {p.read_input(src)} > {a.ofile}; {first}")
    p.write_output(a.ofile, os.path.join(root, "a.txt"))
    if with_b:
        b = p.new_task(name="b")
        b.command(f"cat {p.read_input(src)} > /dev/null; {MODES} > {b.ofile}")
        b.depends_on(a)
        p.write_output(b.ofile, os.path.join(root, "b.txt"))
    return p


NEW = ". 755 directory\nin 755 directory\nout 755 directory\n"  # (umask 022)


@pytest.mark.parametrize(
    "first",
    ["chmod 700 . in out", "mkdir ../../x && mv out/ofile ../../x/ && rmdir out && ln -s ../../x out"],
    ids=["chmod", "symlink"],
)
def test_a_directory_a_task_changed_is_not_handed_on(tmp_path, first):
    """Given task a that chmods its directory, or makes out/ a symlink to a directory
    elsewhere (its output still read through it), and then ends as emptied as a spare,
    task b, run next, should get directories as mkdir makes them, not a's."""
    root = str(tmp_path)
    old = os.umask(0o022)
    try:
        r = build(two_tasks(root, first), Options(workspace=root, verbosity=-1))
    finally:
        os.umask(old)
    assert r.ok, r.failed
    assert (tmp_path / "a.txt").read_text() == "x\n"
    assert (tmp_path / "b.txt").read_text() == NEW


def test_a_spare_made_under_another_umask_is_not_taken(tmp_path):
    """Given spares left by a build under umask 077, a task of the next build, under umask
    022, should get 755 directories, as a clean build gives it."""
    root = str(tmp_path)
    old = os.umask(0o077)
    try:
        assert build(two_tasks(root, "true", with_b=False), Options(workspace=root, verbosity=-1)).ok
        assert manifest(root)
        os.umask(0o022)
        r = build(two_tasks(root, "true"), Options(workspace=root, verbosity=-1))
    finally:
        os.umask(old)
    assert r.ok, r.failed
    assert (tmp_path / "b.txt").read_text() == NEW


def spare(tmp_path, name: str, dirs: list[str]) -> tuple[str, frozenset[str]]:
    path = tmp_path / "spares" / name
    path.mkdir(parents=True)
    for d in sorted(dirs, key=len):
        (path / d).mkdir()
    return str(path), frozenset(dirs)


def test_a_task_takes_the_spare_closest_to_what_it_needs(tmp_path):
    """Given a small spare and one with 50 subdirectories, a task that needs in/ and out/
    should take the small one and leave the big one; with only the big one left, it should
    make a new directory rather than remove 49 subdirectories."""
    big = spare(tmp_path, "1", ["in", "out"] + [f"in/{k}" for k in range(1, 49)])
    small = spare(tmp_path, "2", ["in"])
    pool = Spares(str(tmp_path / "spares"), [small, big], keep=4)
    work = tmp_path / "work"
    assert pool.take(str(work), {"in", "out"})
    assert sorted(os.listdir(work)) == ["in", "out"]
    assert os.path.isdir(big[0]) and not os.path.exists(small[0])
    assert not pool.take(str(tmp_path / "work2"), {"in", "out"})
    assert os.path.isdir(big[0])
    assert pool.take(str(tmp_path / "work3"), set(big[1]) | {"in/49"})
    assert sorted(os.listdir(tmp_path / "work3/in"), key=int) == [str(k) for k in range(1, 50)]


def test_a_layout_made_ahead_is_the_spare_its_task_takes(tmp_path):
    """Given a layout of 100 subdirectories made ahead, a task needing it should take that
    spare as it is; closing the pool while a layout is being made should stop the thread
    and list only what was made, parents before children."""
    layout = frozenset({"in", "out"} | {f"in/{k}" for k in range(1, 99)})
    pool = Spares(str(tmp_path / "spares"), [], keep=4)
    (tmp_path / "spares").mkdir()
    pool.make_ahead([layout])
    assert pool._ahead is not None
    pool._ahead.join()
    [(path, has)] = pool._pool
    assert has == layout
    ino = os.stat(os.path.join(path, "in/98")).st_ino
    work = tmp_path / "gather"
    assert pool.take(str(work), set(layout))
    assert os.stat(work / "in/98").st_ino == ino and pool._pool == []

    huge = frozenset({"in", "out"} | {f"in/{k}" for k in range(1, 20000)})
    pool = Spares(str(tmp_path / "spares"), [], keep=4)
    pool.make_ahead([huge])
    deadline = time.monotonic() + 10
    while not os.path.isdir(tmp_path / "spares" / "1" / "in/1") and time.monotonic() < deadline:
        time.sleep(0.001)  # under way: some of it made, not all (20,000 mkdirs take far longer)
    pool.close()
    [[name, listed]] = manifest_at(tmp_path / "spares")
    assert set(listed) < huge and ("in" in listed or listed == [])  # stopped part of the way
    assert all(os.path.dirname(d) in ("", *listed) for d in listed)
    assert sorted(_walk(tmp_path / "spares" / name)) == sorted(listed)


def manifest_at(d) -> list:
    with open(os.path.join(d, MANIFEST)) as f:
        return json.load(f)


def _walk(root) -> list[str]:
    return [os.path.relpath(os.path.join(dp, d), root) for dp, dns, _ in os.walk(root) for d in dns]


def test_the_next_build_adopts_at_most_keep_spares_smallest_and_oldest_dropped(tmp_path):
    """Given five spares returned to a pool that keeps three, closing it should remove the
    two oldest of the smallest and list the rest (a large one stays however old); adopting
    should return those three and remove anything else in the directory."""
    d = tmp_path / "spares"
    d.mkdir()
    pool = Spares(str(d), [], keep=3)
    for i in range(5):
        work = tmp_path / f"t{i}"
        (work / "in").mkdir(parents=True)
        dirs = {"in"}
        if i == 0:
            for k in range(1, 5):
                (work / f"in/{k}").mkdir()
            dirs |= {f"in/{k}" for k in range(1, 5)}
        pool.give(str(work), frozenset(dirs))
    pool.close()
    assert sorted(os.listdir(d), key=str) == ["1", "4", "5", MANIFEST]
    (d / "junk").mkdir()
    kept = adopt(str(d), trusted=True)
    assert sorted(os.path.basename(p) for p, _ in kept) == ["1", "4", "5"]
    assert sorted(os.listdir(d)) == ["1", "4", "5"]  # the manifest is read once
    assert Spares(str(d), kept, keep=3).take(str(tmp_path / "w"), {"in"})
    assert adopt(str(d), trusted=True) == []  # no manifest: nothing is trusted
    assert os.listdir(d) == []
