#!/usr/bin/env python3
"""Run the peer build-tool benchmark (see PEERS.md) and render tables.

  harness.py run    --tools make,ninja --shapes chain,fan,layers \
                    --sizes 100,1000,10000 --reps 3 --jobs 2 \
                    --timeout 300 --slow 60 --workdir /tmp/peerbench \
                    --out results.jsonl
  harness.py report results.jsonl [more.jsonl ...]   > tables.md

Scenarios, per (tool, shape, N), in this order on one workload dir:
  clean   move o/ and the tool's state away, build        (reps times)
          (into WORKDIR/.trash, deleted after the run: see TRASH)
  noop    build again, nothing changed                     (reps times)
  edit    rewrite the touched source with new content, build
  touch   set the touched source's mtime to now, same bytes, build
  cutoff  append a '# comment' line to the touched source (the consumer's
          grep drops it, so its output is byte-identical), build
Every build runs under /usr/bin/time -v (peak RSS, user/sys CPU); wall time is
taken around it with a monotonic clock. "reruns" = number of task outputs
whose mtime_ns changed (or that appeared) during the build.
A run that exceeds --timeout is killed (whole process group) and recorded as a
lower bound; the remaining scenarios of that combination, and larger N of the
same tool+shape, are skipped. If one run of a scenario takes longer than
--slow seconds, that scenario is not repeated (recorded with reps=1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen  # noqa: E402

SCENARIOS = ("clean", "noop", "edit", "touch", "cutoff")


def timed(argv, cwd, timeout, log):
    """Run argv under /usr/bin/time -v; return dict(wall,user,sys,rss_kb,rc,
    timed_out)."""
    fd, tf = tempfile.mkstemp(prefix="gnutime.")
    os.close(fd)
    full = ["/usr/bin/time", "-v", "-o", tf] + argv
    with open(log, "wb") as lf:
        t0 = time.perf_counter()
        p = subprocess.Popen(
            full, cwd=cwd, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True
        )
        killed = []

        def kill():
            killed.append(1)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        # NB: Popen.wait(timeout=...) polls with sleeps of up to 50 ms, which
        # quantises the wall time; use a blocking wait + a killer thread.
        timer = threading.Timer(timeout, kill)
        timer.start()
        p.wait()
        wall = time.perf_counter() - t0
        timer.cancel()
        timed_out = bool(killed)
    res = {"wall": wall, "rc": p.returncode, "timed_out": timed_out, "user": None, "sys": None, "rss_kb": None}
    try:
        with open(tf) as f:
            for line in f:
                line = line.strip()
                if line.startswith("User time (seconds):"):
                    res["user"] = float(line.split(":")[1])
                elif line.startswith("System time (seconds):"):
                    res["sys"] = float(line.split(":")[1])
                elif line.startswith("Maximum resident set size (kbytes):"):
                    res["rss_kb"] = int(line.split(":")[1])
                elif line.startswith("Exit status:"):
                    res["rc"] = int(line.split(":")[1])
    finally:
        os.unlink(tf)
    return res


def snapshot(d, outs):
    m = {}
    for p in outs:
        try:
            m[p] = os.stat(os.path.join(d, p)).st_mtime_ns
        except FileNotFoundError:
            m[p] = None
    return m


# Files are not deleted while the harness measures: they are renamed into TRASH, which
# is emptied when the run is over (or by bench/run, after all its runs: --keep-trash).
# Why: on ext4 without a journal (this project's VMs), the kernel avoids reusing an inode
# freed in the last 60 s, or 6 min while its inode-table block is dirty, and each new
# file's allocation scans past every such inode of its group from the start. Deleting the
# previous run's ~10,000-50,000 files right before a build made each file the build
# created cost ~140 us of CPU instead of ~10 us: a cost of the deletion, charged to
# whichever tool ran next, in proportion to the files it creates.
TRASH = None  # set by cmd_run: a new directory of its own under <workdir>/.trash
_trashed = [0]


def discard(path):
    """Move `path` (a file or directory) out of the way without freeing its inodes."""
    if not os.path.lexists(path):
        return
    _trashed[0] += 1
    os.rename(path, os.path.join(TRASH, f"{_trashed[0]}-{os.path.basename(path)}"))


def empty_trash():
    if TRASH is not None:
        shutil.rmtree(os.path.dirname(TRASH), ignore_errors=True)  # this run's and any left before


def clean(d, tool):
    discard(os.path.join(d, "o"))
    os.makedirs(os.path.join(d, "o"))
    for s in tool.state:
        discard(os.path.join(d, s))


def bench_combo(tname, shape, n, a, emit):
    tool = gen.TOOLS[tname]
    d = os.path.join(a.workdir, f"{tname}-{shape}-{n}")
    discard(d)  # left by an earlier run with --keep
    g = gen.generate(tname, shape, n, d)
    outs = [t["out"] for t in g["tasks"]]
    touch = os.path.join(d, g["touch"])
    expect = {
        "clean": g["ntasks"],
        "noop": 0,
        "edit": gen.downstream_cone(g, g["touch"]),
        "touch": 0,
        "cutoff": gen.direct_consumers(g, g["touch"]),
    }
    argv = tool.build_cmd(a.jobs)
    log = os.path.join(a.workdir, f"{tname}-{shape}-{n}.log")
    counter = [0]

    def prepare(sc):
        if sc == "clean":
            clean(d, tool)
            return
        if sc == "noop":
            return
        time.sleep(0.05)  # coarse fs timestamps: be strictly newer than outputs
        counter[0] += 1
        if sc == "edit":
            with open(touch, "w") as f:
                f.write(f"{g['sources'][g['touch']].strip()} e{counter[0]}\n")
        elif sc == "touch":
            os.utime(touch)
        elif sc == "cutoff":
            with open(touch, "a") as f:
                f.write(f"# comment {counter[0]}\n")

    scenarios = SCENARIOS if tool.incremental else ("clean",)
    if getattr(a, "scenarios", None):
        keep = a.scenarios.split(",")
        scenarios = tuple(sc for sc in scenarios if sc in keep)
    for sc in scenarios:
        reps = a.reps
        if sc in ("edit", "touch", "cutoff") and getattr(a, "inc_reps", None):
            reps = a.inc_reps
        r = 0
        while r < reps:
            prepare(sc)
            before = snapshot(d, outs)
            load1 = os.getloadavg()[0]  # the VM is shared: record contention
            res = timed(argv, d, a.timeout, log)
            after = snapshot(d, outs)
            reruns = sum(1 for p in outs if after[p] is not None and after[p] != before[p])
            missing = sum(1 for p in g["finals"] if after[p] is None)
            counts = None
            if hasattr(tool, "counts_from_log"):
                with open(log, "rb") as f:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
                    counts = tool.counts_from_log(f.read().decode(errors="replace"))
            rec = {
                "tool": tname,
                "shape": shape,
                "n": n,
                "ntasks": g["ntasks"],
                "scenario": sc,
                "rep": r,
                "reruns": reruns,
                "expect": expect[sc],
                "missing_finals": missing,
                "jobs": a.jobs,
                "cmd": argv,
                "load1": load1,
                **res,
                **(counts or {}),
            }
            emit(rec)
            flag = " TIMEOUT" if res["timed_out"] else (f" rc={res['rc']}" if res["rc"] else "")
            print(
                f"  {tname:11s} {shape:6s} {n:6d} {sc:6s} #{r} "
                f"{res['wall']:8.3f}s rss={res['rss_kb']}k "
                f"reruns={reruns}/{expect[sc]}" + (f" ran={counts['tool_ran']}" if counts else "") + f"{flag}",
                flush=True,
            )
            if res["timed_out"] or res["rc"] != 0:
                with open(log, "rb") as f:
                    tail = f.read()[-1500:].decode(errors="replace")
                print("    --- log tail ---\n    " + tail.replace("\n", "\n    "), flush=True)
                return False
            if r == 0 and res["wall"] > a.slow:
                reps = 1
            r += 1
    if not a.keep:
        discard(d)
    return True


def cmd_probe(a):
    """Time `build_cmd + extra args` on a freshly generated (clean) workload,
    e.g. `snakemake -n` = DAG construction + planning only, no jobs run."""
    os.makedirs(a.workdir, exist_ok=True)
    out = open(a.out, "a")
    tool = gen.TOOLS[a.tool]
    out.write(json.dumps({"meta": "version", "tool": a.tool, "version": tool.version(), "time": time.time()}) + "\n")
    extra = a.extra.split()
    for shape in a.shapes.split(","):
        for n in sorted(int(x) for x in a.sizes.split(",")):
            d = os.path.join(a.workdir, f"probe-{a.tool}-{shape}-{n}")
            g = gen.generate(a.tool, shape, n, d)
            argv = tool.build_cmd(a.jobs) + extra
            for r in range(a.reps):
                res = timed(argv, d, a.timeout, d + ".log")
                rec = {
                    "tool": a.tool,
                    "shape": shape,
                    "n": n,
                    "ntasks": g["ntasks"],
                    "scenario": a.label,
                    "rep": r,
                    "reruns": 0,
                    "expect": 0,
                    "jobs": a.jobs,
                    "cmd": argv,
                    **res,
                }
                out.write(json.dumps(rec) + "\n")
                out.flush()
                print(
                    f"  {a.tool} {shape} {n} {a.label} #{r} "
                    f"{res['wall']:.3f}s rss={res['rss_kb']}k rc={res['rc']}"
                    f"{' TIMEOUT' if res['timed_out'] else ''}",
                    flush=True,
                )
                if res["timed_out"] or res["rc"]:
                    break
                if res["wall"] > a.slow:
                    break
            shutil.rmtree(d, ignore_errors=True)


def cmd_run(a):
    global TRASH
    os.makedirs(a.workdir, exist_ok=True)
    os.makedirs(os.path.join(a.workdir, ".trash"), exist_ok=True)
    TRASH = tempfile.mkdtemp(dir=os.path.join(a.workdir, ".trash"))  # names of its own: runs share .trash
    try:
        _run(a)
    finally:
        if not a.keep_trash:
            empty_trash()


def _run(a):
    tools = a.tools.split(",")
    for t in tools:
        if t not in gen.TOOLS:
            sys.exit(f"unknown tool {t}; known: {', '.join(gen.TOOLS)}")
    out = open(a.out, "a")

    def emit(rec):
        out.write(json.dumps(rec) + "\n")
        out.flush()

    for t in tools:
        v = gen.TOOLS[t].version()
        emit(
            {
                "meta": "version",
                "tool": t,
                "version": v,
                "host": platform.node(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "time": time.time(),
            }
        )
        print(f"== {t}: {v}", flush=True)
        if v is None:
            print(f"   {t} unavailable, skipped", flush=True)
            continue
        cap = dict((kv.split("=")[0], int(kv.split("=")[1])) for kv in a.max_n.split(",") if kv)
        for shape in a.shapes.split(","):
            for n in sorted(int(x) for x in a.sizes.split(",")):
                if n > cap.get(t, n):
                    print(f"   {t}: N={n} above --max-n, skipped", flush=True)
                    continue
                if not bench_combo(t, shape, n, a, emit):
                    print(f"   skipping larger N for {t}/{shape}", flush=True)
                    break


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def load(paths):
    recs, vers = [], {}
    for p in paths:
        with open(p) as f:
            for line in f:
                r = json.loads(line)
                if r.get("meta") == "version":
                    vers[r["tool"]] = r["version"]
                else:
                    recs.append(r)
    return recs, vers


def fmt_s(x):
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def cmd_report(a):
    recs, vers = load(a.files)
    tools = []
    for r in recs:
        if r["tool"] not in tools:
            tools.append(r["tool"])
    if a.tools:
        tools = [t for t in a.tools.split(",") if t in tools]
    groups = {}
    for r in recs:
        groups.setdefault((r["tool"], r["shape"], r["n"], r["scenario"]), []).append(r)
    combos = sorted({(r["shape"], r["n"], r["ntasks"]) for r in recs}, key=lambda x: (gen.ALL_SHAPES.index(x[0]), x[1]))
    print("Tool versions:\n")
    for t in tools:
        print(f"- {t}: {vers.get(t)}")
    print()
    titles = {
        "clean": "a. Clean build, wall s (median)",
        "noop": "b. No-op rebuild, wall s (median)",
        "edit": "c. One source changed (content), wall s (median) [tasks re-run / correct cone]",
        "touch": "d. One source touched, identical content, wall s (median) [tasks re-run]",
        "cutoff": "f. One source gets a comment line (consumer output identical), wall s [tasks re-run / minimum]",
    }
    extra_sc = sorted({r["scenario"] for r in recs} - set(SCENARIOS))
    for sc in extra_sc:
        titles[sc] = f"Probe '{sc}' (build command + extra args on a clean workload), wall s (median)"
    for sc in list(SCENARIOS) + extra_sc:
        if not any(r["scenario"] == sc for r in recs):
            continue
        print(f"### {titles[sc]}\n")
        print("| shape | N | tasks | " + " | ".join(tools) + " |")
        print("|---|---:|---:|" + "---:|" * len(tools))
        for shape, n, nt in combos:
            cells = []
            for t in tools:
                rs = groups.get((t, shape, n, sc))
                if not rs:
                    cells.append(
                        "n/a"
                        if sc in SCENARIOS and sc != "clean" and t in gen.TOOLS and not gen.TOOLS[t].incremental
                        else "-"
                    )
                    continue
                to = [r for r in rs if r["timed_out"]]
                ok = [r for r in rs if not r["timed_out"] and r["rc"] == 0]
                if to:
                    cells.append(f">{to[0]['wall']:.0f} (timeout)")
                    continue
                if not ok:
                    cells.append(f"fail rc={rs[0]['rc']}")
                    continue
                med = statistics.median(r["wall"] for r in ok)
                c = fmt_s(med)
                if len(ok) < 3:
                    c += f" (n={len(ok)})"
                if sc in ("edit", "touch", "cutoff"):
                    rr = sorted({r["reruns"] for r in ok})
                    rr_s = "/".join(str(x) for x in rr)
                    c += f" [{rr_s}" + (f"/{ok[0]['expect']}]" if sc != "touch" else "]")
                elif sc in ("clean", "noop"):
                    bad = [r for r in ok if r["reruns"] != r["expect"]]
                    if bad:
                        c += f" [re-ran {bad[0]['reruns']}]"
                else:  # probes: add peak RSS
                    rss = [r["rss_kb"] for r in ok if r["rss_kb"]]
                    if rss:
                        c += f"; {statistics.median(rss) / 1024:.0f} MiB"
                cells.append(c)
            print(f"| {shape} | {n} | {nt} | " + " | ".join(cells) + " |")
        print()
    if not any(r["scenario"] in ("clean", "noop") for r in recs):
        return
    # spread + cpu for clean/noop
    for sc in ("clean", "noop"):
        print(f"### {sc}: min–max wall s, and median user+sys CPU s\n")
        print("| shape | N | " + " | ".join(tools) + " |")
        print("|---|---:|" + "---:|" * len(tools))
        for shape, n, _nt in combos:
            cells = []
            for t in tools:
                ok = [r for r in groups.get((t, shape, n, sc), []) if not r["timed_out"] and r["rc"] == 0]
                if not ok:
                    cells.append("-")
                    continue
                w = [r["wall"] for r in ok]
                cpu = statistics.median((r["user"] or 0) + (r["sys"] or 0) for r in ok)
                cells.append(f"{fmt_s(min(w))}–{fmt_s(max(w))}; cpu {fmt_s(cpu)}")
            print(f"| {shape} | {n} | " + " | ".join(cells) + " |")
        print()
    print(
        "### e. Peak RSS of the no-op rebuild, MiB (median; largest single "
        "process, /usr/bin/time -v; hail-local: its full run)\n"
    )
    print("| shape | N | " + " | ".join(tools) + " |")
    print("|---|---:|" + "---:|" * len(tools))
    for shape, n, _nt in combos:
        cells = []
        for t in tools:
            sc = "noop" if gen.TOOLS[t].incremental else "clean"
            ok = [r for r in groups.get((t, shape, n, sc), []) if not r["timed_out"] and r["rc"] == 0 and r["rss_kb"]]
            cells.append(f"{statistics.median(r['rss_kb'] for r in ok) / 1024:.0f}" if ok else "-")
        print(f"| {shape} | {n} | " + " | ".join(cells) + " |")
    print()


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tools", default="make,ninja,doit,snakemake")
    r.add_argument("--shapes", default="chain,fan,layers")
    r.add_argument("--sizes", default="100,1000,10000")
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--timeout", type=float, default=300)
    r.add_argument("--slow", type=float, default=60)
    r.add_argument("--workdir", default="/tmp/peerbench")
    r.add_argument("--out", default="results.jsonl")
    r.add_argument("--max-n", default="", help="per-tool size caps, e.g. hail-local=1000")
    r.add_argument("--keep", action="store_true", help="keep workload dirs after measuring")
    r.add_argument(
        "--keep-trash",
        action="store_true",
        help="leave WORKDIR/.trash (what clean builds moved away) for the caller to delete after all runs",
    )
    r.add_argument(
        "--scenarios",
        default="",
        help="subset of clean,noop,edit,touch,cutoff (default all; clean always runs first if listed)",
    )
    r.add_argument("--inc-reps", type=int, default=0, help="runs per edit/touch/cutoff scenario (default --reps)")
    q = sub.add_parser("probe")
    q.add_argument("--tool", required=True)
    q.add_argument("--shapes", default="chain,fan,layers")
    q.add_argument("--sizes", default="1000,10000")
    q.add_argument("--extra", default="-n")
    q.add_argument("--label", default="dryrun")
    q.add_argument("--reps", type=int, default=3)
    q.add_argument("--jobs", type=int, default=2)
    q.add_argument("--timeout", type=float, default=300)
    q.add_argument("--slow", type=float, default=60)
    q.add_argument("--workdir", default="/tmp/peerbench")
    q.add_argument("--out", default="results/probe.jsonl")
    p = sub.add_parser("report")
    p.add_argument("files", nargs="+")
    p.add_argument("--tools", default="")
    a = ap.parse_args()
    {"run": cmd_run, "report": cmd_report, "probe": cmd_probe}[a.cmd](a)


if __name__ == "__main__":
    main()
