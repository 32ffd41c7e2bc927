"""The no-op certificate (pipebuild/noop.py): a whole build shown up to date by one stat per file.

Oracle: the full build. Whenever the certificate is used, the full build would have skipped
every task; whenever anything it covers changes, it must not be used (the build then runs
the usual way and counts its queries). tests/test_property.py checks the same against its
model of random edits, with the certificate in place before half of them.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipebuild import Pipeline, noop, pipeline, resource, task
from pipebuild.build import Options, build
from pipebuild.executors import FakeExecutor
from pipebuild.rebuild import Reason
from pipebuild.store import Store

PIPEBUILD = str(Path(sys.executable).parent / "pipebuild")


def fresh_counters() -> None:
    """Count uids from 0, as a new process does."""
    resource._file_counter = itertools.count()
    resource._group_counter = itertools.count()
    task._task_counter = itertools.count()
    pipeline._pipeline_counter = itertools.count()


def define(tweak: Callable[[Pipeline, dict[str, task.Task]], None] | None = None) -> Pipeline:
    """A small pipeline (two sources, three tasks, a group, a copied input), optionally tweaked."""
    fresh_counters()
    p = Pipeline(name="n")
    a = p.read_input("src/a.txt")
    b = p.read_input("src/b.txt")
    p.write_output(b, "out/b-copy.txt")
    up = p.new_task("upper")
    up.command(f"tr a-z A-Z < {a} > {up.ofile}")
    pair = p.new_task("pair")
    pair.declare_resource_group(both={"x": "{root}.x", "y": "{root}.y"})
    pair.command(f"cat {up.ofile} > {pair.both.x}; cat {b} > {pair.both.y}")
    join = p.new_task("join")
    join.command(f"cat {pair.both.x} {pair.both.y} > {join.ofile}")
    p.write_output(up.ofile, "out/upper.txt")
    p.write_output(join.ofile, "out/join.txt")
    if tweak is not None:
        tweak(p, {"upper": up, "pair": pair, "join": join})
    return p


def fp(p: Pipeline, root: str = "/w", targets: list[str] | None = None, remote: str | None = None) -> str | None:
    return noop.fingerprint(p, root, root + "/.pipebuild", targets, remote, False)


def write_sources(root: Path) -> None:
    (root / "src").mkdir(exist_ok=True)
    (root / "src" / "a.txt").write_text("alpha\n")
    (root / "src" / "b.txt").write_text("beta\n")


def age(root: Path) -> None:
    """Move every source's and output's mtime 10 s back (see test_property.age)."""
    for sub in ("src", "out"):
        for f in (root / sub).iterdir():
            st = f.stat()
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))


def run(root: Path, p: Pipeline | None = None, **kw: object):
    return build(p or define(), Options(workspace=str(root), verbosity=-1, **kw))  # type: ignore[arg-type]


def certified(root: Path):
    """A built workspace whose last build wrote a certificate."""
    write_sources(root)
    assert len(run(root).ran) == 3
    age(root)
    r = run(root)  # re-hashes what age() moved, now outside the racy window
    assert (r.ran, r.restored, r.queries > 0) == ([], [], True)
    assert (root / ".pipebuild" / "noop").exists()
    return r


# -- using it --------------------------------------------------------------------------


def test_certified_noop_reads_no_trace_and_hashes_nothing(tmp_path):
    """Given a certified workspace, a no-op build should issue no query and hash nothing."""
    full = certified(tmp_path)
    r = run(tmp_path)
    assert r.up_to_date == full.up_to_date == ["upper", "pair", "join"]
    assert (r.ran, r.restored, r.failed, r.not_run) == ([], [], [], [])
    assert (r.queries, r.hashed) == (0, 0)
    assert r.reasons == dict.fromkeys(r.up_to_date, Reason.UP_TO_DATE)
    assert noop.UP_TO_DATE == Reason.UP_TO_DATE


def test_certificate_is_per_target_selection(tmp_path):
    """Given a certificate for the whole build, a build of one target should not use it."""
    certified(tmp_path)
    r = run(tmp_path, targets=["upper"])
    assert (r.up_to_date, r.queries > 0) == (["upper"], True)
    r = run(tmp_path, targets=["upper"])  # that build certified its own selection
    assert (r.up_to_date, r.queries) == (["upper"], 0)


def test_force_ignores_the_certificate(tmp_path):
    """Given a certified workspace, -B should run every task."""
    certified(tmp_path)
    assert len(run(tmp_path, force_all=True).ran) == 3


@pytest.mark.parametrize(
    "change, expect",
    [
        ("source-edit", {"ran": ["upper", "pair", "join"]}),
        ("source-touch", {"ran": []}),
        ("dest-edit", {"restored": ["join"]}),
        ("dest-delete", {"restored": ["upper"]}),
        ("copy-delete", {"ran": []}),
    ],
)
def test_any_changed_file_voids_the_certificate(tmp_path, change, expect):
    """Given a certified workspace, a changed file should send the build the full way."""
    certified(tmp_path)
    if change == "source-edit":
        (tmp_path / "src" / "a.txt").write_text("alpha, edited\n")
    elif change == "source-touch":
        os.utime(tmp_path / "src" / "a.txt")
    elif change == "dest-edit":
        (tmp_path / "out" / "join.txt").write_text("edited by hand\n")
    elif change == "dest-delete":
        (tmp_path / "out" / "upper.txt").unlink()
    else:
        (tmp_path / "out" / "b-copy.txt").unlink()
    r = run(tmp_path)
    assert r.queries > 0
    assert r.ran == expect.get("ran", [])
    assert r.restored == expect.get("restored", [])
    assert (tmp_path / "out" / "b-copy.txt").read_text() == "beta\n"
    assert (tmp_path / "out" / "upper.txt").read_text() == ("ALPHA, EDITED\n" if change == "source-edit" else "ALPHA\n")


def test_a_write_to_the_trace_store_voids_the_certificate(tmp_path):
    """Given a certified workspace, any write to the trace store should remove the certificate."""
    certified(tmp_path)
    store = Store(str(tmp_path / ".pipebuild" / "cache.sqlite"))
    try:
        store.forget_tasks(["join"])
    finally:
        store.close()
    assert not (tmp_path / ".pipebuild" / "noop").exists()
    r = run(tmp_path)  # the full way: join's trace is rewritten from the action cache
    assert (r.ran, r.up_to_date, r.queries > 0) == ([], ["upper", "pair", "join"], True)


@pytest.mark.parametrize("how", ["replaced", "overwritten"])
def test_a_replaced_trace_store_voids_the_certificate(tmp_path, how):
    """Given a certified workspace whose cache.sqlite is replaced (another inode) or
    overwritten in place (`cp other cache.sqlite`: the same inode), check should refuse."""
    certified(tmp_path)
    state = tmp_path / ".pipebuild"
    key = fp(define(), str(tmp_path)) or ""
    assert noop.check(str(state), key) is not None
    db = state / "cache.sqlite"
    data = db.read_bytes()
    if how == "replaced":
        copy = tmp_path / "copy.sqlite"
        copy.write_bytes(data)  # same bytes, another inode
        os.replace(copy, db)
    else:
        ino = db.stat().st_ino
        db.write_bytes(data + b"\0" * 4096)  # same inode, other bytes
        assert db.stat().st_ino == ino
    assert noop.check(str(state), key) is None


def test_a_home_directory_changed_within_a_process_is_seen(tmp_path, monkeypatch):
    """Given an input copied to `~/copy.txt`, a build in the same process under another HOME
    should copy it there, and its certificate should name that file (no cached old path)."""
    write_sources(tmp_path)
    homes = [tmp_path / "h1", tmp_path / "h2"]

    def home_copy(p: Pipeline, t: dict[str, task.Task]) -> None:
        p.write_output(p.read_input("src/a.txt"), "~/copy.txt")

    for home in homes:
        home.mkdir()
        monkeypatch.setenv("HOME", str(home))
        run(tmp_path, define(home_copy))
        assert (home / "copy.txt").read_text() == "alpha\n"
    (homes[1] / "copy.txt").unlink()
    r = run(tmp_path, define(home_copy))
    assert r.queries > 0 and (homes[1] / "copy.txt").read_text() == "alpha\n"


def test_a_pipefile_function_is_not_importable_by_name(tmp_path):
    """Given a Pipefile whose function a spawned process must import, the build should
    stop with one line (it cannot be pickled by name), not hang on a worker that fails."""
    (tmp_path / "Pipefile.py").write_text(
        "import multiprocessing as mp\n"
        "from pipebuild import Pipeline\n"
        "def sq(x):\n    return x * x\n"
        "with mp.get_context('spawn').Pool(1) as pool:\n    N = sum(pool.map(sq, range(3)))\n"
        "p = Pipeline()\nt = p.new_task(name='t')\n"
        "t.command(f'echo {N} > {t.ofile}')\np.write_output(t.ofile, 'out.txt')\n"
    )
    r = subprocess.run([PIPEBUILD, "make"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1 and "PicklingError" in r.stderr, r.stderr


def test_an_unfinished_build_voids_the_certificate(tmp_path):
    """Given a certified workspace and the marker a killed build leaves, check should refuse."""
    certified(tmp_path)
    state = str(tmp_path / ".pipebuild")
    key = fp(define(), str(tmp_path))
    assert key is not None and noop.check(state, key) == ["upper", "pair", "join"]
    (tmp_path / ".pipebuild" / "building").touch()
    assert noop.check(state, key) is None


def test_a_full_build_removes_the_certificate_before_it_starts(tmp_path):
    """Given a certified workspace, a build that cannot use it should remove it before any work."""
    certified(tmp_path)
    seen = []

    def tweak(p: Pipeline, t: dict[str, task.Task]) -> None:
        t["join"].command("true")

    def handler(job):
        seen.append((tmp_path / ".pipebuild" / "noop").exists())
        return 1  # fail: no certificate at the end either

    r = run(tmp_path, define(tweak), executor=FakeExecutor(handler))
    assert seen == [False] and [f.name for f in r.failed] == ["join"]
    assert not (tmp_path / ".pipebuild" / "noop").exists()


def test_racy_rows_are_not_certified(tmp_path):
    """Given a row hashed in the clock tick of its writing (inode -1), write should refuse."""
    state = tmp_path / ".pipebuild"
    state.mkdir()
    (state / "cache.sqlite").touch()
    assert noop.write(str(state), "0" * 32, ["t"], {"/x": (1, 2, 3)})
    assert noop.write(str(state), "0" * 32, ["t"], {"/x": (1, 2, -1)}) is False
    assert not (state / "noop").exists()


def test_no_certificate_when_a_file_read_is_also_written(tmp_path):
    """Given a task that reads an input copy's destination, the build should not certify:
    the row of that file is the copy's write, not the stat the task's decision read."""

    def copy_read(p: Pipeline, t: dict[str, task.Task]) -> None:
        c = p.read_input("out/b-copy.txt")
        reader = p.new_task("reader")
        reader.command(f"cat {c} > {reader.ofile}")
        p.write_output(reader.ofile, "out/reader.txt")

    write_sources(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b-copy.txt").write_text("beta\n")
    run(tmp_path, define(copy_read))
    age(tmp_path)
    run(tmp_path, define(copy_read))
    assert not (tmp_path / ".pipebuild" / "noop").exists()
    (tmp_path / "src" / "b.txt").write_text("beta 2\n")
    run(tmp_path, define(copy_read))  # copies the source; the reader saw the old copy
    r = run(tmp_path, define(copy_read))  # catches up, as without a certificate
    assert r.ran == ["reader"] and (tmp_path / "out" / "reader.txt").read_text() == "beta 2\n"


# -- the fingerprint -------------------------------------------------------------------


def _cmd(p, t):
    t["upper"].command("echo more")


def _name(p, t):
    t["join"].name = "join2"


def _dep(p, t):
    t["upper"].depends_on(t["join"])


def _ext(p, t):
    p.read_input("src/c", extension=".txt")


def _dest(p, t):
    p.write_output(t["upper"].ofile, "out/upper2.txt")


def _timeout(p, t):
    t["join"].timeout(5)


def _group_dest(p, t):
    p.write_output(t["pair"].both, "out/both")


def _input_group(p, t):
    p.read_input_group(x="src/a.txt", y="src/b.txt")


def _new_task(p, t):
    p.new_task("extra").command("true")


def _new_resource(p, t):
    t["join"].command(f"true > {t['join'].other}")


def _cpu(p, t):  # sizing is not part of any decision
    t["join"].cpu(2).memory("1G").storage("1G")


TWEAKS = [_cmd, _name, _dep, _ext, _dest, _timeout, _group_dest, _input_group, _new_task, _new_resource]


def test_the_same_definition_has_the_same_fingerprint():
    """Given the same Pipefile run twice (uids from 0), the fingerprints should be equal."""
    assert fp(define()) == fp(define()) is not None
    assert fp(define(_cpu)) == fp(define())


@pytest.mark.parametrize("tweak", TWEAKS, ids=lambda f: f.__name__.strip("_"))
def test_every_change_to_the_definition_changes_the_fingerprint(tweak):
    """Given one change through the API, the fingerprint should differ."""
    assert fp(define(tweak)) != fp(define())


def test_workspace_targets_and_remote_cache_change_the_fingerprint():
    """Given the same definition, another workspace, targets or remote cache should differ."""
    base = fp(define())
    assert fp(define(), root="/other") != base
    assert fp(define(), targets=["join"]) != base
    assert fp(define(), remote="gs://b/p") != base


def test_home_directory_is_part_of_the_fingerprint(monkeypatch):
    """Given `~` in a path, another HOME resolves it elsewhere: the fingerprint should differ;
    with `~user`, whose directory is not part of it, there should be none."""

    def home(p: Pipeline, t: dict[str, task.Task]) -> None:
        p.read_input("~/data.txt")

    monkeypatch.setenv("HOME", "/home/one")
    one = fp(define(home))
    monkeypatch.setenv("HOME", "/home/two")
    assert one is not None and fp(define(home)) != one
    assert fp(define(lambda p, t: p.read_input("~root/data.txt"))) is None
    assert fp(define(), targets=["~root/out"]) is None


@pytest.mark.parametrize("kind", ["image", "always_run", "gs-input", "gs-output"])
def test_no_certificate_where_a_decision_reads_more_than_files(kind):
    """Given an image (resolved by Docker each time), always_run or a gs:// path, there is none."""

    def tweak(p: Pipeline, t: dict[str, task.Task]) -> None:
        if kind == "image":
            t["join"].image("ubuntu:24.04")
        elif kind == "always_run":
            t["join"].always_run()
        elif kind == "gs-input":
            p.read_input("gs://bucket/x")
        else:
            p.write_output(t["join"].ofile, "gs://bucket/y")

    assert fp(define(tweak)) is None


