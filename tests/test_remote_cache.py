"""The remote cache in GCS (pipebuild/remote.py) against fake-gcs-server on a loopback port.

Two workspaces in different directories with the same sources stand for two machines.
Oracles: the objects in the emulator's bucket (names, generations, bytes), every HTTP
request the storage client sends (counted by wrapping `requests.Session.request`, below
pipebuild), and the bytes of the published outputs. Skips without the emulator, fails
instead when PIPEBUILD_REQUIRE_DOCKER=1 (see conftest.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import emulator_host, fake_gcs_server, new_bucket

from pipebuild import Pipeline, remote
from pipebuild import build as pbuild
from pipebuild.backend import LocalBackend
from pipebuild.hashing import digest_str, hash_file
from pipebuild.report import Reporter

PREFIX = "team/v1"
UP_A = digest_str("ALPHA\n")  # the digest of up_a's (unpublished) output


def sources(root: Path, b: str = "bravo\n") -> Path:
    """A checkout: data/a.txt and data/b.txt."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "a.txt").write_text("alpha\n")
    (root / "data" / "b.txt").write_text(b)
    return root


def pipeline(backend: Any = None) -> Pipeline:
    """up_a (not published) and up_b -> join; up_b and join are published."""
    p = Pipeline(backend=backend)
    a, b = p.read_input("data/a.txt"), p.read_input("data/b.txt")
    up_a = p.new_task(name="up_a")
    up_a.command(f"tr a-z A-Z < {a} > {up_a.ofile}")
    up_b = p.new_task(name="up_b")
    up_b.command(f"tr a-z A-Z < {b} > {up_b.ofile}")
    join = p.new_task(name="join")
    join.command(f"cat {up_a.ofile} {up_b.ofile} > {join.ofile}")
    p.write_output(up_b.ofile, "results/b.txt")
    p.write_output(join.ofile, "results/joined.txt")
    return p


class Warnings(Reporter):
    """A quiet reporter that keeps the warnings."""

    def __init__(self) -> None:
        super().__init__(verbosity=-1)
        self.warnings: list[str] = []

    def warning(self, text: str) -> None:
        self.warnings.append(text)


def build_in(root: Path, url: str | None, read_only: bool = False, reporter: Reporter | None = None):  # type: ignore[no-untyped-def]
    """Build `pipeline()` in-process in workspace `root` with the remote cache `url`."""
    opts = pbuild.Options(
        workspace=str(root), jobs=2, remote_cache=url, remote_cache_read_only=read_only,
        reporter=reporter or Warnings(),
    )  # fmt: skip
    return pbuild.build(pipeline(), opts)


