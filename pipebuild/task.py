"""`Task`: one bash command over resources (hail-compatible API, no disk I/O).

Mentioning a resource in `command()` records the dependency, exactly as the original did
(spec §2.2): an input or another task's file becomes an input of this task, and its
producer a dependency; this task's own file becomes one of its outputs.
"""

from __future__ import annotations

import itertools
import re
import string
from typing import TYPE_CHECKING, Any

from .exceptions import DefinitionError, DuplicateResourceError, PipelineException
from .resource import InputResourceFile, Resource, ResourceFile, ResourceGroup, TaskResourceFile

if TYPE_CHECKING:
    from .pipeline import Pipeline

UID_RE = re.compile(r"__RESOURCE_FILE__\d+|__RESOURCE_GROUP__\d+|__TASK__\d+|__PIPELINE__\d+")

_task_counter = itertools.count()
_formatter = string.Formatter()


def _undefined(name: str) -> PipelineException:
    return PipelineException(
        f"undefined resource '{name}'\n"
        "Hint: resources must be defined within the task methods 'command' or "
        "'declare_resource_group'"
    )


def _format_template(group: str, ident: str, template: str) -> str:
    """Expand `{root}` in a resource-group template, without `eval` (the original's bug)."""
    try:
        fields = [f for _, f, _, _ in _formatter.parse(template) if f is not None]
    except ValueError as e:
        fields = [f"<{e}>"]
    bad = [f for f in fields if f != "root"]
    if bad:
        raise PipelineException(
            f"value for name '{ident}' in resource group '{group}' uses {{{bad[0]}}}; "
            "only {root} can be used in a resource group template"
        )
    return template.format(root=group)


_names_of: dict[type, frozenset[str]] = {}


def _class_names(cls: type) -> frozenset[str]:
    """The attribute names a class and its bases define (a resource must not shadow one)."""
    names = _names_of.get(cls)
    if names is None:
        names = _names_of[cls] = frozenset(dir(cls))
    return names


