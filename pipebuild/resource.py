"""Resources: the files a pipeline's tasks read and write (hail-compatible API).

A `ResourceFile` is a `str` whose value is its uid (`__RESOURCE_FILE__<n>`), so it can be
written into a command with an f-string; `Task.command` finds the uids again and the
build replaces each with the path the task sees (see docs/DESIGN.md). No disk I/O here.
"""

from __future__ import annotations

import itertools
import re
from typing import TYPE_CHECKING, Any

from .exceptions import PipelineException

if TYPE_CHECKING:
    from .task import Task

_file_counter = itertools.count()
_group_counter = itertools.count()

_UNSAFE = re.compile(r"[^A-Za-z0-9._+\-]")


def safe_name(name: str) -> str:
    """`name` as one file-name component that needs no shell quoting and stays put."""
    s = _UNSAFE.sub("_", name)
    if s in ("", ".", ".."):
        s = "_" + s
    return s


class Resource:
    """Abstract base of every resource."""

    _uid: str

    def _add_output_path(self, path: str) -> None:
        raise NotImplementedError


class ResourceFile(Resource, str):
    """One file; its string value is its uid."""

    _value: str
    _output_paths: list[str]
    # Defaults on the class: an instance sets only what differs (a 10,000-task Pipefile
    # makes ~20,000 files, and each attribute set costs ~40 ns).
    _source: Task | None = None
    _resource_group: ResourceGroup | None = None
    _has_extension: bool = False
    _extension: str = ""

    def __new__(cls, value: str) -> ResourceFile:  # noqa: D102
        uid = f"__RESOURCE_FILE__{next(_file_counter)}"
        obj = str.__new__(cls, uid)
        obj._uid = uid
        obj._value = value
        obj._output_paths = []
        return obj

    def add_extension(self, extension: str) -> ResourceFile:
        """Give the file an extension such as '.bam'; allowed once."""
        if self._has_extension:
            raise PipelineException("Resource already has a file extension added.")
        self._extension = extension
        self._has_extension = True
        return self

    def _add_output_path(self, path: str) -> None:
        if path not in self._output_paths:
            self._output_paths.append(path)
        if self._source is not None:
            self._source._external_outputs[self] = None

    def _file_name(self) -> str:
        """The safe base name under which the task sees this file."""
        base = self._value
        ext = self._extension
        if ext and not base.endswith(ext):
            base += ext
        return safe_name(base)

    # str's own __str__ gives the uid (the string value) without a Python call, which an
    # f-string makes for each resource it formats; __hash__/__eq__ (by uid) are str's too.

    def __repr__(self) -> str:
        return self._uid

    __hash__ = str.__hash__


class InputResourceFile(ResourceFile):
    """A file that exists before the pipeline runs (`Pipeline.read_input`)."""

    _input_path: str
    _where: tuple[str, int] | None = None

    def __new__(cls, value: str, input_path: str = "") -> InputResourceFile:  # noqa: D102
        obj: InputResourceFile = super().__new__(cls, value)  # type: ignore[assignment]
        obj._input_path = input_path
        return obj


class TaskResourceFile(ResourceFile):
    """A file produced by a task (`t.ofile`, `t['name']`, or a declared group member)."""

    _name: str

    def __new__(cls, value: str, source: Task | None = None, name: str = "") -> TaskResourceFile:  # noqa: D102
        obj: TaskResourceFile = super().__new__(cls, value)  # type: ignore[assignment]
        obj._source = source
        obj._name = name or value
        return obj


class ResourceGroup(Resource):
    """Files that share a root and travel together; `{rg}` is the root path."""

    def __init__(self, source: Task | None, root: str, **values: ResourceFile) -> None:
        self._uid = f"__RESOURCE_GROUP__{next(_group_counter)}"
        self._source = source
        self._root = root
        self._resources: dict[str, ResourceFile] = {}
        self._output_paths: list[str] = []
        for name, resource_file in values.items():
            self._resources[name] = resource_file
            resource_file._resource_group = self

    def _get_resource(self, item: str) -> ResourceFile:
        if item not in self._resources:
            raise PipelineException(
                f"'{item}' not found in the resource group.\n"
                "Hint: you must declare each attribute when constructing the resource group."
            )
        return self._resources[item]

    def __getitem__(self, item: str) -> ResourceFile:
        return self._get_resource(item)

    def __getattr__(self, item: str) -> ResourceFile:
        if item.startswith("__") and item.endswith("__"):
            raise AttributeError(item)
        return self._get_resource(item)

    def _add_output_path(self, path: str) -> None:
        if path not in self._output_paths:
            self._output_paths.append(path)
        for name, resource_file in self._resources.items():
            resource_file._add_output_path(path + "." + name)

    def __add__(self, other: Any) -> str:
        if not isinstance(other, str):
            raise PipelineException(f"cannot add {type(other)} to a resource group")
        return self._uid + other

    def __radd__(self, other: Any) -> str:
        if not isinstance(other, str):
            raise PipelineException(f"cannot add a resource group to {type(other)}")
        return other + self._uid

    def __str__(self) -> str:
        return self._uid

    def __repr__(self) -> str:
        return self._uid

    def __format__(self, spec: str) -> str:
        return format(self._uid, spec)