def test_a_definition_it_cannot_read_has_no_fingerprint():
    """Given a definition mistake the full build reports (here a non-task dependency set
    behind the API's back), the fingerprint should be None, not a traceback."""

    def broken(p: Pipeline, t: dict[str, task.Task]) -> None:
        t["join"]._dependencies[object()] = None  # type: ignore[index]

    assert fp(define(broken)) is None


def test_every_attribute_of_the_api_objects_is_classified():
    """Each attribute of a Task or file is read by the fingerprint or listed as not read.

    A new attribute must be added to one of the two (noop.py), so that a change to it can
    never leave a stale certificate in use.
    """
    p = define()
    read = {
        "Task": {
            "_uid", "name", "_timeout", "_command", "_dependencies", "_inputs", "_resources", "_valid",
            "_image", "_always_run", "_internal_outputs", "_external_outputs",
        },
        "ResourceFile": {
            "_uid", "_value", "_extension", "_output_paths", "_source", "_resource_group", "_input_path",
        },
        "ResourceGroup": {"_uid", "_source", "_root", "_resources", "_output_paths"},
    }  # fmt: skip
    resources = list(p._resource_map.values())
    for kind, objs in (
        ("Task", p._tasks),
        ("ResourceFile", [r for r in resources if isinstance(r, resource.ResourceFile)]),
        ("ResourceGroup", [r for r in resources if isinstance(r, resource.ResourceGroup)]),
    ):
        assert objs
        not_read = noop.NOT_READ.get(kind, set())
        assert not read[kind] & not_read
        for obj in objs:
            attrs = set(vars(obj)) - {k for k, v in vars(obj).items() if isinstance(v, resource.Resource)}
            # ... and the defaults the classes hold (an attribute left at its default is not in vars)
            for cls in type(obj).__mro__:
                if cls.__module__.startswith("pipebuild"):
                    attrs |= {k for k, v in vars(cls).items() if not k.startswith("__") and not callable(v)}
            assert attrs <= read[kind] | not_read, (kind, attrs - read[kind] - not_read)


