"""Errors the hail-compatible API raises, with the exact messages of spec §2 and §5.

Also the bugs pipebuild fixes on purpose: templates are never eval'd, foreign and cyclic
dependencies raise PipelineException, and a failing command fails the run.
"""

import re

import pytest

from pipebuild import Pipeline, PipelineException

TASK_METHODS = "'command' or 'declare_resource_group'"
UNDEFINED_HINT = f"\nHint: resources must be defined within the task methods {TASK_METHODS}"
GROUP_MEMBER_HINT = "\nHint: you must declare each attribute when constructing the resource group."


# --------------------------------------------------------------------------------------
# Construction


def test_pipeline_rejects_a_name_attribute():
    """Given attributes with a 'name' key, we should point the user at the name argument."""
    with pytest.raises(PipelineException) as excinfo:
        Pipeline(attributes={"name": "x"})
    assert str(excinfo.value) == "'name' is not a valid attribute. Use the name argument instead."


# --------------------------------------------------------------------------------------
# command()


def test_command_rejects_a_task_reference():
    """Given '{task}' inside a command, we should reject the Task object reference."""
    p = Pipeline()
    other, t = p.new_task(), p.new_task()
    cmd = f"echo {other}"
    with pytest.raises(PipelineException) as excinfo:
        t.command(cmd)
    assert str(excinfo.value) == f"found a reference to a Task object in command '{cmd}'."


def test_command_rejects_a_pipeline_reference():
    """Given '{pipeline}' inside a command, we should reject the Pipeline object reference."""
    p = Pipeline()
    t = p.new_task()
    cmd = f"echo {p}"
    with pytest.raises(PipelineException) as excinfo:
        t.command(cmd)
    assert str(excinfo.value) == f"found a reference to a Pipeline object in command '{cmd}'."


@pytest.mark.parametrize("kind", ["task file", "input file", "input group"])
def test_command_rejects_a_resource_from_another_pipeline(kind):
    """Given a resource of another pipeline in a command, we should name it as undefined."""
    other = Pipeline()
    if kind == "task file":
        src = other.new_task()
        src.command(f"echo > {src.ofile}")
        foreign = src.ofile
    elif kind == "input file":
        foreign = other.read_input("x.txt")
    else:
        foreign = other.read_input_group(bed="x.bed")
    t = Pipeline().new_task()
    cmd = f"cat {foreign}"
    with pytest.raises(PipelineException) as excinfo:
        t.command(cmd)
    pattern = (
        r"undefined resource '[^']+' in command '"
        + re.escape(cmd)
        + r"'\.\nHint: resources must be from the same pipeline as the current task\."
    )
    assert re.fullmatch(pattern, str(excinfo.value)), str(excinfo.value)


def test_command_rejects_an_upstream_resource_not_yet_defined():
    """Given t2 using t1.x before t1 mentions it, we should report 'x' as undefined."""
    p = Pipeline()
    t1, t2 = p.new_task(), p.new_task()
    with pytest.raises(PipelineException) as excinfo:
        t2.command(f"cat {t1.x}")
    assert str(excinfo.value) == "undefined resource 'x'" + UNDEFINED_HINT


def test_command_accepts_an_upstream_resource_once_defined():
    """Given t1 mentioning t1.x first, we should let t2 use it (and by declaration too)."""
    p = Pipeline()
    t1, t2 = p.new_task(), p.new_task()
    t1.command(f"echo > {t1.x}")
    t1.declare_resource_group(g={"bed": "{root}.bed"})
    assert t2.command(f"cat {t1.x} {t1.g.bed} {t1.g}") is t2


# --------------------------------------------------------------------------------------
# write_output()


@pytest.mark.parametrize(("value", "type_name"), [("plain.txt", "str"), (3, "int")])
def test_write_output_rejects_a_non_resource(value, type_name):
    """Given write_output of a plain value, we should accept only Resource inputs."""
    with pytest.raises(PipelineException) as excinfo:
        Pipeline().write_output(value, "dest.txt")
    expected = f"'write_output' only accepts Resource inputs. Found '<class '{type_name}'>'."
    assert str(excinfo.value) == expected


def test_write_output_rejects_a_task_file_its_task_never_mentioned():
    """Given write_output of t.ofile that t never mentioned, we should call it undefined."""
    p = Pipeline()
    t = p.new_task()
    t.command("true")
    with pytest.raises(PipelineException) as excinfo:
        p.write_output(t.ofile, "dest.txt")
    assert str(excinfo.value).startswith("undefined resource")


# --------------------------------------------------------------------------------------
# declare_resource_group() and groups


def test_declare_resource_group_rejects_a_value_that_is_not_a_dict():
    """Given a list instead of a dict, we should name the group and the type found."""
    t = Pipeline().new_task()
    with pytest.raises(PipelineException) as excinfo:
        t.declare_resource_group(g=["{root}.bed"])
    assert str(excinfo.value) == "value for name 'g' is not a dict. Found '<class 'list'>' instead."


def test_declare_resource_group_rejects_a_template_that_is_not_a_str():
    """Given an int template, we should name the member and the type found."""
    t = Pipeline().new_task()
    with pytest.raises(PipelineException) as excinfo:
        t.declare_resource_group(g={"bed": 1})
    expected = "value for name 'bed' is not a string. Found '<class 'int'>' instead."
    assert str(excinfo.value) == expected


