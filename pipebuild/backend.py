"""Backends: what runs a pipeline (hail-compatible API).

`LocalBackend` runs tasks on this machine through the incremental engine (`build.py`),
so a second `p.run()` of an unchanged pipeline runs nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .exceptions import PipelineException, UsageError

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
    """Run tasks on Google Cloud Batch: one Batch job per task that must run, with the
    bucket as content store and as a remote cache shared by every machine that uses it.

    `billing_project` (hail's argument) is the Cloud project, like `project`; the defaults
    are PIPEBUILD_BATCH_PROJECT, then GOOGLE_CLOUD_PROJECT. `region` defaults to
    PIPEBUILD_BATCH_REGION, then us-central1. `bucket` is `NAME` or `gs://NAME/PREFIX`
    (default PIPEBUILD_BATCH_BUCKET; the prefix defaults to `pipebuild`): blobs live under
    PREFIX/cas/, the action cache under PREFIX/ac/, run logs and results under PREFIX/runs/.

    `api_endpoint` (or PIPEBUILD_BATCH_API_ENDPOINT) selects another Batch endpoint; a
    loopback http:// endpoint gets anonymous credentials. GCS honours STORAGE_EMULATOR_HOST.
    `runtime_image` (or PIPEBUILD_RUNTIME_IMAGE) is the image that stages files on the VM
    (runtime/Dockerfile). Tasks without an image run in `default_image` (`ubuntu:latest`,
    as in hail). `spot=True` uses Spot VMs: Batch retries a preempted task `spot_retries`
    times, then pipebuild runs it once on a standard VM. `jobs` (default 64) bounds the
    jobs active at once. Polls start every `poll_interval` seconds and back off to
    `poll_max`; API errors are retried for `api_deadline` seconds before a task fails. `p.run(wait=False)` returns a `BatchRun` at once; `dry_run=True`
    prints the job specs and submits nothing.
    """

    def __init__(
        self,
        billing_project: str | None = None,
        bucket: str | None = None,
        *,
        project: str | None = None,
        region: str | None = None,
        api_endpoint: str | None = None,
        runtime_image: str | None = None,
        default_image: str | None = None,
        spot: bool = False,
        spot_retries: int = 3,
        machine_type: str | None = None,
        service_account: str | None = None,
        labels: dict[str, str] | None = None,
        jobs: int | None = None,
        cache_dir: str | None = None,
        keep_going: bool = False,
        remote_cache_read_only: bool = False,
        poll_interval: float = 2.0,
        poll_max: float = 30.0,
        api_deadline: float = 600.0,
    ) -> None:
        if billing_project and project and billing_project != project:
            raise PipelineException(f"billing_project '{billing_project}' and project '{project}' differ")
        self._project = project or billing_project or None
        self._bucket = bucket
        self._region = region
        self._api_endpoint = api_endpoint
        self._runtime_image = runtime_image
        self._default_image = default_image
        self._spot = spot
        self._spot_retries = spot_retries
        self._machine_type = machine_type
        self._service_account = service_account
        self._labels = dict(labels or {})
        if jobs is not None and jobs < 1:
            raise PipelineException(f"jobs must be at least 1, not {jobs}")
        self._jobs = jobs
        self._cache_dir = cache_dir
        self._keep_going = keep_going
        self._remote_cache_read_only = remote_cache_read_only
        self._poll = (poll_interval, poll_max)
        self._api_deadline = api_deadline
        self.default_jobs = 64

    def _settings(self) -> Any:
        """The resolved settings; UsageError naming what is missing."""
        from .executors import batch

        project = self._project or os.environ.get("PIPEBUILD_BATCH_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT")
        if not project:
            raise UsageError("BatchBackend needs a Cloud project: BatchBackend(project=...) or PIPEBUILD_BATCH_PROJECT")
        bucket, prefix = self._bucket_prefix()
        return batch.Settings(
            project=project,
            region=self._region or os.environ.get("PIPEBUILD_BATCH_REGION") or "us-central1",
            bucket=bucket,
            prefix=prefix,
            api_endpoint=self._api_endpoint or os.environ.get(batch.ENV_ENDPOINT) or None,
            runtime_image=self._runtime_image or os.environ.get(batch.ENV_RUNTIME) or batch.DEFAULT_RUNTIME_IMAGE,
            default_image=self._default_image or batch.DEFAULT_IMAGE,
            spot=self._spot,
            spot_retries=self._spot_retries,
            machine_type=self._machine_type,
            service_account=self._service_account,
            labels=self._labels,
            poll_interval=self._poll[0],
            poll_max=self._poll[1],
            api_deadline=self._api_deadline,
        )

    def _bucket_prefix(self) -> tuple[str, str]:
        from .remote import parse

        text = self._bucket or os.environ.get("PIPEBUILD_BATCH_BUCKET")
        if not text:
            raise UsageError("BatchBackend needs a bucket: BatchBackend(bucket=...) or PIPEBUILD_BATCH_BUCKET")
        url = text if text.startswith("gs://") else "gs://" + text
        try:
            bucket, prefix = parse(url)
        except UsageError:
            raise UsageError(f"not a bucket: '{text}' (expected NAME or gs://NAME/PREFIX)") from None
        text = url
        return bucket, prefix if "/" in text[5:] else "pipebuild"

    @property
    def _remote_cache(self) -> str:
        """The bucket's action cache and content store, as a remote cache URL (remote.py)."""
        bucket, prefix = self._bucket_prefix()
        return f"gs://{bucket}/{prefix}" if prefix else f"gs://{bucket}"

    def _executor(self) -> Any:
        """A new executor for one build."""
        from .executors.batch import BatchExecutor

        return BatchExecutor(self._settings())

    def _run(
        self,
        pipeline: Pipeline,
        dry_run: bool,
        verbose: bool,
        delete_scratch_on_exit: bool,
        wait: bool = True,
        open: bool = False,
        disable_progress_bar: bool = False,
        **backend_kwargs: Any,
    ) -> Any:
        if backend_kwargs:
            raise TypeError(f"BatchBackend._run() got unexpected keyword arguments: {sorted(backend_kwargs)}")
        from . import build, load
        from .executors import batch

        if load.loading():
            return None  # a Pipefile that calls p.run() while the CLI loads it
        executor = self._executor()
        options = build.Options(
            workspace=os.path.abspath(self._cache_dir or os.getcwd()),
            jobs=self._jobs or self.default_jobs,
            keep_going=self._keep_going,
            verbose=verbose,
            delete_scratch=delete_scratch_on_exit,
            executor=executor,
        )
        if dry_run:
            print(batch.dry_run(pipeline, options), end="")
            return None
        run = batch.BatchRun(pipeline, options)
        if not wait:
            run.start()
            return run
        run.run()
        assert run.result is not None
        run.result.raise_for_failure()  # hail returned normally on a failed batch; pipebuild raises
        print("Pipeline completed successfully!")
        return run
