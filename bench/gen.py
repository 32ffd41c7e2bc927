#!/usr/bin/env python3
"""Synthetic file-target workloads + per-tool build-description generators.

One workload = a DAG of tasks; every task reads files and writes exactly one
file with a trivial single-process shell command, so wall time is dominated
by the build tool's own overhead:

  * tasks that read *sources*   :  grep -hv '^#' IN... > OUT
  * every other task            :  cksum IN... > OUT

`grep -hv '^#'` drops comment lines, which lets the harness test *early
cutoff*: appending "# ..." to a source changes its bytes, the consumer re-runs,
but produces byte-identical output, so a content-aware tool can stop there.
`cksum` keeps outputs small (no size blow-up in "layers") while still
propagating every input change.

Shapes (N = requested size; the real task count is in graph["ntasks"]):
  chain  : s/seed -> c0 -> c1 -> ... -> c{N-1}              (N tasks, depth N)
  fan    : f_i = grep(s/seed, s/p{i}) for i<N; g = cksum(all f_i)  (N+1 tasks)
           (one shared source plus one tiny per-task source so that
            "change one source" has a small, well-defined cone)
  layers : L = round(sqrt(N)) layers x W = N // L tasks;
           layer 0 task j reads s/x{j}, s/x{(j+1)%W};
           layer k task j reads l{k-1}_{j}, l{k-1}_{(j+1)%W}
  spine  : a chain of N//2 steps with a leaf on each: t_k = cksum(t_{k-1}),
           leaf_k = cksum(t_k)  (N tasks; not in the default runs: it shows
           how a scheduler copes with two tasks ready at once, one at a time)

The file written for each tool lives in the workload directory next to
s/ (sources) and o/ (outputs).  graph.json is always written as well.

pipebuild (class Pipebuild, emits Pipefile.py) is registered here like the
peers; see its docstring for how its commands differ from shell_cmd().

Extending with a new tool: subclass Tool below, implement
emit() (write the build description into the workload dir) and build_cmd()
(argv that builds the default target with `jobs` parallelism, run with
cwd = workload dir), list the tool's state paths in `state` (removed for a
clean build), and register it in TOOLS.  Nothing else in the harness needs to
change.  See PEERS.md, section "Adding a tool".

CLI:  gen.py --tool make --shape layers --n 1000 --dir /tmp/w   (prints summary)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

SHAPES = ("chain", "fan", "layers")  # the default runs and issue #8's targets
ALL_SHAPES = (*SHAPES, "spine")


# --------------------------------------------------------------------------
# workload graphs
# --------------------------------------------------------------------------
def make_graph(shape: str, n: int) -> dict:
    """Return {'sources': {path: content}, 'tasks': [{id,ins,out,kind}],
    'finals': [paths], 'touch': path, 'ntasks': int}; tasks are topologically
    ordered. Paths are relative to the workload dir (short names on purpose:
    the fan gather's command line must stay < 128 KiB at N=10000)."""
    src: dict[str, str] = {}
    tasks: list[dict] = []
    if shape == "chain":
        src["s/seed"] = "seed\n"
        prev = "s/seed"
        for i in range(n):
            out = f"o/c{i}"
            tasks.append({"id": f"c{i}", "ins": [prev], "out": out, "kind": "src" if i == 0 else "sum"})
            prev = out
        finals = [prev]
        touch = "s/seed"
    elif shape == "fan":
        src["s/seed"] = "seed\n"
        for i in range(n):
            src[f"s/p{i}"] = f"p{i}\n"
            tasks.append({"id": f"f{i}", "ins": ["s/seed", f"s/p{i}"], "out": f"o/f{i}", "kind": "src"})
        tasks.append({"id": "g", "ins": [f"o/f{i}" for i in range(n)], "out": "o/g", "kind": "sum"})
        finals = ["o/g"]
        touch = f"s/p{n // 2}"
    elif shape == "layers":
        L = max(1, round(math.sqrt(n)))
        W = max(1, n // L)
        for j in range(W):
            src[f"s/x{j}"] = f"x{j}\n"
        for k in range(L):
            for j in range(W):
                j2 = (j + 1) % W
                if k == 0:
                    ins = [f"s/x{j}", f"s/x{j2}"]
                else:
                    ins = [f"o/l{k - 1}_{j}", f"o/l{k - 1}_{j2}"]
                if ins[0] == ins[1]:
                    ins = ins[:1]
                tasks.append({"id": f"l{k}_{j}", "ins": ins, "out": f"o/l{k}_{j}", "kind": "src" if k == 0 else "sum"})
        finals = [f"o/l{L - 1}_{j}" for j in range(W)]
        touch = f"s/x{W // 2}"
    elif shape == "spine":
        src["s/seed"] = "seed\n"
        prev = "s/seed"
        finals = []
        for k in range(max(1, n // 2)):
            out = f"o/t{k}"
            tasks.append({"id": f"t{k}", "ins": [prev], "out": out, "kind": "src" if k == 0 else "sum"})
            tasks.append({"id": f"v{k}", "ins": [out], "out": f"o/v{k}", "kind": "sum"})
            finals.append(f"o/v{k}")
            prev = out
        touch = "s/seed"
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return {
        "shape": shape,
        "n": n,
        "ntasks": len(tasks),
        "sources": src,
        "tasks": tasks,
        "finals": finals,
        "touch": touch,
    }


def shell_cmd(task: dict, prefix: str = "") -> str:
    """The task's shell command (paths optionally prefixed, e.g. absolute)."""
    ins = " ".join(prefix + p for p in task["ins"])
    out = prefix + task["out"]
    if task["kind"] == "src":
        return f"grep -hv '^#' {ins} > {out}"
    return f"cksum {ins} > {out}"


def downstream_cone(graph: dict, path: str) -> int:
    """Number of tasks transitively depending on `path` (= correct re-run
    count after a real content change of that source)."""
    consumers: dict[str, list[dict]] = {}
    for t in graph["tasks"]:
        for i in t["ins"]:
            consumers.setdefault(i, []).append(t)
    seen: set[str] = set()
    stack = [path]
    while stack:
        p = stack.pop()
        for t in consumers.get(p, ()):
            if t["id"] not in seen:
                seen.add(t["id"])
                stack.append(t["out"])
    return len(seen)


def direct_consumers(graph: dict, path: str) -> int:
    return sum(1 for t in graph["tasks"] if path in t["ins"])


def write_workload(graph: dict, d: str) -> None:
    """Create d/ with sources, empty o/, graph.json (no tool files)."""
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(os.path.join(d, "s"))
    os.makedirs(os.path.join(d, "o"))
    for p, c in graph["sources"].items():
        with open(os.path.join(d, p), "w") as f:
            f.write(c)
    with open(os.path.join(d, "graph.json"), "w") as f:
        json.dump(graph, f)


# --------------------------------------------------------------------------
# tools
# --------------------------------------------------------------------------
PEERS_VENV = os.environ.get("PEERS_VENV", "/tmp/peers-venv")
HAIL_VENV = os.environ.get("HAIL_VENV", "/tmp/hail-venv")
PIPEBUILD_VENV = os.environ.get("PIPEBUILD_VENV", "/tmp/pipebuild-venv")


class Tool:
    name = "?"
    state: tuple[str, ...] = ()  # tool state to delete for a clean build
    incremental = True  # False: every run re-executes all tasks
    parallel = True  # False: ignores `jobs`

    def emit(self, graph: dict, d: str) -> None:
        raise NotImplementedError

    def build_cmd(self, jobs: int) -> list[str]:
        raise NotImplementedError

    def version(self) -> str | None:
        """Exact version string, or None if the tool is unavailable."""
        raise NotImplementedError


def _run_version(argv: list[str]) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return (r.stdout or r.stderr).strip().splitlines()[0]


class Make(Tool):
    name = "make"

    def emit(self, graph, d):
        lines = [
            "# generated by gen.py",
            "MAKEFLAGS += -rR",
            ".SUFFIXES:",
            ".PHONY: all",
            "all: " + " ".join(graph["finals"]),
            "",
        ]
        for t in graph["tasks"]:
            lines.append(f"{t['out']}: {' '.join(t['ins'])}")
            lines.append("\t" + shell_cmd(t))
        with open(os.path.join(d, "Makefile"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def build_cmd(self, jobs):
        return ["make", f"-j{jobs}"]

    def version(self):
        return _run_version(["make", "--version"])


class Ninja(Tool):
    name = "ninja"
    state = (".ninja_log", ".ninja_deps")

    def emit(self, graph, d):
        lines = [
            "# generated by gen.py",
            "rule src",
            "  command = grep -hv '^#' $in > $out",
            "rule sum",
            "  command = cksum $in > $out",
            "",
        ]
        for t in graph["tasks"]:
            lines.append(f"build {t['out']}: {t['kind']} {' '.join(t['ins'])}")
        lines.append("default " + " ".join(graph["finals"]))
        with open(os.path.join(d, "build.ninja"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def build_cmd(self, jobs):
        return ["ninja", f"-j{jobs}"]

    def version(self):
        v = _run_version(["ninja", "--version"])
        return f"ninja {v}" if v else None


SNAKEFILE = """\
# generated by gen.py -- one wildcard rule, inputs looked up per target
import json
G = json.load(open("graph.json"))
INS = {t["out"][2:]: t["ins"] for t in G["tasks"]}
CMD = {t["out"][2:]: ("grep -hv '^#'" if t["kind"] == "src" else "cksum")
       for t in G["tasks"]}

rule all:
    input: G["finals"]

rule task:
    input: lambda wc: INS[wc.n]
    output: "o/{n}"
    params: c=lambda wc: CMD[wc.n]
    shell: "{params.c} {input} > {output}"
"""


class Snakemake(Tool):
    name = "snakemake"
    state = (".snakemake",)

    def emit(self, graph, d):
        text = SNAKEFILE
        lim = os.environ.get("SNAKEMAKE_RECURSION_LIMIT")
        if lim:  # off by default; chains deeper than ~500 need it
            text = f"import sys; sys.setrecursionlimit({int(lim)})\n" + text
        with open(os.path.join(d, "Snakefile"), "w") as f:
            f.write(text)

    def build_cmd(self, jobs):
        return [f"{PEERS_VENV}/bin/snakemake", "--cores", str(jobs)]

    def version(self):
        v = _run_version([f"{PEERS_VENV}/bin/snakemake", "--version"])
        return f"snakemake {v}" if v else None


DODO = """\
# generated by gen.py
import json
G = json.load(open("graph.json"))
CMD = {"src": "grep -hv '^#' %s > %s", "sum": "cksum %s > %s"}
DOIT_CONFIG = {"default_tasks": ["b"], "verbosity": 0,
               "check_file_uptodate": "md5"}

def task_b():
    for t in G["tasks"]:
        yield {"name": t["id"], "file_dep": t["ins"], "targets": [t["out"]],
               "actions": [CMD[t["kind"]] % (" ".join(t["ins"]), t["out"])]}
"""


class Doit(Tool):
    name = "doit"
    backend = None  # doit default: "dbm" (here: dbm.dumb, no gdbm/ndbm)
    state = (".doit.db", ".doit.db.dat", ".doit.db.dir", ".doit.db.bak", ".doit.db.db")

    def emit(self, graph, d):
        with open(os.path.join(d, "dodo.py"), "w") as f:
            f.write(DODO)

    def build_cmd(self, jobs):
        argv = [f"{PEERS_VENV}/bin/doit"]
        if self.backend:
            argv += ["--backend", self.backend]
        if jobs > 1:
            argv += ["-n", str(jobs)]
        return argv

    def version(self):
        v = _run_version([f"{PEERS_VENV}/bin/doit", "--version"])
        return f"doit {v}" if v else None


class DoitSqlite(Doit):
    name = "doit-sqlite"
    backend = "sqlite3"


HAIL_SCRIPT = """\
# generated by gen.py -- hailtop.batch LocalBackend (no caching: always runs all)
import json, os, sys
import hailtop.batch as hb
D = os.path.abspath(os.path.dirname(__file__))
G = json.load(open(os.path.join(D, "graph.json")))
b = hb.Batch(backend=hb.LocalBackend(tmp_dir=os.path.join(D, ".hailtmp")),
             name="bench")
jobs = {}
for t in G["tasks"]:
    j = b.new_job(name=t["id"])
    for i in t["ins"]:
        if i in jobs:
            j.depends_on(jobs[i])
    ins, out = " ".join(t["ins"]), t["out"]
    # LocalBackend cds into its scratch dir first; cd back so outputs are
    # byte-identical to the other tools' (cksum prints the file names)
    if t["kind"] == "src":
        j.command(f"cd {D} && grep -hv '^#' {ins} > {out}")
    else:
        j.command(f"cd {D} && cksum {ins} > {out}")
    jobs[t["out"]] = j
b.run()
"""


class HailLocal(Tool):
    name = "hail-local"
    state = (".hailtmp",)
    incremental = False
    parallel = False  # LocalBackend runs jobs one after another

    def emit(self, graph, d):
        with open(os.path.join(d, "hail_batch.py"), "w") as f:
            f.write(HAIL_SCRIPT)

    def build_cmd(self, jobs):
        return [f"{HAIL_VENV}/bin/python", "hail_batch.py"]

    def version(self):
        v = _run_version([f"{HAIL_VENV}/bin/python", "-c", "import importlib.metadata as m;print(m.version('hail'))"])
        return f"hail {v} (hailtop.batch LocalBackend)" if v else None


PIPEFILE = """\
# generated by gen.py -- one task per graph node, hailtop.pipeline style
import json
from pipebuild import Pipeline

G = json.load(open("graph.json"))
p = Pipeline(name="bench-" + G["shape"])
ofile = {}    # output path -> the producing task's ofile
sources = {}  # source path -> its InputResourceFile (one per distinct path)


def res(path):
    if path in ofile:
        return ofile[path]
    if path not in sources:
        sources[path] = p.read_input(path)
    return sources[path]


for task in G["tasks"]:
    t = p.new_task(name=task["id"])
    ins = " ".join(res(i) for i in task["ins"])
    if task["kind"] == "src":
        t.command(f"grep -hv '^#' {ins} > {t.ofile}")
    else:
        t.command(f"cksum {ins} > {t.ofile}")
    p.write_output(t.ofile, task["out"])
    ofile[task["out"]] = t.ofile
"""


def pipebuild_src_digest() -> str | None:
    """Short sha256 over the *.py files of the pipebuild package that
    PIPEBUILD_VENV imports. With an editable install the source can change
    under a running benchmark, so every result records what it measured."""
    import hashlib

    try:  # the package the venv imports (editable: the repo; else a copy)
        root = subprocess.run(
            [f"{PIPEBUILD_VENV}/bin/python", "-c", "import os, pipebuild; print(os.path.dirname(pipebuild.__file__))"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        ).stdout.strip()  # not cwd: `python -c` imports from it
    except (OSError, subprocess.TimeoutExpired):
        root = ""
    if not root or not os.path.isdir(root):
        return None
    h = hashlib.sha256()
    for dp, dn, fn in sorted(os.walk(root)):
        dn.sort()
        for f in sorted(fn):
            if f.endswith(".py"):
                p = os.path.join(dp, f)
                h.update(os.path.relpath(p, root).encode() + b"\0")
                with open(p, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()[:12]


class Pipebuild(Tool):
    """pipebuild (this repo): `pipebuild make` over a Pipefile.py.

    Each command runs in the task's own scratch dir with relative resource
    paths (`in/seed`, `out/ofile`, ...), so the command text differs from
    shell_cmd() but runs the same program on the same bytes; cksum prints the
    file names it was given, so the *contents* of o/* differ from make's
    (deterministically).  Every task publishes its ofile to task["out"] with
    write_output, so o/* are the destinations, as for make."""

    name = "pipebuild"
    state = (".pipebuild",)

    def emit(self, graph, d):
        with open(os.path.join(d, "Pipefile.py"), "w") as f:
            f.write(PIPEFILE)

    def build_cmd(self, jobs):
        return [f"{PIPEBUILD_VENV}/bin/pipebuild", "make", "-j", str(jobs)]

    def counts_from_log(self, text):
        """pipebuild's own summary line: 'N ran, N restored, N up to date'."""
        m = re.search(r"(\d+) ran, (\d+) restored, (\d+) up to date", text)
        if not m:
            return None
        return {"tool_ran": int(m[1]), "tool_restored": int(m[2]), "tool_uptodate": int(m[3])}

    def version(self):
        if not os.path.exists(f"{PIPEBUILD_VENV}/bin/pipebuild"):
            return None
        v = _run_version([f"{PIPEBUILD_VENV}/bin/pipebuild", "--version"])
        if v is None:  # no --version option: ask the installed metadata
            v = _run_version(
                [f"{PIPEBUILD_VENV}/bin/python", "-c", "import importlib.metadata as m;print(m.version('pipebuild'))"]
            )
        if v is None:
            return None
        v = v if v.lower().startswith("pipebuild") else f"pipebuild {v}"
        return f"{v} (src {pipebuild_src_digest()})"


TOOLS: dict[str, Tool] = {
    t.name: t for t in (Make(), Ninja(), Snakemake(), Doit(), DoitSqlite(), HailLocal(), Pipebuild())
}


def generate(tool: str, shape: str, n: int, d: str) -> dict:
    g = make_graph(shape, n)
    write_workload(g, d)
    TOOLS[tool].emit(g, d)
    return g


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tool", required=True, choices=sorted(TOOLS))
    ap.add_argument("--shape", required=True, choices=ALL_SHAPES)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("-j", "--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    g = generate(a.tool, a.shape, a.n, a.dir)
    print(
        json.dumps(
            {
                "dir": a.dir,
                "tool": a.tool,
                "shape": a.shape,
                "n": a.n,
                "ntasks": g["ntasks"],
                "touch": g["touch"],
                "cone": downstream_cone(g, g["touch"]),
                "build": shlex.join(TOOLS[a.tool].build_cmd(a.jobs)),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
