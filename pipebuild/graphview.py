"""`pipebuild graph`: the task graph coloured by state, as DOT, Mermaid, SVG or HTML.

A task's state is what `make` would do with it now (`build.preview`), plus "failed last
time" from its trace: up to date, restorable from the cache, stale, never built, failed
last time, after a stale task (reruns only if that task's output changes), missing input.
Nothing runs offline, so there is no "running" state.

DOT and SVG leave the layout to Graphviz. HTML is one self-contained file with its own
layout, so it needs nothing installed: layers by longest path from the sources (edges
always point right), the order within a layer from four barycentre sweeps (Sugiyama's
heuristic, enough to untangle fan-out/fan-in pipelines), fixed-height rows. Boxes never
overlap, so a few hundred tasks stay readable with the page's pan, zoom and search.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from .exceptions import UsageError

if TYPE_CHECKING:
    from .build import Options
    from .pipeline import Pipeline


class State(Enum):
    """A task's state in the picture."""

    UP_TO_DATE = "up to date"
    RESTORE = "restorable"
    STALE = "stale"
    NEVER_BUILT = "never built"
    FAILED = "failed last time"
    WAITING = "after a stale task"
    MISSING = "missing input"

    @property
    def css(self) -> str:
        """A class name: up-to-date, failed-last-time, ..."""
        return self.value.replace(" ", "-")


# fill, border: green done, blue cached, amber/orange to do, red failed, grey blocked
COLOURS = {
    State.UP_TO_DATE: ("#c8e6c9", "#2e7d32"),
    State.RESTORE: ("#bbdefb", "#1565c0"),
    State.STALE: ("#ffe0b2", "#ef6c00"),
    State.NEVER_BUILT: ("#fff9c4", "#f9a825"),
    State.FAILED: ("#ffcdd2", "#c62828"),
    State.WAITING: ("#f5f5f5", "#9e9e9e"),
    State.MISSING: ("#e0e0e0", "#424242"),
}


@dataclass
class View:
    """The selected tasks in topological order, their states, and the edges between them."""

    title: str
    names: list[str]
    states: list[State]
    reasons: list[str]
    edges: list[tuple[int, int]]  # (upstream, downstream), upstream < downstream

    def counts(self) -> dict[State, int]:
        """How many tasks are in each state (states present only, in State order)."""
        present = {s: self.states.count(s) for s in State}
        return {s: n for s, n in present.items() if n}


def state_of(what: str, reason: str, failed_before: bool) -> State:
    """Map a preview row (what make would do, why) to a State."""
    from .rebuild import Reason

    if what == "skip":
        return State.UP_TO_DATE
    if what == "restore":
        return State.RESTORE
    if failed_before or reason == Reason.FAILED_LAST_TIME:
        return State.FAILED
    if what == "cannot run":
        return State.MISSING
    if what == "may run":
        return State.WAITING
    if reason == Reason.NEVER_BUILT:
        return State.NEVER_BUILT
    return State.STALE


def view(pipeline: Pipeline, options: Options) -> View:
    """The view of the targets' cone (all tasks when no target), from the workspace's cache."""
    from . import build
    from .graph import plan
    from .store import Store

    graph = plan(pipeline, options.workspace, options.state_dir)
    selected = graph.cone(build.select(graph, options.targets))
    rows = {name: (what, reason) for name, what, reason in build.preview(pipeline, options)}
    failed: set[str] = set()
    db = os.path.join(options.state_dir, "cache.sqlite")
    if os.path.exists(db):
        store = Store(db, warn=lambda _: None)
        try:
            failed = {name for name, rec in store.load_tasks().items() if rec.status != "ok"}
        finally:
            store.close()
    index: dict[int, int] = {}
    names: list[str] = []
    states: list[State] = []
    reasons: list[str] = []
    edges: list[tuple[int, int]] = []
    for node in graph.nodes:
        if not selected[node.index]:
            continue
        index[node.index] = len(names)
        what, reason = rows[node.name]
        state = state_of(what, reason, node.name in failed)
        if state is State.FAILED and reason != "failed last time":
            reason = f"failed last time; now: {reason}"
        names.append(node.name)
        states.append(state)
        reasons.append(reason)
        edges.extend((index[d], index[node.index]) for d in node.deps)
    return View(pipeline.name or os.path.basename(options.workspace), names, states, reasons, edges)


# -- DOT and Mermaid ------------------------------------------------------------------


