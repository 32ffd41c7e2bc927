"""BatchBackend on Google Cloud Batch, end to end on one machine, with real parts only.

* the real google-cloud-batch client (REST transport) against the executing stand-in of the
  Batch API in tests/batch_standin.py, which runs each job's runnables in real containers;
* fake-gcs-server as the bucket (conftest.py), reached by google-cloud-storage here and by
  the stage-in / stage-out containers through STORAGE_EMULATOR_HOST;
* the runtime image `pipebuild-runtime:test` (tests/runtime_image.py: the current source on a
  locally built base), and `pipebuild-test:bash` as the tasks' image.

Oracles: the bytes of published outputs, the stand-in's own record of API requests, jobs
and VM directories, the objects in the bucket, the daemon's container list, and the exit
statuses and messages of the CLI. Skipped without Docker; PIPEBUILD_REQUIRE_DOCKER=1 (set
by .ci/run) turns a skip into a failure.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import BATCH_NEEDS, batch_unavailable, docker_client_with
from runtime_image import BASE_IMAGE, build_runtime_image

from pipebuild import BatchBackend, Pipeline
from pipebuild.build import BuildResult, Options, build
from pipebuild.exceptions import BuildFailed, PipelineException, UsageError
from pipebuild.executors import Job
from pipebuild.executors.batch import BatchExecutor, Settings, job_spec, label_value, resources, slug
from pipebuild.report import Reporter

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "pipebuild-test:bash"
PROJECT = "pb-test"
REGION = "us-central1"
PARENT = f"projects/{PROJECT}/locations/{REGION}"


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime_image():  # type: ignore[no-untyped-def]
    """pipebuild-runtime:test with the current source (built once per module)."""
    client = docker_client_with(BASE_IMAGE, BATCH_NEEDS)
    import docker

    try:
        return build_runtime_image(client, ROOT)
    except docker.errors.DockerException as e:
        batch_unavailable(f"cannot build the runtime image: {e}")
    finally:
        client.close()


@pytest.fixture
def cloud(emulator, bucket, runtime_image, batch_standin, monkeypatch):  # type: ignore[no-untyped-def]
    """The bucket, the stand-in, and the environment that points pipebuild at both."""
    monkeypatch.setenv("PIPEBUILD_BATCH_API_ENDPOINT", batch_standin.endpoint)
    monkeypatch.setenv("PIPEBUILD_RUNTIME_IMAGE", runtime_image)
    monkeypatch.delenv("PIPEBUILD_REMOTE_CACHE", raising=False)
    return batch_standin, bucket


def backend(bucket, **kw) -> BatchBackend:  # type: ignore[no-untyped-def]
    kw.setdefault("default_image", IMAGE)
    return BatchBackend(
        project=PROJECT, region=REGION, bucket=f"gs://{bucket.name}/cache", poll_interval=0.1, poll_max=0.5, **kw
    )


def two_tasks(ws: Path, bucket, text: str = "hello\n", **kw) -> Pipeline:  # type: ignore[no-untyped-def]
    """in.txt -> upper (host-less: the default image) -> count (explicit image) -> out/count.txt."""
    (ws / "in.txt").write_text(text)
    p = Pipeline(name="two", backend=backend(bucket, **kw))
    src = p.read_input(str(ws / "in.txt"))
    up = p.new_task(name="upper")
    up.command(f"tr a-z A-Z < {src} > {up.ofile}")
    count = p.new_task(name="count").image(IMAGE)
    count.command(f"wc -c < {up.ofile} > {count.ofile}; echo counted >&2")
    p.write_output(up.ofile, str(ws / "out" / "upper.txt"))
    p.write_output(count.ofile, str(ws / "out" / "count.txt"))
    return p


def one_task(bucket, dest: Path, name: str, command, source: Path | None = None, timeout: float | None = None, **kw):  # type: ignore[no-untyped-def]
    """A pipeline of one task `name` publishing its output at `dest`; `command(ofile, src)`
    writes its command, with `src` the input read from `source` (if any)."""
    p = Pipeline(name=name, backend=backend(bucket, **kw))
    src = p.read_input(str(source)) if source is not None else None
    t = p.new_task(name=name)
    if timeout is not None:
        t.timeout(timeout)
    t.command(command(t.ofile, src))
    p.write_output(t.ofile, str(dest))
    return p


def run(ws: Path, p: Pipeline, **kw) -> tuple[BuildResult, str]:  # type: ignore[no-untyped-def]
    out, err = io.StringIO(), io.StringIO()
    opts = Options(workspace=str(ws), jobs=8, reporter=Reporter(out=out, err=err), **kw)
    result = build(p, opts)
    return result, out.getvalue() + err.getvalue()


def objects(bucket, prefix: str) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(b.name for b in bucket.client.list_blobs(bucket.name, prefix=prefix))


def job_requests(standin) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return [r for r in standin.requests if "/jobs" in r[1]]


# -- pure functions --------------------------------------------------------------------


def settings(**kw) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(project=PROJECT, region=REGION, bucket="bkt", **kw)


def test_job_spec_maps_resources_timeout_spot_and_labels():
    job = Job(
        "Align Reads!", "/x", "set -euo pipefail\ntrue\n", "", "", timeout=90, image="img:1",
        cpu="2", memory="3.75Gi", storage="10G", key="ab" * 16,
    )  # fmt: skip
    spec = job_spec(
        settings(spot=True, spot_retries=2, machine_type="n2-standard-4"), job, "pb-x", "r1", {"K": "V"}, True
    )
    ts = spec.task_groups[0].task_spec
    assert ts.compute_resource.cpu_milli == 2000
    assert ts.compute_resource.memory_mib == 3840  # 3.75 GiB
    assert ts.compute_resource.boot_disk_mib == 30 * 1024 + 9537  # 10 GB in MiB, rounded up, + 30 GiB
    assert [r.display_name for r in ts.runnables] == ["stage-in", "main", "stage-out"]
    assert [r.always_run for r in ts.runnables] == [False, False, True]
    assert ts.runnables[1].container.image_uri == "img:1"
    assert ts.runnables[1].timeout.total_seconds() == 90
    assert ts.max_run_duration.total_seconds() == 90 + 3600
    assert ts.max_retry_count == 2
    assert list(ts.lifecycle_policies[0].action_condition.exit_codes) == [50001, 50002, 50003, 50006]
    assert ts.environment.variables["K"] == "V"
    policy = spec.allocation_policy.instances[0].policy
    assert policy.provisioning_model.name == "SPOT" and policy.machine_type == "n2-standard-4"
    assert list(spec.allocation_policy.location.allowed_locations) == [f"regions/{REGION}"]
    assert spec.labels["pipebuild-run"] == "r1" and spec.labels["pipebuild-task"] == "align-reads-"
    standard = job_spec(settings(), job, "pb-x", "r1", {}, False)
    assert standard.allocation_policy.instances[0].policy.provisioning_model.name == "STANDARD"
    assert standard.task_groups[0].task_spec.max_retry_count == 0


def test_names_are_valid_batch_ids_and_labels():
    assert slug("Align Reads: sample #1", 24) == "align-reads-sample-1"
    assert slug("___", 10) == "task"
    assert len(slug("x" * 100, 24)) == 24
    assert label_value("A/B c") == "a-b-c"


def test_a_request_no_machine_meets_is_refused_before_submitting():
    with pytest.raises(PipelineException, match="more than any machine has"):
        resources(Job("big", "", "", "", "", cpu=1000))
    with pytest.raises(PipelineException, match="memory"):
        resources(Job("big", "", "", "", "", memory="100Ti"))
    assert resources(Job("small", "", "", "", "", cpu="500m")) == (500, None, None)


def test_missing_settings_are_one_line_usage_errors(monkeypatch, workdir):
    for var in ("PIPEBUILD_BATCH_PROJECT", "GOOGLE_CLOUD_PROJECT", "PIPEBUILD_BATCH_BUCKET"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UsageError, match="needs a Cloud project"):
        BatchBackend(bucket="bkt")._settings()
    with pytest.raises(UsageError, match="needs a bucket"):
        BatchBackend(billing_project="proj")._settings()
    s = BatchBackend(billing_project="proj", bucket="bkt")._settings()
    assert (s.project, s.bucket, s.prefix, s.region) == ("proj", "bkt", "pipebuild", "us-central1")
    with pytest.raises(UsageError, match="not a bucket: 'B!'"):
        BatchBackend(billing_project="proj", bucket="B!")._settings()
    with pytest.raises(PipelineException, match="differ"):
        BatchBackend("a", project="b")


# -- end to end ----------------------------------------------------------------------


def test_success_then_a_rerun_makes_no_batch_call(cloud, tmp_path):
    standin, bucket = cloud
    p = two_tasks(tmp_path, bucket)
    result, log = run(tmp_path, p)
    assert result.ok, log
    assert sorted(result.ran) == ["count", "upper"]
    assert (tmp_path / "out" / "upper.txt").read_text() == "HELLO\n"
    assert (tmp_path / "out" / "count.txt").read_text().strip() == "6"
    assert "counted" in (tmp_path / ".pipebuild" / "logs" / "count.err").read_text()
    assert len(standin.created) == 2
    assert log.count(f"image {IMAGE} is not pinned by digest") == 1  # both tasks use it: one warning
    for name in standin.created:  # the imageless task ran in the default image, on its own VM
        assert standin.get_job(name)["status"]["state"] == "SUCCEEDED"
    assert len(objects(bucket, "cache/ac/")) == 2
    before = len(standin.requests)
    again, _ = run(tmp_path, two_tasks(tmp_path, bucket))
    assert again.ran == [] and sorted(again.up_to_date) == ["count", "upper"]
    assert len(standin.requests) == before


def test_a_second_machine_reuses_the_bucket_and_makes_no_batch_call(cloud, tmp_path):
    standin, bucket = cloud
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    result, log = run(first, two_tasks(first, bucket))
    assert result.ok, log
    before = len(standin.requests)
    other, log = run(second, two_tasks(second, bucket))
    assert other.ok, log
    assert other.ran == [] and sorted(other.restored) == ["count", "upper"]
    assert len(standin.requests) == before
    assert (second / "out" / "count.txt").read_text().strip() == "6"


def test_changed_input_reruns_its_task_and_early_cutoff_stops_there(cloud, tmp_path):
    standin, bucket = cloud

    def pipeline(text: str) -> Pipeline:
        (tmp_path / "in.txt").write_text(text)
        p = Pipeline(name="cutoff", backend=backend(bucket))
        src = p.read_input(str(tmp_path / "in.txt"))
        length = p.new_task(name="length")
        length.command(f"wc -c < {src} > {length.ofile}")
        double = p.new_task(name="double")
        double.command(f"echo $(( $(cat {length.ofile}) * 2 )) > {double.ofile}")
        p.write_output(double.ofile, str(tmp_path / "double.txt"))
        return p

    result, log = run(tmp_path, pipeline("hello\n"))
    assert result.ok, log
    assert (tmp_path / "double.txt").read_text() == "12\n"
    changed, log = run(tmp_path, pipeline("world\n"))  # same length: `length` writes the same bytes
    assert changed.ok, log
    assert changed.ran == ["length"] and changed.up_to_date == ["double"]
    assert len(standin.created) == 3
    longer, log = run(tmp_path, pipeline("hello, world\n"))
    assert sorted(longer.ran) == ["double", "length"], log
    assert (tmp_path / "double.txt").read_text() == "26\n"


def test_a_user_failure_reports_the_exit_code_and_stderr(cloud, tmp_path):
    standin, bucket = cloud
    p = one_task(bucket, tmp_path / "x", "boom", lambda o, _: f"echo boom >&2; exit 3; echo never > {o}")
    result, log = run(tmp_path, p)
    assert [f.name for f in result.failed] == ["boom"]
    failure = result.failed[0]
    assert failure.detail == "exit code 3"
    assert failure.tail == ["boom"]
    assert "infrastructure" not in log
    assert standin.get_job(standin.created[0])["status"]["state"] == "FAILED"
    assert objects(bucket, "cache/ac/") == []
    with pytest.raises(BuildFailed):
        result.raise_for_failure()


def test_a_missing_output_fails_the_task(cloud, tmp_path):
    _, bucket = cloud
    p = one_task(bucket, tmp_path / "x", "lazy", lambda o, _: f"echo did nothing # {o}")
    result, _ = run(tmp_path, p)
    assert [f.name for f in result.failed] == ["lazy"]
    assert "output missing: out/ofile" in result.failed[0].detail
    assert not (tmp_path / "x").exists()


def test_a_timeout_is_reported_as_one(cloud, tmp_path):
    _, bucket = cloud
    p = one_task(bucket, tmp_path / "x", "sleepy", lambda o, _: f"sleep 60; touch {o}", timeout=2)
    t0 = time.monotonic()
    result, _ = run(tmp_path, p)
    assert time.monotonic() - t0 < 40
    assert [f.detail for f in result.failed] == ["timed out after 2 s"]


def test_spot_preemption_is_retried_by_batch(cloud, tmp_path):
    standin, bucket = cloud
    standin.preempt(times=1)
    p = one_task(
        bucket, tmp_path / "x", "lucky", lambda o, _: f"echo attempt $BATCH_TASK_RETRY_ATTEMPT > {o}", spot=True
    )
    result, log = run(tmp_path, p)
    assert result.ok, log
    assert len(standin.created) == 1
    job = standin.get_job(standin.created[0])
    codes = [e.get("taskExecution", {}).get("exitCode") for e in job["status"].get("statusEvents", [])]
    assert 50001 in codes
    assert job["allocationPolicy"]["instances"][0]["policy"]["provisioningModel"] in ("SPOT", 2)


def test_spot_preempted_every_time_falls_back_to_a_standard_vm(cloud, tmp_path):
    standin, bucket = cloud
    standin.preempt(times=2)  # spot_retries=1: both Spot attempts are lost
    p = one_task(bucket, tmp_path / "x", "unlucky", lambda o, _: f"echo done > {o}", spot=True, spot_retries=1)
    result, log = run(tmp_path, p)
    assert result.ok, log
    assert "running it once more on a standard VM" in log
    models = [
        standin.get_job(n)["allocationPolicy"]["instances"][0]["policy"]["provisioningModel"] for n in standin.created
    ]
    assert [m if isinstance(m, str) else {1: "STANDARD", 2: "SPOT"}[m] for m in models] == ["SPOT", "STANDARD"]
    assert (tmp_path / "x").read_text() == "done\n"


def test_injected_429_and_503_are_retried(cloud, tmp_path):
    standin, bucket = cloud
    standin.fail_next(429, times=2, method="POST", path_contains="/jobs")
    standin.fail_next(503, times=2, method="GET", path_contains="/jobs")
    result, log = run(tmp_path, two_tasks(tmp_path, bucket))
    assert result.ok, log
    posts = [r for r in standin.requests if r[0] == "POST" and "/jobs" in r[1]]
    assert len(posts) == 2 + 2  # two refused, then one per task
    assert len(standin.created) == 2


def test_a_create_that_meets_409_is_not_a_failure(cloud, tmp_path):
    standin, bucket = cloud
    ex = BatchExecutor(backend(bucket)._settings())
    job = Job("dup", str(tmp_path), "true\n", "", "", image=IMAGE, key="cd" * 16)
    spec = job_spec(ex.settings, job, "pb-dup-1", ex.run_id, {"PIPEBUILD_MANIFEST": "{}"}, False)
    assert ex._create("pb-dup-1", spec) is None
    assert ex._create("pb-dup-1", spec) is None  # the stand-in answers 409: it exists
    assert standin.created == [f"{PARENT}/jobs/pb-dup-1"]
    assert [r[0] for r in job_requests(standin)].count("POST") == 2


def test_polling_lists_active_jobs_by_label_instead_of_getting_each_job(cloud, tmp_path):
    standin, bucket = cloud
    p = Pipeline(name="wide", backend=backend(bucket))
    for i in range(12):
        t = p.new_task(name=f"t{i}")
        t.command(f"echo {i} > {t.ofile}")
        p.write_output(t.ofile, str(tmp_path / "out" / f"{i}.txt"))
    result, log = run(tmp_path, p)
    assert result.ok, log
    reqs = job_requests(standin)
    gets = [r for r in reqs if r[0] == "GET" and r[1].split("?")[0].rstrip("/").split("/")[-2] == "jobs"]
    lists = [r for r in reqs if r[0] == "GET" and r[1].split("?")[0].rstrip("/").endswith("/jobs")]
    assert len(standin.created) == 12
    assert len(gets) <= 2 * 12  # about one per job, when it has ended
    assert lists and len(lists) % 5 == 0  # one list per active state, per poll


def test_cancel_deletes_the_run_jobs_and_their_containers(cloud, tmp_path):
    standin, bucket = cloud
    p = one_task(bucket, tmp_path / "x", "forever", lambda o, _: f"sleep 300; touch {o}")
    os.chdir(tmp_path)
    handle = p.run(wait=False)
    deadline = time.monotonic() + 60
    while not any(c.labels.get("pipebuild.batch-standin") for c in standin.containers()) or not standin.created:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    assert handle.status()["state"] == "running"
    handle.cancel()
    status = handle.wait(timeout=60)
    assert status["complete"] and status["state"] == "cancelled"
    assert any(m == "DELETE" for m, _ in job_requests(standin))
    assert standin.wait_idle(30)
    assert standin.containers() == []


def test_run_wait_false_returns_a_handle_and_dry_run_submits_nothing(cloud, tmp_path, capsys):
    standin, bucket = cloud
    p = two_tasks(tmp_path, bucket)
    os.chdir(tmp_path)
    assert p.run(dry_run=True) is None
    printed = capsys.readouterr().out
    assert printed.count('"displayName": "stage-out"') == 2
    assert "# task upper: run (never built)" in printed
    assert standin.requests == []
    handle = p.run(wait=False)
    status = handle.wait(timeout=120)
    assert status["state"] == "success" and status["n_succeeded"] == 2 and status["n_jobs"] == 2
    assert len(status["jobs_submitted"]) == 2
    assert p.run().status()["state"] == "success"  # hail's idiom; nothing runs again


def test_a_large_script_travels_through_the_bucket(cloud, tmp_path):
    standin, bucket = cloud
    p = Pipeline(name="big", backend=backend(bucket))
    t = p.new_task(name="long")
    for i in range(3000):
        t.command(f"echo line-{i:05d}-{'x' * 20} >> {t.ofile}")
    p.write_output(t.ofile, str(tmp_path / "x"))
    result, log = run(tmp_path, p)
    assert result.ok, log
    assert len((tmp_path / "x").read_text().splitlines()) == 3000
    assert any(n.endswith("/manifest.json") for n in objects(bucket, "cache/runs/"))


def test_corrupt_blobs_in_the_bucket_are_replaced_and_the_work_done(cloud, tmp_path):
    """A blob whose name lies, for an input (replaced by the client before it submits) and
    for an output (replaced by stage-out on the VM): the build succeeds with the right bytes."""
    _, bucket = cloud
    from pipebuild.hashing import digest_str, hash_file

    (tmp_path / "in.txt").write_text("genuine\n")
    digest = hash_file(str(tmp_path / "in.txt"))
    bucket.blob(f"cache/cas/{digest}").upload_from_string(b"forged\n")
    out_digest = digest_str("GENUINE\n")
    bucket.blob(f"cache/cas/{out_digest}").upload_from_string(b"FORGED\n")
    p = one_task(bucket, tmp_path / "x", "reader", lambda o, src: f"tr a-z A-Z < {src} > {o}", tmp_path / "in.txt")
    result, log = run(tmp_path, p)
    assert result.ok, log
    assert (tmp_path / "x").read_text() == "GENUINE\n"
    assert f"cache/cas/{digest} held other bytes; replaced" in log
    assert bucket.blob(f"cache/cas/{digest}").download_as_bytes() == b"genuine\n"
    assert bucket.blob(f"cache/cas/{out_digest}").download_as_bytes() == b"GENUINE\n"


def test_an_api_that_keeps_failing_fails_the_task_and_deletes_its_job(cloud, tmp_path):
    standin, bucket = cloud
    p = one_task(bucket, tmp_path / "x", "unseen", lambda o, _: f"sleep 5; touch {o}", api_deadline=1.0)
    standin.fail_next(403, times=10_000, method="GET", path_contains="/jobs")  # e.g. expired credentials
    t0 = time.monotonic()
    result, log = run(tmp_path, p)
    assert time.monotonic() - t0 < 30
    assert [f.name for f in result.failed] == ["unseen"]
    assert result.failed[0].detail.startswith("infrastructure failure: cannot follow Cloud Batch job pb-unseen-")
    assert "warning: cannot follow Cloud Batch jobs" in log
    assert ("DELETE", f"/v1/{standin.created[0]}") in [(m, q.split("?")[0]) for m, q in standin.requests]
    assert (tmp_path / ".pipebuild" / "batch-jobs").read_text() == ""


class StubClient:
    """A Batch client whose create lets a Ctrl-C land while the request is in flight."""

    def __init__(self, executor: BatchExecutor) -> None:
        self.executor = executor
        self.calls: list[tuple[str, str]] = []

    def create_job(self, parent: str, job, job_id: str):  # type: ignore[no-untyped-def]
        self.calls.append(("create", job_id))
        self.executor.cancel_all()  # Ctrl-C, while the create is on the wire
        return job

    def delete_job(self, name: str):  # type: ignore[no-untyped-def]
        self.calls.append(("delete", name.rsplit("/", 1)[1]))


def test_ctrl_c_during_a_create_deletes_the_job_it_created(tmp_path, monkeypatch):
    ex = BatchExecutor(settings(), client=None)
    ex._client = StubClient(ex)
    monkeypatch.setattr(ex, "_upload_inputs", lambda job: None)
    monkeypatch.setattr(ex, "_manifest", lambda job, job_id: {})
    res = ex.run(Job("t", str(tmp_path), "true\n", "", "", image=IMAGE, key="ef" * 16))
    assert res.error == "interrupted"
    (create, cid), (delete, did) = ex._client.calls
    assert (create, delete) == ("create", "delete") and cid == did


def event(code: int) -> dict:  # type: ignore[type-arg]
    return {"description": f"task failed with {code}", "taskExecution": {"exitCode": code}}


@pytest.mark.parametrize(
    ("state", "result", "code", "timeout", "want"),
    [
        ("FAILED", {"rc": 3, "staged": True}, 3, None, "exit 3"),
        ("FAILED", {"rc": 137, "staged": True}, 137, 60, "exit 137"),  # killed (OOM): not a timeout
        ("FAILED", {"rc": None, "staged": True}, 50005, 60, "timed out"),
        ("FAILED", {"rc": None, "staged": True}, 50002, 60, "infrastructure failure: the VM stopped reporting"),
        ("FAILED", {"rc": None, "staged": True}, 50003, None, "infrastructure failure: the VM rebooted"),
        (
            "FAILED",
            {"rc": None, "staged": False, "error": "NotFound: 404"},
            3,
            None,
            "infrastructure failure: stage-in: NotFound",
        ),
        ("FAILED", None, 4, None, "infrastructure failure: Cloud Batch job pb-j FAILED (exit code 4)"),
        ("FAILED", {"rc": 0, "staged": True}, 4, 60, "infrastructure failure: stage-out could not store"),
        ("CANCELLED", None, None, None, "the Cloud Batch job pb-j was cancelled or deleted"),
    ],
)
def test_how_a_finished_job_is_reported(state, result, code, timeout, want, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    from google.cloud import batch_v1

    ex = BatchExecutor(settings())
    monkeypatch.setattr(ex, "_read_result", lambda job_id: result)
    monkeypatch.setattr(ex, "_fetch_logs", lambda job, result: None)
    done = batch_v1.Job.from_json(
        json.dumps({"status": {"state": state, "statusEvents": [event(code)] if code else []}}),
        ignore_unknown_fields=True,
    )
    job = Job("t", str(tmp_path), "", "", "", timeout=timeout)
    res = ex._result(job, "pb-j", state, code, done)
    if want.startswith("exit "):
        assert (res.exit_code, res.error, res.timed_out) == (int(want[5:]), None, False)
    elif want == "timed out":
        assert res.timed_out and res.error is None
    else:
        assert res.error is not None and res.error.startswith(want), res.error
        assert not res.timed_out


# -- the command line ------------------------------------------------------------------


PIPEFILE = """\
from pipebuild import Pipeline

