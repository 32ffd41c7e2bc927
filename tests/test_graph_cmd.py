"""`pipebuild graph`: the task graph coloured by state, as DOT, Mermaid, SVG and HTML.

Oracles: the states follow from edits whose effect is known (an input changed, a task
failed, a task added), the colours are graphview.COLOURS, XML well-formedness is checked
by ElementTree, and readability of the built-in layout is geometry: no two boxes overlap
and every edge points right.
"""

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipebuild.cli import app
from pipebuild.graphview import BOX_H, COLOURS, State, View, layout, to_svg

PIPEBUILD = str(Path(sys.executable).parent / "pipebuild")
SVG = "{http://www.w3.org/2000/svg}"

# src -> up -> count; other is independent; flaky fails while FLAG exists; late is added later
PIPEFILE = """\
from pipebuild import Pipeline

p = Pipeline(name="states")
src = p.read_input("in.txt")
up = p.new_task(name="up")
up.command(f"tr a-z A-Z < {src} > {up.ofile}")
p.write_output(up.ofile, "out/up.txt")
count = p.new_task(name="count")
count.command(f"wc -c < {up.ofile} > {count.ofile}")
p.write_output(count.ofile, "out/count.txt")
other = p.new_task(name="other")
other.command(f"echo other > {other.ofile}")
p.write_output(other.ofile, "out/other.txt")
flaky = p.new_task(name="flaky")
flaky.command(f"if test -e FLAG; then exit 1; fi; echo ok > {flaky.ofile}")
p.write_output(flaky.ofile, "out/flaky.txt")
"""

LATE = """
late = p.new_task(name="late")
late.command(f"echo late > {late.ofile}")
p.write_output(late.ofile, "out/late.txt")
"""


def invoke(*args: str):  # type: ignore[no-untyped-def]
    """Run the CLI in-process (the cwd is restored afterwards)."""
    cwd = os.getcwd()
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        os.chdir(cwd)


@pytest.fixture
def states_project(workdir):  # type: ignore[no-untyped-def]
    """Every state at once: up stale (input changed), count after a stale task, other up to date,
    flaky failed last time, late never built."""
    (workdir / "in.txt").write_text("hello\n")
    (workdir / "Pipefile.py").write_text(PIPEFILE.replace("FLAG", str(workdir / "flag")))
    (workdir / "flag").write_text("")
    assert invoke("make", "-k", "-j1").exit_code == 1
    (workdir / "in.txt").write_text("changed\n")
    (workdir / "Pipefile.py").write_text((workdir / "Pipefile.py").read_text() + LATE)
    return workdir


EXPECTED = {
    "up": State.STALE,
    "count": State.WAITING,
    "other": State.UP_TO_DATE,
    "flaky": State.FAILED,
    "late": State.NEVER_BUILT,
}


def dot_states(text: str) -> dict[str, State]:
    """Task name -> state, read back from the fill colours of a DOT file."""
    by_fill = {fill: state for state, (fill, _) in COLOURS.items()}
    found = {}
    for m in re.finditer(r'^  t\d+ \[label="([^"]+)", fillcolor="(#[0-9a-f]{6})"', text, re.M):
        found[m.group(1)] = by_fill[m.group(2)]
    return found


def test_dot_colours_each_task_by_its_state(states_project):
    """Given tasks in every state, the DOT output should colour each one by its state and draw the edges."""
    result = invoke("graph")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("digraph pipebuild {")
    assert dot_states(result.stdout) == EXPECTED
    names = dict(re.findall(r'^  (t\d+) \[label="([^"]+)"', result.stdout, re.M))
    edges = {(names[a], names[b]) for a, b in re.findall(r"^  (t\d+) -> (t\d+);", result.stdout, re.M)}
    assert edges == {("up", "count")}
    assert "legend" in result.stdout and "failed last time (1)" in result.stdout


def test_a_deleted_output_is_restorable(states_project):
    """Given an up-to-date task whose destination was deleted, its state should be 'restorable'."""
    (states_project / "out" / "other.txt").unlink()
    assert dot_states(invoke("graph").stdout)["other"] is State.RESTORE


def test_target_limits_the_graph_to_its_cone(states_project):
    """Given a target, only it and its upstream tasks should be drawn."""
    result = invoke("graph", "out/count.txt", "--format", "dot")
    assert set(dot_states(result.stdout)) == {"up", "count"}


def test_mermaid_assigns_a_class_per_state(states_project):
    """Given --format mermaid, each task should be a node in the class of its state."""
    result = invoke("graph", "-F", "mermaid")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith("flowchart LR\n")
    ids = dict(re.findall(r'^  (t\d+)\["([^"]+)"\]$', text, re.M))
    classes = {}
    for members, cls in re.findall(r"^  class (\S+) (\S+)$", text, re.M):
        for m in members.split(","):
            classes[ids[m]] = cls
    assert classes == {name: state.css.replace("-", "_") for name, state in EXPECTED.items()}
    ((a, b),) = re.findall(r"^  (t\d+) --> (t\d+)$", text, re.M)
    assert (ids[a], ids[b]) == ("up", "count")


