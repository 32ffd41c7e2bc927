"""A remote cache in GCS, shared across machines: `gs://BUCKET/PREFIX`.

Layout (Bazel's AC/CAS split):

    PREFIX/cas/<digest>   the bytes of an output, named by their xxh3-128 digest
    PREFIX/ac/<key>       JSON {output relpath: digest}, the outputs of one action key

Both are written create-only (`if_generation_match=0`: a 412 means the object is already
there, which is fine) and never overwritten, so a racing or retried writer cannot clobber
an entry, and what a key names never changes. Blobs go up before the entry that names them.

Reading: the rebuilder asks `lookup(key)` only when the local traces and action cache do
not answer, so a no-op build makes no remote request. An entry counts as a hit only if
every blob it names is still in `cas/` (a metadata request each, so an expired blob means
a miss rather than a consumer that cannot get its input). A hit names digests; blobs are
fetched lazily (`fetch`), only when a destination must be published or a task that runs
needs the file as an input, and each one is hashed on the way in: a blob whose bytes do not
match its name is rejected with a one-line warning and deleted locally, and the work is
done again.

Writing: after a task runs successfully, `upload(key, outputs)` stores its output blobs and
then its entry, unless the cache is read-only (untrusted CI jobs). A failure is a one-line
warning, never a failed build; after a failure that is not a plain "not found", the cache is
left alone for the rest of the build (one warning, no request after it).

google-cloud-storage is imported on first use (`gcs._client`: one client per thread, which
honours `STORAGE_EMULATOR_HOST`).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .exceptions import UsageError

if TYPE_CHECKING:
    from .cas import ContentStore

ENV_URL = "PIPEBUILD_REMOTE_CACHE"
ENV_READ_ONLY = "PIPEBUILD_REMOTE_CACHE_READ_ONLY"
RETRY_SECONDS = 20.0  # how long a request is retried (transient errors) before giving up
TIMEOUT = (10.0, 60.0)  # connect, read
_URL = re.compile(r"gs://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])(?:/(.*))?")
_DIGEST = re.compile(r"[0-9a-f]{32}")


def settings(url: str | None, read_only: bool, backend: Any = None) -> tuple[str | None, bool]:
    """The remote cache URL and read-only flag: explicit values, then the Pipeline's
    LocalBackend, then PIPEBUILD_REMOTE_CACHE / PIPEBUILD_REMOTE_CACHE_READ_ONLY=1.
    Read-only wins if any of them asks for it."""
    if not url:
        url = getattr(backend, "_remote_cache", None) or os.environ.get(ENV_URL) or None
    read_only = (
        read_only
        or bool(getattr(backend, "_remote_cache_read_only", False))
        or os.environ.get(ENV_READ_ONLY, "").strip().lower() in ("1", "true", "yes")
    )
    return url, read_only


def parse(url: str) -> tuple[str, str]:
    """(bucket, prefix) of gs://BUCKET[/PREFIX]; UsageError if it is not such a URL."""
    m = _URL.fullmatch(url.strip())
    if m is None:
        raise UsageError(f"not a remote cache URL: '{url}' (expected gs://BUCKET or gs://BUCKET/PREFIX)")
    return m.group(1), (m.group(2) or "").strip("/")