# -- the command line ------------------------------------------------------------------


def certified_project(root: Path) -> list[str]:
    """A one-task Pipefile (src/a.txt -> out/t.txt), built and certified by `pipebuild make`;
    returns that command."""
    (root / "Pipefile.py").write_text(
        "from pipebuild import Pipeline\n"
        "p = Pipeline()\n"
        "a = p.read_input('src/a.txt')\n"
        "t = p.new_task(name='t')\n"
        "t.command(f'cat {a} > {t.ofile}')\n"
        "p.write_output(t.ofile, 'out/t.txt')\n"
    )
    write_sources(root)
    make = [PIPEBUILD, "make"]
    assert "1 ran" in subprocess.run(make, cwd=root, check=True, capture_output=True, text=True).stdout
    age(root)
    subprocess.run(make, cwd=root, check=True, capture_output=True)  # writes the certificate
    assert (root / ".pipebuild" / "noop").exists()
    return make


def test_certified_make_does_not_import_the_engine(tmp_path):
    """Given a certified workspace, `pipebuild make` should answer without the engine or SQLite."""
    make = certified_project(tmp_path)
    code = (  # what fastmake.main does, up to its exit
        "import sys\n"
        "from pipebuild import fastmake\n"
        "assert fastmake.run(fastmake.parse(['make'])) == 0\n"
        "print(sorted(m for m in ('pipebuild.build', 'pipebuild.graph', 'sqlite3') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    summary, modules = out.stdout.splitlines()
    assert summary.startswith("pipebuild: 0 ran, 0 restored, 1 up to date, 0 failed (") and modules == "[]"
    (tmp_path / "src" / "a.txt").write_text("changed\n")
    out = subprocess.run(make, cwd=tmp_path, check=True, capture_output=True, text=True)
    assert "1 ran" in out.stdout and (tmp_path / "out" / "t.txt").read_text() == "changed\n"


@pytest.mark.parametrize("closed", ["stdout", "stderr"])
def test_make_with_a_closed_standard_stream_succeeds(tmp_path, closed):
    """Given `pipebuild make >&-` (or `2>&-`), a good build should still exit 0."""
    (tmp_path / "Pipefile.py").write_text(
        "from pipebuild import Pipeline\np = Pipeline()\nt = p.new_task(name='t')\n"
        "t.command(f'echo hi > {t.ofile}')\np.write_output(t.ofile, 'out.txt')\n"
    )
    redirect = ">&-" if closed == "stdout" else "2>&-"
    for _ in range(2):  # a build, then a certified no-op
        r = subprocess.run(f"{PIPEBUILD} make {redirect}", shell=True, cwd=tmp_path, capture_output=True)
        assert r.returncode == 0, r
    assert (tmp_path / "out.txt").read_text() == "hi\n"


def test_what_a_pipefile_leaves_open_is_flushed_at_exit(tmp_path):
    """Given a Pipefile that writes to a file it holds in a global and never closes, and an
    atexit function, `make` should end with the file flushed and the function run."""
    (tmp_path / "Pipefile.py").write_text(
        "import atexit\n"
        "from pipebuild import Pipeline\n"
        "log = open('defined.log', 'a')\n"
        "log.write('defined\\n')\n"
        "atexit.register(lambda: open('atexit.log', 'a').write('ran\\n'))\n"
        "def helper():\n    return log  # the namespace is now in a reference cycle\n"
        "p = Pipeline()\nt = p.new_task(name='t')\n"
        "t.command(f'echo hi > {t.ofile}')\np.write_output(t.ofile, 'out.txt')\n"
    )
    for _ in range(2):
        subprocess.run([PIPEBUILD, "make"], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "defined.log").read_text() == "defined\n" * 2
    assert (tmp_path / "atexit.log").read_text() == "ran\n" * 2


def test_a_stale_make_computes_the_fingerprint_once(tmp_path, monkeypatch):
    """Given a certified workspace and an edited source, `make` should compute the
    fingerprint once: the full build takes the one the certificate check computed."""
    from pipebuild import fastmake

    certified_project(tmp_path)
    (tmp_path / "src" / "a.txt").write_text("changed\n")
    age(tmp_path)  # outside the racy window, so that the full build certifies again
    calls: list[str | None] = []
    real = noop._fingerprint

    def counted(*args: object) -> str | None:
        calls.append(real(*args))  # type: ignore[arg-type]
        return calls[-1]

    monkeypatch.setattr(noop, "_fingerprint", counted)
    monkeypatch.chdir(tmp_path)
    assert fastmake.run(fastmake.parse(["make", "-q", "-C", str(tmp_path)])) == 0
    assert len(calls) == 1 and calls[0] is not None
    assert (tmp_path / "out" / "t.txt").read_text() == "changed\n"
    # the full build certified with the fingerprint the check computed
    assert noop.check(str(tmp_path / ".pipebuild"), calls[0]) == ["t"]
