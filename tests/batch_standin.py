"""An executing stand-in for the Google Cloud Batch v1 REST API, for tests.

The real `google.cloud.batch_v1.BatchServiceClient(transport="rest")` talks to it over HTTP on
127.0.0.1 (see `client_for`), and it *runs* the jobs it is given on this machine, so a test of
the Batch executor exercises the production transport, real containers and real files.

Design: one `ThreadingHTTPServer`, one runner thread per job, one thread per task, and a
semaphore of `parallelism` slots (default 4) shared by every task attempt of every job: on a
2-core CI machine more than a few concurrent containers only slows each one down. Each task
attempt gets a fresh "VM": a directory `<workdir>/vms/<job uid>/task-<i>/attempt-<a>/`. Every
host path in a Container runnable's `volumes` ("/host:/ctr[:ro]") is re-rooted under it, so
two jobs never share files, as two VMs would not. Container runnables run through the docker
SDK with host networking (they reach emulators on 127.0.0.1); Script runnables run with bash on
the host, in the VM directory (absolute host paths in a script are NOT re-rooted: use relative
ones or $BATCH_STANDIN_VM_ROOT).

Implemented (requests take enums as integers or names; answers use names):
  CreateJob (job id rule -> 400, duplicate -> 409), GetJob, ListJobs (pageSize/pageToken,
  orderBy name|create_time [desc], filter of `labels.K="V"`, `labels.K=V`, `status.state=S`
  and `name="..."` terms joined by AND), DeleteJob and CancelJob (done Operations; running
  containers and scripts are killed before the answer), GetTask, ListTasks (filter
  `status.state=S`). task_count >= 1 with TaskGroup.parallelism, task_environments,
  BATCH_TASK_INDEX / BATCH_TASK_COUNT / BATCH_TASK_RETRY_ATTEMPT, always_run,
  ignore_exit_status, background, runnable timeout and max_run_duration (-> exit 50005),
  max_retry_count with one lifecycle policy (RETRY_TASK / FAIL_TASK on exit codes; none:
  retry any non-zero), block_external_network, cpu_milli -> nano_cpus (capped at the host's
  cores), memory_mib -> mem_limit. TaskSpec volumes are mounted at their mount_path when a
  container lists no volumes. A barrier is a no-op (allowed only with task_count 1).
  Job states QUEUED -> SCHEDULED -> RUNNING -> SUCCEEDED | FAILED, CANCELLATION_IN_PROGRESS ->
  CANCELLED, DELETION_IN_PROGRESS -> gone; task states PENDING -> ASSIGNED -> RUNNING ->
  SUCCEEDED | FAILED (UNEXECUTED if cancelled before it ran); per-state counts; status events
  with `taskExecution.exitCode` on task failures, retries and the job's failure.
Rejected with 400 rather than faked: gcs / nfs volumes, Container.options, more than one task
group or lifecycle policy, task_count_per_node > 1, require_hosts_file, run_as_non_root,
malformed volumes, max_retry_count outside 0..10, invalid labels, bodies over 1 MB.
Recorded but without effect: allocation_policy (except the provisioning model, for `preempt`),
logs_policy, notifications, priority, scheduling_policy.

Python API for tests (`BatchStandin`):
  BatchStandin(workdir, *, env=None, parallelism=4, docker_client=None)
  .start() -> self, .stop()     stop() kills every container and script it started and
                                removes leftovers found by CONTAINER_LABEL; also a context manager
  .endpoint                     "http://127.0.0.1:PORT", for ClientOptions(api_endpoint=...)
  .env                          dict added last to every runnable's environment (the "cloud"
                                knows where GCS is: put STORAGE_EMULATOR_HOST here)
  .requests                     list of (method, path) of every API request, injected failures too
  .created                      job names in creation order (deleted ones stay listed)
  .fail_next(status, times=1, method=None, path_contains="")
                                the next `times` matching requests get that HTTP status and a
                                Google-format error body, and do nothing else
  .preempt(times=1, match="", after=0.0)
                                the next `times` task attempts of SPOT / PREEMPTIBLE jobs whose id
                                contains `match` lose their VM `after` seconds in (0: before any
                                runnable starts): runnables are killed, always_run ones do not
                                run, the attempt's exit code is 50001. STANDARD VMs never are.
  .wait_idle(timeout=60) -> bool
                                True once no job is queued or running
  .log(job, task=0) -> str      what the task's runnables printed, all attempts (job: id or name)
  .vm_root(job, task=0, attempt=0) -> Path
                                the directory that stood for that attempt's VM; a container
                                volume "/mnt/disks/x:/x" is vm_root(...)/"mnt/disks/x"
  .containers() -> list         docker containers of this stand-in that still exist
  .get_job(name), .list_jobs(parent, query), .get_task(job_name, i), .list_tasks(job_name, query)
                                what the API answers, as REST JSON dicts (the job as the client
                                sent it, enums included, plus name, uid, times and status);
                                ApiError(404) for a job that does not exist (or no longer does)
"""