class Task:
    """A command to run, with its resources and settings. Create with `Pipeline.new_task`."""

    # Settings default on the class; an instance holds those set (a 10,000-task Pipefile
    # makes 10,000 tasks, and each attribute set costs ~40 ns).
    _cpu: str | None = None
    _memory: str | None = None
    _storage: Any = None
    _image: str | None = None
    _always_run: bool = False
    _timeout: float | None = None
    _where: tuple[str, int] | None = None

    def __init__(self, pipeline: Pipeline, name: str | None = None, attributes: dict[str, str] | None = None) -> None:
        self._pipeline = pipeline
        self.name = name
        self.attributes = attributes if attributes is not None else {}
        self._command: list[str] = []
        self._resources: dict[str, Resource] = {}
        self._resources_inverse: dict[Resource, str] = {}
        # Ordered sets (dicts) so that layout and keys never depend on set order.
        self._inputs: dict[ResourceFile, None] = {}
        self._internal_outputs: dict[ResourceFile, None] = {}
        self._external_outputs: dict[ResourceFile, None] = {}
        self._mentioned: dict[Resource, None] = {}
        self._valid: set[Resource] = set()
        self._dependencies: dict[Task, None] = {}
        self._uid = f"__TASK__{next(_task_counter)}"

    # -- resources ---------------------------------------------------------------------

    def _get_resource(self, item: str) -> Resource:
        r = self._resources.get(item)
        if r is None:
            r = TaskResourceFile(item, source=self, name=item)
            self._pipeline._resource_map[r._uid] = r
            self._resources[item] = r
            self._resources_inverse[r] = item
            # Later `t.item` finds it without going through __getattr__ (a 10,000-task
            # Pipefile reads resources ~40,000 times).
            if item.isidentifier() and item not in self.__dict__ and item not in _class_names(type(self)):
                self.__dict__[item] = r
        return r

    def __getitem__(self, item: str) -> Resource:
        return self._get_resource(item)

    def __getattr__(self, item: str) -> Resource:
        if item.startswith("__") and item.endswith("__"):
            raise AttributeError(item)
        return self._get_resource(item)

    def _add_reference(self, r: Resource) -> None:
        """A group, or a file in a group (a plain file is handled in `command`)."""
        if isinstance(r, ResourceGroup):
            source = r._source
            files = list(r._resources.values())
        else:
            assert isinstance(r, ResourceFile)
            source = r._source
            group = r._resource_group
            files = list(group._resources.values()) if group is not None else [r]
        if source is self:
            self._valid.add(r)
            if isinstance(r, ResourceGroup) or len(files) > 1:
                self._valid.update(files)
        else:
            if source is not None:
                if r not in source._valid:
                    name = source._resources_inverse.get(r) or str(getattr(r, "_name", r._uid))
                    raise _undefined(name)
                self._dependencies[source] = None
                for f in files:
                    source._internal_outputs[f] = None
            for f in files:
                self._inputs[f] = None
        self._mentioned[r] = None

    # -- API ---------------------------------------------------------------------------

    def command(self, command: str) -> Task:
        """Append a bash command; resources mentioned in it become inputs or outputs."""
        command = str(command)
        rmap = self._pipeline._resource_map
        for uid in UID_RE.findall(command):
            r = rmap.get(uid)
            if r is None:
                if uid.startswith("__TASK__"):
                    raise PipelineException(f"found a reference to a Task object in command '{command}'.")
                if uid.startswith("__PIPELINE__"):
                    raise PipelineException(f"found a reference to a Pipeline object in command '{command}'.")
                raise PipelineException(
                    f"undefined resource '{uid}' in command '{command}'.\n"
                    "Hint: resources must be from the same pipeline as the current task."
                )
            if not isinstance(r, ResourceFile) or r._resource_group is not None:
                self._add_reference(r)
                continue
            # A plain file, inline (10,000-task Pipefiles mention 30,000 of them).
            source = r._source
            if source is self:
                self._valid.add(r)
            else:
                if source is not None:
                    if r not in source._valid:
                        raise _undefined(source._resources_inverse.get(r) or str(getattr(r, "_name", r._uid)))
                    self._dependencies[source] = None
                    source._internal_outputs[r] = None
                self._inputs[r] = None
            self._mentioned[r] = None
        self._command.append(command)
        return self

    def declare_resource_group(self, **mappings: dict[str, str]) -> Task:
        """Declare named groups of output files, e.g. `g={'bed': '{root}.bed'}`."""
        for name, d in mappings.items():
            if not isinstance(d, dict):
                raise PipelineException(f"value for name '{name}' is not a dict. Found '{type(d)}' instead.")
            if name in self._resources:
                raise DuplicateResourceError(f"resource '{name}' is already defined in this task")
            files: dict[str, ResourceFile] = {}
            for ident, template in d.items():
                if not isinstance(template, str):
                    raise PipelineException(
                        f"value for name '{ident}' is not a string. Found '{type(template)}' instead."
                    )
                value = _format_template(name, ident, template)
                f = TaskResourceFile(value, source=self, name=ident)
                self._pipeline._resource_map[f._uid] = f
                files[ident] = f
            rg = ResourceGroup(self, name, **files)
            self._pipeline._resource_map[rg._uid] = rg
            self._resources[name] = rg
            self._resources_inverse[rg] = name
            if name.isidentifier() and name not in self.__dict__ and name not in _class_names(type(self)):
                self.__dict__[name] = rg
            self._valid.add(rg)
            self._valid.update(files.values())
        return self

    def depends_on(self, *tasks: Task) -> Task:
        """Run after `tasks` (ordering only: never part of the action key)."""
        for t in tasks:
            if not isinstance(t, Task):
                raise PipelineException(f"'depends_on' only accepts Task inputs. Found '{type(t)}'.")
            self._dependencies[t] = None
        return self

    def storage(self, storage: Any) -> Task:
        """Disk to request (e.g. '10Gi'); a bare number is in GB."""
        self._storage = storage
        return self

    def memory(self, memory: Any) -> Task:
        """Memory to request (e.g. '4G', '3.75Gi'); a bare number is in GB."""
        self._memory = str(memory)
        return self

    def cpu(self, cores: Any) -> Task:
        """CPU cores to request."""
        self._cpu = str(cores)
        return self

    def image(self, image: str) -> Task:
        """Docker image to run the task in."""
        self._image = image
        return self

    def always_run(self, always_run: bool = True) -> Task:
        """Run on every build, and even when a dependency failed."""
        self._always_run = always_run
        return self

    def timeout(self, timeout: float | int) -> Task:
        """Fail the task after `timeout` seconds."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise DefinitionError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self._timeout = timeout
        return self

    def __str__(self) -> str:
        return self._uid

    def __repr__(self) -> str:
        return f"<Task {self.name or self._uid}>"

    def _pretty(self) -> str:
        return f"Task(name={self.name!r}, command={self._command!r})"


# Keep the name importable where the original had it.
__all__ = ["Task", "InputResourceFile", "UID_RE"]
