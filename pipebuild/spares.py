"""Emptied task directories, kept for reuse within a build and from one build to the next.

On this project's ext4 VMs (no journal, mounted with `discard`), removing a directory
waits ~60 us for the device to discard its block, and each directory or file made in the
minutes after many were freed costs far more kernel time than usual (the inode allocator
steps over recently freed inodes one at a time). Renaming a directory costs ~3 us.

So a task directory that ends holding only the empty subdirectories `_prepare` made is
renamed into `.pipebuild/spares/`, and the next task takes the spare that needs the
fewest subdirectories made or removed. Spares outlive the build: the build lists them in
`spares/manifest.json` at its end, and the next build adopts them if the last one ended
(a build killed with -9 leaves its `building` marker, and then they are all removed). A
gather of 10,000 files all called `ofile` lays them out as `in/ofile`, `in/1/ofile` ...
`in/9999/ofile`: removing those 10,000 directories at the end took ~0.7 s, and made the
next build's files slow to create; kept, the next run of the gather makes none.

Spares live beside `tmp/`, not in it, so no task's directory name can clash with one.
A directory is only kept if it and each subdirectory is as `mkdir` makes one now: a
directory (not a symlink), owned by this user, with the mode the umask gives. A task's
`chmod` of its directory, or a build under another umask, must not reach a later task.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading

MANIFEST = "manifest.json"

Spare = tuple[str, frozenset[str]]  # (path, its subdirectories relative to it)


def adopt(spares_dir: str, trusted: bool) -> list[Spare]:
    """The spares the last build listed, after removing everything else in `spares_dir`.

    `trusted` is False when the last build did not end (then nothing is kept)."""
    kept: list[Spare] = []
    if trusted:
        try:
            with open(os.path.join(spares_dir, MANIFEST)) as f:
                listed = json.load(f)
            for name, dirs in listed:
                if (
                    isinstance(name, str)
                    and name.isascii()
                    and name.isdigit()
                    and all(isinstance(d, str) for d in dirs)
                ):
                    kept.append((os.path.join(spares_dir, name), frozenset(dirs)))
        except (OSError, ValueError, TypeError):
            kept = []
    names = {os.path.basename(path) for path, _ in kept}
    try:
        entries = os.listdir(spares_dir)
    except FileNotFoundError:
        entries = []
    for entry in entries:
        if entry in names:
            continue
        path = os.path.join(spares_dir, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass
    present = set(entries)
    return [s for s in kept if os.path.basename(s[0]) in present]


class Spares:
    """The pool of spare task directories; its methods are called from worker threads."""

    def __init__(self, spares_dir: str, adopted: list[Spare], keep: int) -> None:
        self.dir = spares_dir
        # What a new directory looks like (read here, on the build's thread: reading the
        # umask means setting it): 0o777 less the umask, and the setgid bit of its parent.
        mask = os.umask(0o022)
        os.umask(mask)
        self.mode = 0o777 & ~mask
        try:
            self.mode |= os.stat(spares_dir).st_mode & stat.S_ISGID
        except OSError:
            pass
        self.uid = os.geteuid()
        self.keep = keep  # at most this many are left for the next build
        self._pool = list(adopted)
        self._adopted = {path for path, _ in adopted}  # not yet looked at
        self._lock = threading.Lock()
        self._making: set[frozenset[str]] = set()  # layouts make_ahead has yet to finish
        self._made = threading.Condition(self._lock)  # one of them is finished
        self._count = max((int(os.path.basename(p)) for p, _ in adopted), default=0)
        self._ahead: threading.Thread | None = None
        self._stop = False

    def make_ahead(self, layouts: list[frozenset[str]]) -> None:
        """Make spares with these subdirectories, on a thread of their own, for tasks that
        will need them later (a gather of 10,000 files all called `ofile` needs 10,000:
        ~0.5 s of mkdir on ext4, which the build otherwise spends with both cores idle,
        between the last task before the gather and the gather). A layout that a spare in
        the pool has already is skipped. A task that needs a layout still being made
        waits for it (what is left to make is less than the whole)."""
        if layouts:
            self._making = set(layouts)
            self._ahead = threading.Thread(target=self._make, args=(layouts,), name="pipebuild_spares", daemon=True)
            self._ahead.start()

    def _make(self, layouts: list[frozenset[str]]) -> None:
        try:
            for dirs in layouts:
                try:
                    self._make_one(dirs)
                finally:
                    with self._lock:
                        self._making.discard(dirs)
                        self._made.notify_all()
        finally:  # (whatever happened, nobody waits for the rest)
            with self._lock:
                self._making.clear()
                self._made.notify_all()

    def _make_one(self, dirs: frozenset[str]) -> None:
        with self._lock:
            if self._stop or any(has == dirs for _, has in self._pool):
                return
            self._count += 1
            path = os.path.join(self.dir, str(self._count))
        made: list[str] = []  # parents first, so what is made is a layout of its own
        try:
            os.mkdir(path)
        except OSError:
            return
        try:
            for d in sorted(dirs, key=len):
                if self._stop:
                    break
                os.mkdir(os.path.join(path, d))
                made.append(d)
        except OSError:
            pass
        with self._lock:
            self._pool.append((path, frozenset(made)))

    def take(self, workdir: str, dirs: set[str]) -> bool:
        """Rename the best spare to `workdir` and give it exactly the subdirectories `dirs`.

        False if no spare is worth it: making `workdir` anew costs one mkdir per
        directory; a spare costs one per subdirectory it lacks or has too many."""
        with self._lock:
            if self._making:
                wanted = frozenset(dirs)
                while wanted in self._making:
                    self._made.wait()
            best, cost = -1, len(dirs) + 1
            for i in range(len(self._pool) - 1, -1, -1):  # the newest first
                has = self._pool[i][1]
                if abs(len(has) - len(dirs)) >= cost:
                    continue
                c = len(has.symmetric_difference(dirs))
                if c < cost:
                    best, cost = i, c
                    if c == 0:
                        break
            if best < 0:
                return False
            path, has = self._pool.pop(best)
            adopted = path in self._adopted
            self._adopted.discard(path)
        if adopted:  # from the last build: trust what is there, not what it listed
            found = self._subdirs(path)
            if found is None:
                shutil.rmtree(path, ignore_errors=True)
                return False
            has = found
        try:
            os.rename(path, workdir)
            for d in sorted(has - dirs, key=len, reverse=True):
                os.rmdir(os.path.join(workdir, d))
            for d in sorted(dirs - has, key=len):
                os.mkdir(os.path.join(workdir, d))
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(workdir, ignore_errors=True)
            return False
        return True

    def _subdirs(self, path: str) -> frozenset[str] | None:
        """The directories under `path` (relative to it), or None if it holds anything else
        or one of them (or it) is not as mkdir makes one now."""
        found: list[str] = []
        todo = [""]
        try:
            if not self.looks_new(os.lstat(path)):
                return None
            while todo:
                rel = todo.pop()
                with os.scandir(os.path.join(path, rel)) as it:
                    for e in it:
                        if not self.looks_new(e.stat(follow_symlinks=False)):
                            return None
                        sub = f"{rel}/{e.name}" if rel else e.name
                        found.append(sub)
                        todo.append(sub)
        except OSError:
            return None
        return frozenset(found)

    def looks_new(self, st: os.stat_result) -> bool:
        """True if `st` (of lstat) is of a directory as mkdir makes one now."""
        return stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == self.mode and st.st_uid == self.uid

    def give_if_new(self, workdir: str, dirs: set[str]) -> bool:
        """Keep `workdir` as a spare if it holds exactly the empty subdirectories `dirs`,
        each (and it) as mkdir makes one now; else False."""
        children: dict[str, set[str]] = {"": set()}
        for d in dirs:
            head, tail = os.path.split(d)
            children.setdefault(head, set()).add(tail)
            children.setdefault(d, set())
        for d, names in children.items():
            path = os.path.join(workdir, d)
            if not self.looks_new(os.lstat(path)) or set(os.listdir(path)) != names:
                return False
        self.give(workdir, frozenset(dirs))
        return True

    def give(self, workdir: str, dirs: frozenset[str]) -> None:
        """Keep `workdir`, which holds exactly the empty subdirectories `dirs`, as a spare."""
        with self._lock:
            self._count += 1
            path = os.path.join(self.dir, str(self._count))
        os.rename(workdir, path)
        with self._lock:
            self._pool.append((path, dirs))

    def close(self) -> None:
        """List the spares for the next build. Beyond `keep`, those with the fewest
        subdirectories (the cheapest to make again), oldest first, are removed."""
        self._stop = True
        if self._ahead is not None:
            self._ahead.join()
        with self._lock:
            pool, self._pool = self._pool, []
        order = sorted(range(len(pool)), key=lambda i: len(pool[i][1]))  # (stable: oldest first)
        drop = set(order[: max(len(pool) - self.keep, 0)])
        extra = [pool[i] for i in sorted(drop)]
        pool = [spare for i, spare in enumerate(pool) if i not in drop]
        for path, dirs in extra:
            if path in self._adopted:  # never looked at: not as listed, maybe
                shutil.rmtree(path, ignore_errors=True)
                continue
            try:  # only empty directories: rmdir them, deepest first
                for d in sorted(dirs, key=len, reverse=True):
                    os.rmdir(os.path.join(path, d))
                os.rmdir(path)
            except OSError:
                shutil.rmtree(path, ignore_errors=True)
        listed = [[os.path.basename(path), sorted(dirs)] for path, dirs in pool]
        try:
            with open(os.path.join(self.dir, MANIFEST), "w") as f:
                json.dump(listed, f, separators=(",", ":"))
        except OSError:
            pass  # then the next build removes them
