"""The runtime image the Batch VMs' stage-in and stage-out containers run (tests/runtime_image.py).

Built on a real dockerd from `pipebuild-runtime-base:test` (tests/build_test_images.sh) and
the current source. These tests skip when Docker or the `docker` package is missing, and
fail instead when PIPEBUILD_REQUIRE_DOCKER=1 (.ci/run sets it). Oracles: the interpreter's
own version, the imports the stager needs, and a hash of the source on both sides.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import docker_client_with
from runtime_image import BASE_IMAGE, RUNTIME_IMAGE, build_runtime_image

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def client():  # type: ignore[no-untyped-def]
    """A client of a running dockerd that has the base image (built here if missing)."""
    c = docker_client_with(BASE_IMAGE)
    yield c
    c.close()


@pytest.fixture(scope="module")
def image(client) -> str:  # type: ignore[no-untyped-def]
    return build_runtime_image(client, REPO)


def run_python(client, image: str, code: str) -> str:  # type: ignore[no-untyped-def]
    """Run `python3 -c CODE` in the image as BatchBackend does (entrypoint python3); its stdout."""
    out = client.containers.run(image, ["-c", code], entrypoint="python3", network_mode="host", remove=True)
    return out.decode().strip()


def test_runtime_image_has_python_311_and_the_stager_imports(client, image) -> None:  # type: ignore[no-untyped-def]
    # Given the runtime image, python3 on PATH should be 3.11 and import what stage-in/out use.
    code = (
        "import sys, pipebuild, google.cloud.storage, xxhash, typer, sqlite_utils, rich, watchdog;"
        " print(sys.version_info[:2])"
    )
    assert run_python(client, image, code) == "(3, 11)"


def test_runtime_image_carries_the_current_source(client, image) -> None:  # type: ignore[no-untyped-def]
    # Given the image built now, pipebuild/hashing.py inside should be the bytes on disk.
    code = "import hashlib, pipebuild.hashing as h; print(hashlib.sha256(open(h.__file__, 'rb').read()).hexdigest())"
    host = hashlib.sha256((REPO / "pipebuild" / "hashing.py").read_bytes()).hexdigest()
    assert run_python(client, image, code) == host


def test_runtime_image_rebuild_of_an_unchanged_source_is_a_cache_hit(client, image) -> None:  # type: ignore[no-untyped-def]
    # Given an image just built, building again from the same source should give the same
    # image id without running any step (each test session pays for a rebuild): every step
    # after FROM comes from the cache, and no step starts a container.
    before = client.images.get(image).id
    log: list[str] = []
    assert build_runtime_image(client, REPO, log) == image == RUNTIME_IMAGE
    assert client.images.get(image).id == before
    steps = [line for line in log if line.startswith("Step ")]
    cached = [line for line in log if "Using cache" in line]
    assert len(steps) >= 2 and len(cached) == len(steps) - 1, log
    assert not [line for line in log if "Running in" in line], log