class Requests:
    """Every HTTP request sent through requests (the storage client's transport)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[tuple[str, str]] = []
        real = requests.Session.request

        def request(session, method, url, *a, **k):  # type: ignore[no-untyped-def]
            self.sent.append((method, str(url)))
            return real(session, method, url, *a, **k)

        monkeypatch.setattr(requests.Session, "request", request)

    def downloads(self) -> list[str]:
        """Names of the content-store blobs downloaded (media GETs of cas/ objects)."""
        names = []
        for method, url in self.sent:
            if method == "GET" and "alt=media" in url:
                name = requests.utils.unquote(url.split("/o/", 1)[1].split("?", 1)[0])
                if "/cas/" in name:
                    names.append(name)
        return names


def objects(bucket) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """{name: generation} of every object in the bucket."""
    return {b.name: int(b.generation) for b in bucket.list_blobs()}


def digest_of(path: Path) -> str:
    return hash_file(str(path))


@pytest.fixture
def url(bucket) -> str:  # type: ignore[no-untyped-def]
    return f"gs://{bucket.name}/{PREFIX}"


def test_fresh_clone_runs_nothing_and_fetches_only_published_outputs(bucket, url, tmp_path, monkeypatch):
    """Given a cache warmed by workspace A, workspace B elsewhere should run 0 tasks, download
    only the published outputs, and publish byte-identical files."""
    a, b = sources(tmp_path / "a"), sources(tmp_path / "elsewhere" / "b")
    r = build_in(a, url)
    assert sorted(r.ran) == ["join", "up_a", "up_b"], r
    names = set(objects(bucket))
    assert sum(n.startswith(f"{PREFIX}/ac/") for n in names) == 3, names
    assert sum(n.startswith(f"{PREFIX}/cas/") for n in names) == 3, names
    sent, reporter = Requests(monkeypatch), Warnings()
    r = build_in(b, url, reporter=reporter)
    assert r.ran == [] and sorted(r.restored) == ["join", "up_b"] and r.up_to_date == ["up_a"], r
    assert reporter.warnings == []
    assert r.reasons["join"] == "remote cache hit", r.reasons
    for out in ("results/b.txt", "results/joined.txt"):
        assert (b / out).read_bytes() == (a / out).read_bytes()
    published = {f"{PREFIX}/cas/{digest_of(a / o)}" for o in ("results/b.txt", "results/joined.txt")}
    assert sorted(sent.downloads()) == sorted(published)
    assert not [m for m, _ in sent.sent if m != "GET"], sent.sent  # a reader writes nothing
    # Then B is warm locally: a no-op there asks the remote nothing.
    again = Requests(monkeypatch)
    r = build_in(b, url)
    assert r.ran == [] and r.restored == [] and len(r.up_to_date) == 3, r
    assert again.sent == []


def test_no_op_with_a_warm_local_cache_makes_no_remote_request(url, tmp_path, monkeypatch):
    """Given a workspace that built with the remote cache, a second build should send no request."""
    a = sources(tmp_path / "a")
    build_in(a, url)
    sent = Requests(monkeypatch)
    r = build_in(a, url)
    assert r.ran == [] and len(r.up_to_date) == 3, r
    assert sent.sent == []


def test_changed_input_in_b_runs_and_uploads_only_its_cone(bucket, url, tmp_path, monkeypatch):
    """Given a warm cache and a changed b.txt in B, only up_b and join should run and upload;
    join's other input (up_a's unpublished output) should come from the cache."""
    a, b = sources(tmp_path / "a"), sources(tmp_path / "b", b="changed\n")
    build_in(a, url)
    before = objects(bucket)
    sent = Requests(monkeypatch)
    r = build_in(b, url)
    assert sorted(r.ran) == ["join", "up_b"] and r.up_to_date == ["up_a"], r
    assert (b / "results/joined.txt").read_text() == "ALPHA\nCHANGED\n"
    after = objects(bucket)
    assert {n: g for n, g in after.items() if n in before} == before  # nothing overwritten
    new = sorted(set(after) - set(before))
    assert new == sorted(
        [f"{PREFIX}/cas/{digest_of(b / 'results/b.txt')}", f"{PREFIX}/cas/{digest_of(b / 'results/joined.txt')}"]
        + [n for n in new if n.startswith(f"{PREFIX}/ac/")]
    ), new
    assert sum(n.startswith(f"{PREFIX}/ac/") for n in new) == 2, new
    # up_a did not run, but join did and needed up_a's output: that one blob was fetched.
    assert sent.downloads() == [f"{PREFIX}/cas/{UP_A}"]
    # A third workspace with the same change now hits the cache for everything.
    c = sources(tmp_path / "c", b="changed\n")
    r = build_in(c, url)
    assert r.ran == [] and (c / "results/joined.txt").read_bytes() == (b / "results/joined.txt").read_bytes(), r


def test_read_only_cache_is_read_but_never_written(bucket, url, tmp_path, monkeypatch):
    """Given LocalBackend(remote_cache_read_only=True), a build should use hits and write nothing."""
    a = sources(tmp_path / "a")
    build_in(a, url)
    before = objects(bucket)
    b = sources(tmp_path / "b", b="untrusted\n")
    sent = Requests(monkeypatch)
    backend = LocalBackend(cache_dir=str(b), jobs=2, remote_cache=url, remote_cache_read_only=True)
    pipeline(backend).run()
    assert (b / "results/joined.txt").read_text() == "ALPHA\nUNTRUSTED\n"
    assert objects(bucket) == before
    assert [m for m, _ in sent.sent if m not in ("GET",)] == [], sent.sent
    assert len(sent.downloads()) == 1  # up_a's output, for join (up_a itself did not run)


def test_read_only_from_the_environment(bucket, url, tmp_path, monkeypatch):
    """Given PIPEBUILD_REMOTE_CACHE and PIPEBUILD_REMOTE_CACHE_READ_ONLY=1, nothing should be written."""
    monkeypatch.setenv("PIPEBUILD_REMOTE_CACHE", url)
    monkeypatch.setenv("PIPEBUILD_REMOTE_CACHE_READ_ONLY", "1")
    a = sources(tmp_path / "a")
    r = pbuild.build(pipeline(), pbuild.Options(workspace=str(a), reporter=Warnings()))
    assert len(r.ran) == 3, r
    assert objects(bucket) == {}
    monkeypatch.delenv("PIPEBUILD_REMOTE_CACHE_READ_ONLY")
    shutil.rmtree(a / ".pipebuild")
    r = pbuild.build(pipeline(), pbuild.Options(workspace=str(a), reporter=Warnings()))
    assert len(r.ran) == 3 and len(objects(bucket)) == 6, (r, objects(bucket))


def test_corrupted_remote_blob_is_rejected_and_the_task_reruns(bucket, url, tmp_path):
    """Given a cas/ object whose bytes no longer match its name, B should warn once, rerun the
    task, publish the right bytes and keep no copy of the bad blob."""
    a, b = sources(tmp_path / "a"), sources(tmp_path / "b")
    build_in(a, url)
    d = digest_of(a / "results/joined.txt")
    bucket.blob(f"{PREFIX}/cas/{d}").upload_from_string(b"tampered\n")
    reporter = Warnings()
    r = build_in(b, url, reporter=reporter)
    assert r.ok and r.ran == ["join"] and r.restored == ["up_b"], r
    assert (b / "results/joined.txt").read_text() == "ALPHA\nBRAVO\n"
    assert len(reporter.warnings) == 1 and f"cas/{d} does not match its digest" in reporter.warnings[0]
    assert "\n" not in reporter.warnings[0]
    blob = b / ".pipebuild" / "cas" / d[:2] / d[2:]
    assert blob.read_bytes() == b"ALPHA\nBRAVO\n"  # the rerun's output, not the tampered bytes
    assert not any((b / ".pipebuild" / "cas" / "tmp").iterdir())
    # ...and the bucket is repaired, so the next machine gets the right bytes without a rerun.
    assert bucket.blob(f"{PREFIX}/cas/{d}").download_as_bytes() == b"ALPHA\nBRAVO\n"
    c = sources(tmp_path / "c")
    r = build_in(c, url)
    assert r.ran == [] and (c / "results/joined.txt").read_text() == "ALPHA\nBRAVO\n", r


def test_corrupted_unpublished_blob_reruns_its_producer(bucket, url, tmp_path):
    """Given a bad blob for up_a's unpublished output, a task that needs it should still get
    the right bytes (up_a runs again) and the build should succeed."""
    a, b = sources(tmp_path / "a"), sources(tmp_path / "b", b="changed\n")
    build_in(a, url)
    up_a = UP_A
    assert f"{PREFIX}/cas/{up_a}" in objects(bucket)
    bucket.blob(f"{PREFIX}/cas/{up_a}").upload_from_string(b"tampered\n")
    reporter = Warnings()
    r = build_in(b, url, reporter=reporter)
    assert r.ok, r
    assert (b / "results/joined.txt").read_text() == "ALPHA\nCHANGED\n"
    assert len(reporter.warnings) == 1 and f"cas/{up_a} does not match" in reporter.warnings[0]


def chain() -> Pipeline:
    """x -> y (neither published) -> z, which also reads data/b.txt; z is published."""
    p = Pipeline()
    x = p.new_task(name="x")
    x.command(f"tr a-z A-Z < {p.read_input('data/a.txt')} > {x.ofile}")
    y = p.new_task(name="y")
    y.command(f"rev < {x.ofile} > {y.ofile}")
    z = p.new_task(name="z")
    z.command(f"cat {y.ofile} {p.read_input('data/b.txt')} > {z.ofile}")
    p.write_output(z.ofile, "z.txt")
    return p


def test_bad_blobs_along_a_chain_rerun_each_producer(bucket, url, tmp_path):
    """Given bad remote blobs for both x's and y's outputs, z (which must run) should get the
    right input: y reruns, which needs x to rerun first."""
    a, b = sources(tmp_path / "a"), sources(tmp_path / "b", b="changed\n")
    warm = pbuild.build(chain(), pbuild.Options(workspace=str(a), remote_cache=url, reporter=Warnings()))
    assert sorted(warm.ran) == ["x", "y", "z"], warm
    for data in ("ALPHA\n", "AHPLA\n"):
        bucket.blob(f"{PREFIX}/cas/{digest_str(data)}").upload_from_string(b"tampered\n")
    reporter = Warnings()
    r = pbuild.build(chain(), pbuild.Options(workspace=str(b), jobs=2, remote_cache=url, reporter=reporter))
    assert r.ok and r.ran == ["z"] and sorted(r.up_to_date) == ["x", "y"], r
    assert (b / "z.txt").read_text() == "AHPLA\nchanged\n"
    assert len(reporter.warnings) == 2, reporter.warnings


def test_missing_bucket_is_a_warning_and_the_build_succeeds(emulator, tmp_path):
    """Given a cache in a bucket that does not exist, the build should run, succeed and warn once."""
    a = sources(tmp_path / "a")
    reporter = Warnings()
    r = build_in(a, "gs://pb-no-such-bucket/x", reporter=reporter)
    assert r.ok and len(r.ran) == 3, r
    assert (a / "results/joined.txt").read_text() == "ALPHA\nBRAVO\n"
    assert len(reporter.warnings) == 1, reporter.warnings
    assert "remote cache gs://pb-no-such-bucket/x" in reporter.warnings[0] and "\n" not in reporter.warnings[0]


def test_emulator_stopped_mid_build_is_a_warning_and_the_build_succeeds(tmp_path, monkeypatch):
    """Given the cache server dying while the first task runs, the upload should fail with one
    warning, the cache be left alone after that, and the build succeed."""
    monkeypatch.setattr(remote, "RETRY_SECONDS", 0.5)
    with fake_gcs_server(tmp_path) as (server, proc), emulator_host(server):
        bucket_name = new_bucket().name
        root = sources(tmp_path / "a")
        p = Pipeline()
        first = p.new_task(name="first")
        first.command(f"kill {proc.pid}; while kill -0 {proc.pid} 2>/dev/null; do sleep 0.05; done")
        first.command(f"echo one > {first.ofile}")
        second = p.new_task(name="second")
        second.command(f"cat {first.ofile} > {second.ofile}")
        p.write_output(second.ofile, "out.txt")
        threading.Thread(target=proc.wait, daemon=True).start()  # reap it, so `kill -0` sees it gone
        reporter = Warnings()
        sent = Requests(monkeypatch)
        opts = pbuild.Options(workspace=str(root), remote_cache=f"gs://{bucket_name}/p", reporter=reporter)
        r = pbuild.build(p, opts)
        assert r.ok and r.ran == ["first", "second"], r
        assert (root / "out.txt").read_text() == "one\n"
        assert len(reporter.warnings) == 1 and "cannot upload" in reporter.warnings[0], reporter.warnings
        # one lookup for `first`, then the failed upload; nothing for `second` after the failure
        lookups = [u for m, u in sent.sent if m == "GET" and "%2Fac%2F" in u]
        assert len(lookups) == 1, sent.sent  # `first`'s; none for `second`, after the failure


def make(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipebuild", "make", *args], cwd=root, capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip


PIPEFILE = """\
from pipebuild import Pipeline

