"""The trace store (`pipebuild.store.Store`) and the content store (`pipebuild.cas.ContentStore`).

Store tests run against an in-memory and an on-disk database. The on-disk-only tests damage
the file (another schema version, garbage bytes, truncation, a damaged page) and require a
one-line warning and a fresh, working cache, never an exception (ARCHITECTURE.md §3.6);
the end-to-end variants run `pipebuild make` after the damage and check its outputs.
"""

import builtins
import json
import os
import random
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import xxhash

from pipebuild.cas import SENTINEL_MTIME_NS, ContentStore
from pipebuild.hashing import hash_file
from pipebuild.store import SCHEMA_VERSION, Store, TaskRecord

PIPEBUILD = os.path.join(os.path.dirname(sys.executable), "pipebuild")
BLOCK = 1 << 20  # hashing.py reads files in 1 MiB blocks

TABLES = {
    "meta": ["key", "value"],
    "files": ["path", "size", "mtime_ns", "ino", "digest"],
    "tasks": ["name", "key", "recipe", "inputs", "outputs", "status", "finished", "duration"],
    "actions": ["key", "outputs", "created"],
    "blobs": ["digest", "size", "used"],
}
PRIMARY_KEYS = {"meta": "key", "files": "path", "tasks": "name", "actions": "key", "blobs": "digest"}


# --------------------------------------------------------------------------------------
# Helpers and fixtures


class Warnings(list):
    """A `warn` callback that keeps every message."""

    def __call__(self, text: str) -> None:
        self.append(text)

    def lines(self) -> list[str]:
        return [line for w in self for line in w.splitlines()]


def rec(key: str = "k1", status: str = "ok", outputs: dict | None = None, inputs: dict | None = None) -> TaskRecord:
    return TaskRecord(
        key,
        "recipe-" + key,
        json.dumps(inputs if inputs is not None else {"in/a.txt": ["src/a.txt", "d" * 32]}),
        json.dumps(outputs if outputs is not None else {"out/ofile": "e" * 32}, sort_keys=True),
        status,
        1700000000.25,
        0.5,
    )


def fields(r: TaskRecord) -> tuple:
    return (r.key, r.recipe, r.inputs, r.outputs, r.status, r.finished, r.duration)


@pytest.fixture(params=["memory", "disk"])
def db_path(request, tmp_path):
    """None (an in-memory store) or the path of a not yet existing database file."""
    return None if request.param == "memory" else str(tmp_path / "cache.sqlite")


@pytest.fixture
def opened():
    """Open stores through this, so each is closed after the test."""
    stores: list[Store] = []

    def open_(path, warn=None):
        s = Store(path, warn=warn if warn is not None else Warnings())
        stores.append(s)
        return s

    yield open_
    for s in stores:
        try:
            s.close()
        except sqlite3.Error:
            pass


def populate(s: Store, n_tasks: int = 3, n_files: int = 3) -> None:
    """Some traces, action entries, blobs and stat rows."""
    for i in range(n_tasks):
        s.record(
            f"task{i}",
            rec(f"key{i}", outputs={"out/ofile": f"{i:032x}"}),
            (f"key{i}", {"out/ofile": f"{i:032x}"}),
            [(f"{i:032x}", 100 + i)],
            [(f"/w/src/file{i}.txt", 10 + i, 1_000_000 + i, 500 + i, f"{i + 100:032x}")],
        )
    if n_files > n_tasks:
        s.record(files=[(f"/w/extra/{j:06d}/" + "x" * 40, j, j, j, f"{j:032x}") for j in range(n_files)])


def snapshot(s: Store) -> tuple:
    return (
        {n: fields(r) for n, r in s.load_tasks().items()},
        s.load_files(),
        sorted((d, size) for d, size, _ in s.blobs_by_age()),
    )


# --------------------------------------------------------------------------------------
# Schema


