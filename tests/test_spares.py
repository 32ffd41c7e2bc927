"""Spare task directories: reused within a build and kept for the next one (spares.py)."""

from __future__ import annotations

import json
import os

from pipebuild import Pipeline
from pipebuild.build import Options, build
from pipebuild.graph import plan
from pipebuild.spares import MANIFEST, Spares, adopt
from pipebuild.workspace import Workspace


def gather(root: str) -> Pipeline:
    """Three tasks that each write `ofile`, and a gather of the three that reports the inode
    numbers of its directory and of in/1/ on stderr."""
    p = Pipeline(name="gather")
    parts = []
    for i in range(3):
        t = p.new_task(name=f"part{i}")
        t.command(f"echo {i} > {t.ofile}")
        parts.append(t.ofile)
    g = p.new_task(name="gather")
    g.command(f"cat {' '.join(parts)} > {g.ofile}; stat -c %i . in/1 >&2")
    p.write_output(g.ofile, os.path.join(root, "all.txt"))
    return p


def manifest(root) -> list:
    with open(os.path.join(root, ".pipebuild/spares", MANIFEST)) as f:
        return json.load(f)


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


def test_the_next_build_adopts_at_most_keep_spares_newest_first(tmp_path):
    """Given five spares returned to a pool that keeps three, closing it should remove the
    two oldest and list the rest; adopting should return those three and remove anything
    else in the directory."""
    d = tmp_path / "spares"
    d.mkdir()
    pool = Spares(str(d), [], keep=3)
    for i in range(5):
        work = tmp_path / f"t{i}"
        (work / "in").mkdir(parents=True)
        pool.give(str(work), frozenset({"in"}))
    pool.close()
    assert sorted(os.listdir(d), key=str) == ["3", "4", "5", MANIFEST]
    (d / "junk").mkdir()
    kept = adopt(str(d), trusted=True)
    assert sorted(os.path.basename(p) for p, _ in kept) == ["3", "4", "5"]
    assert sorted(os.listdir(d)) == ["3", "4", "5"]  # the manifest is read once
    assert Spares(str(d), kept, keep=3).take(str(tmp_path / "w"), {"in"})
    assert adopt(str(d), trusted=True) == []  # no manifest: nothing is trusted
    assert os.listdir(d) == []
