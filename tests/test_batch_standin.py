"""The Batch stand-in (tests/batch_standin.py), driven through the real google-cloud-batch client.

The executor tests trust this stand-in to behave like Cloud Batch, so here it is checked on its
own: the client's view of the API (names, paging, filters, errors, retries) and what a job
really does (files a container leaves on the "VM", exit codes in status events, retries,
preemption, deadlines, and the daemon's own container list after a cancel or delete).
Script runnables are used where Docker is beside the point: each container costs ~0.3 s.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("google.cloud.batch_v1")  # the fixtures skip or fail with a reason; this keeps imports clean

from batch_standin import BatchStandin, client_for  # noqa: E402
from google.api_core import exceptions  # noqa: E402
from google.cloud import batch_v1  # noqa: E402

IMAGE = "pipebuild-test:bash"
PARENT = "projects/test/locations/us-central1"
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def script(text: str, **flags) -> batch_v1.Runnable:  # type: ignore[no-untyped-def]
    return batch_v1.Runnable(script=batch_v1.Runnable.Script(text=text), **flags)


def container(cmd: str, volumes: tuple[str, ...] = (), **flags) -> batch_v1.Runnable:  # type: ignore[no-untyped-def]
    c = batch_v1.Runnable.Container(image_uri=IMAGE, entrypoint="/bin/bash", commands=["-c", cmd], volumes=volumes)
    return batch_v1.Runnable(container=c, **flags)


def job(*runnables: batch_v1.Runnable, task_count: int = 1, labels=None, spot: bool | None = None, **spec):  # type: ignore[no-untyped-def]
    """A one-group job of these runnables; `spec` goes to the TaskSpec."""
    group = batch_v1.TaskGroup(task_spec=batch_v1.TaskSpec(runnables=list(runnables), **spec), task_count=task_count)
    j = batch_v1.Job(task_groups=[group], labels=labels or {})
    if spot is not None:
        model = batch_v1.AllocationPolicy.ProvisioningModel
        policy = batch_v1.AllocationPolicy.InstancePolicy(provisioning_model=model.SPOT if spot else model.STANDARD)
        j.allocation_policy = batch_v1.AllocationPolicy(
            instances=[batch_v1.AllocationPolicy.InstancePolicyOrTemplate(policy=policy)]
        )
    return j


def run(api, job_id: str, j: batch_v1.Job, timeout: float = 30) -> batch_v1.Job:  # type: ignore[no-untyped-def]
    """Create the job and poll it until it ends."""
    created = api.create_job(parent=PARENT, job=j, job_id=job_id)
    return wait(api, created.name, TERMINAL, timeout)


def wait(api, name: str, states: tuple[str, ...], timeout: float = 30) -> batch_v1.Job:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        got = api.get_job(name=name)
        if got.status.state.name in states:
            return got
        assert time.monotonic() < deadline, f"{name} still {got.status.state.name}"
        time.sleep(0.05)


def task_exit_codes(api, name: str, index: int = 0) -> list[int]:  # type: ignore[no-untyped-def]
    """Exit codes in task `index`'s status events, oldest first."""
    task = api.get_task(name=f"{name}/taskGroups/group0/tasks/{index}")
    return [e.task_execution.exit_code for e in task.status.status_events if "exit code" in e.description]


def retry_on(*codes: int, action=batch_v1.LifecyclePolicy.Action.RETRY_TASK) -> list[batch_v1.LifecyclePolicy]:  # type: ignore[no-untyped-def]
    condition = batch_v1.LifecyclePolicy.ActionCondition(exit_codes=list(codes))
    return [batch_v1.LifecyclePolicy(action=action, action_condition=condition)]


# -- the API surface ---------------------------------------------------------------------


