"""gs:// inputs and outputs through google-cloud-storage (imported on first use).

An object is identified the way a local file is: a stat-cache row `(size, generation,
crc32c, digest)` under its URL, where the generation and crc32c come from one metadata
request. While they match the row, the object's digest is known without downloading it, so
a no-op build costs one metadata request per gs:// path and no transfer. When they do not
match, an input is downloaded (streamed into the content store, hashed with xxh3 on the way,
its crc32c checked by the client) and tasks see it through a hard link like any input.

Uploads rely on GCS's own atomicity: a single-object upload (one request, or a resumable
session of 8 MiB chunks for larger files) creates the new generation only when it
completes, with the crc32c the client sent checked by the server. An upload that fails or
is interrupted leaves no object, or the previous generation untouched, so no temporary name
and copy is needed (which would double the traffic and still not be atomic across the pair).
XML multipart / parallel composite uploads, which are not atomic that way, are never used.

With `STORAGE_EMULATOR_HOST` set, the client needs no credentials (tests use fake-gcs-server).
"""

from __future__ import annotations

import base64
import os
import re
import threading
from typing import IO, TYPE_CHECKING, Any

import xxhash

from .exceptions import DefinitionError, PipelineException
from .rebuild import StatCache
from .store import FileRow

if TYPE_CHECKING:
    from .cas import ContentStore
    from .graph import Graph

CHUNK = 8 << 20  # resumable upload chunk: bounded memory, and what the emulator handles
_URL = re.compile(r"gs://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])/(.*[^/])")
_local = threading.local()


class GcsError(OSError, PipelineException):
    """A GCS request failed: a one-line error before the build, a task failure during it."""

    def __init__(self, msg: str) -> None:
        OSError.__init__(self, msg)
        self.msg = msg

    def __str__(self) -> str:
        return self.msg


def is_gs(path: str) -> bool:
    """True for a gs:// URL."""
    return path.startswith("gs://")


def check_url(url: str) -> str:
    """`url` itself if it names an object (gs://BUCKET/NAME); DefinitionError if not."""
    if _URL.fullmatch(url) is None:
        raise DefinitionError(f"not a gs:// object: {url} (expected gs://BUCKET/NAME, not ending in /)")
    return url


def _split(url: str) -> tuple[str, str]:
    m = _URL.fullmatch(url)
    if m is None:
        raise GcsError(f"not a gs:// object: {url}")
    return m.group(1), m.group(2)


def _client() -> Any:
    """A storage client for this thread (remade if STORAGE_EMULATOR_HOST changes)."""
    key = os.environ.get("STORAGE_EMULATOR_HOST")
    client = getattr(_local, "client", None)
    if client is None or getattr(_local, "key", None) != key:
        try:
            from google.cloud import storage  # type: ignore[attr-defined,import-untyped,unused-ignore]
        except ImportError:
            raise GcsError(
                "gs:// paths need the 'google-cloud-storage' package: pip install 'pipebuild[gcs]'"
            ) from None
        try:
            client = storage.Client()
        except Exception as e:  # noqa: BLE001 - auth and config errors come in many types
            raise GcsError(f"cannot use Google Cloud Storage: {_short(e)}") from None
        _local.client = client
        _local.key = key
    return client


def _blob(url: str) -> Any:
    bucket, name = _split(url)
    return _client().bucket(bucket).blob(name)


def _crc(blob: Any) -> int:
    return int.from_bytes(base64.b64decode(blob.crc32c), "big") if blob.crc32c else 0


def stat(url: str) -> tuple[int, int, int] | None:
    """(size, generation, crc32c) of the object, or None if there is none."""
    bucket, name = _split(url)
    try:
        blob = _client().bucket(bucket).get_blob(name)
    except GcsError:
        raise
    except Exception as e:  # noqa: BLE001 - google.api_core, google.auth and requests errors
        raise GcsError(f"cannot read {url}: {_short(e)}") from None
    if blob is None:
        return None
    return (int(blob.size or 0), int(blob.generation or 0), _crc(blob))


class _HashingWriter:
    """A file that hashes what is written to it."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.h = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.h.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def download(url: str, cas: ContentStore, generation: int | None = None) -> tuple[str, int]:
    """Stream the object into the content store; returns (digest, size)."""
    fd, tmp = cas.tmp_file("gs")
    try:
        with os.fdopen(fd, "wb") as f:
            w = _HashingWriter(f)
            try:
                _blob(url).download_to_file(w, if_generation_match=generation, checksum="auto")
            except GcsError:
                raise
            except Exception as e:  # noqa: BLE001 - network, 404, 412 and checksum errors
                raise GcsError(f"cannot download {url}: {_short(e)}") from None
        digest = w.h.hexdigest()
        cas.put(tmp, digest)
        return digest, w.size
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def local_copy(cas: ContentStore, url: str, digest: str) -> str:
    """A local path holding the object's bytes (its content-store blob), fetched if need be."""
    if cas.has(digest):
        return cas.path(digest)
    got, _ = download(url, cas)
    if got != digest:
        raise GcsError(f"{url} changed during the build; run again")
    return cas.path(digest)