def test_new_store_creates_every_table_and_a_schema_version_row(db_path, opened):
    """Given a new store, we should find the five tables with their columns and one schema_version row."""
    s = opened(db_path)
    db = s.db
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert set(TABLES) <= tables
    for table, columns in TABLES.items():
        info = list(db.execute(f"PRAGMA table_info({table})"))
        assert [c[1] for c in info] == columns, table
        assert [c[1] for c in info if c[5]] == [PRIMARY_KEYS[table]], table
    assert list(db.execute("SELECT key, value FROM meta")) == [("schema_version", SCHEMA_VERSION)]
    assert s.load_tasks() == {}
    assert s.load_files() == {}
    assert s.action("anything") is None
    assert s.blobs_by_age() == []


def test_reopening_a_database_keeps_it_without_warning(tmp_path, opened):
    """Given a database written and closed, we should reopen it silently with its schema row intact."""
    path = str(tmp_path / "cache.sqlite")
    s = opened(path)
    populate(s)
    before = snapshot(s)
    s.close()
    warns = Warnings()
    s2 = opened(path, warns)
    assert warns == []
    assert snapshot(s2) == before
    assert list(s2.db.execute("SELECT key, value FROM meta")) == [("schema_version", SCHEMA_VERSION)]
    assert s2.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# --------------------------------------------------------------------------------------
# Round trips


def test_record_round_trips_a_task_an_action_blobs_and_stat_rows(db_path, opened):
    """Given one record() with everything, we should read each part back unchanged."""
    s = opened(db_path)
    r = rec("abc", inputs={"in/x.txt": ["data/x.txt", "1" * 32], "in/y": ["t1:out/ofile", "2" * 32]})
    s.record(
        "t1",
        r,
        ("abc", {"out/ofile": "f" * 32, "out/g.bed": "0" * 32}),
        [("f" * 32, 12), ("0" * 32, 0)],
        [("/w/data/x.txt", 3, 123456789012345678, 42, "1" * 32), ("/w/res/o.txt", 12, 5, 43, "f" * 32)],
    )
    tasks = s.load_tasks()
    assert list(tasks) == ["t1"]
    assert fields(tasks["t1"]) == fields(r)
    assert tasks["t1"].input_digests() == {"in/x.txt": ["data/x.txt", "1" * 32], "in/y": ["t1:out/ofile", "2" * 32]}
    assert tasks["t1"].output_digests() == {"out/ofile": "e" * 32}
    assert s.action("abc") == {"out/ofile": "f" * 32, "out/g.bed": "0" * 32}
    assert s.action("abd") is None
    assert s.load_files() == {
        "/w/data/x.txt": (3, 123456789012345678, 42, "1" * 32),
        "/w/res/o.txt": (12, 5, 43, "f" * 32),
    }
    assert sorted((d, size) for d, size, _ in s.blobs_by_age()) == [("0" * 32, 0), ("f" * 32, 12)]


def test_record_replaces_rows_and_forgets_files(db_path, opened):
    """Given a second record for the same task, action and path, we should keep only the newest rows."""
    s = opened(db_path)
    s.record(
        "t", rec("k1"), ("k1", {"out/ofile": "a" * 32}), files=[("/p", 1, 1, 1, "a" * 32), ("/q", 2, 2, 2, "b" * 32)]
    )
    s.record(
        "t", rec("k2", status="failed", outputs={}), files=[("/p", 9, 9, 9, "c" * 32)], forget_files=["/q", "/nope"]
    )
    s.record(action=("k1", {"out/ofile": "d" * 32}))
    tasks = s.load_tasks()
    assert fields(tasks["t"]) == fields(rec("k2", status="failed", outputs={}))
    assert s.load_files() == {"/p": (9, 9, 9, "c" * 32)}
    assert s.action("k1") == {"out/ofile": "d" * 32}
    s.forget_tasks(["t", "unknown"])
    assert s.load_tasks() == {}


def test_blob_rows_age_touch_and_forget(db_path, opened):
    """Given blobs recorded in order, we should list them least recently used first, honour touch and forget."""
    s = opened(db_path)
    for d in ("a", "b", "c"):
        s.record(blobs=[(d * 32, 1)])
        # time.time() resolution is far below a statement's cost, but make the order explicit:
        s.db.execute("UPDATE blobs SET used=? WHERE digest=?", ({"a": 1.0, "b": 2.0, "c": 3.0}[d], d * 32))
    assert [d for d, _, _ in s.blobs_by_age()] == ["a" * 32, "b" * 32, "c" * 32]
    s.touch_blobs(["a" * 32])
    assert [d for d, _, _ in s.blobs_by_age()] == ["b" * 32, "c" * 32, "a" * 32]
    s.forget_blob("c" * 32)
    assert [d for d, _, _ in s.blobs_by_age()] == ["b" * 32, "a" * 32]