def test_create_get_list_with_label_filter_and_paging_then_delete(batch_standin, batch_api):
    # Given five jobs, three labelled run=a, we should list exactly those three, two per page.
    for i in range(5):
        labels = {"run": "a" if i % 2 == 0 else "b", "n": str(i)}
        created = batch_api.create_job(parent=PARENT, job=job(script("true"), labels=labels), job_id=f"pb-job-{i}")
        assert created.status.state.name == "QUEUED"
    got = batch_api.get_job(name=f"{PARENT}/jobs/pb-job-0")
    assert got.name == f"{PARENT}/jobs/pb-job-0" and got.uid.startswith("pb-job-0-")
    assert got.create_time.year >= 2024 and dict(got.labels) == {"run": "a", "n": "0"}

    before = len(batch_standin.requests)
    pager = batch_api.list_jobs(request={"parent": PARENT, "filter": 'labels.run="a"', "page_size": 2})
    assert [j.name.rsplit("/", 1)[1] for j in pager] == ["pb-job-0", "pb-job-2", "pb-job-4"]
    assert len(batch_standin.requests) - before == 2  # two pages
    both = batch_api.list_jobs(request={"parent": PARENT, "filter": "labels.run=b AND labels.n=3"})
    assert [j.name.rsplit("/", 1)[1] for j in both] == ["pb-job-3"]
    assert len(list(batch_api.list_jobs(parent="projects/test/locations/elsewhere"))) == 0

    assert batch_standin.wait_idle(30)
    op = batch_api.delete_job(name=f"{PARENT}/jobs/pb-job-1")
    assert op.done()
    with pytest.raises(exceptions.NotFound):
        batch_api.get_job(name=f"{PARENT}/jobs/pb-job-1")
    assert len(list(batch_api.list_jobs(parent=PARENT))) == 4
    assert batch_standin.created == [f"{PARENT}/jobs/pb-job-{i}" for i in range(5)]


def test_duplicate_create_is_conflict_and_bad_id_is_400(batch_standin, batch_api):
    batch_api.create_job(parent=PARENT, job=job(script("true")), job_id="pb-dup")
    with pytest.raises(exceptions.Conflict):
        batch_api.create_job(parent=PARENT, job=job(script("true")), job_id="pb-dup")
    for bad in ("Upper", "9starts-with-digit", "ends-with-dash-", "x" * 64):
        with pytest.raises(exceptions.BadRequest):
            batch_api.create_job(parent=PARENT, job=job(script("true")), job_id=bad)
    assert batch_standin.created == [f"{PARENT}/jobs/pb-dup"]


def test_not_emulated_features_are_rejected(batch_standin, batch_api):
    gcs = batch_v1.Volume(gcs=batch_v1.GCS(remote_path="bucket/dir"), mount_path="/mnt/gcs")
    with pytest.raises(exceptions.BadRequest, match="gcs"):
        batch_api.create_job(parent=PARENT, job=job(script("true"), volumes=[gcs]), job_id="pb-gcs")
    with pytest.raises(exceptions.BadRequest, match="maxRetryCount"):
        batch_api.create_job(parent=PARENT, job=job(script("true"), max_retry_count=11), job_id="pb-retries")
    assert batch_standin.created == []


def test_unknown_path_is_404_and_a_malformed_body_400_in_google_error_format(batch_standin):
    # The client cannot send these requests, so plain HTTP.
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{batch_standin.endpoint}/v1/{PARENT}/queues/q1", timeout=5)
    body = json.loads(e.value.read())
    e.value.close()
    assert e.value.code == 404 and body["error"]["code"] == 404 and body["error"]["status"] == "NOT_FOUND"

    bad = json.dumps({"taskGroups": [{"taskCount": "many", "taskSpec": {"runnables": [{"script": {"text": "true"}}]}}]})
    request = urllib.request.Request(
        f"{batch_standin.endpoint}/v1/{PARENT}/jobs?jobId=pb-bad", bad.encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=5)
    body = json.loads(e.value.read())
    e.value.close()
    assert e.value.code == 400 and body["error"]["status"] == "INVALID_ARGUMENT"
    assert batch_standin.created == []