def upload(src: str, url: str) -> tuple[str, int, int, int]:
    """Upload the file `src` to `url`; returns (url, size, generation, crc32c) for the stat cache."""
    size = os.path.getsize(src)
    with open(src, "rb") as f:
        return upload_stream(f, size, url)


def upload_stream(f: IO[bytes], size: int, url: str) -> tuple[str, int, int, int]:
    """Upload `size` bytes read from `f` as one object; all of it or nothing appears."""
    blob = _blob(url)
    blob.chunk_size = CHUNK
    try:
        blob.upload_from_file(f, size=size, checksum="crc32c", content_type="application/octet-stream")
    except GcsError:
        raise
    except Exception as e:  # noqa: BLE001 - network, auth and checksum errors
        raise GcsError(f"cannot upload {url}: {_short(e)}") from None
    return (url, int(blob.size if blob.size is not None else size), int(blob.generation or 0), _crc(blob))


def crc32c_file(path: str) -> int:
    """The CRC32C of a file, as GCS reports it for an object."""
    import google_crc32c  # installed with google-cloud-storage

    c: Any = google_crc32c.Checksum()  # type: ignore[no-untyped-call]
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            c.update(block)
    return int.from_bytes(c.digest(), "big")


def put_file(bucket: Any, name: str, path: str, **req: Any) -> str:
    """Store a content-named file as `name` without clobbering a good copy: 'created', or
    'present' when an object with the same size and crc32c is there, or 'replaced' when
    the object there holds other bytes (it is swapped, conditional on its generation, so
    a concurrent writer's good copy is never overwritten twice). `req`: timeout, retry."""
    from google.api_core import exceptions as gexc

    size = os.path.getsize(path)
    existing = bucket.get_blob(name, **req) if size > CHUNK else None  # do not send a big file twice
    if existing is None:
        blob = bucket.blob(name)
        blob.chunk_size = CHUNK
        try:
            blob.upload_from_filename(
                path, if_generation_match=0, checksum="crc32c", content_type="application/octet-stream", **req
            )
            return "created"
        except gexc.PreconditionFailed:
            existing = bucket.get_blob(name, **req)
            if existing is None:
                return "present"  # deleted in between: leave it to the next writer
    if int(existing.size or 0) == size and _crc(existing) == crc32c_file(path):
        return "present"
    blob = bucket.blob(name)
    blob.chunk_size = CHUNK
    try:
        blob.upload_from_filename(
            path, if_generation_match=existing.generation, checksum="crc32c",
            content_type="application/octet-stream", **req,
        )  # fmt: skip
    except gexc.PreconditionFailed:
        pass  # another writer replaced it first
    return "replaced"


class RemoteStatCache(StatCache):
    """A StatCache that answers gs:// paths from object metadata (see the module docstring).

    For an input (`inputs`) whose metadata changed, `fetch=True` downloads it into the
    content store to learn its digest; `fetch=False` (status, dry run) does not, and
    returns a marker that matches no digest, so the task shows as stale. For any other
    gs:// path (a destination), a changed object gives such a marker too: it is restored.
    """

    def __init__(self, rows: dict[str, FileRow], cas: ContentStore, inputs: set[str], fetch: bool) -> None:
        super().__init__(rows)
        self.cas = cas
        self.inputs = inputs
        self.fetch = fetch

    def digest(self, path: str) -> str | None:
        """The digest of a local file or gs:// object; None if it does not exist."""
        if not is_gs(path):
            return super().digest(path)
        st = stat(path)
        if st is None:
            return None
        size, generation, crc = st
        row = self.rows.get(path)
        if row is not None and row[0] == size and row[1] == generation and row[2] == crc:
            return row[3]
        if path not in self.inputs or not self.fetch:
            return f"gs-generation-{generation}"
        digest, got = download(path, self.cas, generation)
        self.hashed += 1
        if got != size:
            raise GcsError(f"{path} changed while it was downloaded; run again")
        self.update(path, size, generation, crc, digest)
        return digest


def stat_cache(rows: dict[str, FileRow], graph: Graph, cas: ContentStore, fetch: bool) -> StatCache:
    """The build's stat cache: a RemoteStatCache when the graph has gs:// paths."""
    inputs: set[str] = set()
    remote = False
    for n in graph.nodes:
        for i in n.inputs:
            if i.source is not None and is_gs(i.source):
                inputs.add(i.source)
        if not remote:
            remote = any(is_gs(d) for o in n.outputs for d in o.dests)
    for r, dests in graph.input_copies:
        if is_gs(r._input_path):
            inputs.add(r._input_path)
        remote = remote or any(is_gs(d) for d in dests)
    if not inputs and not remote:
        return StatCache(rows)
    return RemoteStatCache(rows, cas, inputs, fetch)


def _short(e: BaseException) -> str:
    text = str(getattr(e, "message", None) or e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
