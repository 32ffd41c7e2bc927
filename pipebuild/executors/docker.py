"""Docker tasks: a task with `image(...)` runs in a container through the `docker` SDK.

`DispatchExecutor` is the default executor: tasks without an image run on the host
(`LocalExecutor`), tasks with one in Docker. Before anything runs, the build calls its
`prepare(nodes)`: that connects to the daemon (one line and exit 2 if it cannot), resolves
each image name to its ID (pulling an image that is not present; one line naming the image
and the task if that fails) and checks each task's limits. The IDs go into the action keys,
so rebuilding an image under the same tag reruns its tasks, and a task always runs in the
very image its key names.

A container gets the task directory mounted at the same absolute path, as its working
directory; it runs `bash -c SCRIPT` as the invoking user (`uid:gid`), so outputs belong to
that user. `cpu` becomes a CPU quota (capped at the machine's cores), `memory` a memory
limit, `timeout` a kill. Containers are always removed, and `cancel_all` (Ctrl-C) kills and
removes the running ones. The `docker` package is imported only when a task has an image.

Quantities (`memory`, `storage`) follow Kubernetes: `500M` (10^6), `3.75Gi` (2^30), `1k`;
a bare number is in GB (10^9), as the original documentation said. For compatibility with
the original local backend, which handed the value to `docker run -m`, lower-case `m`, `g`
and `t` are read as Docker reads them (powers of 1024). `storage` is checked but not
enforced by local containers. `cpu` takes cores (`0.5`, `2`) or millicores (`500m`).
"""

from __future__ import annotations

import os
import re
import shlex
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from ..exceptions import DefinitionError, UsageError
from . import STOPPED, Executor, Job, JobResult, long_script_file
from .local import LocalExecutor

if TYPE_CHECKING:
    from ..graph import Node

FLAGS_ENV = ("PIPEBUILD_EXTRA_DOCKER_RUN_FLAGS", "HAIL_PIPELINE_EXTRA_DOCKER_RUN_FLAGS")
GSA_KEY_TARGET = "/gsa-key/key.json"
SCRIPT_TARGET = "/.pipebuild-script.sh"
LABEL = "pipebuild.task"
WORKSPACE_LABEL = "pipebuild.workspace"

# -- quantities ------------------------------------------------------------------------

_QUANTITY = re.compile(r"\+?((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([KMGTPE]i|[kKMGTPEmgt])?[bB]?")
_UNITS = {
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "m": 2**20, "g": 2**30, "t": 2**40,
}  # fmt: skip
_CPU = re.compile(r"\+?(\d+\.?\d*|\.\d+)(m?)")


def parse_quantity(value: Any) -> int:
    """Bytes in a Kubernetes-style quantity: '500M', '4G', '3.75Gi'; a bare number is GB."""
    text = str(value).strip()
    m = _QUANTITY.fullmatch(text)
    if m is None:
        raise ValueError(f"not a quantity: {value!r} (use e.g. 500M, 4G or 3.75Gi; a bare number is GB)")
    number = float(m.group(1))
    unit = m.group(2)
    return int(number * (_UNITS[unit] if unit else 10**9))


def parse_cpu(value: Any) -> float:
    """Cores in '0.5', '2' or '500m' (millicores); zero is refused."""
    text = str(value).strip()
    m = _CPU.fullmatch(text)
    if m is None or float(m.group(1)) == 0:
        raise ValueError(f"not a number of CPU cores: {value!r} (use e.g. 0.5, 2 or 500m)")
    cores = float(m.group(1))
    return cores / 1000 if m.group(2) else cores


# -- extra `docker run` flags ------------------------------------------------------------