@pytest.mark.parametrize(
    "template",
    [
        "{root}.{__import__('os').system('touch MARKER')}",
        "{__import__('os').system('touch MARKER')}",
        "{root}.{sample}",
    ],
)
def test_resource_group_template_is_never_evaluated(workdir, template):
    """Given a template holding Python code or unknown fields, we should raise, not run it."""
    marker = workdir / "pwned"
    template = template.replace("MARKER", str(marker))
    p = Pipeline()
    t = p.new_task()
    with pytest.raises(PipelineException):
        t.declare_resource_group(g={"bed": template})
        t.command(f"echo > {t.g.bed}")
        p.write_output(t.g, str(workdir / "out"))
        p.run()
    assert not marker.exists()


@pytest.mark.parametrize("access", ["attribute", "item"])
@pytest.mark.parametrize("source", ["declared", "input"])
def test_resource_group_rejects_an_unknown_member(access, source):
    """Given an undeclared member name, we should raise the hinting PipelineException."""
    p = Pipeline()
    if source == "declared":
        t = p.new_task()
        t.declare_resource_group(g={"bed": "{root}.bed"})
        rg = t.g
    else:
        rg = p.read_input_group(bed="x.bed")
    with pytest.raises(PipelineException) as excinfo:
        rg.nope if access == "attribute" else rg["nope"]
    assert str(excinfo.value) == "'nope' not found in the resource group." + GROUP_MEMBER_HINT


# --------------------------------------------------------------------------------------
# add_extension()


def test_add_extension_twice_is_rejected():
    """Given a second add_extension, we should refuse to stack extensions."""
    r = Pipeline().new_task().ofile
    r.add_extension(".txt")
    with pytest.raises(PipelineException) as excinfo:
        r.add_extension(".gz")
    assert str(excinfo.value) == "Resource already has a file extension added."


def test_add_extension_after_read_input_extension_is_rejected():
    """Given read_input(extension=...), we should count that as the one extension."""
    r = Pipeline().read_input("x", extension=".gz")
    with pytest.raises(PipelineException) as excinfo:
        r.add_extension(".txt")
    assert str(excinfo.value) == "Resource already has a file extension added."


# --------------------------------------------------------------------------------------
# Graph errors at run(): reported before anything runs


def marker_task(p, marker):
    """Add an independent task that leaves `marker` behind if it ever executes."""
    t = p.new_task("bystander")
    t.command(f"echo ran > {marker}; echo > {t.ofile}")
    return t


def test_dependency_on_another_pipelines_task_is_rejected_at_run(workdir):
    """Given depends_on a task of another pipeline, we should raise PipelineException."""
    other = Pipeline()
    foreign = other.new_task("foreign")
    foreign.command("true")
    p = Pipeline()
    t = p.new_task("local")
    t.command(f"echo ran > {workdir / 'ran'}")
    t.depends_on(foreign)
    with pytest.raises(PipelineException):
        p.run()
    assert not (workdir / "ran").exists()


@pytest.mark.parametrize("shape", ["self", "pair", "resources"])
def test_dependency_cycle_is_rejected_before_anything_runs(workdir, shape):
    """Given a cycle (self, two tasks, or via resources), we should raise and run nothing."""
    p = Pipeline()
    marker_task(p, workdir / "ran")
    a = p.new_task("a")
    b = p.new_task("b")
    if shape == "self":
        a.command("true").depends_on(a)
        b.command("true")
    elif shape == "pair":
        a.command("true").depends_on(b)
        b.command("true").depends_on(a)
    else:
        a.command(f"echo a > {a.ofile}")
        b.command(f"cat {a.ofile} > {b.ofile}")
        a.command(f"cat {b.ofile} > /dev/null")
    with pytest.raises(PipelineException) as excinfo:
        p.run()
    assert str(excinfo.value).startswith("cycle detected in dependency graph")
    assert not (workdir / "ran").exists()


def test_missing_input_file_is_reported_at_run(workdir):
    """Given read_input of a file that does not exist, we should raise at run and run nothing."""
    p = Pipeline()
    marker_task(p, workdir / "ran")
    inp = p.read_input(str(workdir / "missing.txt"))
    t = p.new_task("reader")
    t.command(f"cat {inp} > {t.ofile}")
    p.write_output(t.ofile, str(workdir / "out.txt"))
    with pytest.raises(PipelineException) as excinfo:
        p.run()
    assert "missing.txt" in str(excinfo.value)
    assert not (workdir / "ran").exists()
    assert not (workdir / "out.txt").exists()


# --------------------------------------------------------------------------------------
# Task failure (hail ran without set -e; pipebuild uses set -euo pipefail)


@pytest.mark.parametrize(
    "template",
    [
        "false; echo ok > {out}",
        "false | cat > {out}",
        "echo $PIPEBUILD_TEST_UNSET_VARIABLE > {out}",
    ],
    ids=["errexit", "pipefail", "nounset"],
)
def test_failing_middle_command_fails_the_run(workdir, template):
    """Given a middle task whose command fails early, we should fail naming it, publish nothing."""
    p = Pipeline()
    first = p.new_task("first")
    first.command(f"echo 1 > {first.ofile}")
    middle = p.new_task("breaks")
    middle.command(f"cat {first.ofile} > /dev/null")
    middle.command(template.format(out=middle.ofile))
    last = p.new_task("last")
    last.command(f"cat {middle.ofile} > {last.ofile}; echo ran > {workdir / 'ran'}")
    p.write_output(middle.ofile, str(workdir / "middle.txt"))
    p.write_output(last.ofile, str(workdir / "last.txt"))
    with pytest.raises(PipelineException) as excinfo:
        p.run()
    assert "breaks" in str(excinfo.value)
    assert not (workdir / "middle.txt").exists()
    assert not (workdir / "last.txt").exists()
    assert not (workdir / "ran").exists()
