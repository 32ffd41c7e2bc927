"""The local content-addressed store: `.pipebuild/cas/<2 hex>/<30 hex>`.

Every blob is read-only and has its mtime set to a sentinel (1 s after the epoch). Tasks
see blobs through hard links, so a task that writes into an input in place would alter
the blob; any write moves the mtime off the sentinel, so one `stat` tells an intact blob
from a suspect one without reading it. A suspect blob is re-hashed: kept (and re-marked)
if its bytes still match, deleted if not.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import stat

from .hashing import copy_and_hash, hash_file

SENTINEL_MTIME_NS = 1_000_000_000
_names = itertools.count()  # temporary names under tmp/, unique in this process


class ContentStore:
    """Blobs by digest under `root`."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") or "/"
        self._dirs: set[str] = set()
        self.tmp = os.path.join(root, "tmp")

    def path(self, digest: str) -> str:
        """Where the blob with this digest lives."""
        return f"{self.root}/{digest[:2]}/{digest[2:]}"  # os.path.join, for a digest (~1 us less)

    def has(self, digest: str) -> bool:
        """True if the blob is present and intact; a damaged blob is deleted."""
        p = self.path(digest)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return False
        if st.st_mtime_ns == SENTINEL_MTIME_NS:
            return True
        if hash_file(p) == digest:
            _mark(p)
            return True
        os.unlink(p)
        return False

    def _dir_for(self, digest: str) -> str:
        d = os.path.join(self.root, digest[:2])
        if d not in self._dirs:
            os.makedirs(d, exist_ok=True)
            self._dirs.add(d)
        return d

    def put(self, src: str, digest: str) -> None:
        """Add the file `src` (a task's output, which it consumes) under `digest`."""
        if self.has(digest):
            os.unlink(src)
            return
        self._dir_for(digest)
        st = os.lstat(src)
        if st.st_nlink > 1 or not stat.S_ISREG(st.st_mode):
            # Another name shares this inode (or it is a link): store a private copy, so
            # marking the blob never touches a file outside the store.
            fd, tmp = self.tmp_file(digest[:8])
            try:
                with open(src, "rb") as f, open(fd, "wb", closefd=False) as out:
                    shutil.copyfileobj(f, out)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
            os.close(fd)
            os.unlink(src)
            src = tmp
        _mark(src)
        _install(src, self.path(digest))

    def tmp_file(self, prefix: str) -> tuple[int, str]:
        """A new file under tmp/ with a fresh name (tasks running at once may store the same
        digest), open for writing: (descriptor, path)."""
        while True:
            tmp = f"{self.tmp}/{prefix}.{next(_names)}"
            try:
                return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), tmp
            except FileExistsError:
                continue  # left by a build that was killed (the next build's recovery empties tmp/)
            except FileNotFoundError:
                os.makedirs(self.tmp, exist_ok=True)

    def put_copy(self, src: str, digest: str) -> bool:
        """Add a copy of `src` (a file that must stay where it is) if its bytes have `digest`.

        The copy is hashed as it is written, so a file that changed since it was hashed is
        caught here; returns False (and stores nothing) when the bytes differ.
        """
        return self.has(digest) or self.copy_in(src, digest) is not None

    def copy_in(self, src: str, digest: str) -> int | None:
        """put_copy of a digest not in the store; returns the blob's size, or None when the
        bytes of `src` do not have `digest`.

        The copy is written through the descriptor that created it: reopening it with
        O_TRUNC would make ext4 write it out at close (its auto_da_alloc rule for files
        truncated to 0 bytes), ~50 us of CPU and a wait for the disk per blob."""
        self._dir_for(digest)
        fd, tmp = self.tmp_file(digest[:8])
        try:
            try:
                if copy_and_hash(src, fd) != digest:
                    os.unlink(tmp)
                    return None
                size = os.fstat(fd).st_size
                _mark(fd)
            finally:
                os.close(fd)
            _install(tmp, self.path(digest))
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return size

    def link_to(self, digest: str, dst: str) -> None:
        """Make the blob visible at `dst`: a hard link, or a copy across devices."""
        link_or_copy(self.path(digest), dst)

    def remove(self, digest: str) -> int:
        """Delete a blob; returns the bytes freed."""
        p = self.path(digest)
        try:
            size = os.stat(p).st_size
            os.unlink(p)
        except FileNotFoundError:
            return 0
        return size


def _install(src: str, path: str) -> None:
    """Move a finished blob to `path`, unless a blob is already there (same digest, same bytes).

    Never rename over an existing blob: a task being prepared may be hard-linking it at
    that moment, and link() of a name whose inode was just replaced fails with ENOENT
    (seen with two tasks storing the same new source at once)."""
    try:
        os.link(src, path)
    except FileExistsError:
        pass
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
            raise
        os.replace(src, path)  # no hard links here: the old way
        return
    os.unlink(src)


def _mark(path: str | int) -> None:
    """Make a blob (a path, or a descriptor open on it) read-only, with the sentinel mtime."""
    os.chmod(path, 0o444)
    os.utime(path, ns=(SENTINEL_MTIME_NS, SENTINEL_MTIME_NS))


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link `src` at `dst`, copying when a link is not possible."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
            raise
        shutil.copyfile(src, dst)
