"""Backends: what runs a pipeline (hail-compatible API).

`LocalBackend` runs tasks on this machine through the incremental engine (`build.py`),
so a second `p.run()` of an unchanged pipeline runs nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .exceptions import PipelineException

if TYPE_CHECKING:
    from .pipeline import Pipeline


class Backend:
    """Abstract: something that can run a pipeline. Do not call `_run` directly."""

    def _run(
        self,
        pipeline: Pipeline,
        dry_run: bool,
        verbose: bool,
        delete_scratch_on_exit: bool,
        **backend_kwargs: Any,
    ) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (nothing, for the local backend)."""


class LocalBackend(Backend):
    """Run tasks on this machine with bash, several at a time, only those that are stale.

    `tmp_dir` is accepted for compatibility; task directories live in the workspace's
    `.pipebuild/tmp/` so outputs move into the content store by rename. `jobs` defaults to
    the number of cores; `cache_dir` (default: the current directory) holds `.pipebuild/`.

    A task with an `image` runs in Docker (`executors/docker.py`): `extra_docker_run_flags`
    (default: `PIPEBUILD_EXTRA_DOCKER_RUN_FLAGS`, else `HAIL_PIPELINE_EXTRA_DOCKER_RUN_FLAGS`)
    adds `docker run` flags such as `-e K=V`, `-v SRC:DEST` or `--network host`, and
    `gsa_key_file` (default: `PIPEBUILD_GSA_KEY_FILE`, else `HAIL_PIPELINE_GSA_KEY_FILE`) is
    mounted read-only at `/gsa-key/key.json`.

    `remote_cache="gs://BUCKET/PREFIX"` (default: `PIPEBUILD_REMOTE_CACHE`) shares the
    action cache and content store across machines (`remote.py`); with
    `remote_cache_read_only=True` (or `PIPEBUILD_REMOTE_CACHE_READ_ONLY=1`) it is only read.
    """

    def __init__(
        self,
        tmp_dir: str = "/tmp/",
        gsa_key_file: str | None = None,
        extra_docker_run_flags: str | None = None,
        *,
        jobs: int | None = None,
        cache_dir: str | None = None,
        keep_going: bool = False,
        remote_cache: str | None = None,
        remote_cache_read_only: bool = False,
    ) -> None:
        self._tmp_dir = tmp_dir
        self._gsa_key_file = (
            gsa_key_file or os.environ.get("PIPEBUILD_GSA_KEY_FILE") or os.environ.get("HAIL_PIPELINE_GSA_KEY_FILE")
        )
        if extra_docker_run_flags is None:
            extra_docker_run_flags = os.environ.get("PIPEBUILD_EXTRA_DOCKER_RUN_FLAGS") or os.environ.get(
                "HAIL_PIPELINE_EXTRA_DOCKER_RUN_FLAGS", ""
            )
        self._extra_docker_run_flags = extra_docker_run_flags
        if jobs is not None and jobs < 1:
            raise PipelineException(f"jobs must be at least 1, not {jobs}")
        self._jobs = jobs
        self._cache_dir = cache_dir
        self._keep_going = keep_going
        if remote_cache:
            from .remote import parse

            parse(remote_cache)  # a malformed URL fails here, not at run time
        self._remote_cache = remote_cache or None
        self._remote_cache_read_only = remote_cache_read_only

    def _run(
        self,
        pipeline: Pipeline,
        dry_run: bool,
        verbose: bool,
        delete_scratch_on_exit: bool,
        **backend_kwargs: Any,
    ) -> None:
        if backend_kwargs:
            raise TypeError(f"LocalBackend._run() got unexpected keyword arguments: {sorted(backend_kwargs)}")
        from . import build, load

        if load.loading():
            return None  # a Pipefile that calls p.run() while the CLI loads it
        options = build.Options(
            workspace=os.path.abspath(self._cache_dir or os.getcwd()),
            jobs=self._jobs or os.cpu_count() or 1,
            keep_going=self._keep_going,
            verbose=verbose,
            delete_scratch=delete_scratch_on_exit,
            remote_cache=self._remote_cache,
            remote_cache_read_only=self._remote_cache_read_only,
        )
        if dry_run:
            print(build.script(pipeline, options), end="")
            return None
        result = build.build(pipeline, options)
        result.raise_for_failure()
        print("Pipeline completed successfully!")
        return None


class BatchBackend(Backend):
    """Run tasks on Google Cloud Batch. Not implemented in this release: `run` raises."""

    def __init__(self, billing_project: str | None = None, bucket: str | None = None, **kwargs: Any) -> None:
        self._billing_project = billing_project
        self._bucket = bucket
        self._kwargs = kwargs

    def _run(
        self,
        pipeline: Pipeline,
        dry_run: bool,
        verbose: bool,
        delete_scratch_on_exit: bool,
        **backend_kwargs: Any,
    ) -> Any:
        raise PipelineException(
            "BatchBackend (Google Cloud Batch) is not implemented in this version of pipebuild; use LocalBackend"
        )