def test_injected_429_raises_and_503_is_retried_by_get_job(batch_standin, batch_api):
    batch_standin.fail_next(429, method="POST")
    with pytest.raises(exceptions.TooManyRequests):
        batch_api.create_job(parent=PARENT, job=job(script("true")), job_id="pb-throttled")
    assert batch_standin.created == []  # an injected failure does nothing
    name = batch_api.create_job(parent=PARENT, job=job(script("true")), job_id="pb-throttled").name

    batch_standin.fail_next(503, times=2, method="GET", path_contains="pb-throttled")
    before = len(batch_standin.requests)
    assert batch_api.get_job(name=name).name == name
    assert batch_standin.requests[before:] == [("GET", f"/v1/{name}")] * 3


def test_enums_are_read_as_integers_or_names():
    # The client sends integers ($alt=json;enum-encoding=int); hand-written JSON may use names.
    from batch_standin import ACTIONS, PROVISIONING_MODELS, _should_retry, enum_name

    assert enum_name(2, PROVISIONING_MODELS) == enum_name("SPOT", PROVISIONING_MODELS) == "SPOT"
    for action in (1, "RETRY_TASK"):
        policy = [{"action": action, "actionCondition": {"exitCodes": [50001]}}]
        assert _should_retry(50001, policy) and not _should_retry(1, policy)
    assert enum_name("2", ACTIONS) == "FAIL_TASK"


# -- what jobs do --------------------------------------------------------------------------


def test_runnables_share_a_volume_and_always_run_runs_after_a_failure(batch_standin, batch_api):
    # Given write → read-and-fail → skipped → always_run, we should see the read, the failure's
    # exit code, no trace of the skipped runnable, and the always_run one's file.
    vol = ("/mnt/disks/pb:/pb",)
    batch_standin.env["CLOUD_NOTE"] = "from-the-cloud"  # as the fixture passes STORAGE_EMULATOR_HOST
    hi = batch_v1.Environment(variables={"GREETING": "hi"})  # the runnable's env wins over the task's
    j = job(
        container('echo "$GREETING $BATCH_TASK_INDEX/$BATCH_TASK_COUNT $CLOUD_NOTE" > /pb/msg', vol, environment=hi),
        container("cat /pb/msg; exit 3", vol),
        container("touch /pb/skipped", vol),
        container("cp /pb/msg /pb/copied", vol, always_run=True),
        environment=batch_v1.Environment(variables={"GREETING": "hello"}),
    )
    done = run(batch_api, "pb-volume", j)
    assert done.status.state.name == "FAILED"
    disk = batch_standin.vm_root("pb-volume") / "mnt/disks/pb"
    assert (disk / "copied").read_text() == "hi 0/1 from-the-cloud\n"
    assert not (disk / "skipped").exists()
    assert "hi 0/1 from-the-cloud" in batch_standin.log("pb-volume")
    assert task_exit_codes(batch_api, done.name) == [3]
    assert done.status.status_events[-1].task_execution.exit_code == 3
    assert dict(done.status.task_groups["group0"].counts) == {"FAILED": 1}
    states = [e.description.split(" to ")[1].split(" ")[0] for e in done.status.status_events]
    assert states == ["SCHEDULED", "RUNNING", "FAILED"]
    assert batch_standin.containers() == []  # removed after use


def test_ignore_exit_status_and_task_count(batch_standin, batch_api):
    # Given three tasks whose first runnable fails but is ignored, every task should succeed,
    # each on its own VM with its own index.
    j = job(script("exit 7", ignore_exit_status=True), script('echo "$BATCH_TASK_INDEX" > idx'), task_count=3)
    done = run(batch_api, "pb-ignored", j)
    assert done.status.state.name == "SUCCEEDED"
    assert dict(done.status.task_groups["group0"].counts) == {"SUCCEEDED": 3}
    tasks = list(batch_api.list_tasks(parent=f"{done.name}/taskGroups/group0"))
    assert [t.status.state.name for t in tasks] == ["SUCCEEDED"] * 3
    assert [(batch_standin.vm_root("pb-ignored", i) / "idx").read_text() for i in range(3)] == ["0\n", "1\n", "2\n"]

    plain = run(batch_api, "pb-not-ignored", job(script("exit 7"), script("touch after")))
    assert plain.status.state.name == "FAILED" and task_exit_codes(batch_api, plain.name) == [7]
    assert not (batch_standin.vm_root("pb-not-ignored") / "after").exists()


