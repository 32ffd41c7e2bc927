"""The Cloud Batch executor: each task that must run becomes one Google Cloud Batch job.

The engine drives the graph on the client, as for local builds (Batch v1 has no job
dependencies): when a task is ready and its action key misses both caches, `run(job)`

1. uploads the task's inputs to the content store `gs://BUCKET/PREFIX/cas/<digest>`
   (create-only; blobs known to be there are skipped);
2. creates a job `pb-<task>-<key[:12]>-<run>-<n>` of three runnables sharing the VM
   directory /mnt/disks/pb, mounted at /pb:
   * stage-in, in the runtime image: `python3 -m pipebuild.stage in` (see stage.py);
   * the task's script in its image (default `ubuntu:latest`, as hail's BatchBackend), with
     its stdout, stderr and exit code written under /pb/meta;
   * stage-out, `always_run`: logs and outputs to the content store, then the result;
3. waits: one poller per build lists the run's jobs by label (`pipebuild-run=<id>`), so a
   poll costs one request however many jobs are active (Batch allows 15,000 reads a minute
   per region), with a backoff from `poll_interval` up to `poll_max`;
4. brings back the logs and outputs, each checked against its digest, into the task
   directory, where the engine collects them exactly as for a local task.

Creating a job is retried on 429, 500, 503 and timeouts with backoff; the job id is chosen
here, so a retried create that meets 409 (it exists) is not a failure. With `spot=True`
tasks run on Spot VMs, retried by Batch after a preemption (lifecycle RETRY_TASK on exit
codes 50001-50006), and once more on a standard VM if Spot keeps losing them. Ctrl-C and
a failure without -k delete the run's active jobs.

A failure of the command reports its exit code, and its stderr comes back for the tail
shown by pipebuild; a failure of the platform (a reserved exit code 5000x, a stage-in that
could not fetch an input) says "infrastructure failure" and what Batch reported.

The client is google-cloud-batch's synchronous REST client, called from the engine's
worker threads. `api_endpoint` (or PIPEBUILD_BATCH_API_ENDPOINT) selects another endpoint;
a loopback `http://` endpoint is used with anonymous credentials (tests run a stand-in of
the API: tests/batch_standin.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import PipelineException, UsageError
from . import STOPPED, Job, JobResult

ENV_ENDPOINT = "PIPEBUILD_BATCH_API_ENDPOINT"
ENV_RUNTIME = "PIPEBUILD_RUNTIME_IMAGE"
DEFAULT_RUNTIME_IMAGE = "ghcr.io/pipebuild/runtime:0.1.0"  # pipebuild.__version__: see runtime/README.md
DEFAULT_IMAGE = "ubuntu:latest"
MOUNT = "/mnt/disks/pb:/pb"
# Reserved exit codes of Cloud Batch (the troubleshooting page, via Cromwell's GcpBatchExitCode).
INFRA_EXIT = {
    50000: "the task failed for a reason Batch did not name",
    50001: "the Spot VM was preempted",
    50002: "the VM stopped reporting to Batch",
    50003: "the VM rebooted during the task",
    50004: "the VM and the task stopped responding",
    50005: "the task ran past its maximum run time",
    50006: "the VM was recreated",
}
PREEMPTION_EXIT = [50001, 50002, 50003, 50006]
MANIFEST_INLINE_MAX = 64 << 10  # a job definition is capped at 1 MB: larger manifests go to the bucket
MAX_CPU = 416  # the largest GCE machine types; a request above cannot be placed anywhere
MAX_MEMORY = 32 << 40
_TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


@dataclass
class Settings:
    """Where and how tasks run on Cloud Batch (BatchBackend's arguments, resolved)."""

    project: str
    region: str
    bucket: str
    prefix: str = "pipebuild"
    api_endpoint: str | None = None
    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    default_image: str = DEFAULT_IMAGE
    spot: bool = False
    spot_retries: int = 3  # Batch retries after a preemption, before one standard-VM attempt
    machine_type: str | None = None
    service_account: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    poll_interval: float = 2.0
    poll_max: float = 30.0
    api_deadline: float = 600.0  # how long transient API errors (creates, polls, deletes) are retried

    @property
    def parent(self) -> str:
        """The Batch location that owns the jobs."""
        return f"projects/{self.project}/locations/{self.region}"


def make_client(endpoint: str | None) -> Any:
    """The synchronous REST client of google-cloud-batch, for `endpoint` if given."""
    try:
        from google.api_core.client_options import ClientOptions
        from google.cloud import batch_v1
    except ImportError:
        raise UsageError("BatchBackend needs google-cloud-batch: pip install 'pipebuild[batch]'") from None
    kwargs: dict[str, Any] = {"transport": "rest"}
    if endpoint:
        kwargs["client_options"] = ClientOptions(api_endpoint=endpoint)
        if re.match(r"http://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?(/|$)", endpoint):
            from google.auth.credentials import AnonymousCredentials

            kwargs["credentials"] = AnonymousCredentials()  # type: ignore[no-untyped-call]
    return batch_v1.BatchServiceClient(**kwargs)


def slug(text: str, n: int) -> str:
    """`text` as a Batch job-id or label fragment: lowercase [a-z0-9-], at most n chars."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "task"


def label_value(text: str) -> str:
    """A label value: lowercase letters, digits, '_' and '-', at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower())[:63]