from __future__ import annotations

import copy
import enum
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

CONTAINER_LABEL = "pipebuild.batch-standin"
JOB_ID_RE = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
MAX_BODY = 1024 * 1024  # Batch's limit on a job definition
DEFAULT_PAGE_SIZE = 100
DEFAULT_MAX_RUN = 7 * 24 * 3600.0  # Batch's default max_run_duration

_LOC = r"projects/[^/]+/locations/[^/]+"
_JOB = rf"{_LOC}/jobs/[a-zA-Z0-9-]+"


class ExitCode(enum.IntEnum):
    """Exit codes Batch reserves for failures that are not the task's own."""

    UNKNOWN = 50000
    PREEMPTED = 50001
    OVER_RUN_TIME = 50005


class Stop(enum.Enum):
    """Why a task attempt's VM stopped before its runnables finished."""

    PREEMPTED = "preempted"
    OVER_RUN_TIME = "max_run_duration"
    CANCELLED = "cancelled"


STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    412: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
PROVISIONING_MODELS = {
    0: "PROVISIONING_MODEL_UNSPECIFIED",
    1: "STANDARD",
    2: "SPOT",
    3: "PREEMPTIBLE",
    4: "RESERVATION_BOUND",
    5: "FLEX_START",
}
ACTIONS = {0: "ACTION_UNSPECIFIED", 1: "RETRY_TASK", 2: "FAIL_TASK"}
TERMINAL_JOB = ("SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL_TASK = ("SUCCEEDED", "FAILED", "UNEXECUTED")


class ApiError(Exception):
    """An error answer in Google's JSON error format."""

    def __init__(self, code: int, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status or STATUS_NAMES.get(code, "UNKNOWN")

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": str(self), "status": self.status}}


def client_for(endpoint: str) -> Any:
    """The real google-cloud-batch client, REST transport, no credentials, aimed at `endpoint`."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import batch_v1

    return batch_v1.BatchServiceClient(
        credentials=AnonymousCredentials(), transport="rest", client_options=ClientOptions(api_endpoint=endpoint)
    )


def now() -> str:
    """The time now, RFC 3339 in UTC with microseconds."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def enum_name(value: Any, names: dict[int, str]) -> str:
    """An enum given as an integer (the client's enum-encoding=int) or a name, as its name."""
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return names.get(int(value), str(value))
    return str(value or names[0])


def seconds(duration: Any, default: float | None) -> float | None:
    """A protobuf JSON Duration ("3600s", "1.5s") in seconds."""
    if duration in (None, ""):
        return default
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?)s", str(duration))
    if m is None:
        raise ApiError(400, f"invalid duration {duration!r}")
    return float(m.group(1))


def invalid(message: str) -> ApiError:
    return ApiError(400, message)


class _Rule:
    """An injected behaviour that applies to the next `times` matching events."""

    __slots__ = ("times", "status", "method", "path_contains", "match", "after")

    def __init__(self, times: int, **kw: Any) -> None:
        self.times = times
        self.status = kw.get("status", 0)
        self.method = kw.get("method")
        self.path_contains = kw.get("path_contains", "")
        self.match = kw.get("match", "")
        self.after = kw.get("after", 0.0)


class _Attempt:
    """One task attempt's VM: the containers and processes to kill when it must stop."""

    def __init__(self, docker: Any) -> None:
        self.docker = docker
        self.lock = threading.Lock()
        self.containers: list[Any] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stopped: Stop | None = None

    def add(self, thing: Any) -> bool:
        """Track a started container or process; False (and kill it) if the VM already stopped."""
        with self.lock:
            if self.stopped is None:
                (self.procs if isinstance(thing, subprocess.Popen) else self.containers).append(thing)
                return True
        self._kill(thing)
        return False

    def discard(self, thing: Any) -> None:
        """Stop tracking a container or process that has ended and been cleaned up."""
        with self.lock:
            for things in (self.containers, self.procs):
                if thing in things:
                    things.remove(thing)

    def stop(self, why: Stop | None) -> None:
        """Stop the VM: kill everything it runs. `why` None is the normal end of the attempt."""
        with self.lock:
            if why is not None and self.stopped is None:
                self.stopped = why
            things = [*self.containers, *self.procs]
        for t in things:
            self._kill(t)

    def _kill(self, thing: Any) -> None:
        if isinstance(thing, subprocess.Popen):
            if thing.poll() is None:
                try:
                    os.killpg(thing.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                thing.wait()
            return
        import docker

        try:
            thing.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:  # "removal already in progress"
            if e.status_code != 409:
                raise


class _Job:
    """A job's REST form plus what its runner needs."""

    def __init__(self, name: str, body: dict[str, Any]) -> None:
        self.name = name
        self.id = name.rsplit("/", 1)[1]
        self.body = body
        self.tasks: list[dict[str, Any]] = []
        self.attempts: dict[int, _Attempt] = {}
        self.stopping: str | None = None  # "cancel" or "delete"
        self.done = False
        self.started = 0.0
        self.log_dir = Path()

    @property
    def group(self) -> dict[str, Any]:
        return self.body["taskGroups"][0]

    @property
    def spec(self) -> dict[str, Any]:
        return self.group["taskSpec"]

    @property
    def state(self) -> str:
        return str(self.body["status"]["state"])

    def provisioning_model(self) -> str:
        instances = (self.body.get("allocationPolicy") or {}).get("instances") or []
        policy = (instances[0].get("policy") or {}) if instances else {}
        return enum_name(policy.get("provisioningModel", 0), PROVISIONING_MODELS)


class BatchStandin:
    """The stand-in: an HTTP server answering Batch v1 REST calls and running the jobs."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        env: dict[str, str] | None = None,
        parallelism: int = 4,
        docker_client: Any = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.env: dict[str, str] = dict(env or {})
        self.requests: list[tuple[str, str]] = []
        self.created: list[str] = []
        self.id = uuid.uuid4().hex[:12]
        self._own_docker = docker_client is None
        self._docker = docker_client
        self._slots = threading.Semaphore(parallelism)
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._jobs: dict[str, _Job] = {}
        self._by_id: dict[str, _Job] = {}  # last job created under each id, for log()
        self._runners: list[threading.Thread] = []
        self._failures: list[_Rule] = []
        self._preemptions: list[_Rule] = []
        self._server: ThreadingHTTPServer | None = None
        self._serving: threading.Thread | None = None
        self._ops = 0

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> BatchStandin:
        """Serve on a free loopback port."""
        if self._docker is None:
            import docker

            # Each running container holds one connection in a blocking wait.
            self._docker = docker.from_env(max_pool_size=64)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        # A short poll interval: stop() waits up to one interval, after every test.
        self._serving = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="batch-standin", daemon=True
        )
        self._serving.start()
        return self

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        """Stop serving, kill every container and script of every job, close the docker client."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            jobs = list(self._jobs.values())
            for job in jobs:
                job.stopping = job.stopping or "cancel"
        for job in jobs:
            for attempt in list(job.attempts.values()):
                attempt.stop(Stop.CANCELLED)
        for t in list(self._runners):
            t.join(timeout=30)
        if self._docker is not None:
            for c in self.containers():
                c.remove(force=True)
            if self._own_docker:
                self._docker.close()
            self._docker = None

    def __enter__(self) -> BatchStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test hooks --------------------------------------------------------------------

    def fail_next(self, status: int, times: int = 1, method: str | None = None, path_contains: str = "") -> None:
        """Answer the next `times` requests matching method and path with HTTP `status`."""
        with self._lock:
            rule = _Rule(times, status=status, method=method and method.upper(), path_contains=path_contains)
            self._failures.append(rule)

    def preempt(self, times: int = 1, match: str = "", after: float = 0.0) -> None:
        """Preempt the next `times` attempts of Spot/preemptible jobs whose id contains `match`."""
        with self._lock:
            self._preemptions.append(_Rule(times, match=match, after=after))

    def wait_idle(self, timeout: float = 60) -> bool:
        """Wait until no job is queued or running; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: all(j.done for j in self._jobs.values()), timeout=timeout)

    def log(self, job: str, task: int = 0) -> str:
        """What task `task` of `job` (an id or a name) printed, over all its attempts."""
        with self._lock:
            j = self._by_id[job.rsplit("/", 1)[-1]]
        path = j.log_dir / f"task-{task}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def vm_root(self, job: str, task: int = 0, attempt: int = 0) -> Path:
        """The directory that stood for the VM of that task attempt (job: an id or a name)."""
        with self._lock:
            j = self._by_id[job.rsplit("/", 1)[-1]]
        return self.workdir / "vms" / j.body["uid"] / f"task-{task}" / f"attempt-{attempt}"

    def containers(self) -> list[Any]:
        """Containers this stand-in started that still exist (running or not)."""
        return list(self._docker.containers.list(all=True, filters={"label": f"{CONTAINER_LABEL}={self.id}"}))

    # -- API methods -------------------------------------------------------------------

    def create_job(self, parent: str, job_id: str, body: dict[str, Any], size: int) -> dict[str, Any]:
        if not job_id:
            job_id = "job-" + uuid.uuid4().hex[:20]
        if not JOB_ID_RE.match(job_id):
            raise invalid(f"Job id {job_id!r} must match {JOB_ID_RE.pattern}")
        self._validate(body, size)
        name = f"{parent}/jobs/{job_id}"
        with self._lock:
            if name in self._jobs:
                raise ApiError(409, f"Job {name} already exists")
            job = _Job(name, copy.deepcopy(body))
            uid = f"{job_id[:36]}-{uuid.uuid4().hex[:8]}-{uuid.uuid4().hex[:4]}"
            job.log_dir = self.workdir / "logs" / uid
            group = job.group
            n = int(group.get("taskCount") or 1)
            group.update(name=f"{name}/taskGroups/group0", taskCount=str(n))
            group["parallelism"] = str(int(group.get("parallelism") or n))
            t = now()
            job.body.update(name=name, uid=uid, createTime=t, updateTime=t)
            job.body["status"] = {"state": "QUEUED", "statusEvents": []}
            job.tasks = [
                {"name": f"{name}/taskGroups/group0/tasks/{i}", "status": {"state": "PENDING", "statusEvents": []}}
                for i in range(n)
            ]
            self._jobs[name] = job
            self._by_id[job_id] = job
            self.created.append(name)
            runner = threading.Thread(target=self._run_job, args=(job,), name=f"job {job_id}", daemon=True)
            self._runners.append(runner)
            answer = self._job_json(job)
        runner.start()
        return answer

    def get_job(self, name: str) -> dict[str, Any]:
        with self._lock:
            return self._job_json(self._job(name))

    def list_jobs(self, parent: str, query: dict[str, str]) -> dict[str, Any]:
        terms = _filter_terms(query.get("filter", ""), allowed=("labels", "status.state", "name"))
        order = query.get("orderBy", "").strip()
        with self._lock:
            jobs = [j for n, j in self._jobs.items() if n.startswith(parent + "/jobs/")]
            if order in ("name", "name asc"):
                jobs.sort(key=lambda j: j.name)
            elif order == "create_time desc":
                jobs.reverse()
            elif order not in ("", "create_time", "create_time asc"):
                raise invalid(f"unsupported orderBy {order!r}")
            found = [out for out in map(self._job_json, jobs) if all(_matches(out, t) for t in terms)]
        page, token = _page(found, query)
        return {"jobs": page, **({"nextPageToken": token} if token else {})}

    def stop_job(self, name: str, how: str) -> dict[str, Any]:
        """CancelJob (how="cancel") or DeleteJob (how="delete"): kill what runs, then answer."""
        with self._lock:
            job = self._job(name)
            if how == "cancel" and (job.state in TERMINAL_JOB or job.stopping == "delete"):
                raise ApiError(400, f"Job {name} is {job.state}", "FAILED_PRECONDITION")
            if job.stopping != how and not job.done:
                self._set_job_state(job, "DELETION_IN_PROGRESS" if how == "delete" else "CANCELLATION_IN_PROGRESS")
            job.stopping = how
            if job.done and how == "delete":
                self._forget(job)
            attempts = list(job.attempts.values())
            self._ops += 1
        for a in attempts:
            a.stop(Stop.CANCELLED)
        loc = name.split("/jobs/")[0]
        response = "google.protobuf.Empty" if how == "delete" else "google.cloud.batch.v1.CancelJobResponse"
        return {
            "name": f"{loc}/operations/operation-{self.id}-{self._ops}",
            "done": True,
            "metadata": {
                "@type": "type.googleapis.com/google.cloud.batch.v1.OperationMetadata",
                "createTime": now(),
                "endTime": now(),
                "target": name,
                "verb": how,
                "apiVersion": "v1",
            },
            "response": {"@type": f"type.googleapis.com/{response}"},
        }

    def get_task(self, job_name: str, index: int) -> dict[str, Any]:
        with self._lock:
            job = self._job(job_name)
            if not 0 <= index < len(job.tasks):
                raise ApiError(404, f"Task {index} not found in {job_name}")
            return copy.deepcopy(job.tasks[index])

    def list_tasks(self, job_name: str, query: dict[str, str]) -> dict[str, Any]:
        terms = _filter_terms(query.get("filter", ""), allowed=("status.state",))
        with self._lock:
            tasks = [copy.deepcopy(t) for t in self._job(job_name).tasks]
        page, token = _page([t for t in tasks if all(_matches(t, term) for term in terms)], query)
        return {"tasks": page, **({"nextPageToken": token} if token else {})}

    # -- validation --------------------------------------------------------------------

    def _validate(self, body: dict[str, Any], size: int) -> None:
        if size > MAX_BODY:
            raise invalid(f"job definition is {size} bytes, over the 1 MB limit")
        groups = body.get("taskGroups") or []
        if len(groups) != 1:
            raise invalid("a job must have exactly one task group")
        group = groups[0]
        n = int(group.get("taskCount") or 1)
        if not 1 <= n <= 100_000:
            raise invalid(f"taskCount {n} is outside 1..100000")
        if int(group.get("taskCountPerNode") or 1) > 1:
            raise invalid("stand-in: taskCountPerNode > 1 is not emulated (one task per VM)")
        for flag in ("requireHostsFile", "runAsNonRoot"):
            if group.get(flag):
                raise invalid(f"stand-in: {flag} is not emulated")
        spec = group.get("taskSpec") or {}
        runnables = spec.get("runnables") or []
        if not runnables:
            raise invalid("taskSpec.runnables must not be empty")
        for r in runnables:
            kinds = [k for k in ("container", "script", "barrier") if k in r]
            if len(kinds) != 1:
                raise invalid("each runnable must have exactly one of container, script, barrier")
            if "barrier" in r and n > 1:
                raise invalid("stand-in: barriers are emulated only with taskCount 1")
            c = r.get("container")
            if c is not None:
                if not c.get("imageUri"):
                    raise invalid("container.imageUri is required")
                if c.get("options"):
                    raise invalid("stand-in: container.options is not emulated")
                for v in c.get("volumes") or []:
                    parts = v.split(":")
                    if len(parts) not in (2, 3) or not parts[0].startswith("/") or not parts[1].startswith("/"):
                        raise invalid(f"container volume {v!r} is not /host:/container[:ro|rw]")
                    if len(parts) == 3 and parts[2] not in ("ro", "rw"):
                        raise invalid(f"container volume {v!r}: mode must be ro or rw")
            s = r.get("script")
            if s is not None and not (s.get("text") or s.get("path")):
                raise invalid("script needs text or path")
            seconds(r.get("timeout"), None)
        for v in spec.get("volumes") or []:
            if "gcs" in v or "nfs" in v:
                raise invalid("stand-in: gcs and nfs volumes are not emulated; copy files in and out instead")
            if not str(v.get("mountPath", "")).startswith("/"):
                raise invalid("volume.mountPath must be an absolute path")
        retries = int(spec.get("maxRetryCount") or 0)
        if not 0 <= retries <= 10:
            raise invalid(f"maxRetryCount {retries} is outside 0..10")
        if len(spec.get("lifecyclePolicies") or []) > 1:
            raise invalid("at most one lifecycle policy is supported")
        seconds(spec.get("maxRunDuration"), None)
        for k, v in (body.get("labels") or {}).items():
            if not LABEL_KEY_RE.match(k) or not LABEL_VALUE_RE.match(str(v)):
                raise invalid(f"invalid label {k}={v}")

    # -- state (callers hold self._lock) -----------------------------------------------

    def _job(self, name: str) -> _Job:
        job = self._jobs.get(name)
        if job is None:
            raise ApiError(404, f"Job {name} not found")
        return job

    def _job_json(self, job: _Job) -> dict[str, Any]:
        out = copy.deepcopy(job.body)
        counts: dict[str, int] = {}
        for t in job.tasks:
            state = t["status"]["state"]
            counts[state] = counts.get(state, 0) + 1
        out["status"]["taskGroups"] = {"group0": {"counts": {k: str(v) for k, v in counts.items()}}}
        return out

    def _set_job_state(self, job: _Job, new: str, extra: str = "", exit_code: int | None = None) -> None:
        status = job.body["status"]
        old = status["state"]
        status["state"] = new
        event: dict[str, Any] = {
            "type": "STATUS_CHANGED",
            "description": f"Job state is set from {old} to {new} for job {job.name}.{extra}",
            "eventTime": now(),
        }
        if exit_code is not None:
            event["taskExecution"] = {"exitCode": exit_code}
        status["statusEvents"].append(event)
        job.body["updateTime"] = event["eventTime"]
        if new in ("RUNNING",) and not job.started:
            job.started = time.monotonic()
        if new in TERMINAL_JOB and job.started:
            status["runDuration"] = f"{time.monotonic() - job.started:.6f}s"

    def _set_task_state(self, job: _Job, i: int, new: str, why: str = "", exit_code: int | None = None) -> str:
        task = job.tasks[i]
        old = task["status"]["state"]
        task["status"]["state"] = new
        desc = f"Task state is updated from {old} to {new} on zones/local-a/instances/standin-{job.id[:20]}-{i}{why}"
        desc += f" with exit code {exit_code}." if exit_code is not None else "."
        event: dict[str, Any] = {"type": "STATUS_CHANGED", "description": desc, "eventTime": now(), "taskState": new}
        if exit_code is not None:
            event["taskExecution"] = {"exitCode": exit_code}
        task["status"]["statusEvents"].append(event)
        job.body["updateTime"] = event["eventTime"]
        return desc

    def _forget(self, job: _Job) -> None:
        self._jobs.pop(job.name, None)
        self._idle.notify_all()

    # -- execution ---------------------------------------------------------------------

    def _run_job(self, job: _Job) -> None:
        n = len(job.tasks)
        results: list[int | None] = [None] * n
        with self._lock:
            if job.stopping is None:
                self._set_job_state(job, "SCHEDULED")
        per_job = threading.Semaphore(int(job.group["parallelism"]))

        def task(i: int) -> None:
            results[i] = self._run_task(job, i, per_job)

        threads = [threading.Thread(target=task, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with self._lock:
            for i, t in enumerate(job.tasks):
                if t["status"]["state"] not in TERMINAL_TASK:
                    ran = results[i] is not None
                    self._set_task_state(job, i, "FAILED" if ran else "UNEXECUTED", " because the job was cancelled")
            if job.stopping == "delete":
                job.done = True
                self._forget(job)
                return
            if job.stopping == "cancel":
                self._set_job_state(job, "CANCELLED")
            else:
                failed = [i for i, r in enumerate(results) if r != 0]
                if failed:
                    i = failed[0]
                    last = job.tasks[i]["status"]["statusEvents"][-1]["description"]
                    why = f" Job failed due to task failure. Specifically, task with index {i} failed due to the following task event: {last!r}"
                    self._set_job_state(job, "FAILED", why, exit_code=results[i])
                else:
                    self._set_job_state(job, "SUCCEEDED")
            job.done = True
            self._idle.notify_all()

    def _run_task(self, job: _Job, i: int, per_job: threading.Semaphore) -> int | None:
        """Run task i's attempts until one succeeds or no retry is due; its exit code (None: never ran)."""
        spec = job.spec
        max_retry = int(spec.get("maxRetryCount") or 0)
        attempt = 0
        while True:
            with per_job, self._slots:
                with self._lock:
                    if job.stopping is not None:
                        return None if attempt == 0 else ExitCode.UNKNOWN.value
                    self._set_task_state(job, i, "ASSIGNED")
                    if job.state == "SCHEDULED":
                        self._set_job_state(job, "RUNNING")
                    self._set_task_state(job, i, "RUNNING")
                    vm = _Attempt(self._docker)
                    job.attempts[i] = vm
                    preempt_after = self._take_preemption(job)
                code, why = self._run_attempt(job, i, attempt, vm, preempt_after)
            with self._lock:
                job.attempts.pop(i, None)
                if job.stopping is not None:
                    self._set_task_state(job, i, "FAILED", " because the job was cancelled")
                    return code or ExitCode.UNKNOWN.value
                if code == 0:
                    self._set_task_state(job, i, "SUCCEEDED", exit_code=0)
                    return 0
                retry = attempt < max_retry and _should_retry(code, spec.get("lifecyclePolicies") or [])
                desc = self._set_task_state(job, i, "FAILED", why, exit_code=code)
                if not retry:
                    return code
                # Retried at once, under the same lock: a reader never sees FAILED for a task that will rerun.
                self._set_task_state(job, i, "PENDING", f" for retry {attempt + 1} of {max_retry}")
                job.body["status"]["statusEvents"].append(
                    {
                        "type": "TASK_RETRY",
                        "description": f"Task with index {i} is retried ({attempt + 1} of {max_retry}) after: {desc}",
                        "eventTime": now(),
                        "taskState": "FAILED",
                        "taskExecution": {"exitCode": code},
                    }
                )
            attempt += 1

    def _take_preemption(self, job: _Job) -> float | None:
        """If a preempt() rule applies to this attempt, consume it: seconds until the VM is lost."""
        if job.provisioning_model() not in ("SPOT", "PREEMPTIBLE"):
            return None
        for rule in self._preemptions:
            if rule.times > 0 and rule.match in job.id:
                rule.times -= 1
                return float(rule.after)
        return None

    def _run_attempt(
        self, job: _Job, i: int, attempt: int, vm: _Attempt, preempt_after: float | None
    ) -> tuple[int, str]:
        """Run the runnables on a fresh VM; (exit code, why it failed if not the runnable's own code)."""
        spec = job.spec
        root = self.vm_root(job.id, i, attempt)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        job.log_dir.mkdir(parents=True, exist_ok=True)
        timers = [threading.Timer(seconds(spec.get("maxRunDuration"), DEFAULT_MAX_RUN), vm.stop, [Stop.OVER_RUN_TIME])]
        if preempt_after is not None:
            if preempt_after <= 0:
                vm.stop(Stop.PREEMPTED)
            else:
                timers.append(threading.Timer(preempt_after, vm.stop, [Stop.PREEMPTED]))
        for t in timers:
            t.daemon = True
            t.start()
        failed: int | None = None
        with open(job.log_dir / f"task-{i}.log", "ab") as log:
            log.write(f"--- attempt {attempt} on {root}\n".encode())
            try:
                for k, r in enumerate(spec["runnables"]):
                    if vm.stopped is not None:
                        break
                    if (failed is not None and not r.get("alwaysRun")) or "barrier" in r:
                        continue
                    env = self._environment(job, i, attempt, r, root)
                    timeout = seconds(r.get("timeout"), None)
                    log.write(f"--- runnable {k} {r.get('displayName', '')}\n".encode())
                    log.flush()
                    if "script" in r:
                        code = self._run_script(r, env, root, vm, log, timeout)
                    else:
                        code = self._run_container(job, i, attempt, r, env, root, vm, log, timeout)
                    log.write(f"--- runnable {k} exit {code}\n".encode())
                    if code != 0 and failed is None and not r.get("ignoreExitStatus"):
                        failed = code
            finally:
                for t in timers:
                    t.cancel()
                vm.stop(None)  # background runnables end with the VM
        if vm.stopped is Stop.PREEMPTED:
            return ExitCode.PREEMPTED.value, " due to Spot VM preemption"
        if vm.stopped is Stop.OVER_RUN_TIME:
            return ExitCode.OVER_RUN_TIME.value, " due to task execution exceeding max run duration"
        return failed or 0, ""

    def _environment(self, job: _Job, i: int, attempt: int, r: dict[str, Any], root: Path) -> dict[str, str]:
        env: dict[str, str] = {}
        env.update(job.spec.get("environments") or {})
        env.update((job.spec.get("environment") or {}).get("variables") or {})
        per_index = job.group.get("taskEnvironments") or []
        if i < len(per_index):
            env.update(per_index[i].get("variables") or {})
        env.update((r.get("environment") or {}).get("variables") or {})
        env.update(
            BATCH_TASK_INDEX=str(i),
            BATCH_TASK_COUNT=str(len(job.tasks)),
            BATCH_TASK_RETRY_ATTEMPT=str(attempt),
            BATCH_STANDIN_VM_ROOT=str(root),
        )
        env.update(self.env)
        return {k: str(v) for k, v in env.items()}

    def _run_script(
        self, r: dict[str, Any], env: dict[str, str], root: Path, vm: _Attempt, log: Any, timeout: float | None
    ) -> int:
        script = r["script"]
        argv = ["bash", "-c", script["text"]] if script.get("text") else ["bash", script["path"]]
        full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root), **env}
        p = subprocess.Popen(
            argv, cwd=root, env=full, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        if not vm.add(p):
            p.wait()
            return ExitCode.UNKNOWN.value
        if r.get("background"):
            return 0
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return ExitCode.OVER_RUN_TIME.value
        finally:
            vm.discard(p)

    def _run_container(
        self,
        job: _Job,
        i: int,
        attempt: int,
        r: dict[str, Any],
        env: dict[str, str],
        root: Path,
        vm: _Attempt,
        log: Any,
        timeout: float | None,
    ) -> int:
        import docker
        import requests

        c = r["container"]
        volumes = list(c.get("volumes") or [])
        if not volumes:  # Batch mounts every TaskSpec volume at its own path when none are listed
            volumes = [f"{v['mountPath']}:{v['mountPath']}" for v in job.spec.get("volumes") or []]
        binds = []
        for v in volumes:
            host, ctr, *mode = v.split(":")
            on_vm = root / host.lstrip("/")
            on_vm.mkdir(parents=True, exist_ok=True)
            binds.append(f"{on_vm}:{ctr}:{mode[0] if mode else 'rw'}")
        kwargs: dict[str, Any] = {
            "image": c["imageUri"],
            "command": list(c.get("commands") or []) or None,
            "environment": env,
            "volumes": binds,
            "network_mode": "none" if c.get("blockExternalNetwork") else "host",
            "labels": {
                CONTAINER_LABEL: self.id,
                f"{CONTAINER_LABEL}.job": job.name,
                f"{CONTAINER_LABEL}.task": str(i),
                f"{CONTAINER_LABEL}.attempt": str(attempt),
            },
        }
        if c.get("entrypoint"):
            kwargs["entrypoint"] = [c["entrypoint"]]
        resources = job.spec.get("computeResource") or {}
        if resources.get("cpuMilli"):  # capped: Docker refuses more CPUs than the host has
            kwargs["nano_cpus"] = min(int(resources["cpuMilli"]) * 10**6, (os.cpu_count() or 1) * 10**9)
        if resources.get("memoryMib"):
            kwargs["mem_limit"] = f"{int(resources['memoryMib'])}m"
        try:
            container = self._docker.containers.create(**kwargs)
        except docker.errors.DockerException as e:
            log.write(f"--- cannot create the container: {e}\n".encode())
            return ExitCode.UNKNOWN.value
        if not vm.add(container):
            return ExitCode.UNKNOWN.value
        try:
            container.start()
        except docker.errors.NotFound:  # the VM stopped meanwhile
            return ExitCode.UNKNOWN.value
        except docker.errors.APIError as e:
            log.write(f"--- cannot start the container: {e}\n".encode())
            return ExitCode.UNKNOWN.value
        if r.get("background"):
            return 0
        try:
            return int(container.wait(timeout=timeout)["StatusCode"])
        except requests.exceptions.RequestException:  # the runnable's timeout
            return ExitCode.OVER_RUN_TIME.value
        except docker.errors.NotFound:  # removed by a stop (preemption, cancel, deadline)
            return ExitCode.UNKNOWN.value
        finally:
            try:
                log.write(container.logs(stdout=True, stderr=True))
                container.remove(force=True)
                vm.discard(container)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                if e.status_code != 409:  # 409: a stop is removing it already
                    raise


def _should_retry(code: int, policies: list[dict[str, Any]]) -> bool:
    """Batch's rule: no policy retries any failure; RETRY_TASK only listed codes; FAIL_TASK all others."""
    if not policies:
        return True
    p = policies[0]
    action = enum_name(p.get("action", 0), ACTIONS)
    listed = code in [int(c) for c in (p.get("actionCondition") or {}).get("exitCodes") or []]
    if action == "RETRY_TASK":
        return listed
    if action == "FAIL_TASK":
        return not listed
    return True


_TERM_RE = re.compile(r'^\s*([A-Za-z_.][A-Za-z0-9_.-]*)\s*=\s*(?:"([^"]*)"|([^\s"]+))\s*$')


def _filter_terms(text: str, allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    """A filter of `field=value` terms joined by AND, as (field, value) pairs; others are 400."""
    if not text.strip():
        return []
    terms = []
    for part in re.split(r"\s+AND\s+", text.strip()):
        m = _TERM_RE.match(part)
        if m is None:
            raise invalid(f"stand-in: unsupported filter term {part!r}")
        field = m.group(1)
        key = field.lower() if field.lower() in ("status.state", "name") else field
        if not (key in allowed or (key.startswith("labels.") and "labels" in allowed)):
            raise invalid(f"stand-in: unsupported filter field {field!r}")
        terms.append((key, m.group(2) if m.group(2) is not None else m.group(3)))
    return terms


def _matches(resource: dict[str, Any], term: tuple[str, str]) -> bool:
    field, value = term
    if field.startswith("labels."):
        return bool((resource.get("labels") or {}).get(field[len("labels.") :]) == value)
    if field == "status.state":
        return bool(resource["status"]["state"] == value)
    return bool(resource["name"] == value)


def _page(items: list[dict[str, Any]], query: dict[str, str]) -> tuple[list[dict[str, Any]], str]:
    """One page of `items` and the token of the next ("" when none)."""
    try:
        start = int(query.get("pageToken") or 0)
        size = int(query.get("pageSize") or 0) or DEFAULT_PAGE_SIZE
    except ValueError:
        raise invalid("invalid pageToken or pageSize") from None
    if start < 0 or size < 0:
        raise invalid("invalid pageToken or pageSize")
    end = start + size
    return items[start:end], (str(end) if end < len(items) else "")


def _handler(standin: BatchStandin) -> type[BaseHTTPRequestHandler]:
    routes: list[tuple[str, re.Pattern[str], Callable[..., dict[str, Any]]]] = [
        ("POST", re.compile(rf"({_LOC})/jobs"), lambda m, q, b, n: standin.create_job(m[1], q.get("jobId", ""), b, n)),
        ("GET", re.compile(rf"({_LOC})/jobs"), lambda m, q, b, n: standin.list_jobs(m[1], q)),
        ("GET", re.compile(rf"({_JOB})"), lambda m, q, b, n: standin.get_job(m[1])),
        ("DELETE", re.compile(rf"({_JOB})"), lambda m, q, b, n: standin.stop_job(m[1], "delete")),
        ("POST", re.compile(rf"({_JOB}):cancel"), lambda m, q, b, n: standin.stop_job(m[1], "cancel")),
        ("GET", re.compile(rf"({_JOB})/taskGroups/group0/tasks"), lambda m, q, b, n: standin.list_tasks(m[1], q)),
        (
            "GET",
            re.compile(rf"({_JOB})/taskGroups/group0/tasks/(\d+)"),
            lambda m, q, b, n: standin.get_task(m[1], int(m[2])),
        ),
    ]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's requests session expects

        def _answer(self, code: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _dispatch(self) -> None:
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with standin._lock:
                standin.requests.append((self.command, url.path))
                injected = next(
                    (
                        f
                        for f in standin._failures
                        if f.times > 0 and f.method in (None, self.command) and f.path_contains in url.path
                    ),
                    None,
                )
                if injected is not None:
                    injected.times -= 1
            try:
                if injected is not None:
                    raise ApiError(injected.status, f"stand-in: injected HTTP {injected.status}")
                if not url.path.startswith("/v1/"):
                    raise ApiError(404, f"no such path: {url.path}")
                for method, pattern, call in routes:
                    m = pattern.fullmatch(url.path[len("/v1/") :])
                    if m is not None and method == self.command:
                        try:
                            body = json.loads(raw) if raw else {}
                        except ValueError:
                            raise invalid("the request body is not JSON") from None
                        return self._answer(200, call(m, query, body, len(raw)))
                raise ApiError(404, f"no such resource or method: {self.command} {url.path}")
            except ApiError as e:
                self._answer(e.code, e.body())
            except (ValueError, TypeError, KeyError, AttributeError) as e:  # a malformed body
                self._answer(400, invalid(f"malformed request: {e!r}").body())

        do_GET = do_POST = do_DELETE = do_PATCH = _dispatch

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
