"""pipebuild/stage.py, the stager that runs on each Cloud Batch VM, run here against the GCS
emulator with a temporary directory standing for /pb. Oracles: the files it lays out, the
objects it writes, and the digests computed here."""

from __future__ import annotations

import json
import os

import pytest

from pipebuild import stage
from pipebuild.hashing import digest_str

ALPHA, FORGED, OUT = digest_str("alpha\n"), digest_str("forged\n"), digest_str("OUT\n")


def manifest(bucket, inputs: list[tuple[str, str]], outputs: list[str]) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return {
        "bucket": bucket.name,
        "prefix": "pfx",
        "run": "pfx/runs/pb-job-1",
        "inputs": [list(i) for i in inputs],
        "outputs": outputs,
        "script": "set -euo pipefail\ncat in/a.txt > out/ofile\n",
    }


def test_stage_in_lays_out_inputs_and_the_script(bucket, tmp_path):
    bucket.blob(f"pfx/cas/{ALPHA}").upload_from_string(b"alpha\n")
    m = manifest(bucket, [("in/a.txt", digest_str("alpha\n"))], ["out/ofile", "out/sub/x"])
    assert stage.stage_in(m, str(tmp_path)) == 0
    assert (tmp_path / "work/in/a.txt").read_text() == "alpha\n"
    assert (tmp_path / "work/out/sub").is_dir()
    assert (tmp_path / "meta/script.sh").read_text() == m["script"]
    assert (tmp_path / "meta/staged").exists()


def test_stage_in_rejects_a_blob_that_does_not_match_its_name(bucket, tmp_path):
    d = digest_str("alpha\n")
    bucket.blob(f"pfx/cas/{d}").upload_from_string(b"forged\n")
    assert stage.stage_in(manifest(bucket, [("in/a.txt", d)], []), str(tmp_path)) == 3
    assert f"cas/{d} holds {FORGED}" in (tmp_path / "meta/stage-in.error").read_text()
    assert not (tmp_path / "meta/staged").exists()


@pytest.mark.parametrize("rc", [0, 7])
def test_stage_out_stores_logs_and_outputs_of_a_success_only(bucket, tmp_path, monkeypatch, rc):
    monkeypatch.setenv("BATCH_TASK_RETRY_ATTEMPT", "2")
    (tmp_path / "work/out").mkdir(parents=True)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/staged").touch()
    (tmp_path / "meta/rc").write_text(f"{rc}\n")
    (tmp_path / "meta/stdout").write_text("said\n")
    (tmp_path / "meta/stderr").write_text("")
    (tmp_path / "work/out/ofile").write_text("OUT\n")
    os.symlink("ofile", tmp_path / "work/out/link")  # a symlink to a file counts, as locally
    m = manifest(bucket, [], ["out/ofile", "out/link", "out/missing"])
    assert stage.stage_out(m, str(tmp_path)) == 0
    result = json.loads(bucket.blob("pfx/runs/pb-job-1/result-2.json").download_as_bytes())
    assert result["rc"] == rc and result["attempt"] == 2 and result["staged"] is True
    assert result["logs"] == {"stdout": digest_str("said\n"), "stderr": digest_str("")}
    names = {b.name for b in bucket.client.list_blobs(bucket.name, prefix="pfx/cas/")}
    if rc == 0:
        assert result["outputs"] == {"out/ofile": digest_str("OUT\n"), "out/link": digest_str("OUT\n")}
        assert f"pfx/cas/{OUT}" in names
    else:
        assert result["outputs"] == {}
        assert f"pfx/cas/{OUT}" not in names


def test_stage_out_after_a_failed_stage_in_reports_its_error(bucket, tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/stage-in.error").write_text("NotFound: 404 cas/abc")
    assert stage.stage_out(manifest(bucket, [], ["out/ofile"]), str(tmp_path)) == 0
    result = json.loads(bucket.blob("pfx/runs/pb-job-1/result-0.json").download_as_bytes())
    assert result == {
        "rc": None,
        "attempt": 0,
        "staged": False,
        "outputs": {},
        "logs": {},
        "error": "NotFound: 404 cas/abc",
    }


def test_the_manifest_comes_from_the_environment_or_the_bucket(bucket, monkeypatch):
    m = manifest(bucket, [], [])
    monkeypatch.setenv("PIPEBUILD_MANIFEST", json.dumps(m))
    assert stage.manifest() == m
    monkeypatch.delenv("PIPEBUILD_MANIFEST")
    bucket.blob("pfx/runs/pb-job-1/manifest.json").upload_from_string(json.dumps(m))
    monkeypatch.setenv("PIPEBUILD_MANIFEST_URL", f"gs://{bucket.name}/pfx/runs/pb-job-1/manifest.json")
    assert stage.manifest() == m


def test_usage(capsys):
    assert stage.main(["sideways"]) == 2
    assert "usage: python3 -m pipebuild.stage in|out" in capsys.readouterr().err
