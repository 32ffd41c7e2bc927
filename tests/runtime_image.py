"""The runtime image for the Batch tests: the current pipebuild source on a prebuilt base.

runtime/Dockerfile is the production image (python:3.11-slim + `pip install '/src[gcs]'`);
it needs Docker Hub, which this machine cannot reach. The tests use a stand-in built in two
layers. tests/build_test_images.sh builds `pipebuild-runtime-base:test` once (~45 s:
debootstrap's python3 3.11 and the dependencies in /opt/pipebuild/lib, on PYTHONPATH).
`build_runtime_image` adds the `pipebuild/` package on top, as `pipebuild-runtime:test`,
each test session, since the source changes between runs. It takes about a second and
never touches the network: the context is an in-memory tar built with `network_mode="none"`.
An unchanged source hits the builder's cache and gives the same image id.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path
from typing import Any

BASE_IMAGE = "pipebuild-runtime-base:test"
RUNTIME_IMAGE = "pipebuild-runtime:test"
BUILD_SCRIPT = Path(__file__).with_name("build_test_images.sh")
DOCKERFILE = f"FROM {BASE_IMAGE}\nCOPY pipebuild /opt/pipebuild/lib/pipebuild\n"


def ensure_image(client: Any, name: str = BASE_IMAGE) -> None:
    """Build the test images with tests/build_test_images.sh if `name` is missing (the base
    image: package registries, ~45 s); RuntimeError if that fails."""
    import docker

    try:
        client.images.get(name)
        return
    except docker.errors.ImageNotFound:
        pass
    r = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"cannot build {name}: {r.stderr.strip()}")


def _context(repo_root: Path) -> io.BytesIO:
    """A build context: the Dockerfile and pipebuild/ without bytecode, with fixed metadata."""

    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if info.name.endswith((".pyc", "__pycache__")):
            return None
        info.mtime = 0  # so that an unchanged source is a cache hit
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = DOCKERFILE.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        tar.add(repo_root / "pipebuild", arcname="pipebuild", filter=normalize)
    buf.seek(0)
    return buf


def build_runtime_image(client: Any, repo_root: Path, log: list[str] | None = None) -> str:
    """Build `pipebuild-runtime:test` from the base image and repo_root/pipebuild; return the tag.

    `log`, if given, receives the build's output lines. Raises docker.errors.ImageNotFound
    when the base image is missing (see ensure_image) and docker.errors.BuildError when the
    build fails.
    """
    import docker

    client.images.get(BASE_IMAGE)
    try:
        old_id = client.images.get(RUNTIME_IMAGE).id
    except docker.errors.ImageNotFound:
        old_id = None
    image, lines = client.images.build(
        fileobj=_context(Path(repo_root)),
        custom_context=True,
        tag=RUNTIME_IMAGE,
        pull=False,
        rm=True,
        forcerm=True,
        network_mode="none",
    )
    if log is not None:
        log.extend(str(line.get("stream", "")).rstrip("\n") for line in lines if line.get("stream"))
    if old_id is not None and old_id != image.id:
        # The previous build is now untagged; drop it unless a container still uses it.
        try:
            client.images.remove(old_id)
        except docker.errors.APIError:
            pass
    return RUNTIME_IMAGE