def resources(job: Job) -> tuple[int | None, int | None, int | None]:
    """(cpu_milli, memory_mib, boot_disk_mib) for the task's requests; PipelineException
    for a request no machine can meet, before anything is submitted."""
    from .docker import parse_cpu, parse_quantity

    cpu = mem = disk = None
    if job.cpu is not None:
        cores = parse_cpu(job.cpu)
        if cores > MAX_CPU:
            raise PipelineException(f"task {job.name}: cpu {job.cpu} is more than any machine has ({MAX_CPU})")
        cpu = max(1, math.ceil(cores * 1000))
    if job.memory is not None:
        size = parse_quantity(job.memory)
        if size > MAX_MEMORY:
            raise PipelineException(f"task {job.name}: memory {job.memory} is more than any machine has")
        mem = max(1, math.ceil(size / (1 << 20)))
    if job.storage is not None:
        # The task directory lives on the boot disk; keep 30 GiB for the OS and images.
        disk = 30 * 1024 + math.ceil(parse_quantity(job.storage) / (1 << 20))
    return cpu, mem, disk


def wrap_command() -> str:
    """The main runnable's bash: run the script in /pb/work, keep its logs and exit code."""
    return (
        "cd /pb/work && PIPEBUILD_TASK_DIR=/pb/work bash /pb/meta/script.sh "
        ">/pb/meta/stdout 2>/pb/meta/stderr; rc=$?; echo $rc >/pb/meta/rc; exit $rc"
    )