def test_html_is_one_self_contained_file(states_project, tmp_path):
    """Given --format html -o FILE, the file should need nothing else: no external script, style,
    font or image, an inline SVG that is well-formed XML with one box per task in its state's colours."""
    out = tmp_path / "graph.html"
    result = invoke("graph", "--format", "html", "-o", str(out))
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=|<link|@import|url\((?!#)""", page), "refers to something outside"
    urls = set(re.findall(r"https?://[^\s\"')]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls  # the SVG namespace is a name, not a download
    svg = ET.fromstring(page[page.index("<svg") : page.index("</svg>") + len("</svg>")])
    boxes = {}
    for g in svg.iter(SVG + "g"):
        if "node" in g.get("class", "").split():
            boxes[g.find(SVG + "text").text] = g.find(SVG + "rect").get("fill")
    assert boxes == {name: COLOURS[state][0] for name, state in EXPECTED.items()}
    assert len([p for p in svg.iter(SVG + "path") if p.get("class") == "edge"]) == 1
    assert "const DATA = " in page and "addEventListener" in page


def test_html_escapes_names_that_look_like_markup(workdir):
    """Given a task name with <, & and quotes, the page should stay well-formed and show the name."""
    (workdir / "Pipefile.py").write_text(
        "from pipebuild import Pipeline\np = Pipeline()\n"
        "t = p.new_task(name='</script><b>&\"x\"')\nt.command(f'echo > {t.ofile}')\n"
        "p.write_output(t.ofile, 'o.txt')\n"
    )
    page = invoke("graph", "-F", "html").stdout
    assert page.count("</script>") == 1
    svg = ET.fromstring(page[page.index("<svg") : page.index("</svg>") + 6])
    assert [t.text for t in svg.iter(SVG + "text")] == ['</script><b>&"x"']
    dot = invoke("graph").stdout
    assert 'label="</script><b>&\\"x\\""' in dot


def wide_view(n_chains: int = 60, depth: int = 5) -> View:
    """A fan-out / chains / fan-in graph of n_chains * depth + 2 tasks (topological order)."""
    names, edges = ["split"], []
    last = []
    for c in range(n_chains):
        prev = 0
        for d in range(depth):
            names.append(f"chain{c:03d}-step{d}-{'x' * (c % 7)}")
            edges.append((prev, len(names) - 1))
            prev = len(names) - 1
        last.append(prev)
    names.append("merge")
    edges.extend((i, len(names) - 1) for i in last)
    states = [list(State)[i % len(State)] for i in range(len(names))]
    return View("wide", names, states, [s.value for s in states], edges)


def test_built_in_layout_stays_readable_at_hundreds_of_tasks():
    """Given 302 tasks, no two boxes should overlap, every edge should point right (left to right
    is upstream to downstream), and every box should lie inside the picture."""
    v = wide_view()
    boxes, width, height = layout(v)
    assert len(boxes) == 302
    for u, w in v.edges:
        assert boxes[u].x + boxes[u].w < boxes[w].x, (v.names[u], v.names[w])
    ordered = sorted(boxes, key=lambda b: (b.x, b.y))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.x == b.x:
            assert a.y + BOX_H < b.y, (a, b)
    columns = sorted({(b.x, b.w) for b in boxes})
    for (x1, w1), (x2, _) in zip(columns, columns[1:], strict=False):
        assert x1 + w1 < x2
    for b in boxes:
        assert 0 <= b.x and b.x + b.w <= width and 0 <= b.y and b.y + BOX_H <= height
    svg = ET.fromstring(to_svg(v))
    assert len([g for g in svg.iter(SVG + "g") if "node" in g.get("class", "")]) == 302


def test_barycentre_ordering_untangles_crossed_chains():
    """Given two chains created crosswise (a1 feeds b2, a2 feeds b1), the layout should put each
    consumer level with its producer, so the edges do not cross."""
    v = View("x", ["a1", "a2", "b2", "b1"], [State.STALE] * 4, ["stale"] * 4, [(0, 3), (1, 2)])
    boxes, _, _ = layout(v)
    assert boxes[0].y == boxes[3].y and boxes[1].y == boxes[2].y


def test_svg_uses_graphviz(states_project):
    """Given Graphviz's dot on PATH, --format svg should be dot's SVG with every task in it."""
    result = invoke("graph", "--format", "svg")
    assert result.exit_code == 0, result.output
    svg = ET.fromstring(result.stdout.encode())
    labels = {t.text for t in svg.iter(SVG + "text")}
    assert set(EXPECTED) <= labels, labels
    fills = {p.get("fill") for p in svg.iter(SVG + "path")} | {p.get("fill") for p in svg.iter(SVG + "polygon")}
    assert COLOURS[State.FAILED][0] in fills


def test_svg_without_graphviz_is_one_line_and_exit_2(states_project, tmp_path):
    """Given no dot on PATH, --format svg should say so in one line and exit 2, writing nothing."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    proc = subprocess.run(
        [PIPEBUILD, "graph", "--format", "svg"], cwd=states_project, capture_output=True, text=True, env=env, timeout=30
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Graphviz" in lines[0] and "dot" in lines[0], proc.stderr


def test_output_path_is_relative_to_where_the_command_ran(states_project, tmp_path):
    """Given -C DIR and -o a relative path, the file should land relative to the starting directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    result = invoke("graph", "-C", str(states_project), "-o", "g.dot")
    assert result.exit_code == 0, result.output
    assert (elsewhere / "g.dot").read_text().startswith("digraph")
    assert not (states_project / "g.dot").exists()