class RemoteCache:
    """The action cache and content store under gs://BUCKET/PREFIX."""

    def __init__(self, url: str, read_only: bool = False, warn: Callable[[str], None] = print) -> None:
        self.bucket, self.prefix = parse(url)
        self.url = f"gs://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.read_only = read_only
        self._warn = warn
        self._lock = threading.Lock()
        self.broken = False  # after a failure: no more requests in this build
        # What this build did (tests and reports read these).
        self.hits = 0
        self.fetched: list[str] = []
        self.uploaded: list[str] = []
        # Blobs known to be in the cache already (fetched, or stored there by a remote executor).
        self.present: set[str] = set()
        self.rejected: set[str] = set()  # blobs found bad here (already warned about)

    # -- names ---------------------------------------------------------------------

    def _name(self, kind: str, ident: str) -> str:
        return f"{self.prefix}/{kind}/{ident}" if self.prefix else f"{kind}/{ident}"

    def _blob(self, kind: str, ident: str) -> Any:
        from . import gcs

        return gcs._client().bucket(self.bucket).blob(self._name(kind, ident))

    def _fail(self, what: str, e: BaseException) -> None:
        from .gcs import _short

        with self._lock:
            if self.broken:
                return
            self.broken = True
        self._warn(f"pipebuild: warning: remote cache {self.url}: cannot {what}: {_short(e)}; going on without it")

    # -- reading -------------------------------------------------------------------

    def lookup(self, key: str) -> dict[str, str] | None:
        """The outputs recorded remotely for an action key, or None (a miss or an error)."""
        if self.broken:
            return None
        try:
            from google.api_core import exceptions as gexc

            data = self._blob("ac", key).download_as_bytes(timeout=TIMEOUT, retry=_retry())
        except ImportError as e:
            self._fail("read the action cache", e)
            return None
        except Exception as e:  # noqa: BLE001 - api_core, auth and transport errors
            if isinstance(e, gexc.NotFound):
                return None
            self._fail(f"read ac/{key}", e)
            return None
        try:
            outs = json.loads(data)
            ok = isinstance(outs, dict) and all(
                isinstance(k, str) and isinstance(v, str) and _DIGEST.fullmatch(v) for k, v in outs.items()
            )
        except ValueError:
            ok = False
        if not ok:
            self._warn(f"pipebuild: warning: remote cache entry {self.url}/ac/{key} is malformed; ignoring it")
            return None
        # An entry is only as good as its blobs: one that a lifecycle rule (or a person)
        # removed makes the entry a miss, so the task runs here instead of promising bytes
        # that a consumer would later fail to fetch.
        try:
            for digest in sorted(set(outs.values()) - self.present):
                if not self._blob("cas", digest).exists(timeout=TIMEOUT, retry=_retry()):
                    return None
                with self._lock:
                    self.present.add(digest)
        except Exception as e:  # noqa: BLE001 - api_core, auth and transport errors
            self._fail(f"read cas/ for ac/{key}", e)
            return None
        self.hits += 1
        result: dict[str, str] = outs
        return result

    def fetch(self, digest: str, cas: ContentStore) -> int | None:
        """Download the blob `digest` into the local content store and verify it; its size,
        or None if it is missing, unreadable or does not match its digest."""
        if self.broken or not _DIGEST.fullmatch(digest):
            return None
        from . import gcs

        fd, tmp = cas.tmp_file("remote")
        try:
            with os.fdopen(fd, "wb") as f:
                w = gcs._HashingWriter(f)
                try:
                    from google.api_core import exceptions as gexc
                except ImportError as e:  # google-cloud-storage is the optional [gcs] extra
                    self._fail(f"download cas/{digest}", e)
                    return None
                try:
                    self._blob("cas", digest).download_to_file(w, checksum="auto", timeout=TIMEOUT, retry=_retry())
                except Exception as e:  # noqa: BLE001 - api_core, auth, transport and checksum errors
                    if not isinstance(e, gexc.NotFound):
                        self._fail(f"download cas/{digest}", e)
                    return None
            got = w.h.hexdigest()
            if got != digest:
                with self._lock:
                    self.present.discard(digest)  # there, but bad: the next upload replaces it
                    self.rejected.add(digest)
                self._warn(
                    f"pipebuild: warning: remote cache blob {self.url}/cas/{digest} does not match its digest "
                    f"(got {got}); rejected, the work is done again"
                )
                return None
            cas.put(tmp, digest)
            with self._lock:
                self.fetched.append(digest)
                self.present.add(digest)
            return w.size
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- writing -------------------------------------------------------------------

    def upload(self, key: str, outputs: dict[str, str], cas: ContentStore) -> bool:
        """Store a successful action: its output blobs, then its entry (create-only).
        False (after a one-line warning) if that could not be done; never raises."""
        if self.read_only or self.broken:
            return False
        from . import gcs

        try:
            from google.api_core import exceptions as gexc

            bucket = gcs._client().bucket(self.bucket)
            for digest in sorted(set(outputs.values()) - self.present):
                how = gcs.put_file(bucket, self._name("cas", digest), cas.path(digest), timeout=TIMEOUT, retry=_retry())
                if how == "replaced" and digest not in self.rejected:
                    self._warn(
                        f"pipebuild: warning: remote cache blob {self.url}/cas/{digest} held other bytes; replaced"
                    )
                if how != "present":
                    with self._lock:
                        self.uploaded.append(self._name("cas", digest))
                with self._lock:
                    self.present.add(digest)
            entry = json.dumps(outputs, sort_keys=True).encode()
            try:
                self._blob("ac", key).upload_from_string(
                    entry, content_type="application/json", if_generation_match=0, timeout=TIMEOUT, retry=_retry()
                )
                with self._lock:
                    self.uploaded.append(self._name("ac", key))
            except gexc.PreconditionFailed:
                pass  # the first writer wins; the outputs are the same by definition of the key
        except Exception as e:  # noqa: BLE001 - never fail a build over the cache
            self._fail(f"upload to the cache (action {key})", e)
            return False
        return True


def _retry() -> Any:
    """The client's default retry policy (transient errors only), bounded by RETRY_SECONDS."""
    from google.cloud.storage.retry import DEFAULT_RETRY  # type: ignore[import-untyped]

    return DEFAULT_RETRY.with_timeout(RETRY_SECONDS)