p = Pipeline(name="cli")
src = p.read_input("in.txt")
t = p.new_task(name="shout").image("pipebuild-test:bash")
t.command(f"tr a-z A-Z < {src} > {t.ofile}")
p.write_output(t.ofile, "out/shout.txt")
slow = p.new_task(name="slow").image("pipebuild-test:bash")
slow.command(f"sleep $(cat {src} | wc -l)00; touch {slow.ofile}")
p.write_output(slow.ofile, "out/slow.txt")
"""


def cli(args: list[str], cwd: Path, env: dict[str, str], **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "pipebuild", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180, **kw
    )


def test_cli_backend_batch_from_environment(cloud, tmp_path):
    standin, bucket = cloud
    (tmp_path / "Pipefile.py").write_text(PIPEFILE)
    (tmp_path / "in.txt").write_text("hi\n")
    env = dict(os.environ, PIPEBUILD_BATCH_PROJECT=PROJECT, PIPEBUILD_BATCH_BUCKET=f"gs://{bucket.name}/ci", CI="true")
    r = cli(["make", "--backend", "batch", "out/shout.txt"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "shout.txt").read_text() == "HI\n"
    assert len(standin.created) == 1 and standin.created[0].startswith(f"projects/{PROJECT}/locations/us-central1/")
    assert objects(bucket, "ci/ac/")
    r = cli(["make", "--backend", "batch", "-n", "out/shout.txt"], tmp_path, env)
    assert r.returncode == 0 and "0 of 1 tasks would run" in r.stdout
    no_bucket = {k: v for k, v in env.items() if k != "PIPEBUILD_BATCH_BUCKET"}
    r = cli(["make", "--backend", "batch"], tmp_path, no_bucket)
    assert r.returncode == 2 and r.stderr.strip().startswith("pipebuild: BatchBackend needs a bucket")


def start_slow_make(cloud, tmp_path: Path, **popen: Any) -> tuple[subprocess.Popen[str], dict[str, str]]:  # type: ignore[no-untyped-def]
    """`pipebuild make --backend batch out/slow.txt` of PIPEFILE in tmp_path, returned once
    its job's container runs: (the process, its environment)."""
    standin, bucket = cloud
    (tmp_path / "Pipefile.py").write_text(PIPEFILE)
    (tmp_path / "in.txt").write_text("hi\n")
    env = dict(os.environ, PIPEBUILD_BATCH_PROJECT=PROJECT, PIPEBUILD_BATCH_BUCKET=bucket.name, CI="true")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipebuild", "make", "--backend", "batch", "out/slow.txt"],
        cwd=tmp_path, env=env, text=True, **popen,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not standin.containers() or not standin.created:
            assert time.monotonic() < deadline and proc.poll() is None, "the job never started"
            time.sleep(0.2)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, env