def _dot_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(v: View) -> str:
    """Graphviz DOT, left to right, one box per task, a legend of the states present."""
    lines = [
        "digraph pipebuild {",
        f"  graph [rankdir=LR, nodesep=0.12, ranksep=0.45, fontname=Helvetica, fontsize=12, "
        f"labelloc=t, label={_dot_str(v.title)}, tooltip={_dot_str(v.title)}];",
        '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=10, height=0.28, margin="0.08,0.03"];',
        '  edge [color="#9e9e9e", arrowsize=0.6];',
    ]
    for i, (name, state, reason) in enumerate(zip(v.names, v.states, v.reasons, strict=True)):
        fill, border = COLOURS[state]
        tip = f"{name}: {state.value}" + (f" ({reason})" if reason and reason != state.value else "")
        lines.append(f'  t{i} [label={_dot_str(name)}, fillcolor="{fill}", color="{border}", tooltip={_dot_str(tip)}];')
    lines.extend(f"  t{u} -> t{w};" for u, w in v.edges)
    lines.append('  subgraph cluster_legend {\n    label="states"; style=dashed; color="#bdbdbd"; fontsize=10;')
    for k, (state, n) in enumerate(v.counts().items()):
        fill, border = COLOURS[state]
        label = _dot_str(f"{state.value} ({n})")
        lines.append(f'    legend{k} [label={label}, fillcolor="{fill}", color="{border}"];')
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mermaid_str(text: str) -> str:
    for a, b in (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(a, b)
    return '"' + text.replace("\n", " ") + '"'


def to_mermaid(v: View) -> str:
    """A Mermaid flowchart with a class per state."""
    lines = ["flowchart LR"]
    lines.extend(f"  t{i}[{_mermaid_str(name)}]" for i, name in enumerate(v.names))
    lines.extend(f"  t{u} --> t{w}" for u, w in v.edges)
    for state in v.counts():
        fill, border = COLOURS[state]
        cls = state.css.replace("-", "_")
        lines.append(f"  classDef {cls} fill:{fill},stroke:{border},color:#212121")
        members = ",".join(f"t{i}" for i, s in enumerate(v.states) if s is state)
        lines.append(f"  class {members} {cls}")
    return "\n".join(lines) + "\n"


def to_svg_graphviz(v: View) -> str:
    """SVG laid out by Graphviz `dot`; a UsageError (one line) when it is not installed."""
    exe = shutil.which("dot")
    if exe is None:
        raise UsageError("--format svg needs Graphviz's 'dot', which is not on PATH (install graphviz, or use html)")
    proc = subprocess.run([exe, "-Tsvg"], input=to_dot(v), capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[0]
        raise UsageError(f"Graphviz dot failed: {first}")
    return proc.stdout


# -- the built-in layout (html) -------------------------------------------------------

CHAR_W = 7.4  # px per character of a 12 px monospace font, with a little slack
BOX_H = 22
ROW = 30  # BOX_H plus the gap between rows
GAP_X = 64  # between layers, room for the edges' curves
PAD = 16
MAX_LABEL = 48  # characters; longer names are cut with "…" (the full name is in the tooltip)


@dataclass
class Box:
    """Where a task is drawn."""

    x: float
    y: float
    w: float
    label: str


def layout(v: View) -> tuple[list[Box], float, float]:
    """Boxes for every task, and the picture's width and height."""
    n = len(v.names)
    preds: list[list[int]] = [[] for _ in range(n)]
    succs: list[list[int]] = [[] for _ in range(n)]
    for u, w in v.edges:
        preds[w].append(u)
        succs[u].append(w)
    layer = [0] * n
    for i in range(n):  # the names are in topological order
        layer[i] = max((layer[p] + 1 for p in preds[i]), default=0)
    layers: list[list[int]] = [[] for _ in range(max(layer, default=-1) + 1)]
    for i in range(n):
        layers[layer[i]].append(i)
    pos = [0.0] * n

    def place(members: list[int]) -> None:
        for rank, i in enumerate(members):
            pos[i] = (rank + 0.5) / len(members)

    for members in layers:
        place(members)
    for _ in range(4):
        for members in layers[1:]:
            members.sort(key=lambda i: sum(pos[p] for p in preds[i]) / len(preds[i]) if preds[i] else pos[i])
            place(members)
        for members in reversed(layers[:-1]):
            members.sort(key=lambda i: sum(pos[s] for s in succs[i]) / len(succs[i]) if succs[i] else pos[i])
            place(members)
    labels = [name if len(name) <= MAX_LABEL else name[: MAX_LABEL - 1] + "…" for name in v.names]
    tallest = max((len(m) for m in layers), default=0)
    boxes: list[Box | None] = [None] * n
    x = float(PAD)
    for members in layers:
        width = max(len(labels[i]) for i in members) * CHAR_W + 16
        top = PAD + (tallest - len(members)) * ROW / 2
        for rank, i in enumerate(members):
            boxes[i] = Box(x, top + rank * ROW, width, labels[i])
        x += width + GAP_X
    width = x - GAP_X + PAD if layers else 2 * PAD
    height = 2 * PAD + max(tallest * ROW - (ROW - BOX_H), 0)
    return [b for b in boxes if b is not None], width, height


def to_svg(v: View) -> str:
    """An SVG drawing with the built-in layout (no Graphviz needed)."""
    boxes, width, height = layout(v)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="graph" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'width="{width:.0f}" height="{height:.0f}" font-family="ui-monospace, Menlo, Consolas, monospace" '
        'font-size="12">',
        '<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="6" markerHeight="6" '
        'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#9e9e9e"/></marker></defs>',
        '<g id="edges" fill="none" stroke="#9e9e9e" stroke-width="1">',
    ]
    mid = BOX_H / 2
    for u, w in v.edges:
        a, b = boxes[u], boxes[w]
        x1, y1, x2, y2 = a.x + a.w, a.y + mid, b.x, b.y + mid
        dx = max(24.0, (x2 - x1) / 2)
        out.append(
            f'<path class="edge" data-u="{u}" data-v="{w}" marker-end="url(#arrow)" '
            f'd="M{x1:.1f},{y1:.1f} C{x1 + dx:.1f},{y1:.1f} {x2 - dx:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"/>'
        )
    out.append("</g>")
    out.append('<g id="nodes">')
    for i, (box, state, reason) in enumerate(zip(boxes, v.states, v.reasons, strict=True)):
        fill, border = COLOURS[state]
        tip = html.escape(f"{v.names[i]}: {state.value}" + (f" ({reason})" if reason != state.value else ""))
        out.append(
            f'<g class="node {state.css}" data-i="{i}"><title>{tip}</title>'
            f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.w:.1f}" height="{BOX_H}" rx="5" '
            f'fill="{fill}" stroke="{border}"/>'
            f'<text x="{box.x + 8:.1f}" y="{box.y + mid + 4:.1f}">{html.escape(box.label)}</text></g>'
        )
    out.append("</g></svg>")
    return "\n".join(out) + "\n"


