"""Seeded random edits: every incremental build must equal a clean build, and run exactly
the tasks whose (command, input bytes) were never built before (the minimal set, given
that every earlier result stays in the action cache).

CI runs PIPEBUILD_PROPERTY_SEEDS seeds (default 300); set it higher for a longer local run.
Tasks run through FakeExecutor with a Python handler, so a seed costs milliseconds.
"""

from __future__ import annotations

import itertools
import os
import random
import shlex

import pytest

from pipebuild import Pipeline, resource, task
from pipebuild.build import Options, build
from pipebuild.executors import FakeExecutor, Job

SEEDS = int(os.environ.get("PIPEBUILD_PROPERTY_SEEDS", "300"))
OPS = ("cat", "strip", "upper")


def apply(op: str, tag: str, data: str) -> str:
    """The model of what a task writes."""
    if op == "strip":
        data = "".join(line for line in data.splitlines(keepends=True) if not line.startswith("#"))
    elif op == "upper":
        data = data.upper()
    return f"[{tag}]" + data if op == "cat" else data


def handler(job: Job) -> int:
    """Play a task: `op TAG IN... > OUT` read from the last line of its script."""
    words = shlex.split(job.script.strip().splitlines()[-1])
    op, tag, rest = words[0], words[1], words[2:]
    ins, out = rest[: rest.index(">")], rest[rest.index(">") + 1]
    data = ""
    for path in ins:
        with open(os.path.join(job.dir, path)) as f:
            data += f.read()
    with open(os.path.join(job.dir, out), "w") as f:
        f.write(apply(op, tag, data))
    return 0