# flag -> (SDK keyword, kind); kinds: env, volume, list, map, value, bool, ignore
_FLAGS: dict[str, tuple[str, str]] = {
    "-e": ("environment", "env"), "--env": ("environment", "env"),
    "-v": ("volumes", "volume"), "--volume": ("volumes", "volume"),
    "--network": ("network_mode", "value"), "--net": ("network_mode", "value"),
    "--add-host": ("extra_hosts", "map"), "--label": ("labels", "label"), "-l": ("labels", "label"),
    "--dns": ("dns", "list"), "--cap-add": ("cap_add", "list"), "--cap-drop": ("cap_drop", "list"),
    "--device": ("devices", "list"), "--security-opt": ("security_opt", "list"),
    "--tmpfs": ("tmpfs", "tmpfs"), "--shm-size": ("shm_size", "value"), "-u": ("user", "value"),
    "--user": ("user", "value"), "--ipc": ("ipc_mode", "value"), "--pid": ("pid_mode", "value"),
    "--hostname": ("hostname", "value"), "-h": ("hostname", "value"),
    "--privileged": ("privileged", "bool"), "--init": ("init", "bool"), "--rm": ("", "ignore"),
}  # fmt: skip


def parse_run_flags(text: str, source: str = "extra docker run flags") -> dict[str, Any]:
    """SDK keyword arguments for a `docker run` flag string such as '-e A=1 --network host'.

    Supported: -e/--env, -v/--volume, --network/--net, --add-host, --label, --dns, --cap-add,
    --cap-drop, --device, --security-opt, --tmpfs, --shm-size, -u/--user, --ipc, --pid,
    --hostname, --privileged, --init and --rm (containers are always removed anyway).
    Anything else raises UsageError naming the flag.
    """
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise UsageError(f"{source}: cannot parse {text!r}: {e}") from None
    kwargs: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        flag, eq, value = word.partition("=") if word.startswith("--") else (word, "", "")
        spec = _FLAGS.get(flag)
        if spec is None:
            supported = " ".join(sorted(f for f in _FLAGS if f.startswith("--")))
            raise UsageError(f"{source}: unsupported flag '{word}' (supported: {supported}, -e, -v, -u, -l, -h)")
        key, kind = spec
        if kind in ("bool", "ignore"):
            if eq:
                raise UsageError(f"{source}: flag '{flag}' takes no value")
            if kind == "bool":
                kwargs[key] = True
            continue
        if not eq:
            if i >= len(words):
                raise UsageError(f"{source}: flag '{flag}' needs a value")
            value = words[i]
            i += 1
        _add_flag(kwargs, source, flag, key, kind, value)
    return kwargs


def _add_flag(kwargs: dict[str, Any], source: str, flag: str, key: str, kind: str, value: str) -> None:
    if kind == "env":
        name, eq, v = value.partition("=")
        if not eq:
            v = os.environ.get(name, "")
        kwargs.setdefault(key, {})[name] = v
    elif kind == "volume":
        parts = value.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/"):
            raise UsageError(f"{source}: '{flag} {value}' is not SRC:DEST[:MODE] with an absolute DEST")
        src = os.path.abspath(os.path.expanduser(parts[0])) if "/" in parts[0] else parts[0]
        kwargs.setdefault(key, {})[src] = {"bind": parts[1], "mode": parts[2] if len(parts) == 3 else "rw"}
    elif kind in ("map", "label", "tmpfs"):
        sep = ":" if kind in ("map", "tmpfs") else "="
        name, _, v = value.partition(sep)
        kwargs.setdefault(key, {})[name] = v
    elif kind == "list":
        kwargs.setdefault(key, []).append(value)
    else:
        kwargs[key] = value


# -- the executors ---------------------------------------------------------------------


@dataclass
class _Plan:
    """What `prepare` settled for one task."""

    image_id: str
    nano_cpus: int | None = None
    mem_limit: int | None = None