_CSS = """
body { margin: 0; font: 14px system-ui, sans-serif; color: #212121; }
header { position: sticky; top: 0; background: #fafafa; border-bottom: 1px solid #e0e0e0; padding: 8px 12px;
  display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; z-index: 1; }
header h1 { font-size: 16px; margin: 0; }
.chip { display: inline-flex; align-items: center; gap: 4px; cursor: pointer; user-select: none; }
.chip i { width: 12px; height: 12px; border-radius: 3px; border: 1px solid; display: inline-block; }
.chip.off { opacity: 0.35; }
#view { position: absolute; top: 52px; bottom: 0; left: 0; right: 0; overflow: hidden; cursor: grab; }
#view svg { width: 100%; height: 100%; }
.node { cursor: pointer; }
.dim { opacity: 0.15; }
.hit rect { stroke-width: 3; }
.edge.lit { stroke: #424242; stroke-width: 2; }
#info { font-size: 13px; color: #424242; }
"""

_JS = """
(function () {
  const svg = document.getElementById("graph");
  const view = document.getElementById("view");
  const info = document.getElementById("info");
  const nodes = Array.from(svg.querySelectorAll(".node"));
  const edges = Array.from(svg.querySelectorAll(".edge"));
  const up = DATA.names.map(() => []), down = DATA.names.map(() => []);
  for (const [u, v] of DATA.edges) { down[u].push(v); up[v].push(u); }
  const full = svg.viewBox.baseVal;
  let box = { x: full.x, y: full.y, w: full.width, h: full.height };
  function show() { svg.setAttribute("viewBox", `${box.x} ${box.y} ${box.w} ${box.h}`); }
  function fit() { box = { x: full.x, y: full.y, w: full.width, h: full.height }; show(); }
  svg.removeAttribute("width"); svg.removeAttribute("height"); fit();
  view.addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = svg.getBoundingClientRect(), k = Math.exp(e.deltaY * 0.0015);
    const s = Math.max(box.w / r.width, box.h / r.height);
    const px = box.x + (e.clientX - r.left - (r.width - box.w / s) / 2) * s;
    const py = box.y + (e.clientY - r.top - (r.height - box.h / s) / 2) * s;
    box = { x: px - (px - box.x) * k, y: py - (py - box.y) * k, w: box.w * k, h: box.h * k }; show();
  }, { passive: false });
  let drag = null;
  view.addEventListener("mousedown", (e) => { drag = { x: e.clientX, y: e.clientY, b: { ...box } }; });
  window.addEventListener("mouseup", () => { drag = null; });
  window.addEventListener("mousemove", (e) => {
    if (!drag) return;
    const r = svg.getBoundingClientRect(), s = Math.max(box.w / r.width, box.h / r.height);
    box.x = drag.b.x - (e.clientX - drag.x) * s; box.y = drag.b.y - (e.clientY - drag.y) * s; show();
  });
  function mark(keep, why) {
    nodes.forEach((n, i) => { n.classList.toggle("dim", keep !== null && !keep.has(i));
      n.classList.toggle("hit", keep !== null && keep.has(i)); });
    edges.forEach((e) => { const u = +e.dataset.u, v = +e.dataset.v;
      const lit = keep !== null && keep.has(u) && keep.has(v);
      e.classList.toggle("dim", keep !== null && !lit); e.classList.toggle("lit", lit); });
    info.textContent = why;
  }
  function cone(i) {
    const keep = new Set([i]);
    for (const adj of [up, down]) {
      const stack = [i];
      while (stack.length) { for (const j of adj[stack.pop()]) if (!keep.has(j)) { keep.add(j); stack.push(j); } }
    }
    return keep;
  }
  nodes.forEach((n, i) => n.addEventListener("click", (e) => {
    e.stopPropagation();
    mark(cone(i), `${DATA.names[i]}: ${DATA.states[i]}` + (DATA.reasons[i] !== DATA.states[i] ? ` (${DATA.reasons[i]})` : "")
      + ` - ${up[i].length} input task(s), ${down[i].length} consumer(s); click the background to clear`);
  }));
  svg.addEventListener("click", () => mark(null, ""));
  document.getElementById("search").addEventListener("input", (e) => {
    const q = e.target.value.trim().toLowerCase();
    if (!q) { mark(null, ""); return; }
    const keep = new Set(); DATA.names.forEach((n, i) => { if (n.toLowerCase().includes(q)) keep.add(i); });
    mark(keep, `${keep.size} task(s) match`);
  });
  const off = new Set();
  document.querySelectorAll(".chip").forEach((c) => c.addEventListener("click", () => {
    const s = c.dataset.state; off.has(s) ? off.delete(s) : off.add(s); c.classList.toggle("off");
    const keep = new Set(); DATA.states.forEach((st, i) => { if (!off.has(st)) keep.add(i); });
    mark(off.size ? keep : null, off.size ? `hiding: ${Array.from(off).join(", ")}` : "");
  }));
  document.getElementById("fit").addEventListener("click", fit);
})();
"""