class Model:
    """Sources, tasks and the oracle's view of what each build must do."""

    def __init__(self, rng: random.Random, root: str) -> None:
        self.rng = rng
        self.root = root
        self.sources = {f"s{i}": self.content() for i in range(3)}
        self.tasks: list[dict] = []
        for _ in range(rng.randint(3, 7)):
            self.add_task()
        self.seen: set[tuple] = set()

    def content(self) -> str:
        return self.rng.choice(["a\n", "b\n", "a\nb\n", "#x\na\n", "c\n"])

    def add_task(self) -> None:
        n = len(self.tasks)
        names = list(self.sources) + [t["name"] for t in self.tasks]
        ins = self.rng.sample(names, k=min(len(names), self.rng.randint(1, 2)))
        self.tasks.append({"name": f"t{n}", "op": self.rng.choice(OPS), "tag": str(self.rng.randint(0, 2)), "ins": ins})

    def write_sources(self) -> None:
        for name, text in self.sources.items():
            path = os.path.join(self.root, "src", name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            old = None
            if os.path.exists(path):
                with open(path) as f:
                    old = f.read()
            if old != text:
                with open(path, "w") as f:
                    f.write(text)

    def pipeline(self) -> Pipeline:
        p = Pipeline(name="prop")
        res: dict[str, object] = {n: p.read_input(f"src/{n}") for n in self.sources}
        p.write_output(res["s0"], "out/copy-s0")  # an input copy: kept equal to its source
        for spec in self.tasks:
            t = p.new_task(spec["name"])
            ins = " ".join(str(res[i]) for i in spec["ins"])
            t.command(f"{spec['op']} {spec['tag']} {ins} > {t.ofile}")
            p.write_output(t.ofile, f"out/{spec['name']}")
            res[spec["name"]] = t.ofile
        return p

    def seen_as(self, ins: list[str]) -> tuple[str, ...]:
        """The paths a task sees for its inputs (docs/DESIGN.md): in/s0, in/ofile, in/1/ofile."""
        paths, count = [], {}
        for i in ins:
            base = i if i in self.sources else "ofile"
            k = count.get(base, 0)
            count[base] = k + 1
            paths.append(f"in/{k}/{base}" if k else f"in/{base}")
        return tuple(paths)

    def expected(self) -> tuple[dict[str, str], dict[tuple, set[str]]]:
        """Oracle: every output's bytes, and the work never done before, by key.

        Each new key must run at least once; two identical tasks decided in the same
        build may both run, since neither is in the cache yet.
        """
        values = dict(self.sources)
        new: dict[tuple, set[str]] = {}
        for spec in self.tasks:
            inputs = tuple((i in self.sources, values[i]) for i in spec["ins"])
            key = (spec["op"], spec["tag"], self.seen_as(spec["ins"]), inputs)
            if key not in self.seen:
                new.setdefault(key, set()).add(spec["name"])
            values[spec["name"]] = apply(spec["op"], spec["tag"], "".join(v for _, v in inputs))
        self.seen.update(new)
        return {t["name"]: values[t["name"]] for t in self.tasks}, new

    def edit(self) -> str:
        """One random edit; returns its description."""
        r = self.rng
        kind = r.choice(["content", "content", "touch", "comment", "command", "add", "remove", "dest-del", "dest-edit"])
        if kind == "content":
            s = r.choice(list(self.sources))
            self.sources[s] = self.content()
        elif kind == "touch":
            s = r.choice(list(self.sources))
            os.utime(os.path.join(self.root, "src", s))
        elif kind == "comment":
            s = r.choice(list(self.sources))
            self.sources[s] += "# note\n"
        elif kind == "command":
            t = r.choice(self.tasks)
            t["tag"] = str(r.randint(0, 2))
        elif kind == "add":
            self.add_task()
        elif kind == "remove" and len(self.tasks) > 1:
            self.tasks.pop()  # the last task: nothing depends on it
        elif kind in ("dest-del", "dest-edit"):
            name = r.choice([t["name"] for t in self.tasks] + ["copy-s0"])
            path = os.path.join(self.root, "out", name)
            if os.path.exists(path):
                if kind == "dest-del":
                    os.unlink(path)
                else:
                    with open(path, "a") as f:
                        f.write("edited by hand\n")
        return kind


def fresh_pipeline(model: Model) -> Pipeline:
    """The model's pipeline as a new process would make it: resource and task uids counted
    from 0, so that a definition left unchanged has the same no-op fingerprint (noop.py)."""
    resource._file_counter = itertools.count()
    resource._group_counter = itertools.count()
    task._task_counter = itertools.count()
    return model.pipeline()


def age(model: Model) -> None:
    """Set every source's and destination's mtime 10 s back, then build once: that build
    re-hashes them, no longer in the same clock tick as their writing, and so ends with a
    no-op certificate, which the next build (after the next edit) must use only if valid."""
    for sub in ("src", "out"):
        d = os.path.join(model.root, sub)
        for name in os.listdir(d) if os.path.isdir(d) else []:
            st = os.stat(os.path.join(d, name))
            os.utime(os.path.join(d, name), ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))
    result = build(fresh_pipeline(model), Options(workspace=model.root, executor=FakeExecutor(handler), verbosity=-1))
    assert result.ran == [] and result.restored == [] and not result.failed
    assert os.path.exists(os.path.join(model.root, ".pipebuild", "noop"))


def check_build(model: Model, context: str) -> None:
    model.write_sources()
    want, new = model.expected()
    fake = FakeExecutor(handler)
    result = build(fresh_pipeline(model), Options(workspace=model.root, executor=fake, verbosity=-1))
    assert not result.failed, context
    ran = set(result.ran)
    may_run = set().union(*new.values()) if new else set()
    assert ran <= may_run, f"{context}: ran work done before: {sorted(ran - may_run)}"
    for names in new.values():
        assert ran & names, f"{context}: none of {sorted(names)} ran"
    assert [j.name for j in fake.jobs] == result.ran, context
    for name, text in want.items():
        with open(os.path.join(model.root, "out", name)) as f:
            assert f.read() == text, f"{context}: out/{name}"
    with open(os.path.join(model.root, "out", "copy-s0")) as f:
        assert f.read() == model.sources["s0"], f"{context}: out/copy-s0"


@pytest.mark.parametrize("seed", range(SEEDS))
def test_incremental_build_equals_clean_build(tmp_path, seed):
    """Given a random sequence of edits, we should match the oracle after every build."""
    rng = random.Random(seed)
    model = Model(rng, str(tmp_path))
    check_build(model, f"seed {seed} first build")
    for step in range(6):
        if rng.random() < 0.5:
            age(model)
        kind = model.edit()
        check_build(model, f"seed {seed} step {step} after {kind}")