def job_spec(settings: Settings, job: Job, job_id: str, run_id: str, manifest_env: dict[str, str], spot: bool) -> Any:
    """The batch_v1.Job for one task."""
    from google.cloud import batch_v1
    from google.protobuf import duration_pb2  # type: ignore[import-untyped]

    cpu, mem, disk = resources(job)
    container = batch_v1.Runnable.Container
    stage_in = batch_v1.Runnable(
        container=container(
            image_uri=settings.runtime_image, entrypoint="python3", commands=["-m", "pipebuild.stage", "in"],
            volumes=[MOUNT],
        ),
        display_name="stage-in",
    )  # fmt: skip
    main = batch_v1.Runnable(
        container=container(
            image_uri=job.image or settings.default_image, entrypoint="/bin/bash", commands=["-c", wrap_command()],
            volumes=[MOUNT],
        ),
        display_name="main",
    )  # fmt: skip
    if job.timeout:
        main.timeout = duration_pb2.Duration(seconds=max(1, math.ceil(job.timeout)))
    stage_out = batch_v1.Runnable(
        container=container(
            image_uri=settings.runtime_image, entrypoint="python3", commands=["-m", "pipebuild.stage", "out"],
            volumes=[MOUNT],
        ),
        always_run=True,
        display_name="stage-out",
    )  # fmt: skip
    spec = batch_v1.TaskSpec(
        runnables=[stage_in, main, stage_out],
        environment=batch_v1.Environment(variables=manifest_env),
    )
    compute = batch_v1.ComputeResource()
    if cpu:
        compute.cpu_milli = cpu
    if mem:
        compute.memory_mib = mem
    if disk:
        compute.boot_disk_mib = disk
    spec.compute_resource = compute
    if job.timeout:  # the command's limit, plus time to stage files in and out
        spec.max_run_duration = duration_pb2.Duration(seconds=math.ceil(job.timeout) + 3600)
    if spot:
        spec.max_retry_count = settings.spot_retries
        spec.lifecycle_policies = [
            batch_v1.LifecyclePolicy(
                action=batch_v1.LifecyclePolicy.Action.RETRY_TASK,
                action_condition=batch_v1.LifecyclePolicy.ActionCondition(exit_codes=PREEMPTION_EXIT),
            )
        ]
    policy = batch_v1.AllocationPolicy.InstancePolicy(
        provisioning_model=(
            batch_v1.AllocationPolicy.ProvisioningModel.SPOT
            if spot
            else batch_v1.AllocationPolicy.ProvisioningModel.STANDARD
        )
    )
    if settings.machine_type:
        policy.machine_type = settings.machine_type
    alloc = batch_v1.AllocationPolicy(
        instances=[batch_v1.AllocationPolicy.InstancePolicyOrTemplate(policy=policy)],
        location=batch_v1.AllocationPolicy.LocationPolicy(allowed_locations=[f"regions/{settings.region}"]),
    )
    if settings.service_account:
        alloc.service_account = batch_v1.ServiceAccount(email=settings.service_account)
    labels = {label_value(k): label_value(v) for k, v in settings.labels.items()}
    labels.update(
        {
            "pipebuild-run": run_id,
            "pipebuild-task": label_value(job.name),
            "pipebuild-action": (job.key or "")[:32],
        }
    )
    return batch_v1.Job(
        task_groups=[batch_v1.TaskGroup(task_count=1, task_spec=spec)],
        allocation_policy=alloc,
        labels=labels,
        logs_policy=batch_v1.LogsPolicy(destination=batch_v1.LogsPolicy.Destination.CLOUD_LOGGING),
    )


def _state(job: Any) -> str:
    return str(job.status.state.name)


def _exit_code(job: Any) -> int | None:
    """The exit code of the task's last failed attempt, from the job's status events."""
    code = None
    for event in job.status.status_events:
        te = event.task_execution
        if te is not None and te.exit_code:
            code = int(te.exit_code)
    return code


def _last_event(job: Any) -> str:
    events = list(job.status.status_events)
    return str(events[-1].description) if events else ""


_ACTIVE = ("QUEUED", "SCHEDULED", "RUNNING", "CANCELLATION_IN_PROGRESS", "DELETION_IN_PROGRESS")


class _Unfollowable:
    """What a waiter gets when the API kept failing for longer than `api_deadline`."""

    def __init__(self, why: str) -> None:
        self.why = why


class _Poller:
    """One thread that follows every job of the run and wakes the waiting workers.

    A poll lists the run's jobs in each active state (label and state filters), so its cost
    depends on the jobs running, not on how many the run has submitted; a waited-for job
    missing from those lists has ended (or is too new to be listed) and is fetched once."""

    def __init__(self, client: Any, settings: Settings, run_id: str, warn: Callable[[str], None]) -> None:
        self.client = client
        self.settings = settings
        self.filter = f'labels.pipebuild-run="{run_id}"'
        self.warn = warn
        self.lock = threading.Lock()
        self.waiting: dict[str, tuple[threading.Event, list[Any]]] = {}
        self.poke = threading.Event()
        self.thread: threading.Thread | None = None

    def wait(self, name: str, stop: Callable[[], bool]) -> Any:
        """Block until the job `name` ends (its Job, or an _Unfollowable), or `stop()` is
        true (None)."""
        done = threading.Event()
        box: list[Any] = []
        with self.lock:
            self.waiting[name] = (done, box)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="pipebuild-batch-poll", daemon=True)
                self.thread.start()
        while not done.wait(0.2):
            if stop():
                with self.lock:
                    self.waiting.pop(name, None)
                return None
        return box[0]

    def _loop(self) -> None:
        interval = self.settings.poll_interval
        failing_since: float | None = None
        while True:
            self.poke.wait(interval)
            self.poke.clear()
            with self.lock:
                if not self.waiting:
                    self.thread = None
                    return
                names = set(self.waiting)
            changed = False
            try:
                active: set[str] = set()
                for state in _ACTIVE:
                    request = {
                        "parent": self.settings.parent,
                        "filter": f'{self.filter} AND status.state="{state}"',
                        "page_size": 500,
                    }
                    active.update(j.name for j in self.client.list_jobs(request=request))
                for name in sorted(names - active):
                    j = self._get(name)
                    if _state(j) in _TERMINAL:
                        self._finish(name, j)
                        changed = True
                failing_since = None
            except Exception as e:  # noqa: BLE001 - API errors: retried until api_deadline
                why = _short(e)
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    self.warn(f"pipebuild: warning: cannot follow Cloud Batch jobs: {why}; retrying")
                elif now - failing_since > self.settings.api_deadline:
                    for name in names:
                        self._finish(name, _Unfollowable(why))
                    failing_since = None
            interval = self.settings.poll_interval if changed else min(interval * 1.5, self.settings.poll_max)

    def _get(self, name: str) -> Any:
        from google.api_core import exceptions as gexc

        try:
            return self.client.get_job(name=name)
        except gexc.NotFound:
            from google.cloud import batch_v1

            gone = batch_v1.Job(name=name)
            gone.status.state = batch_v1.JobStatus.State.CANCELLED  # type: ignore[assignment]
            return gone

    def _finish(self, name: str, job: Any) -> None:
        with self.lock:
            entry = self.waiting.pop(name, None)
        if entry is not None:
            entry[1].append(job)
            entry[0].set()