class DockerExecutor:
    """Runs each job in a fresh container of its image; removes it however the job ends."""

    def __init__(self, flags: str = "", gsa_key_file: str | None = None, client: Any = None) -> None:
        self.flags = flags
        self.gsa_key_file = gsa_key_file
        self._client = client
        self._errors: Any = None
        self._requests_errors: Any = None
        self._run_kwargs: dict[str, Any] | None = None
        self._plans: dict[str, _Plan] = {}
        self._running: dict[str, Any] = {}  # container id -> container
        self._lock = threading.Lock()
        self._cancelled = False
        self._stopped: set[str] = set()  # ids of containers stopped by stop_running
        self._stop_gen = 0  # bumped by stop_running: a job begun before it must not outlive it
        self._ncpu = 0

    # -- before the build --------------------------------------------------------------

    def connect(self, why: str) -> Any:
        """The SDK client; UsageError when the package is missing or the daemon unreachable."""
        if self._errors is None:
            try:
                import docker.errors  # type: ignore[import-untyped]
                import requests.exceptions  # type: ignore[import-untyped, unused-ignore]
            except ImportError:
                raise UsageError(f"{why} needs the 'docker' Python package: pip install 'pipebuild[docker]'") from None
            self._errors = docker.errors
            self._requests_errors = requests.exceptions
        if self._client is None:
            import docker  # type: ignore[import-untyped, unused-ignore]

            try:
                client = docker.from_env()
                client.ping()
            except docker.errors.DockerException as e:
                host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
                raise UsageError(f"cannot reach the Docker daemon at {host} ({_short(e)}); {why} needs it") from None
            self._client = client
        return self._client

    def prepare(self, nodes: list[Node], workspace: str | None = None) -> dict[str, str]:
        """Connect, resolve images to IDs, check limits; returns {image name: image ID}.

        With `workspace` (the `.pipebuild` directory, whose lock the caller holds), also
        remove containers left behind by a killed earlier build of the same workspace.
        """
        if not nodes:
            return {}
        first = nodes[0]
        client = self.connect(f"task '{first.name}' (image '{first.image}')")
        if self._run_kwargs is None:
            self._run_kwargs = self._base_kwargs()
        if workspace is not None:
            self._remove_orphans(workspace)
        ids: dict[str, str] = {}
        for node in nodes:
            image = node.image
            assert image is not None
            if image not in ids:
                ids[image] = self._resolve(client, image, node)
            plan = _Plan(ids[image])
            task = node.task
            try:
                if task._cpu is not None:
                    cores = parse_cpu(task._cpu)
                    plan.nano_cpus = int(min(cores, self._cores()) * 1e9)
                if task._memory is not None:
                    plan.mem_limit = parse_quantity(task._memory)
                if task._storage is not None:
                    parse_quantity(task._storage)  # checked; local containers do not enforce it
            except ValueError as e:
                raise DefinitionError(f"task '{node.name}': {e}", node.where) from None
            self._plans[node.name] = plan
        return ids

    def _base_kwargs(self) -> dict[str, Any]:
        kwargs = parse_run_flags(self.flags) if self.flags.strip() else {}
        if self.gsa_key_file:
            key = os.path.abspath(os.path.expanduser(self.gsa_key_file))
            if not os.path.isfile(key):
                raise UsageError(f"gsa_key_file {self.gsa_key_file} does not exist")
            kwargs.setdefault("volumes", {})[key] = {"bind": GSA_KEY_TARGET, "mode": "ro"}
            kwargs.setdefault("environment", {}).setdefault("GOOGLE_APPLICATION_CREDENTIALS", GSA_KEY_TARGET)
        return kwargs

    def _cores(self) -> float:
        if not self._ncpu:
            try:
                self._ncpu = int(self._client.info().get("NCPU") or 0)
            except self._errors.DockerException:
                self._ncpu = 0
            self._ncpu = self._ncpu or os.cpu_count() or 1
        return float(self._ncpu)

    def _resolve(self, client: Any, image: str, node: Node) -> str:
        errors = self._errors
        try:
            return str(client.images.get(image).id)
        except errors.ImageNotFound:
            pass
        except errors.APIError as e:
            raise DefinitionError(f"task '{node.name}': image '{image}': {_short(e)}", node.where) from None
        try:
            return str(client.images.pull(image).id)  # the SDK splits name:tag and name@digest
        except errors.DockerException as e:
            raise DefinitionError(
                f"unknown image '{image}' for task '{node.name}': not present locally and cannot be pulled ({_short(e)})",
                node.where,
            ) from None

    def _remove_orphans(self, workspace: str) -> None:
        try:
            stale = self._client.containers.list(all=True, filters={"label": f"{WORKSPACE_LABEL}={workspace}"})
            for c in stale:
                c.remove(force=True)
        except self._errors.DockerException:
            pass  # best effort: the build itself does not depend on it

    # -- running -----------------------------------------------------------------------

    def run(self, job: Job) -> JobResult:
        """Run the job in a container; kill it at its timeout; always remove it."""
        if job.name not in self._plans:
            # Used without prepare() (e.g. directly): resolve the image now.
            client = self.connect(f"task '{job.name}' (image '{job.image}')")
            if self._run_kwargs is None:
                self._run_kwargs = self._base_kwargs()
            try:
                self._plans[job.name] = _Plan(str(client.images.get(job.image).id))
            except self._errors.DockerException as e:
                return JobResult(125, error=f"image '{job.image}': {_short(e)}")
        plan = self._plans[job.name]
        kwargs = self._container_kwargs(job, plan)
        errors = self._errors
        with self._lock:
            if self._cancelled:
                return JobResult(130, error="interrupted")
            gen = self._stop_gen
        try:
            container = self._client.containers.create(plan.image_id, **kwargs)
        except errors.DockerException as e:
            return JobResult(125, error=f"cannot create a container of '{job.image}': {_short(e)}")
        with self._lock:
            self._running[container.id] = container
            cancelled = self._cancelled
            stopped = gen != self._stop_gen  # stop_running came while this job was starting
        try:
            if cancelled:
                return JobResult(130, error="interrupted")
            if stopped:
                return JobResult(137, error=STOPPED)
            result = self._start_and_wait(container, job)
            with self._lock:
                if container.id in self._stopped:
                    self._stopped.discard(container.id)
                    return JobResult(result.exit_code or 137, error=STOPPED)
            return result
        finally:
            with self._lock:
                self._running.pop(container.id, None)
            try:
                container.remove(force=True)
            except errors.DockerException:
                pass

    def _container_kwargs(self, job: Job, plan: _Plan) -> dict[str, Any]:
        base = self._run_kwargs or {}
        kwargs: dict[str, Any] = {k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in base.items()}
        volumes = kwargs.setdefault("volumes", {})
        volumes[job.dir] = {"bind": job.dir, "mode": "rw"}
        env = kwargs.setdefault("environment", {})
        env.update(job.env)
        env["PIPEBUILD_TASK_DIR"] = job.dir
        path = long_script_file(job)
        command = ["bash", SCRIPT_TARGET] if path else ["bash", "-c", job.script]
        if path:
            volumes[path] = {"bind": SCRIPT_TARGET, "mode": "ro"}
        kwargs.setdefault("user", f"{os.getuid()}:{os.getgid()}")
        labels = kwargs.setdefault("labels", {})
        labels[LABEL] = job.name
        labels[WORKSPACE_LABEL] = os.path.dirname(os.path.dirname(job.dir))
        kwargs.update(command=command, working_dir=job.dir, detach=True, stdin_open=False, tty=False)
        if plan.nano_cpus:
            kwargs["nano_cpus"] = plan.nano_cpus
        if plan.mem_limit:
            kwargs["mem_limit"] = plan.mem_limit
        return kwargs

    def _start_and_wait(self, container: Any, job: Job) -> JobResult:
        errors = self._errors
        try:
            container.start()
        except errors.DockerException as e:
            return JobResult(126, error=f"cannot start a container of '{job.image}': {_short(e)}")
        timed_out = False
        try:
            status = container.wait(timeout=job.timeout)
        except self._requests_errors.RequestException as e:
            if job.timeout is None:
                return JobResult(125, error=f"lost the Docker daemon: {_short(e)}")
            timed_out = True
            _quiet(container.kill, errors)
            try:
                status = container.wait(timeout=30)
            except (self._requests_errors.RequestException, errors.DockerException):
                status = {"StatusCode": 137}
        except errors.DockerException as e:
            if self._cancelled:
                return JobResult(130, error="interrupted")
            return JobResult(125, error=f"lost the container: {_short(e)}")
        code = int(status.get("StatusCode", 1))
        self._save_logs(container, job)
        if self._cancelled and code != 0:
            return JobResult(code, error="interrupted")
        if timed_out:
            return JobResult(code, timed_out=True)
        if code == 137 and self._oom_killed(container):
            return JobResult(code, error="killed: out of memory (the task's memory limit)")
        return JobResult(code)

    def _save_logs(self, container: Any, job: Job) -> None:
        for path, out, err in ((job.stdout, True, False), (job.stderr, False, True)):
            with open(path, "wb") as f:
                try:
                    for chunk in container.logs(stdout=out, stderr=err, stream=True, follow=False):
                        f.write(chunk)
                except self._errors.DockerException as e:
                    f.write(f"pipebuild: cannot read the container's log: {_short(e)}\n".encode())

    def _oom_killed(self, container: Any) -> bool:
        try:
            container.reload()
            return bool(container.attrs.get("State", {}).get("OOMKilled"))
        except self._errors.DockerException:
            return False

    def stop_running(self) -> None:
        """Kill and remove the containers running now; later ones still start."""
        with self._lock:
            self._stop_gen += 1
            running = list(self._running.values())
            self._stopped.update(c.id for c in running)
        for c in running:
            _quiet(partial(c.remove, force=True), self._errors)

    def cancel_all(self) -> None:
        """Kill and remove every running container; no new one starts afterwards."""
        with self._lock:
            self._cancelled = True
            running = list(self._running.values())
        for c in running:
            _quiet(partial(c.remove, force=True), self._errors)