def test_over_max_run_duration_is_exit_50005(batch_standin, batch_api):
    t = time.monotonic()
    done = run(batch_api, "pb-slow", job(container("sleep 30"), max_run_duration="1s"))
    assert done.status.state.name == "FAILED"
    assert task_exit_codes(batch_api, done.name) == [50005]
    assert time.monotonic() - t < 10
    quick = run(batch_api, "pb-timeout", job(script("sleep 30", timeout="0.5s"), script("touch after")))
    assert task_exit_codes(batch_api, quick.name) == [50005]
    assert not (batch_standin.vm_root("pb-timeout") / "after").exists()


def test_default_policy_retries_any_failure_and_fail_task_does_not(batch_standin, batch_api):
    flaky = script('echo "$BATCH_TASK_RETRY_ATTEMPT" > attempt; [ "$BATCH_TASK_RETRY_ATTEMPT" = 1 ]')
    done = run(batch_api, "pb-flaky", job(flaky, max_retry_count=2))
    assert done.status.state.name == "SUCCEEDED"
    assert task_exit_codes(batch_api, done.name) == [1, 0]
    task = batch_api.get_task(name=f"{done.name}/taskGroups/group0/tasks/0")
    states = [e.task_state.name for e in task.status.status_events]
    assert states == ["ASSIGNED", "RUNNING", "FAILED", "PENDING", "ASSIGNED", "RUNNING", "SUCCEEDED"]
    assert done.update_time >= done.create_time
    assert (batch_standin.vm_root("pb-flaky", attempt=1) / "attempt").read_text() == "1\n"
    retries = [e for e in done.status.status_events if e.type_ == "TASK_RETRY"]
    assert [e.task_execution.exit_code for e in retries] == [1]

    action = batch_v1.LifecyclePolicy.Action.FAIL_TASK
    failed = run(
        batch_api, "pb-fail-task", job(flaky, max_retry_count=2, lifecycle_policies=retry_on(1, action=action))
    )
    assert failed.status.state.name == "FAILED" and task_exit_codes(batch_api, failed.name) == [1]


def test_spot_preemption_is_retried_by_retry_task_and_standard_vms_are_not_preempted(batch_standin, batch_api):
    # Given one pending preemption, a STANDARD job should run untouched and the next SPOT job
    # should lose its first attempt (50001, nothing run) and succeed on the second.
    batch_standin.preempt(1)
    writes = container('echo "$BATCH_TASK_RETRY_ATTEMPT" > /pb/attempt', ("/mnt/disks/pb:/pb",))
    spec = {"max_retry_count": 2, "lifecycle_policies": retry_on(50001, 50002)}
    standard = run(batch_api, "pb-standard", job(writes, spot=False, **spec))
    assert standard.status.state.name == "SUCCEEDED" and task_exit_codes(batch_api, standard.name) == [0]

    spot = run(batch_api, "pb-spot", job(writes, spot=True, **spec))
    assert spot.status.state.name == "SUCCEEDED"
    assert task_exit_codes(batch_api, spot.name) == [50001, 0]
    assert not (batch_standin.vm_root("pb-spot", attempt=0) / "mnt/disks/pb/attempt").exists()
    assert (batch_standin.vm_root("pb-spot", attempt=1) / "mnt/disks/pb/attempt").read_text() == "1\n"

    # A code the policy does not list is not retried.
    batch_standin.preempt(1, match="pb-spot-two")
    once = run(batch_api, "pb-spot-two", job(writes, spot=True, max_retry_count=2, lifecycle_policies=retry_on(3)))
    assert once.status.state.name == "FAILED" and task_exit_codes(batch_api, once.name) == [50001]


