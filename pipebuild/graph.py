"""The task graph: layout of the paths each task sees, edges, order, cone, cycles.

`plan(pipeline, workspace)` turns the hail-style objects into a list of `Node`s in
topological order (Kahn's algorithm, ties broken by creation order, iterative so a
100,000-task chain needs no recursion). Each node carries everything the engine needs
and nothing from the process: the commands with resource uids replaced by relative paths
(`in/x.bam`, `out/ofile`), which is both what runs and what is hashed into the action key.
"""

from __future__ import annotations

import functools
import os
import re
from collections import deque
from collections.abc import Iterable
from functools import partial

from .exceptions import CycleError, DefinitionError
from .pipeline import Pipeline
from .resource import InputResourceFile, ResourceFile, ResourceGroup, TaskResourceFile, safe_name
from .task import UID_RE, Task
from .workspace import STATE_DIR


class Input:
    """One file a task reads: from the source tree, or another task's output."""

    __slots__ = ("relpath", "source", "producer", "producer_relpath", "_display", "where")

    def __init__(
        self,
        relpath: str,
        source: str | None,
        producer: int,
        producer_relpath: str,
        display: str,
        where: tuple[str, int] | None = None,
    ):
        self.relpath = relpath  # where the task sees it, e.g. in/reads.bam
        self.source = source  # absolute path of a source file, or None
        self.producer = producer  # index of the producing node, or -1
        self.producer_relpath = producer_relpath  # its path in the producer, e.g. out/ofile
        # A source: the path as written. An output: the producer's name, and `display`
        # adds the path (made on demand: one string fewer per edge, ~1.4 MiB at 10,000 tasks).
        self._display = display
        self.where = where  # (file, line) of the read_input call

    @property
    def display(self) -> str:
        """How explain names the input: the path as written, or task:out/file."""
        if self.source is not None:
            return self._display
        return f"{self._display}:{self.producer_relpath}"


class Output:
    """One file a task writes: its path in the task, destinations, whether needed."""

    __slots__ = ("relpath", "dests", "required")

    def __init__(self, relpath: str, dests: list[str], required: bool):
        self.relpath = relpath
        self.dests = dests  # absolute destination paths
        self.required = required  # consumed by a task or published: must exist after a run


class Node:
    """A task as the engine sees it."""

    __slots__ = (
        "index", "task", "name", "deps", "commands", "inputs", "outputs",
        "image", "always_run", "timeout", "where",
    )  # fmt: skip

    def __init__(self, index: int, task: Task):
        self.index = index
        self.task = task
        self.name = ""
        self.deps: list[int] = []
        self.commands: list[str] = []
        self.inputs: list[Input] = []
        self.outputs: list[Output] = []
        self.image = task._image
        self.always_run = task._always_run
        self.timeout = task._timeout
        self.where = task._where


class Graph:
    """Nodes in topological order, plus lookup tables for targets."""

    def __init__(self, nodes: list[Node], workspace: str, input_copies: list[tuple[InputResourceFile, list[str]]]):
        self.nodes = nodes
        self.workspace = workspace
        self.by_name = {n.name: n for n in nodes}
        self.by_dest: dict[str, Node] = {}
        for n in nodes:
            for o in n.outputs:
                for d in o.dests:
                    self.by_dest[d] = n
        # inputs published straight to a destination: (input, absolute destinations)
        self.input_copies = input_copies

    def cone(self, roots: Iterable[int]) -> list[bool]:
        """Marks of the nodes the roots need (themselves and everything upstream)."""
        mark = [False] * len(self.nodes)
        stack = list(roots)
        while stack:
            i = stack.pop()
            if not mark[i]:
                mark[i] = True
                stack.extend(self.nodes[i].deps)
        return mark


