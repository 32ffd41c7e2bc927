"""`Pipeline`: the set of tasks and the files between them (hail-compatible API).

No disk I/O happens here: paths are recorded as written and resolved by the build.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from typing import Any

from .backend import Backend, LocalBackend
from .exceptions import PipelineException
from .resource import InputResourceFile, Resource, ResourceFile, ResourceGroup, TaskResourceFile
from .task import Task, _undefined

_pipeline_counter = itertools.count()


_places: dict[tuple[str, int], tuple[str, int]] = {}  # one tuple per call site, not per call


def _caller(depth: int = 2) -> tuple[str, int] | None:
    """(file, line) of the user code that called into the API (`depth` frames up)."""
    f = sys._getframe(depth)
    where = (f.f_code.co_filename, f.f_lineno)
    return _places.setdefault(where, where)


class Pipeline:
    """A set of tasks and the order or dependencies between them."""

    def __init__(
        self,
        name: str | None = None,
        backend: Backend | None = None,
        attributes: dict[str, str] | None = None,
        default_image: str | None = None,
        default_memory: Any = None,
        default_cpu: Any = None,
        default_storage: Any = None,
        default_timeout: float | int | None = None,
    ) -> None:
        self._uid = f"__PIPELINE__{next(_pipeline_counter)}"
        self.name = name
        if attributes is None:
            attributes = {}
        if "name" in attributes:
            raise PipelineException("'name' is not a valid attribute. Use the name argument instead.")
        self.attributes = attributes
        self._backend = backend if backend is not None else LocalBackend()
        self._default_image = default_image
        self._default_memory = default_memory
        self._default_cpu = default_cpu
        self._default_storage = default_storage
        self._default_timeout = default_timeout
        self._tasks: list[Task] = []
        self._resource_map: dict[str, Resource] = {}
        self._input_resources: list[InputResourceFile] = []

    def new_task(self, name: str | None = None, attributes: dict[str, str] | None = None) -> Task:
        """A new task in this pipeline, with the pipeline's defaults applied."""
        t = Task(self, name, attributes)
        t._where = _caller()
        if self._default_image is not None:
            t.image(self._default_image)
        if self._default_memory is not None:
            t.memory(self._default_memory)
        if self._default_cpu is not None:
            t.cpu(self._default_cpu)
        if self._default_storage is not None:
            t.storage(self._default_storage)
        if self._default_timeout is not None:
            t.timeout(self._default_timeout)
        self._tasks.append(t)
        return t

    def _new_input(self, path: str, value: str) -> InputResourceFile:
        r = InputResourceFile(value, str(path))
        r._where = _caller(3)
        self._resource_map[r._uid] = r
        self._input_resources.append(r)
        return r

    def read_input(self, path: str, extension: str | None = None) -> InputResourceFile:
        """An existing file as a resource; the task sees it under its own base name."""
        path = os.fspath(path)
        r = self._new_input(path, os.path.basename(path.rstrip("/")) or "input")
        if extension is not None:
            r.add_extension(extension)
        return r

    def read_input_group(self, **kwargs: str) -> ResourceGroup:
        """Existing files that travel together; `{rg}` is their common root."""
        paths = {name: os.fspath(p) for name, p in kwargs.items()}
        root = _group_root(paths)
        files: dict[str, ResourceFile] = {}
        for name, path in paths.items():
            f = InputResourceFile(f"{root}.{name}", path)
            f._where = _caller()
            self._resource_map[f._uid] = f
            self._input_resources.append(f)
            files[name] = f
        rg = ResourceGroup(None, root, **files)
        self._resource_map[rg._uid] = rg
        return rg

    def write_output(self, resource: Resource, dest: str) -> None:
        """Publish `resource` at `dest` (call again for more destinations)."""
        if not isinstance(resource, Resource):
            raise PipelineException(f"'write_output' only accepts Resource inputs. Found '{type(resource)}'.")
        if isinstance(resource, TaskResourceFile) and resource._source is not None:
            source = resource._source
            group = resource._resource_group
            if resource not in source._mentioned and (group is None or group not in source._mentioned):
                raise _undefined(resource._name)
        resource._add_output_path(os.fspath(dest))

    def select_tasks(self, pattern: str) -> list[Task]:
        """Tasks whose name matches the regular expression (anchored at the start)."""
        return [t for t in self._tasks if t.name is not None and re.match(pattern, t.name)]

    def run(
        self,
        dry_run: bool = False,
        verbose: bool = False,
        delete_scratch_on_exit: bool = True,
        **backend_kwargs: Any,
    ) -> Any:
        """Build the pipeline with its backend; only stale tasks run."""
        return self._backend._run(self, dry_run, verbose, delete_scratch_on_exit, **backend_kwargs)

    def __str__(self) -> str:
        return self._uid


def _group_root(paths: dict[str, str]) -> str:
    """The root name for an input group: the files' common stem when they share one."""
    stems = set()
    for name, path in paths.items():
        base = os.path.basename(path)
        suffix = "." + name
        stems.add(base[: -len(suffix)] if base.endswith(suffix) else None)
    if len(stems) == 1:
        (stem,) = stems
        if stem:
            return stem
    return "group"