class DispatchExecutor:
    """Host bash for tasks without an image, Docker (created on first need) for the others."""

    def __init__(
        self,
        host: Executor | None = None,
        flags: str = "",
        gsa_key_file: str | None = None,
        docker: DockerExecutor | None = None,
    ) -> None:
        self.host: Executor = host or LocalExecutor()
        self.flags = flags
        self.gsa_key_file = gsa_key_file
        self.docker = docker

    def prepare(self, nodes: list[Node], workspace: str | None = None) -> dict[str, str]:
        """See DockerExecutor.prepare; nodes without an image are ignored."""
        nodes = [n for n in nodes if n.image]
        if not nodes:
            return {}
        if self.docker is None:
            self.docker = DockerExecutor(self.flags, self.gsa_key_file)
        return self.docker.prepare(nodes, workspace)

    def run(self, job: Job) -> JobResult:
        """Run the job on the host, or in its image."""
        if not job.image:
            return self.host.run(job)
        if self.docker is None:
            self.docker = DockerExecutor(self.flags, self.gsa_key_file)
        return self.docker.run(job)

    def cancel_all(self) -> None:
        """Stop everything running, on the host and in containers."""
        self.host.cancel_all()
        if self.docker is not None:
            self.docker.cancel_all()

    def stop_running(self) -> None:
        """Stop what runs now, on the host and in containers."""
        self.host.stop_running()
        if self.docker is not None:
            self.docker.stop_running()

    def close(self) -> None:
        """Let go of what the host executor keeps between jobs (its bash servers)."""
        close = getattr(self.host, "close", None)
        if close is not None:
            close()


def default_executor(backend: object = None) -> DispatchExecutor:
    """The executor for a build: settings from a LocalBackend, else from the environment."""
    flags = getattr(backend, "_extra_docker_run_flags", None)
    if flags is None:
        flags = next((os.environ[v] for v in FLAGS_ENV if os.environ.get(v)), "")
    key = getattr(backend, "_gsa_key_file", None)
    if key is None and backend is None:
        key = os.environ.get("PIPEBUILD_GSA_KEY_FILE") or os.environ.get("HAIL_PIPELINE_GSA_KEY_FILE")
    return DispatchExecutor(flags=flags, gsa_key_file=key)


def _short(e: BaseException) -> str:
    """One line from a Docker SDK error."""
    explanation = getattr(e, "explanation", None)
    text = str(explanation or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _quiet(fn: Callable[[], Any], errors: Any) -> None:
    try:
        fn()
    except errors.DockerException:
        pass