def _resolve(path: str, workspace: str) -> str:
    """An absolute, normalised path for a user-written one."""
    if path.startswith("gs://"):
        from .gcs import check_url  # objects in Google Cloud Storage: see gcs.py

        return check_url(path)
    if path and path[0] not in "~./" and "/." not in path and "//" not in path and path[-1] != "/":
        if _normal(workspace):  # nothing to normalise (the common case: ~2x faster)
            return workspace + "/" + path if workspace != "/" else "/" + path
    return os.path.normpath(os.path.join(workspace, os.path.expanduser(path)))


# For the few paths resolved after planning (targets, input copies). `plan` resolves each
# destination once and sources through its own table: an entry here costs ~150 bytes, and
# caching every destination of a 10,000-task pipeline held ~1.5 MiB through the build.
_resolve_cached = functools.lru_cache(maxsize=1024)(_resolve)


def resolve(path: str, workspace: str) -> str:
    """An absolute, normalised path for a user-written one (cached, unless it starts with
    `~`: that depends on HOME, which can change within a process)."""
    if path.startswith("~"):
        return _resolve(path, workspace)
    return _resolve_cached(path, workspace)


@functools.lru_cache(maxsize=64)
def _normal(workspace: str) -> bool:
    return os.path.isabs(workspace) and os.path.normpath(workspace) == workspace


def _substitute(mapping: dict[str, str], m: re.Match[str]) -> str:
    return mapping[m.group()]