def test_records_persist_across_a_reopen(tmp_path, opened):
    """Given records committed and the store closed, we should read them from a new Store."""
    path = str(tmp_path / "cache.sqlite")
    s = opened(path)
    populate(s, 5, 5)
    s.close()
    s2 = opened(path)
    assert set(s2.load_tasks()) == {f"task{i}" for i in range(5)}
    assert s2.action("key3") == {"out/ofile": f"{3:032x}"}
    assert s2.load_files()["/w/src/file4.txt"] == (14, 1_000_004, 504, f"{104:032x}")


# --------------------------------------------------------------------------------------
# Transactions


def _raise_after_first(rows, exc):
    yield rows[0]
    raise exc


FAILURES = {
    # a files row of the wrong arity: sqlite3 rejects it after the task, action and blobs went in
    "files-row-wrong-arity": lambda: {
        "files": [("/new/ok", 1, 1, 1, "9" * 32), ("/new/short", 1, 1)],
    },
    # the last statement of the transaction fails half-way through its rows
    "forget-files-raises": lambda: {
        "files": [("/new/ok", 1, 1, 1, "9" * 32)],
        "forget_files": _raise_after_first(["/w/src/file0.txt", "/w/src/file1.txt"], RuntimeError("boom")),
    },
    # Ctrl-C in the middle of the blob rows
    "blobs-interrupted": lambda: {
        "blobs": _raise_after_first([("9" * 32, 1), ("8" * 32, 2)], KeyboardInterrupt()),
        "files": [("/new/ok", 1, 1, 1, "9" * 32)],
    },
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failed_record_leaves_nothing_behind(db_path, opened, failure, tmp_path):
    """Given a record() that raises midway, we should see none of its rows, and the store should still work."""
    s = opened(db_path)
    populate(s)
    before = snapshot(s)
    kwargs = FAILURES[failure]()
    kwargs.setdefault("blobs", [("9" * 32, 1)])
    with pytest.raises((sqlite3.Error, RuntimeError, KeyboardInterrupt)):
        s.record(
            "task0",  # replaces an existing trace...
            rec("newkey", outputs={"out/ofile": "9" * 32}),
            ("newkey", {"out/ofile": "9" * 32}),  # ...and adds an action entry
            **kwargs,
        )
    assert snapshot(s) == before
    assert s.action("newkey") is None
    assert fields(s.load_tasks()["task0"]) == fields(rec("key0", outputs={"out/ofile": f"{0:032x}"}))
    assert not s.db.in_transaction
    # The connection is usable: the next transaction commits.
    s.record("after", rec("after"), ("after", {"out/ofile": "a" * 32}))
    assert s.action("after") == {"out/ofile": "a" * 32}
    if db_path is not None:
        s.close()
        s2 = opened(db_path)
        tasks, files, blobs = snapshot(s2)
        assert set(tasks) == set(before[0]) | {"after"}
        assert files == before[1]
        assert blobs == before[2]
        assert s2.action("newkey") is None


def test_queries_counts_one_per_statement_and_opening_counts_none(db_path, opened):
    """Given each public call, we should see `queries` grow by exactly one (a record is one transaction)."""
    s = opened(db_path)
    assert s.queries == 0
    calls = [
        lambda: s.load_files(),
        lambda: s.load_tasks(),
        lambda: s.action("k"),
        lambda: s.record("t", rec(), ("k", {}), [("a" * 32, 1)] * 3, [("/p", 1, 1, 1, "a" * 32)] * 4),
        lambda: s.touch_blobs(["a" * 32, "b" * 32]),
        lambda: s.forget_blob("a" * 32),
        lambda: s.blobs_by_age(),
        lambda: s.forget_tasks(["t", "u"]),
    ]
    for n, call in enumerate(calls, start=1):
        call()
        assert s.queries == n
    # The no-op build path: two reads.
    s2 = opened(db_path)
    s2.load_files()
    s2.load_tasks()
    assert s2.queries == 2


# --------------------------------------------------------------------------------------
# Damaged or foreign databases (on disk only)


def _page_of(path: str, table: str) -> tuple[int, int]:
    """(page number, page size) of a leaf page of `table` in the database at `path`."""
    db = sqlite3.connect(path)
    try:
        size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = [r[0] for r in db.execute("SELECT pageno FROM dbstat WHERE name=? AND pagetype='leaf'", (table,))]
    finally:
        db.close()
    assert pages, f"no leaf page for {table}"
    return pages[len(pages) // 2], size


def damage(path: str, kind: str) -> None:
    """Damage the (closed, checkpointed) database at `path`."""
    assert not os.path.exists(path + "-wal") or os.path.getsize(path + "-wal") == 0
    if kind == "schema-0":
        db = sqlite3.connect(path)
        db.execute("UPDATE meta SET value='0' WHERE key='schema_version'")
        db.commit()
        db.close()
    elif kind == "garbage":
        size = max(os.path.getsize(path), 8192)
        with open(path, "wb") as f:
            f.write(random.Random(7).randbytes(size))
    elif kind == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    elif kind.startswith("damaged-page-"):
        page, size = _page_of(path, kind.removeprefix("damaged-page-"))
        with open(path, "r+b") as f:
            f.seek((page - 1) * size)
            f.write(b"\xde\xad\xbe\xef" * (size // 4))
    else:
        raise AssertionError(kind)


def test_a_database_from_another_schema_version_is_replaced_with_one_warning(tmp_path, opened):
    """Given meta.schema_version '0', we should warn in one line and start an empty, working cache."""
    path = str(tmp_path / "cache.sqlite")
    s = opened(path)
    populate(s)
    s.close()
    damage(path, "schema-0")
    warns = Warnings()
    s2 = opened(path, warns)
    assert len(warns) == 1 and len(warns.lines()) == 1, warns
    assert warns[0].startswith("pipebuild: warning:")
    assert "schema" in warns[0]
    assert s2.load_tasks() == {}
    assert s2.load_files() == {}
    assert s2.action("key0") is None
    assert s2.blobs_by_age() == []
    assert list(s2.db.execute("SELECT key, value FROM meta")) == [("schema_version", SCHEMA_VERSION)]
    s2.record("t", rec(), ("k", {"out/ofile": "a" * 32}))
    s2.close()
    warns2 = Warnings()
    s3 = opened(path, warns2)
    assert warns2 == []
    assert set(s3.load_tasks()) == {"t"}


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_an_unreadable_database_is_replaced_with_one_warning(tmp_path, opened, kind):
    """Given garbage bytes or a real database cut in half, we should warn in one line and start fresh."""
    path = str(tmp_path / "cache.sqlite")
    s = opened(path)
    populate(s, 50, 2000)  # several pages per table
    s.close()
    assert os.path.getsize(path) > 16 * 4096
    damage(path, kind)
    warns = Warnings()
    s2 = opened(path, warns)
    s2_state = snapshot(s2)
    s2.action("key1")
    assert len(warns) == 1 and len(warns.lines()) == 1, warns
    assert warns[0].startswith("pipebuild: warning:")
    assert s2_state == ({}, {}, [])
    s2.record("t", rec(), ("k", {"out/ofile": "a" * 32}), [("a" * 32, 1)], [("/p", 1, 1, 1, "a" * 32)])
    s2.close()
    warns2 = Warnings()
    s3 = opened(path, warns2)
    assert warns2 == []
    assert set(s3.load_tasks()) == {"t"}
    assert s3.action("k") == {"out/ofile": "a" * 32}


@pytest.mark.parametrize("table", ["files", "tasks", "actions"])
def test_a_damaged_page_is_one_warning_not_an_exception(tmp_path, opened, table):
    """Given a database whose header is fine but one page of a table is garbage, we should never raise.

    Every call a build makes must work, there must be exactly one warning line, and whatever
    the store still returns must be rows it was given (never invented ones).
    """
    path = str(tmp_path / "cache.sqlite")
    s = opened(path)
    populate(s, 400, 2000)
    original = snapshot(s)
    original_actions = {f"key{i}": s.action(f"key{i}") for i in range(400)}
    s.close()
    damage(path, f"damaged-page-{table}")
    warns = Warnings()
    s2 = opened(path, warns)
    files = s2.load_files()
    tasks = {n: fields(r) for n, r in s2.load_tasks().items()}
    actions = {k: s2.action(k) for k in original_actions}
    s2.record("new", rec("new"), ("new", {"out/ofile": "a" * 32}), [("a" * 32, 1)], [("/new", 1, 1, 1, "a" * 32)])
    assert len(warns.lines()) == 1, warns
    assert warns[0].startswith("pipebuild: warning:")
    assert files.items() <= original[1].items() | {("/new", (1, 1, 1, "a" * 32))}
    assert tasks.items() <= original[0].items()
    assert all(v is None or v == original_actions[k] for k, v in actions.items())
    assert s2.action("new") == {"out/ofile": "a" * 32}


# --------------------------------------------------------------------------------------
# End to end: `pipebuild make` after the damage


PIPEFILE = textwrap.dedent(
    """\
    from pipebuild import Pipeline

    p = Pipeline(name="store-e2e")
    a = p.read_input("src/a.txt")
    up = p.new_task(name="upper")
    up.command(f"tr a-z A-Z < {a} > {up.ofile}")
    n = p.new_task(name="count")
    n.command(f"wc -c < {up.ofile} | tr -d ' ' > {n.ofile}")
    p.write_output(up.ofile, "out/upper.txt")
    p.write_output(n.ofile, "out/count.txt")
    """
)


def make(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PIPEBUILD, "make", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def expected(text: str) -> dict[str, str]:
    return {"out/upper.txt": text.upper(), "out/count.txt": f"{len(text.encode())}\n"}


def outputs(cwd: Path) -> dict[str, str]:
    return {rel: (cwd / rel).read_text() if (cwd / rel).exists() else "<missing>" for rel in expected("")}


@pytest.mark.parametrize("kind", ["schema-0", "garbage", "truncated", "damaged-page-files", "damaged-page-actions"])
def test_make_after_a_damaged_cache_warns_once_and_builds_correct_outputs(tmp_path, kind):
    """Given a built project, a damaged cache and an edited source, make should warn once and rebuild right."""
    (tmp_path / "Pipefile.py").write_text(PIPEFILE)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hello world\n")
    first = make(tmp_path, "-j2")
    assert first.returncode == 0, first.stderr
    assert outputs(tmp_path) == expected("hello world\n")
    db = str(tmp_path / ".pipebuild" / "cache.sqlite")
    if kind == "truncated":
        # A two-task cache is a handful of pages; make it big enough that half is a real cut.
        s = Store(db)
        populate(s, 200, 2000)
        s.close()
    damage(db, kind)
    (tmp_path / "src" / "a.txt").write_text("a different text, longer\n")

    second = make(tmp_path, "-j2")

    assert second.returncode == 0, second.stderr
    err = second.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith("pipebuild: warning:"), second.stderr
    assert outputs(tmp_path) == expected("a different text, longer\n")
    third = make(tmp_path)
    assert third.returncode == 0, third.stderr
    assert third.stderr == ""
    assert "pipebuild: 0 ran, 0 restored, 2 up to date, 0 failed" in third.stdout


# --------------------------------------------------------------------------------------
# The content store


@pytest.fixture
def cas(tmp_path):
    return ContentStore(str(tmp_path / "cas"))


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hash_file(str(path))


def assert_marked(path: str) -> None:
    st = os.stat(path)
    assert st.st_mtime_ns == SENTINEL_MTIME_NS
    assert stat.S_IMODE(st.st_mode) == 0o444


def test_put_moves_the_file_into_the_store_read_only_and_marked(cas, tmp_path):
    """Given a task output, put should consume it and keep a read-only, sentinel-marked blob."""
    src = tmp_path / "work" / "ofile"
    d = write(src, b"some output\n")
    assert not cas.has(d)
    cas.put(str(src), d)
    assert not src.exists()
    blob = cas.path(d)
    assert blob.startswith(str(tmp_path / "cas") + os.sep)
    assert os.path.basename(os.path.dirname(blob)) == d[:2] and os.path.basename(blob) == d[2:]
    assert Path(blob).read_bytes() == b"some output\n"
    assert_marked(blob)
    assert cas.has(d)


def test_put_of_a_digest_already_stored_drops_the_new_file(cas, tmp_path):
    """Given the same bytes put twice, we should keep the first blob and consume the second file."""
    d = write(tmp_path / "one", b"same")
    cas.put(str(tmp_path / "one"), d)
    ino = os.stat(cas.path(d)).st_ino
    d2 = write(tmp_path / "two", b"same")
    cas.put(str(tmp_path / "two"), d2)
    assert d2 == d
    assert not (tmp_path / "two").exists()
    assert os.stat(cas.path(d)).st_ino == ino


def test_put_of_a_hard_linked_file_never_touches_the_other_name(cas, tmp_path):
    """Given an output that shares its inode with another file, put should store a private copy."""
    other = tmp_path / "keep.txt"
    d = write(other, b"shared inode\n")
    os.chmod(other, 0o644)
    before = os.stat(other)
    os.link(other, tmp_path / "ofile")
    cas.put(str(tmp_path / "ofile"), d)
    after = os.stat(other)
    assert (after.st_mode, after.st_mtime_ns, after.st_nlink) == (before.st_mode, before.st_mtime_ns, 1)
    assert other.read_bytes() == b"shared inode\n"
    assert os.stat(cas.path(d)).st_ino != after.st_ino
    assert_marked(cas.path(d))
    assert not os.listdir(cas.tmp)


def test_copy_in_writes_the_copy_through_the_descriptor_that_created_it(cas, tmp_path, monkeypatch):
    """Given a source copied into the store, its temporary file should be opened once, with
    O_EXCL, and never reopened with O_TRUNC (ext4 writes a file truncated to 0 bytes out at
    close); the blob is marked, its size returned, and nothing is left in tmp/. A source
    whose bytes are not the digest's stores nothing."""
    src = tmp_path / "source.txt"
    d = write(src, b"x" * 5000)
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path, flags, *args, **kw):
        fd = real_open(path, flags, *args, **kw)
        opened.append((str(path), flags))  # opened (the first try fails: no tmp/ yet)
        return fd

    real_builtin_open = builtins.open

    def builtin_spy(file, mode="r", *args, **kw):
        if isinstance(file, str) and "w" in mode:
            opened.append((file, os.O_TRUNC))  # open(path, "w...") truncates
        return real_builtin_open(file, mode, *args, **kw)

    monkeypatch.setattr(os, "open", spy)
    monkeypatch.setattr(builtins, "open", builtin_spy)
    assert cas.copy_in(str(src), d) == 5000
    temps = [(p, f) for p, f in opened if p.startswith(cas.tmp + os.sep)]
    assert len(temps) == 1 and temps[0][1] & os.O_EXCL and not temps[0][1] & os.O_TRUNC
    assert Path(cas.path(d)).read_bytes() == b"x" * 5000
    assert_marked(cas.path(d))
    assert os.listdir(cas.tmp) == []
    assert cas.copy_in(str(src), "0" * 32) is None
    assert not cas.has("0" * 32) and os.listdir(cas.tmp) == []


def test_put_copy_keeps_the_source(cas, tmp_path):
    """Given a destination re-stored with put_copy, the source file should stay as it was."""
    src = tmp_path / "dest.txt"
    d = write(src, b"published\n")
    mode = stat.S_IMODE(os.stat(src).st_mode)
    cas.put_copy(str(src), d)
    assert src.read_bytes() == b"published\n"
    assert stat.S_IMODE(os.stat(src).st_mode) == mode
    assert cas.has(d)
    assert_marked(cas.path(d))


def test_link_to_makes_the_blob_visible_at_a_path(cas, tmp_path):
    """Given a stored blob, link_to should make the same bytes appear at the destination."""
    d = write(tmp_path / "o", b"linked bytes")
    cas.put(str(tmp_path / "o"), d)
    dst = tmp_path / "task" / "in" / "x.txt"
    dst.parent.mkdir(parents=True)
    cas.link_to(d, str(dst))
    assert dst.read_bytes() == b"linked bytes"
    assert os.stat(dst).st_ino == os.stat(cas.path(d)).st_ino  # same file system: a hard link
    assert cas.has(d)


@pytest.mark.parametrize("how", ["append", "overwrite-same-size"])
def test_a_blob_altered_in_place_is_detected_and_deleted(cas, tmp_path, how):
    """Given a blob written through (chmod +w, then new bytes), has() should say False and delete it."""
    d = write(tmp_path / "o", b"original bytes\n")
    cas.put(str(tmp_path / "o"), d)
    blob = cas.path(d)
    os.chmod(blob, 0o644)
    with open(blob, "ab" if how == "append" else "r+b") as f:
        f.write(b"tampered\n" if how == "append" else b"ORIGINAL")
    assert not cas.has(d)
    assert not os.path.exists(blob)
    assert not cas.has(d)
    # The digest can be stored again afterwards.
    d2 = write(tmp_path / "o2", b"original bytes\n")
    cas.put(str(tmp_path / "o2"), d2)
    assert cas.has(d) and Path(blob).read_bytes() == b"original bytes\n"


@pytest.mark.parametrize("also_chmod", [False, True])
def test_a_blob_whose_mtime_moved_but_bytes_are_intact_is_kept_and_re_marked(cas, tmp_path, also_chmod):
    """Given a blob touched (and maybe made writable) without changing bytes, has() should keep and re-mark it."""
    d = write(tmp_path / "o", b"intact\n")
    cas.put(str(tmp_path / "o"), d)
    blob = cas.path(d)
    if also_chmod:
        os.chmod(blob, 0o644)
    os.utime(blob)
    assert os.stat(blob).st_mtime_ns != SENTINEL_MTIME_NS
    assert cas.has(d)
    assert Path(blob).read_bytes() == b"intact\n"
    assert_marked(blob)


def test_remove_returns_the_bytes_freed(cas, tmp_path):
    """Given a stored blob, remove should delete it and return its size; a missing blob frees 0."""
    d = write(tmp_path / "o", b"x" * 1234)
    cas.put(str(tmp_path / "o"), d)
    assert cas.remove(d) == 1234
    assert not cas.has(d)
    assert cas.remove(d) == 0


SMALL = 1 << 16  # hashing.py reads a file under this size in one call


@pytest.mark.parametrize("size", [0, 1, SMALL - 1, SMALL, SMALL + 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 12345])
def test_hash_file_equals_xxh3_128_of_the_bytes(tmp_path, size):
    """Given files around and beyond the 1 MiB read block, hash_file should equal xxh3_128 of all the bytes."""
    data = random.Random(size).randbytes(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert hash_file(str(path)) == xxhash.xxh3_128(data).hexdigest()
    from pipebuild.hashing import copy_and_hash

    with open(tmp_path / "copy", "wb") as copy:
        assert copy_and_hash(str(path), copy.fileno()) == xxhash.xxh3_128(data).hexdigest()
    assert (tmp_path / "copy").read_bytes() == data
    if size > BLOCK:
        # A change in the last block changes the digest.
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        assert hash_file(str(path)) != xxhash.xxh3_128(data).hexdigest()


def test_storing_a_blob_never_replaces_one_already_there(tmp_path):
    """Given two tasks storing the same new source at once, the second copy must not be
    renamed over the first: a task hard-linking the blob at that moment would get ENOENT
    (link() of a name whose inode was just replaced). The blob keeps its first inode."""
    from pipebuild.cas import ContentStore
    from pipebuild.hashing import hash_file

    src = tmp_path / "src.txt"
    src.write_text("same bytes\n")
    digest = hash_file(str(src))
    cas = ContentStore(str(tmp_path / "cas"))
    assert cas.put_copy(str(src), digest)
    held = tmp_path / "task-input"  # a task's hard link to the first blob
    os.link(cas.path(digest), held)
    cas.has = lambda d: False  # type: ignore[method-assign]
    assert cas.put_copy(str(src), digest)
    out = tmp_path / "out"
    out.write_text("same bytes\n")
    cas.put(str(out), digest)
    assert os.path.samefile(cas.path(digest), held)
    assert not out.exists() and os.listdir(cas.tmp) == []