p = Pipeline()
t = p.new_task(name="upper")
t.command(f"tr a-z A-Z < {p.read_input('data/a.txt')} > {t.ofile}")
p.write_output(t.ofile, "results/a.txt")
"""


def test_cli_flags_and_environment(bucket, url, tmp_path):
    """Given --remote-cache in A, B with PIPEBUILD_REMOTE_CACHE should run nothing; a read-only
    run writes nothing; a malformed URL is a one-line usage error."""
    a, b, c = (sources(tmp_path / n) for n in "abc")
    for root in (a, b, c):
        (root / "Pipefile.py").write_text(PIPEFILE)
    r = make(a, "--remote-cache", url)
    assert r.returncode == 0 and "1 ran" in r.stdout, r.stdout + r.stderr
    r = make(b, "-n", env={"PIPEBUILD_REMOTE_CACHE": url})  # a dry run asks the cache too
    assert r.returncode == 0 and "restore    upper  remote cache hit" in r.stdout, r.stdout + r.stderr
    assert not (b / "results/a.txt").exists() and not (b / ".pipebuild").exists()
    r = make(b, env={"PIPEBUILD_REMOTE_CACHE": url})
    assert r.returncode == 0 and "0 ran, 1 restored" in r.stdout, r.stdout + r.stderr
    assert (b / "results/a.txt").read_text() == "ALPHA\n"
    (c / "data" / "a.txt").write_text("charlie\n")
    before = objects(bucket)
    r = make(c, "--remote-cache", url, "--remote-cache-read-only")
    assert r.returncode == 0 and "1 ran" in r.stdout, r.stdout + r.stderr
    assert objects(bucket) == before
    r = make(c, "--remote-cache", "s3://nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a remote cache URL" in r.stderr, r.stderr


def noisy(extra: str) -> Pipeline:
    """stamp (never the same bytes twice, never published) -> report, which appends `extra`."""
    p = Pipeline()
    stamp = p.new_task(name="stamp")
    stamp.command(f"date +%s%N > {stamp.ofile}")
    report = p.new_task(name="report")
    report.command(f"cat {stamp.ofile} > {report.ofile}; echo {extra} >> {report.ofile}")
    p.write_output(report.ofile, "out/report.txt")
    return p


def test_an_unreproducible_producer_whose_blob_is_gone_everywhere_recovers_next_build(tmp_path, url):
    """Given a non-deterministic intermediate whose blob is in neither store, one build may fail, the next succeeds."""
    root = tmp_path / "w"
    root.mkdir()

    def run(remote_url: str | None):  # type: ignore[no-untyped-def]
        opts = pbuild.Options(workspace=str(root), jobs=1, remote_cache=remote_url, reporter=Warnings())
        return pbuild.build(noisy(str(len(os.listdir(root)))), opts)

    assert run(None).ran == ["stamp", "report"]  # the remote never sees stamp's blob
    pbuild.gc(pbuild.Options(workspace=str(root), reporter=Warnings()), 0)
    (root / "extra").write_text("changes report's command input count\n")
    first = run(url)  # stamp is rerun in place and writes other bytes: report cannot run this time
    assert [f.name for f in first.failed] == ["report"]
    second = run(url)  # ...but stamp's stale trace was dropped, so this build runs it properly
    assert not second.failed and second.ran == ["stamp", "report"]
    assert (root / "out/report.txt").read_text().endswith("3\n")


def test_an_entry_whose_blob_expired_is_a_miss_not_a_broken_build(bucket, url, tmp_path):
    """Given ac/ entries whose cas/ blob a lifecycle rule deleted, and a producer that never
    writes the same bytes twice, a fresh workspace should run the producer rather than trust
    the entry, and its consumer should get the new bytes: no failed build, now or later."""

    def run(root: Path, extra: str):  # type: ignore[no-untyped-def]
        root.mkdir(exist_ok=True)
        opts = pbuild.Options(workspace=str(root), jobs=1, remote_cache=url, reporter=Warnings())
        return pbuild.build(noisy(extra), opts)

    assert run(tmp_path / "a", "one").ran == ["stamp", "report"]
    stamp_blob = [
        n for n in objects(bucket) if "/cas/" in n and n.split("/")[-1] != digest_of(tmp_path / "a/out/report.txt")
    ]
    assert len(stamp_blob) == 1
    bucket.blob(stamp_blob[0]).delete()  # expired; ac/ still names it
    for _ in range(2):
        r = run(tmp_path / "b", "two")  # report's command changed: it must run, and needs stamp's output
        assert not r.failed, r.failed
    first = (tmp_path / "b/out/report.txt").read_text().splitlines()
    assert first[1] == "two" and first[0].isdigit()