def show_path(path: str) -> str:
    """A path as short as it can be said: relative to the current directory when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _own_layout(task: Task, shared: dict[str, str]) -> dict[str, str]:
    """uid -> path under out/ for every resource the task owns."""
    paths: dict[str, str] = {}
    resources = task._resources
    if len(resources) == 1:  # the common case: one file, no clash possible
        (r,) = resources.values()
        if type(r) is TaskResourceFile:
            relpath = "out/" + r._file_name()
            paths[r._uid] = shared.setdefault(relpath, relpath)
            return paths
    used: set[str] = set()

    def take(name: str) -> str:
        cand, k = name, 1
        while cand in used:
            k += 1
            cand = f"{name}~{k}"
        used.add(cand)
        return cand

    for r in task._resources.values():
        if isinstance(r, ResourceGroup):
            paths[r._uid] = "out/" + take(safe_name(r._root))
            for f in r._resources.values():
                paths[f._uid] = "out/" + take(f._file_name())
        elif isinstance(r, ResourceFile):
            paths[r._uid] = "out/" + take(r._file_name())
    return paths


def plan(pipeline: Pipeline, workspace: str, state_dir: str) -> Graph:
    """Check the pipeline and lay it out as a graph; relative paths resolve in `workspace`."""
    tasks = pipeline._tasks
    index: dict[Task, int] = {t: i for i, t in enumerate(tasks)}
    # One copy of each relative path ("out/ofile", "in/1/ofile"): most tasks share them.
    shared: dict[str, str] = {}
    sources: dict[str, str] = {}  # input path as written -> absolute path
    own: list[dict[str, str]] = [_own_layout(t, shared) for t in tasks]
    nodes = [Node(i, t) for i, t in enumerate(tasks)]

    for node, t in zip(nodes, tasks, strict=True):
        for dep in t._dependencies:
            j = index.get(dep)
            if j is None:
                raise DefinitionError(
                    f"task '{t.name or t._uid}' depends on task '{dep.name or dep._uid}' from another pipeline",
                    t._where,
                )
            node.deps.append(j)
        mapping = dict(own[node.index])
        # Inputs: one unit per file or group, laid out in order of first mention.
        taken: dict[int, set[str]] = {}
        first_free: dict[str, int] = {}
        seen_groups: set[str] = set()
        for r in t._inputs:
            group = r._resource_group
            if group is None:
                # One plain file (nearly every input): the loop below, specialised.
                source = r._source
                if source is None:
                    name = r._file_name()
                else:
                    pj = index.get(source, -1)
                    if pj < 0:  # pragma: no cover - command() already refuses these
                        raise DefinitionError(f"resource {r._uid} comes from another pipeline", t._where)
                    prel = own[pj][r._uid]
                    name = prel[4:]
                k = first_free.get(name, 0)
                at = taken.get(k)
                while at is not None and name in at:
                    k += 1
                    at = taken.get(k)
                if at is None:
                    taken[k] = {name}
                else:
                    at.add(name)
                if first_free.get(name, 0) == k:
                    first_free[name] = k + 1
                relpath = f"in/{k}/{name}" if k else "in/" + name
                relpath = shared.setdefault(relpath, relpath)
                mapping[r._uid] = relpath
                if source is None:
                    assert isinstance(r, InputResourceFile)
                    src = sources.get(r._input_path) or sources.setdefault(
                        r._input_path, _resolve(r._input_path, workspace)
                    )
                    node.inputs.append(Input(relpath, src, -1, "", r._input_path, r._where))
                else:
                    pname = source.name or source._uid
                    node.inputs.append(Input(relpath, None, pj, prel, pname))
                continue
            if group is not None:
                if group._uid in seen_groups:
                    continue
                seen_groups.add(group._uid)
                files: list[ResourceFile] = list(group._resources.values())
            else:
                files = [r]
            names = []
            for f in files:
                if f._source is None:
                    names.append(f._file_name())
                else:
                    names.append(own[index[f._source]][f._uid][4:])
            if group is not None:
                if group._source is None:
                    root = safe_name(group._root)
                else:
                    root = own[index[group._source]][group._uid][4:]
                names.append(root)
            # The first in/, in/1/, in/2/ ... where none of the unit's names is taken. Search
            # from the lowest index each name could still use, so a gather over 10,000
            # files all called `ofile` stays linear.
            k = max((first_free.get(name, 0) for name in names), default=0)
            while names and taken.get(k, set()).intersection(names):
                k += 1
            prefix = f"in/{k}/" if k else "in/"
            taken.setdefault(k, set()).update(names)
            for name in names:
                if first_free.get(name, 0) == k:
                    first_free[name] = k + 1
            for f, name in zip(files, names, strict=False):
                relpath = prefix + name
                mapping[f._uid] = relpath
                if f._source is None:
                    assert isinstance(f, InputResourceFile)
                    src = resolve(f._input_path, workspace)
                    node.inputs.append(Input(relpath, src, -1, "", f._input_path, f._where))
                else:
                    j = index.get(f._source)
                    if j is None:  # pragma: no cover - command() already refuses these
                        raise DefinitionError(f"resource {f._uid} comes from another pipeline", t._where)
                    prel = own[j][f._uid]
                    pname = f._source.name or f._source._uid
                    node.inputs.append(Input(relpath, None, j, prel, pname))
            if group is not None:
                mapping[group._uid] = prefix + names[-1]
        node.commands = [UID_RE.sub(partial(_substitute, mapping), c) for c in t._command]
        # Outputs: every own file the task mentions or declares.
        for owned in t._resources.values():
            rfiles = list(owned._resources.values()) if isinstance(owned, ResourceGroup) else [owned]
            for rf in rfiles:
                if rf not in t._valid or not isinstance(rf, ResourceFile):
                    continue
                dests = [_resolve(path, workspace) for path in rf._output_paths]
                for dest in dests:
                    if dest == state_dir or dest.startswith(state_dir + os.sep):
                        raise DefinitionError(f"output destination inside {STATE_DIR}/: {dest}", t._where)
                required = bool(dests) or rf in t._internal_outputs
                node.outputs.append(Output(own[node.index][rf._uid], dests, required))
        for f in t._external_outputs:
            if f not in t._valid:
                raise DefinitionError(f"undefined resource '{getattr(f, '_name', f._uid)}'", t._where)

    _name_nodes(nodes)
    order = _toposort(nodes)
    nodes = [nodes[i] for i in order]
    remap = {old: new for new, old in enumerate(order)}
    for new, n in enumerate(nodes):
        n.index = new
        n.deps = sorted({remap[d] for d in n.deps})
        for inp in n.inputs:
            if inp.producer >= 0:
                inp.producer = remap[inp.producer]

    input_copies: list[tuple[InputResourceFile, list[str]]] = []
    for inres in pipeline._input_resources:
        if inres._output_paths:
            input_copies.append((inres, [resolve(path, workspace) for path in inres._output_paths]))
    graph = Graph(nodes, workspace, input_copies)
    _check_destinations(graph)
    return graph


def _check_destinations(graph: Graph) -> None:
    seen: dict[str, str] = {}
    for n in graph.nodes:
        for o in n.outputs:
            for d in o.dests:
                if (graph.workspace + os.sep).startswith(d.rstrip(os.sep) + os.sep):  # the workspace or above
                    raise DefinitionError(f"output destination {d} is a directory of the workspace", n.where)
                if d in seen:
                    raise DefinitionError(
                        f"duplicate output destination {d}: written by {seen[d]} and {n.name}", n.where
                    )
                seen[d] = n.name
    for r, dests in graph.input_copies:
        for d in dests:
            if d in seen:
                raise DefinitionError(f"duplicate output destination {d}: written by {seen[d]} and an input copy")
            seen[d] = "input " + r._input_path
    # Reading a file that a task publishes would hide the dependency: the reader could run
    # first, or keep a stale copy. The task's resource must be used instead.
    for n in graph.nodes:
        for inp in n.inputs:
            if inp.source is not None and inp.source in graph.by_dest:
                writer = graph.by_dest[inp.source].name
                raise DefinitionError(
                    f"input {inp.display} is an output of task '{writer}'; use that task's resource "
                    "(e.g. writer.ofile) instead of read_input",
                    inp.where or n.where,
                )


def _name_nodes(nodes: list[Node]) -> None:
    """Display names: the task's name when unique, else something derived from its work."""
    from .hashing import digest_str

    counts: dict[str, int] = {}
    for n in nodes:
        if n.task.name:
            counts[n.task.name] = counts.get(n.task.name, 0) + 1
    used: set[str] = set()
    next_suffix: dict[str, int] = {}
    for n in nodes:
        base = n.task.name
        if not base or counts[base] > 1:
            h = digest_str("\n".join(n.commands) + "\0" + (n.image or ""))[:8]
            base = f"{base}@{h}" if base else f"task-{h}"
        name, k = base, next_suffix.get(base, 1)
        while name in used:
            k += 1
            name = f"{base}~{k}"
        next_suffix[base] = k
        used.add(name)
        n.name = name


def _toposort(nodes: list[Node]) -> list[int]:
    pending = [len(set(n.deps)) for n in nodes]
    consumers: list[list[int]] = [[] for _ in nodes]
    for n in nodes:
        for d in set(n.deps):
            consumers[d].append(n.index)
    ready = deque(i for i, p in enumerate(pending) if p == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for c in consumers[i]:
            pending[c] -= 1
            if pending[c] == 0:
                ready.append(c)
    if len(order) != len(nodes):
        raise _cycle(nodes, pending)
    return order


def _cycle(nodes: list[Node], pending: list[int]) -> CycleError:
    """A CycleError naming one cycle among the nodes left with pending dependencies."""
    start = next(i for i, p in enumerate(pending) if p > 0)
    path: list[int] = []
    pos: dict[int, int] = {}
    i = start
    while i not in pos:
        pos[i] = len(path)
        path.append(i)
        i = next(d for d in nodes[i].deps if pending[d] > 0)
    cycle = path[pos[i] :] + [i]
    # Dependencies point upstream; print the cycle in the direction work flows.
    names = " -> ".join(nodes[j].name for j in reversed(cycle))
    return CycleError(f"cycle detected in dependency graph: {names}", nodes[start].where)