def test_cli_ctrl_c_deletes_the_running_jobs(cloud, tmp_path):
    standin, _ = cloud
    proc, _ = start_slow_make(cloud, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert ("DELETE", f"/v1/{standin.created[0]}") in [(m, p.split("?")[0]) for m, p in standin.requests]
    assert standin.wait_idle(30)
    assert standin.containers() == []


# -- against real Google Cloud (opt-in) --------------------------------------------------

GCP_PROJECT = os.environ.get("PIPEBUILD_TEST_GCP_PROJECT")
GCP_BUCKET = os.environ.get("PIPEBUILD_TEST_GCP_BUCKET")
GCP_RUNTIME = os.environ.get("PIPEBUILD_TEST_GCP_RUNTIME_IMAGE")


@pytest.mark.skipif(
    not (GCP_PROJECT and GCP_BUCKET and GCP_RUNTIME),
    reason="contract test against real Google Cloud: set PIPEBUILD_TEST_GCP_PROJECT, PIPEBUILD_TEST_GCP_BUCKET "
    "and PIPEBUILD_TEST_GCP_RUNTIME_IMAGE (and application-default credentials)",
)
def test_contract_real_cloud_batch(tmp_path, monkeypatch):
    for var in ("STORAGE_EMULATOR_HOST", "PIPEBUILD_BATCH_API_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    prefix = f"gs://{GCP_BUCKET}/pipebuild-contract-{int(time.time())}"
    p = Pipeline(
        name="contract",
        backend=BatchBackend(
            project=GCP_PROJECT,
            region=os.environ.get("PIPEBUILD_TEST_GCP_REGION", "us-central1"),
            bucket=prefix,
            runtime_image=GCP_RUNTIME,
            spot=True,
        ),
    )
    (tmp_path / "in.txt").write_text("contract\n")
    src = p.read_input(str(tmp_path / "in.txt"))
    t = p.new_task(name="upper")
    t.command(f"tr a-z A-Z < {src} > {t.ofile}")
    p.write_output(t.ofile, str(tmp_path / "out.txt"))
    result, log = run(tmp_path, p)
    assert result.ok, log
    assert (tmp_path / "out.txt").read_text() == "CONTRACT\n"
    again, _ = run(tmp_path, p)
    assert again.ran == [] and again.up_to_date == ["upper"]


def test_jobs_left_by_a_killed_build_are_deleted_by_the_next(cloud, tmp_path):
    standin, _ = cloud
    proc, env = start_slow_make(cloud, tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.kill()  # SIGKILL: no chance to delete anything
    proc.wait()
    orphan = standin.created[0]
    assert standin.get_job(orphan)["status"]["state"] in ("SCHEDULED", "RUNNING")
    r = cli(["make", "--backend", "batch", "out/shout.txt"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert "deleted the 1 Cloud Batch job(s) an interrupted build had submitted" in r.stderr + r.stdout
    assert ("DELETE", f"/v1/{orphan}") in [(m, p.split("?")[0]) for m, p in standin.requests]
    assert standin.wait_idle(30)
    assert standin.containers() == []
    assert (tmp_path / ".pipebuild" / "batch-jobs").read_text() == ""


def test_a_large_file_is_staged_in_and_out_intact(cloud, tmp_path):
    """60 MiB each way: resumable uploads in chunks on both sides, streamed downloads."""
    standin, bucket = cloud
    data = os.urandom(60 << 20)
    (tmp_path / "big.bin").write_bytes(data)
    p = one_task(bucket, tmp_path / "twice.bin", "copy", lambda o, src: f"cat {src} {src} > {o}", tmp_path / "big.bin")
    result, log = run(tmp_path, p)
    assert result.ok, log
    assert (tmp_path / "twice.bin").read_bytes() == data + data