class BatchExecutor:
    """Runs jobs on Google Cloud Batch (see the module docstring)."""

    def __init__(self, settings: Settings, client: Any = None, warn: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.default_image = settings.default_image  # part of the action key of tasks without an image
        self._client = client
        # How to say something to the user; the build sets its reporter's `warning` here.
        self.warn: Callable[[str], None] = warn or (lambda text: print(text, file=sys.stderr))
        self.run_id = "r" + secrets.token_hex(5)
        self._count = 0
        self._lock = threading.Lock()
        self._active: dict[str, str] = {}  # job name -> task name
        self._stopped: set[str] = set()
        self._cancelled = threading.Event()
        self._stop_gen = 0
        self._poller: _Poller | None = None
        # Digests known to be in the bucket's content store; shared with the build's
        # RemoteCache, which then does not upload them again.
        self.remote_blobs: set[str] = set()
        self.submitted: list[str] = []  # job ids, for tests and reports
        self._journal: str | None = None  # the workspace's list of active jobs (see recover)
        self._undeleted: set[str] = set()  # jobs that should be gone but could not be deleted
        self._unpinned: set[str] = set()  # images already warned about

    @property
    def cache_url(self) -> str:
        """The bucket's cache as a remote cache URL (remote.py)."""
        p = self.settings.prefix
        return f"gs://{self.settings.bucket}/{p}" if p else f"gs://{self.settings.bucket}"

    @property
    def client(self) -> Any:
        """The Batch client, made on first use (a fully cached build makes no Batch call)."""
        with self._lock:
            if self._client is None:
                self._client = make_client(self.settings.api_endpoint)
            return self._client

    # -- names ---------------------------------------------------------------------

    def _name(self, kind: str, ident: str) -> str:
        p = self.settings.prefix
        return f"{p}/{kind}/{ident}" if p else f"{kind}/{ident}"

    def _bucket(self) -> Any:
        from .. import gcs

        return gcs._client().bucket(self.settings.bucket)

    # -- the Executor protocol -----------------------------------------------------

    def recover(self, state_dir: str) -> None:
        """Delete the jobs an earlier build in this workspace left running when it was killed
        (`kill -9`, a lost machine), and keep this build's active jobs in the same journal,
        `.pipebuild/batch-jobs`: one job name per line, written before each create."""
        path = os.path.join(state_dir, "batch-jobs")
        try:
            with open(path) as f:
                orphans = [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            orphans = []
        if orphans:
            for name in orphans:
                if not self._delete(name):
                    self._undeleted.add(name)  # stays in the journal for the next build
            self.warn(f"pipebuild: deleted the {len(orphans)} Cloud Batch job(s) an interrupted build had submitted")
        self._journal = path
        self._write_journal()

    def _write_journal(self) -> None:
        if self._journal is None:
            return
        with self._lock:
            names = sorted(set(self._active) | self._undeleted)
            tmp = self._journal + ".tmp"
            with open(tmp, "w") as f:
                f.write("".join(n + "\n" for n in names))
            os.replace(tmp, self._journal)

    def prepare(self, nodes: list[Any], workspace: str | None = None) -> dict[str, str]:
        """Check every selected task's requests before anything is submitted. Images are
        keyed by name as written: pin them by digest (`image@sha256:...`) for keys that
        follow the image's bytes."""
        for node in nodes:
            t = node.task
            resources(Job(node.name, "", "", "", "", cpu=t._cpu, memory=t._memory, storage=t._storage))
        return {}

    def run(self, job: Job) -> JobResult:
        """Run the job on Cloud Batch: stage, submit, wait, bring the results back."""
        if self._cancelled.is_set():
            return JobResult(130, error="interrupted")
        self._warn_unpinned(job.image or self.settings.default_image)
        gen = self._stop_gen
        try:
            self._upload_inputs(job)
        except Exception as e:  # noqa: BLE001 - storage errors
            return JobResult(
                1, error=f"infrastructure failure: cannot upload inputs to gs://{self.settings.bucket}: {_short(e)}"
            )
        spot = self.settings.spot
        while True:
            with self._lock:
                self._count += 1
                n = self._count
            job_id = f"pb-{slug(job.name, 24)}-{(job.key or '0' * 12)[:12]}-{self.run_id}-{n}"
            try:
                env = self._manifest(job, job_id)
                spec = job_spec(self.settings, job, job_id, self.run_id, env, spot)
            except PipelineException as e:
                return JobResult(1, error=str(e))
            except Exception as e:  # noqa: BLE001
                return JobResult(1, error=f"infrastructure failure: cannot store the manifest: {_short(e)}")
            name = f"{self.settings.parent}/jobs/{job_id}"
            with self._lock:
                if self._cancelled.is_set():
                    return JobResult(130, error="interrupted")
                self._active[name] = job.name
            self._write_journal()  # before the create: a build killed now still knows the job
            try:
                err = self._create(job_id, spec)
                if err is not None:
                    return JobResult(1, error=err)
                self.submitted.append(job_id)
                done = None
                if gen == self._stop_gen and not self._cancelled.is_set() and name not in self._stopped:
                    done = self._wait(name)
                if done is None or isinstance(done, _Unfollowable):
                    # Ctrl-C or a stop while it was created or running, or the API kept failing:
                    # the job must not outlive the build.
                    if not self._delete(name):
                        self._undeleted.add(name)
            finally:
                with self._lock:
                    self._active.pop(name, None)
                self._write_journal()
            if isinstance(done, _Unfollowable):
                return JobResult(1, error=f"infrastructure failure: cannot follow Cloud Batch job {job_id}: {done.why}")
            if done is None:
                return JobResult(130, error="interrupted") if self._cancelled.is_set() else JobResult(1, error=STOPPED)
            state = _state(done)
            code = _exit_code(done)
            if state == "FAILED" and spot and code in PREEMPTION_EXIT:
                self.warn(
                    f"pipebuild: warning: {job.name}: Spot VMs were preempted {self.settings.spot_retries + 1} "
                    "time(s); running it once more on a standard VM"
                )
                spot = False
                continue
            return self._result(job, job_id, state, code, done)

    def cancel_all(self) -> None:
        """Ctrl-C: delete the run's active jobs and submit nothing more."""
        self._cancelled.set()
        self._delete_active()

    def stop_running(self) -> None:
        """A failure without -k: delete the jobs active now."""
        with self._lock:
            self._stop_gen += 1
        self._delete_active()

    # -- steps ---------------------------------------------------------------------

    def _warn_unpinned(self, image: str) -> None:
        """Say once per image that a tag is keyed by its name, not by what it points at."""
        with self._lock:
            if "@sha256:" in image or image in self._unpinned:
                return
            self._unpinned.add(image)
        self.warn(
            f"pipebuild: warning: image {image} is not pinned by digest (NAME@sha256:...): its tasks' cache keys "
            "use the tag, so an image pushed again under it does not rerun them"
        )

    def _upload_inputs(self, job: Job) -> None:
        from ..gcs import put_file

        bucket = None
        for relpath, digest in job.inputs:
            if digest in self.remote_blobs:
                continue
            bucket = bucket or self._bucket()
            if put_file(bucket, self._name("cas", digest), os.path.join(job.dir, relpath)) == "replaced":
                self.warn(
                    f"pipebuild: warning: gs://{self.settings.bucket}/{self._name('cas', digest)} held other bytes; "
                    "replaced"
                )
            self.remote_blobs.add(digest)

    def _manifest(self, job: Job, job_id: str) -> dict[str, str]:
        """The manifest's environment variable; a large manifest is stored in the bucket."""
        env = self._manifest_env(job, job_id)
        if "PIPEBUILD_MANIFEST_URL" in env:
            run = self._name("runs", job_id)
            self._bucket().blob(f"{run}/manifest.json").upload_from_string(
                self._manifest_text(job, job_id), content_type="application/json"
            )
        return env

    def _manifest_env(self, job: Job, job_id: str) -> dict[str, str]:
        text = self._manifest_text(job, job_id)
        if len(text) <= MANIFEST_INLINE_MAX:
            return {"PIPEBUILD_MANIFEST": text}
        run = self._name("runs", job_id)
        return {"PIPEBUILD_MANIFEST_URL": f"gs://{self.settings.bucket}/{run}/manifest.json"}

    def _manifest_text(self, job: Job, job_id: str) -> str:
        run = self._name("runs", job_id)
        return json.dumps(
            {
                "bucket": self.settings.bucket,
                "prefix": self.settings.prefix,
                "run": run,
                "inputs": job.inputs,
                "outputs": job.outputs,
                "script": job.script,
            },
            sort_keys=True,
        )

    def _create(self, job_id: str, spec: Any) -> str | None:
        """Create the job, retrying what is transient; None, or why it could not be done."""
        from google.api_core import exceptions as gexc

        delay, deadline = 0.5, time.monotonic() + self.settings.api_deadline
        transient = (
            gexc.TooManyRequests,
            gexc.ServiceUnavailable,
            gexc.InternalServerError,
            gexc.GatewayTimeout,
            gexc.DeadlineExceeded,
        )
        while True:
            try:
                self.client.create_job(parent=self.settings.parent, job=spec, job_id=job_id)
                return None
            except gexc.Conflict:
                return None  # an earlier attempt of this very request created it
            except transient as e:
                if time.monotonic() + delay > deadline or self._cancelled.is_set():
                    return f"infrastructure failure: Cloud Batch did not accept the job: {_short(e)}"
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
            except Exception as e:  # noqa: BLE001 - 400, 403, auth and transport errors
                return f"Cloud Batch rejected the job: {_short(e)}"

    def _wait(self, name: str) -> Any:
        client = self.client
        with self._lock:
            if self._poller is None:
                self._poller = _Poller(client, self.settings, self.run_id, lambda text: self.warn(text))
            poller = self._poller
        return poller.wait(name, lambda: self._cancelled.is_set() or name in self._stopped)

    def _delete_active(self) -> None:
        """Mark the active jobs stopped; each worker deletes its own job as it notices."""
        with self._lock:
            self._stopped.update(self._active)

    def _delete(self, name: str) -> bool:
        """Delete a job, retrying transient errors a little; True if it is gone."""
        from google.api_core import exceptions as gexc

        delay = 0.5
        for attempt in range(5):
            try:
                self.client.delete_job(name=name)
                return True
            except gexc.NotFound:
                return True
            except (gexc.TooManyRequests, gexc.ServiceUnavailable, gexc.InternalServerError) as e:
                if attempt == 4:
                    self.warn(f"pipebuild: warning: cannot delete Cloud Batch job {name}: {_short(e)}")
                    return False
                time.sleep(delay)
                delay *= 2
            except Exception as e:  # noqa: BLE001 - auth, transport: say so, keep it in the journal
                self.warn(f"pipebuild: warning: cannot delete Cloud Batch job {name}: {_short(e)}")
                return False
        return False

    def _result(self, job: Job, job_id: str, state: str, code: int | None, done: Any) -> JobResult:
        """Bring back the logs and outputs of a finished job, and say how it ended: the
        command's exit code when it ran and failed, "timed out" for Batch's run-time limit,
        else an infrastructure failure naming what Batch or the stager reported."""
        try:
            result = self._read_result(job_id)
        except Exception as e:  # noqa: BLE001 - storage errors
            return JobResult(1, error=f"infrastructure failure: cannot read the task's result: {_short(e)}")
        try:
            self._fetch_logs(job, result)
        except Exception as e:  # noqa: BLE001 - the logs are lost, the verdict below still holds
            self.warn(f"pipebuild: warning: {job.name}: cannot fetch the task's logs: {_short(e)}")
        if state == "CANCELLED":
            return JobResult(1, error=f"the Cloud Batch job {job_id} was cancelled or deleted")
        rc = result.get("rc") if result else None
        if state == "SUCCEEDED" and rc == 0:
            try:
                self._fetch_outputs(job, result or {})
            except Exception as e:  # noqa: BLE001
                return JobResult(1, error=f"infrastructure failure: cannot fetch the outputs: {_short(e)}")
            return JobResult(0)
        if isinstance(rc, int) and rc != 0:
            return JobResult(rc)  # the command failed: its exit code, and its stderr is here
        if result and result.get("error"):
            return JobResult(1, error=f"infrastructure failure: stage-in: {result['error']}")
        if code == 50005 and job.timeout:
            return JobResult(1, timed_out=True)
        what = INFRA_EXIT.get(code or 0)
        if what:
            return JobResult(1, error=f"infrastructure failure: {what} (Cloud Batch exit code {code}, job {job_id})")
        if rc == 0:  # the command succeeded, and then stage-out failed
            return JobResult(1, error=f"infrastructure failure: stage-out could not store the outputs (job {job_id})")
        event = _last_event(done)
        detail = f"exit code {code}" if code is not None else "no exit code"
        return JobResult(
            1,
            error=f"infrastructure failure: Cloud Batch job {job_id} {state} ({detail}){': ' + event if event else ''}",
        )

    def _read_result(self, job_id: str) -> dict[str, Any] | None:
        bucket = self._bucket()
        prefix = self._name("runs", job_id) + "/result-"
        best: tuple[int, Any] | None = None
        for blob in bucket.list_blobs(prefix=prefix):
            try:
                attempt = int(blob.name[len(prefix) :].removesuffix(".json"))
            except ValueError:
                continue
            if best is None or attempt > best[0]:
                best = (attempt, blob)
        if best is None:
            return None
        data: dict[str, Any] = json.loads(best[1].download_as_bytes())
        return data

    def _download(self, digest: str, dest: str) -> None:
        """Fetch cas/<digest> to `dest`, checking its bytes against the digest."""
        from .. import gcs

        with open(dest, "wb") as f:
            w = gcs._HashingWriter(f)
            self._bucket().blob(self._name("cas", digest)).download_to_file(w, checksum="auto")
        got = w.h.hexdigest()
        if got != digest:
            os.unlink(dest)
            raise OSError(f"blob cas/{digest} does not match its digest (got {got})")
        self.remote_blobs.add(digest)

    def _fetch_logs(self, job: Job, result: dict[str, Any] | None) -> None:
        logs = (result or {}).get("logs", {})
        for kind, dest in (("stdout", job.stdout), ("stderr", job.stderr)):
            digest = logs.get(kind)
            if digest:
                self._download(digest, dest)
            else:
                open(dest, "wb").close()

    def _fetch_outputs(self, job: Job, result: dict[str, Any]) -> None:
        for relpath, digest in result.get("outputs", {}).items():
            if relpath not in job.outputs:
                continue
            dest = os.path.join(job.dir, relpath)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            self._download(digest, dest)


def _short(e: BaseException) -> str:
    text = str(getattr(e, "message", None) or e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


class BatchRun:
    """A pipeline run on Cloud Batch, as `p.run()` returns it (`p.run(wait=False)` at once).

    `status()` answers with hail's keys (`state` is running, success, failure or cancelled),
    `wait()` blocks until the run ends and returns the status, `cancel()` deletes the run's
    active jobs, and `result` is the BuildResult once the run has ended."""

    def __init__(self, pipeline: Any, options: Any) -> None:
        from ..report import Reporter

        self.pipeline = pipeline
        self.options = options
        self.executor: BatchExecutor = options.executor
        self.id = self.executor.run_id
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._cancelled = False
        counts = self.counts = {"total": 0, "done": 0}
        base = options.reporter or Reporter(options.verbosity, options.explain)

        class Counting(type(base)):  # type: ignore[misc]
            def start(self, total: int) -> None:
                counts["total"] = total
                super().start(total)

            def task(self, name: str, action: str, reason: str, seconds: float | None = None) -> None:
                counts["done"] += 1
                super().task(name, action, reason, seconds)

        base.__class__ = Counting
        options.reporter = base

    def run(self) -> None:
        """Build in this thread (Ctrl-C stops the build as for a local one)."""
        from ..build import build

        try:
            self.result = build(self.pipeline, self.options)
        except BaseException as e:
            self.error = e
            raise

    def start(self) -> None:
        """Build in a background thread. pipebuild drives the graph from this process, so
        the thread is not a daemon: a script that returns early still waits for the run at
        exit (Ctrl-C there stops it; the next build deletes jobs a killed one left)."""

        def target() -> None:
            try:
                self.run()
            except BaseException:  # noqa: BLE001 - kept in self.error, raised again by wait()
                pass

        self._thread = threading.Thread(target=target, name=f"pipebuild-batch-{self.id}")
        self._thread.start()

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the run to end (or `timeout` seconds), then return `status()`.
        An error that stopped the build before any task ran (a bad Pipefile, a missing input)
        is raised here."""
        if self._thread is not None:
            try:
                self._thread.join(timeout)
            except KeyboardInterrupt:
                self.cancel()
                self._thread.join()
                raise
        if self.error is not None and self.result is None:
            raise self.error
        return self.status()

    def cancel(self) -> None:
        """Delete the run's active jobs; the run then ends with them failed."""
        self._cancelled = True
        self.executor.cancel_all()

    def status(self) -> dict[str, Any]:
        """{id, state, complete, n_jobs, n_completed, n_succeeded, n_failed, n_cancelled}."""
        r = self.result
        complete = r is not None or self.error is not None
        n_failed = len(r.failed) if r is not None else 0
        n_cancelled = len(r.not_run) if r is not None else 0
        n_ok = len(r.ran) + len(r.restored) + len(r.up_to_date) if r is not None else 0
        if not complete:
            state = "running"
        elif self._cancelled:
            state = "cancelled"
        elif r is not None and r.ok:
            state = "success"
        else:
            state = "failure"
        return {
            "id": self.id,
            "state": state,
            "complete": complete,
            "n_jobs": self.counts["total"],
            "n_completed": self.counts["done"],
            "n_succeeded": n_ok,
            "n_failed": n_failed,
            "n_cancelled": n_cancelled,
            "jobs_submitted": list(self.executor.submitted),
        }


def dry_run(pipeline: Any, options: Any) -> str:
    """The Batch job specs of the tasks a build would run, as JSON; nothing is submitted.
    Input digests of files not built yet are unknown, and shown by name."""
    from google.cloud import batch_v1

    from ..build import preview, task_script
    from ..graph import plan

    executor: BatchExecutor = options.executor
    rows = {name: (what, reason) for name, what, reason in preview(pipeline, options)}
    graph = plan(pipeline, options.workspace, options.state_dir)
    out: list[str] = []
    for node in graph.nodes:
        if node.name not in rows:
            continue
        what, reason = rows[node.name]
        if what in ("skip", "restore"):
            out.append(f"# task {node.name}: {what} ({reason}): no job\n")
            continue
        t = node.task
        job = Job(
            node.name, "/pb/work", task_script(node, options.verbose), "", "", node.timeout, node.image,
            inputs=[(i.relpath, f"<xxh3 of {i.display}>") for i in node.inputs],
            outputs=[o.relpath for o in node.outputs], cpu=t._cpu, memory=t._memory, storage=t._storage,
        )  # fmt: skip
        job_id = f"pb-{slug(node.name, 24)}-dry-run"
        env = executor._manifest_env(job, job_id)
        spec = job_spec(executor.settings, job, job_id, "dry-run", env, executor.settings.spot)
        out.append(f"# task {node.name}: {what} ({reason}): job {job_id} in {executor.settings.parent}\n")
        out.append(
            batch_v1.Job.to_json(spec, always_print_fields_with_no_presence=False, use_integers_for_enums=False) + "\n"
        )
    return "".join(out)
