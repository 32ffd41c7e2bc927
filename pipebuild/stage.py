"""Stage-in and stage-out of one Cloud Batch task, run on the VM in the runtime image.

    python3 -m pipebuild.stage in     before the user's command
    python3 -m pipebuild.stage out    after it, always (Batch `always_run`)

The BatchBackend (`executors/batch.py`) puts a manifest in the task's environment,
`PIPEBUILD_MANIFEST` (JSON), or, when it is too large for the job definition, stores it at
`gs://BUCKET/<run>/manifest.json` and sets `PIPEBUILD_MANIFEST_URL`:

    {"bucket": B, "prefix": P, "run": "P/runs/<job id>",
     "inputs": [[relpath, digest], ...], "outputs": [relpath, ...], "script": "set -euo pipefail\n..."}

The three runnables share the VM directory mounted at /pb:

    /pb/work/   the task directory: inputs at their relative paths, outputs under out/
    /pb/meta/   script.sh, then the user command's stdout, stderr and rc

stage-in downloads each input from the content store `P/cas/<digest>` and checks its xxh3
digest: a blob that does not match its name fails the task (exit 3) before the command runs.
stage-out uploads the stdout and stderr, and every output that exists as a regular file, to
the content store (create-only: a 412 means the blob is already there), then writes
`<run>/result-<attempt>.json`: {"rc": int or null, "outputs": {relpath: digest}, "logs":
{"stdout"|"stderr": digest}, "attempt", "staged": bool, "error": stage-in's complaint}.
It exits 0 once the result is written, so the task's exit code stays the command's; the
client decides what a missing output means. Exit 4 means stage-out itself failed.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

WORK = "/pb/work"
META = "/pb/meta"
BLOCK = 1 << 20


def _client() -> Any:
    from . import gcs

    return gcs._client()


def manifest() -> dict[str, Any]:
    """The task's manifest, from the environment or from the bucket."""
    text = os.environ.get("PIPEBUILD_MANIFEST")
    if text is None:
        url = os.environ["PIPEBUILD_MANIFEST_URL"]
        bucket, _, name = url.removeprefix("gs://").partition("/")
        text = _client().bucket(bucket).blob(name).download_as_text()
    m: dict[str, Any] = json.loads(text)
    return m


def _cas(m: dict[str, Any], digest: str) -> str:
    return f"{m['prefix']}/cas/{digest}" if m["prefix"] else f"cas/{digest}"


def digest_of(path: str) -> str:
    """The xxh3-128 digest of a file, as pipebuild names blobs."""
    from .hashing import hash_file

    return hash_file(path)


def stage_in(m: dict[str, Any], root: str = "/pb") -> int:
    """Lay out the task directory from the content store; 0, or 3 on a corrupt blob."""
    work, meta = os.path.join(root, "work"), os.path.join(root, "meta")
    os.makedirs(os.path.join(work, "out"), exist_ok=True)
    os.makedirs(meta, exist_ok=True)
    bucket = _client().bucket(m["bucket"])
    for relpath, digest in m["inputs"]:
        dst = os.path.join(work, relpath)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        bucket.blob(_cas(m, digest)).download_to_filename(dst, checksum="auto")
        got = digest_of(dst)
        if got != digest:
            msg = f"input {relpath}: the blob cas/{digest} holds {got}; rejected"
            print(f"pipebuild stage-in: {msg}", file=sys.stderr)
            with open(os.path.join(meta, "stage-in.error"), "w") as f:
                f.write(msg)
            return 3
    for relpath in m["outputs"]:
        os.makedirs(os.path.dirname(os.path.join(work, relpath)), exist_ok=True)
    with open(os.path.join(meta, "script.sh"), "w") as f:
        f.write(m["script"])
    with open(os.path.join(meta, "staged"), "w"):
        pass
    print(f"pipebuild stage-in: {len(m['inputs'])} input(s)", flush=True)
    return 0


def _put(bucket: Any, name: str, path: str) -> None:
    from .gcs import put_file

    if put_file(bucket, name, path) == "replaced":
        print(f"pipebuild stage-out: {name} held other bytes; replaced", file=sys.stderr)


def stage_out(m: dict[str, Any], root: str = "/pb") -> int:
    """Store the logs and outputs and write the attempt's result; 0, or 4 if that failed."""
    work, meta = os.path.join(root, "work"), os.path.join(root, "meta")
    attempt = int(os.environ.get("BATCH_TASK_RETRY_ATTEMPT", "0") or 0)
    bucket = _client().bucket(m["bucket"])
    rc: int | None
    try:
        with open(os.path.join(meta, "rc")) as f:
            rc = int(f.read().strip())
    except (OSError, ValueError):
        rc = None  # the command did not finish: killed, timed out, or stage-in failed
    staged = os.path.exists(os.path.join(meta, "staged"))
    result: dict[str, Any] = {"rc": rc, "attempt": attempt, "staged": staged, "outputs": {}, "logs": {}}
    try:
        with open(os.path.join(meta, "stage-in.error")) as f:
            result["error"] = f.read()[:2000]
    except OSError:
        pass
    try:
        for kind in ("stdout", "stderr"):
            path = os.path.join(meta, kind)
            if os.path.isfile(path):
                d = digest_of(path)
                _put(bucket, _cas(m, d), path)
                result["logs"][kind] = d
        if rc == 0:
            for relpath in m["outputs"]:
                path = os.path.join(work, relpath)
                if os.path.isfile(path):  # as locally: a symlink to a file counts as that file
                    d = digest_of(path)
                    _put(bucket, _cas(m, d), path)
                    result["outputs"][relpath] = d
        bucket.blob(f"{m['run']}/result-{attempt}.json").upload_from_string(
            json.dumps(result, sort_keys=True), content_type="application/json"
        )
    except Exception as e:  # noqa: BLE001 - report any storage error as a stage-out failure
        print(f"pipebuild stage-out: {type(e).__name__}: {e}", file=sys.stderr)
        return 4
    print(f"pipebuild stage-out: rc={rc}, {len(result['outputs'])} output(s)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`in` or `out`."""
    args = sys.argv[1:] if argv is None else argv
    if args not in (["in"], ["out"]):
        print("usage: python3 -m pipebuild.stage in|out", file=sys.stderr)
        return 2
    if args == ["out"]:
        return stage_out(manifest())
    try:
        return stage_in(manifest())
    except Exception as e:  # noqa: BLE001 - a missing blob, a network or auth error: tell stage-out
        msg = f"{type(e).__name__}: {e}"
        print(f"pipebuild stage-in: {msg}", file=sys.stderr)
        os.makedirs(META, exist_ok=True)
        with open(os.path.join(META, "stage-in.error"), "w") as f:
            f.write(msg[:2000])
        return 3


if __name__ == "__main__":
    sys.exit(main())