def test_preemption_mid_run_kills_the_container(batch_standin, batch_api):
    batch_standin.preempt(1, after=0.5)
    slow = container("sleep 30; touch /pb/finished", ("/mnt/disks/pb:/pb",))
    t = time.monotonic()
    done = run(
        batch_api,
        "pb-mid",
        job(slow, container("touch /pb/stageout", ("/mnt/disks/pb:/pb",), always_run=True), spot=True),
    )
    assert time.monotonic() - t < 10
    assert task_exit_codes(batch_api, done.name) == [50001]
    assert not (batch_standin.vm_root("pb-mid") / "mnt/disks/pb/stageout").exists()  # the VM is gone


@pytest.mark.parametrize("how", ["cancel", "delete"])
def test_cancel_and_delete_stop_the_running_container(batch_standin, batch_api, how):
    name = batch_api.create_job(parent=PARENT, job=job(container("sleep 60")), job_id=f"pb-{how}").name
    deadline = time.monotonic() + 20
    while not [c for c in batch_standin.containers() if c.status == "running"]:
        assert time.monotonic() < deadline, "the container never started"
        time.sleep(0.05)
    op = (batch_api.cancel_job if how == "cancel" else batch_api.delete_job)(name=name)
    assert op.done()
    assert batch_standin.containers() == []  # gone before the call returned
    if how == "cancel":
        assert wait(batch_api, name, TERMINAL).status.state.name == "CANCELLED"
    else:
        assert batch_standin.wait_idle(20)
        with pytest.raises(exceptions.NotFound):
            batch_api.get_job(name=name)


def test_background_runnables_end_with_the_vm(batch_standin, batch_api):
    t = time.monotonic()
    done = run(batch_api, "pb-bg", job(container("sleep 30", background=True), script("sleep 0.2; touch done")))
    assert done.status.state.name == "SUCCEEDED" and time.monotonic() - t < 10
    assert (batch_standin.vm_root("pb-bg") / "done").exists()
    assert batch_standin.containers() == []


def intervals(standin, job_id: str, tasks: int) -> list[tuple[float, float]]:  # type: ignore[no-untyped-def]
    """(start, end) of each task of a job of `timed` runnables."""
    return [tuple(map(float, (standin.vm_root(job_id, i) / "t").read_text().split())) for i in range(tasks)]


timed = script("s=$(date +%s.%N); sleep 0.5; echo $s $(date +%s.%N) > t")


def overlap(spans: list[tuple[float, float]]) -> bool:
    spans = sorted(spans)
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))


def test_parallelism_of_a_task_group_and_of_the_standin(batch_standin, batch_api, tmp_path):
    # Given three 0.5 s tasks, they should overlap by default and not with parallelism=1.
    run(batch_api, "pb-wide", job(timed, task_count=3))
    assert overlap(intervals(batch_standin, "pb-wide", 3))
    narrow = job(timed, task_count=3)
    narrow.task_groups[0].parallelism = 1
    run(batch_api, "pb-narrow", narrow)
    assert not overlap(intervals(batch_standin, "pb-narrow", 3))

    # A stand-in with one slot runs one task at a time over all jobs.
    with BatchStandin(tmp_path / "solo", parallelism=1) as solo, client_for(solo.endpoint) as api:
        for i in range(2):
            api.create_job(parent=PARENT, job=job(timed), job_id=f"pb-solo-{i}")
        assert solo.wait_idle(20)
        assert not overlap([intervals(solo, f"pb-solo-{i}", 1)[0] for i in range(2)])


def test_concurrent_jobs_on_the_same_host_path_do_not_share_files(batch_standin, batch_api):
    # Given two jobs at once that write, wait, then read the same /mnt/disks/pb/x, each should
    # read back its own bytes, as on two VMs.
    names = []
    for who in ("left", "right"):
        cmd = f"echo {who} > /pb/x; sleep 0.5; [ $(cat /pb/x) = {who} ]"
        j = job(container(cmd, ("/mnt/disks/pb:/pb",)))
        names.append(batch_api.create_job(parent=PARENT, job=j, job_id=f"pb-{who}").name)
    assert [wait(batch_api, n, TERMINAL).status.state.name for n in names] == ["SUCCEEDED"] * 2