def to_html(v: View) -> str:
    """One self-contained page: the SVG, a legend with counts, pan/zoom, search, cone highlight."""
    data = {"names": v.names, "states": [s.value for s in v.states], "reasons": v.reasons, "edges": v.edges}
    # "<" escaped so no name can close the script element
    payload = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    chips = "".join(
        f'<span class="chip" data-state="{html.escape(s.value)}"><i style="background:{COLOURS[s][0]};'
        f'border-color:{COLOURS[s][1]}"></i>{html.escape(s.value)} ({n})</span>'
        for s, n in v.counts().items()
    )
    title = html.escape(f"pipebuild graph: {v.title}")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{title}</h1><span>{len(v.names)} tasks</span>{chips}"
        '<input id="search" type="search" placeholder="find a task"><button id="fit">fit</button>'
        '<span id="info">scroll to zoom, drag to pan, click a task for its cone</span></header>\n'
        f'<div id="view">\n{to_svg(v)}</div>\n'
        f"<script>\nconst DATA = {payload};\n{_JS}</script>\n</body>\n</html>\n"
    )


FORMATS = {"dot": to_dot, "mermaid": to_mermaid, "svg": to_svg_graphviz, "html": to_html}


def render(v: View, fmt: str) -> str:
    """The picture in one of FORMATS."""
    return FORMATS[fmt](v)
