"""Behaviour of the hail-compatible API: construction, resources, and runs on a LocalBackend.

Oracles come from the spec (shared/spec/hail-pipeline-api.md §2) and from the bytes the
commands are known to write. Error messages live in test_api_errors.py.
"""

import gc
import inspect
import subprocess

import pytest

import pipebuild
import pipebuild.backend
import pipebuild.exceptions
import pipebuild.pipeline
from pipebuild import BatchBackend, LocalBackend, Pipeline, PipelineException
from pipebuild.backend import Backend
from pipebuild.resource import (
    InputResourceFile,
    Resource,
    ResourceFile,
    ResourceGroup,
    TaskResourceFile,
)
from pipebuild.task import Task

# --------------------------------------------------------------------------------------
# Module surface and constructors


def test_package_exports_the_four_hail_names():
    """Given the package, we should export exactly the names hailtop.pipeline exported."""
    assert set(pipebuild.__all__) == {
        "Pipeline",
        "LocalBackend",
        "BatchBackend",
        "PipelineException",
    }
    assert pipebuild.Pipeline is pipebuild.pipeline.Pipeline
    assert pipebuild.LocalBackend is pipebuild.backend.LocalBackend
    assert pipebuild.BatchBackend is pipebuild.backend.BatchBackend
    assert pipebuild.PipelineException is pipebuild.exceptions.PipelineException


def test_backends_share_the_backend_base():
    """Given both backends, we should find them under the abstract Backend."""
    assert issubclass(LocalBackend, Backend)
    assert issubclass(BatchBackend, Backend)
    assert isinstance(LocalBackend(), Backend)


def test_resource_classes_form_the_documented_hierarchy():
    """Given the resource classes, we should see files as str subclasses under Resource."""
    assert issubclass(ResourceFile, Resource)
    assert issubclass(ResourceFile, str)
    assert issubclass(InputResourceFile, ResourceFile)
    assert issubclass(TaskResourceFile, ResourceFile)
    assert issubclass(ResourceGroup, Resource)
    assert not issubclass(ResourceGroup, str)


def test_pipeline_exception_keeps_its_message():
    """Given a PipelineException, we should keep the message in .msg and in str()."""
    err = PipelineException("boom")
    assert isinstance(err, Exception)
    assert err.msg == "boom"
    assert str(err) == "boom"
    assert PipelineException().msg == ""


def test_pipeline_constructor_has_the_hail_signature():
    """Given Pipeline's constructor, we should accept the hail arguments, all defaulting to None."""
    params = list(inspect.signature(Pipeline).parameters.values())
    assert [p.name for p in params] == [
        "name",
        "backend",
        "attributes",
        "default_image",
        "default_memory",
        "default_cpu",
        "default_storage",
        "default_timeout",
    ]
    assert all(p.default is None for p in params)


def test_new_task_has_the_hail_signature():
    """Given Pipeline.new_task, we should accept name and attributes, both defaulting to None."""
    params = list(inspect.signature(Pipeline().new_task).parameters.values())
    assert [(p.name, p.default) for p in params] == [("name", None), ("attributes", None)]


def test_pipeline_keeps_its_name_and_attributes():
    """Given name and attributes, we should expose them as public attributes ({} by default)."""
    p = Pipeline(name="tutorial", attributes={"owner": "me"})
    assert p.name == "tutorial"
    assert p.attributes == {"owner": "me"}
    bare = Pipeline()
    assert bare.name is None
    assert bare.attributes == {}


def test_new_task_keeps_its_name_and_attributes():
    """Given new_task(name, attributes), we should return a Task exposing both ({} by default)."""
    p = Pipeline()
    t = p.new_task(name="align", attributes={"sample": "s1"})
    assert isinstance(t, Task)
    assert t.name == "align"
    assert t.attributes == {"sample": "s1"}
    bare = p.new_task()
    assert bare.name is None
    assert bare.attributes == {}


def test_task_attributes_may_contain_a_name_key():
    """Given a task attribute called 'name', we should accept it (only Pipeline rejects it)."""
    t = Pipeline().new_task(attributes={"name": "x"})
    assert t.attributes == {"name": "x"}


# --------------------------------------------------------------------------------------
# Task setters


def test_setters_return_the_task_so_calls_chain():
    """Given every Task setter, we should get the same task back so calls chain."""
    p = Pipeline(backend=LocalBackend())
    other = p.new_task()
    t = p.new_task()
    assert t.command("true") is t
    assert t.declare_resource_group(g={"bed": "{root}.bed"}) is t
    assert t.depends_on(other) is t
    assert t.storage("10G") is t
    assert t.memory("4G") is t
    assert t.cpu(2) is t
    assert t.image("ubuntu:22.04") is t
    assert t.always_run() is t
    assert t.timeout(60) is t
    chained = p.new_task().command("true").memory("1G").cpu(1).storage("1G").always_run()
    assert isinstance(chained, Task)


def test_memory_and_cpu_are_stored_as_str():
    """Given numeric memory and cpu, we should store them as str, as hail did."""
    t = Pipeline().new_task().memory(4).cpu(0.5)
    assert t._memory == "4"
    assert t._cpu == "0.5"
    t.memory("3.75Gi").cpu(2)
    assert t._memory == "3.75Gi"
    assert t._cpu == "2"


def test_pipeline_defaults_apply_to_every_new_task():
    """Given default_* on the Pipeline, we should apply them to each new task, overridable."""
    p = Pipeline(default_image="debian:12", default_memory=2, default_cpu=1, default_storage="5G")
    t = p.new_task()
    assert t._image == "debian:12"
    assert t._memory == "2"
    assert t._cpu == "1"
    assert t._storage == "5G"
    assert p.new_task().image("ubuntu:22.04")._image == "ubuntu:22.04"


def test_default_timeout_applies_with_a_local_backend():
    """Given default_timeout and a LocalBackend, we should create tasks (hail raised here)."""
    p = Pipeline(backend=LocalBackend(), default_timeout=30)
    t = p.new_task()
    assert isinstance(t, Task)


def test_always_run_and_timeout_run_on_a_local_backend(workdir):
    """Given always_run, timeout and default_timeout on Local, we should run and publish."""
    p = Pipeline(backend=LocalBackend(), default_timeout=60)
    t = p.new_task("tolerant").always_run().timeout(30)
    t.command(f"echo fine > {t.ofile}")
    p.write_output(t.ofile, str(workdir / "out.txt"))
    p.run()
    assert (workdir / "out.txt").read_text() == "fine\n"


# --------------------------------------------------------------------------------------
# Resources


def test_task_resource_file_is_a_str_usable_in_fstrings():
    """Given t.ofile, we should get a TaskResourceFile that formats to its own str value."""
    t = Pipeline().new_task()
    r = t.ofile
    assert isinstance(r, TaskResourceFile)
    assert isinstance(r, str)
    assert str(r) != ""
    assert f"cat {r}" == "cat " + str(r)


def test_task_resources_are_the_same_object_by_attribute_and_item():
    """Given t.ofile and t['ofile'], we should get one object; any string is a valid name."""
    t = Pipeline().new_task()
    assert t.ofile is t["ofile"]
    assert t.ofile is t.ofile
    spaced = t["any name"]
    assert isinstance(spaced, TaskResourceFile)
    assert spaced is t["any name"]
    assert spaced is not t.ofile
    assert str(spaced) != str(t.ofile)


def test_resources_of_distinct_tasks_are_distinct():
    """Given the same resource name on two tasks, we should get two distinct resources."""
    p = Pipeline()
    a, b = p.new_task(), p.new_task()
    assert a.ofile is not b.ofile
    assert str(a.ofile) != str(b.ofile)


def test_declared_group_members_are_reachable_by_attribute_and_item():
    """Given declare_resource_group, we should reach each member by attribute and by item."""
    t = Pipeline().new_task()
    t.declare_resource_group(bfile={"bed": "{root}.bed", "bim": "{root}.bim"})
    rg = t.bfile
    assert isinstance(rg, ResourceGroup)
    assert rg is t["bfile"]
    assert isinstance(rg.bed, TaskResourceFile)
    assert rg.bed is rg["bed"]
    assert rg.bim is rg["bim"]
    assert rg.bed is not rg.bim


def test_resource_group_formats_and_concatenates_as_one_string():
    """Given a group, we should format it to a non-empty str and concatenate with str."""
    t = Pipeline().new_task()
    t.declare_resource_group(bfile={"bed": "{root}.bed"})
    rg = t.bfile
    root = f"{rg}"
    assert root != ""
    assert root == str(rg)
    assert rg + ".bed" == root + ".bed"
    assert "--bfile " + rg == "--bfile " + root


def test_read_input_returns_an_unchecked_input_resource_file():
    """Given read_input of a path that does not exist, we should still get an input file."""
    r = Pipeline().read_input("no/such/file.txt")
    assert isinstance(r, InputResourceFile)
    assert isinstance(r, str)


def test_read_input_group_allows_names_that_are_not_identifiers():
    """Given read_input_group(**{'txt.gz': p}), we should reach the member as rg['txt.gz']."""
    rg = Pipeline().read_input_group(**{"txt.gz": "data/x.txt.gz", "bed": "data/x.bed"})
    assert isinstance(rg, ResourceGroup)
    assert isinstance(rg["txt.gz"], InputResourceFile)
    assert rg.bed is rg["bed"]
    assert rg["txt.gz"] is not rg.bed


def test_add_extension_returns_the_resource():
    """Given add_extension on a fresh resource, we should get the same resource back."""
    t = Pipeline().new_task()
    r = t.ofile
    assert r.add_extension(".txt") is r


def test_select_tasks_matches_names_from_the_start_in_creation_order():
    """Given named and unnamed tasks, we should re.match names in creation order."""
    p = Pipeline()
    a1 = p.new_task("align-1")
    p.new_task()
    x = p.new_task("x-align")
    a2 = p.new_task("align-2")
    a10 = p.new_task("align10")
    assert p.select_tasks("align") == [a1, a2, a10]
    assert p.select_tasks(r"align-\d") == [a1, a2]
    assert p.select_tasks(".*align") == [a1, x, a2, a10]
    assert p.select_tasks(".*") == [a1, x, a2, a10]
    assert p.select_tasks("nothing") == []


def test_a_100000_task_chain_dry_runs_without_recursion_error(workdir, capsys):
    """Given a 100,000-task resource chain, we should dry-run it without a RecursionError."""
    # The cyclic GC dominates here (about 16 s with it, 5 s without, on 2 cores) and has
    # nothing to do with recursion depth, so it is off while the chain is built and planned.
    # Each command differs ('echo i') so that tasks with look-alike commands do not share a
    # display name; that case is much slower and is not what this test is about.
    gc.disable()
    try:
        p = Pipeline()
        prev = p.new_task("first")
        prev.command(f"echo first-step > {prev.ofile}")
        for i in range(99_998):
            t = p.new_task()
            t.command(f"cat {prev.ofile} > {t.ofile}; echo {i}")
            prev = t
        last = p.new_task("last")
        last.command(f"cat {prev.ofile} > {last.ofile}; echo last-step")
        p.run(dry_run=True)
    finally:
        gc.enable()
    out = capsys.readouterr().out
    assert out.index("first-step") < out.index("echo 50000") < out.index("last-step")


# --------------------------------------------------------------------------------------
# Running on a LocalBackend


def tutorial_pipeline(dest):
    """The seed tutorial shape: one task writes a file, a second reads it, publish to dest."""
    p = Pipeline(name="tutorial", backend=LocalBackend())
    t1 = p.new_task("hello")
    t1.command(f"echo hello > {t1.ofile}")
    t2 = p.new_task("world")
    t2.command(f"cat {t1.ofile} > {t2.ofile}")
    t2.command(f"echo world >> {t2.ofile}")
    p.write_output(t2.ofile, str(dest))
    return p


def test_two_task_pipeline_publishes_its_output(workdir):
    """Given a task reading another task's output, we should publish the combined bytes."""
    tutorial_pipeline(workdir / "out.txt").run()
    assert (workdir / "out.txt").read_text() == "hello\nworld\n"


def test_default_backend_runs_locally(workdir):
    """Given Pipeline() with no backend, we should run the task on the local host."""
    p = Pipeline()
    t = p.new_task()
    t.command(f"printf local > {t.ofile}")
    p.write_output(t.ofile, str(workdir / "out.txt"))
    p.run()
    assert (workdir / "out.txt").read_text() == "local"


def test_write_output_creates_missing_parent_directories(workdir):
    """Given a destination under directories that do not exist, we should create them."""
    dest = workdir / "deep" / "er" / "out.txt"
    tutorial_pipeline(dest).run()
    assert dest.read_text() == "hello\nworld\n"


def test_read_input_is_readable_in_a_command(workdir):
    """Given read_input of a file, we should let a command read its bytes."""
    (workdir / "in.txt").write_text("input bytes\n")
    p = Pipeline()
    inp = p.read_input(str(workdir / "in.txt"))
    t = p.new_task()
    t.command(f"tr a-z A-Z < {inp} > {t.ofile}")
    p.write_output(t.ofile, str(workdir / "out.txt"))
    p.run()
    assert (workdir / "out.txt").read_text() == "INPUT BYTES\n"


def test_read_input_accepts_a_relative_path(workdir):
    """Given read_input of a path relative to the cwd, we should read that file."""
    (workdir / "data").mkdir()
    (workdir / "data" / "in.txt").write_text("rel\n")
    p = Pipeline()
    inp = p.read_input("data/in.txt")
    t = p.new_task()
    t.command(f"cat {inp} > {t.ofile}")
    p.write_output(t.ofile, "out.txt")
    p.run()
    assert (workdir / "out.txt").read_text() == "rel\n"


def test_input_written_to_an_output_is_copied(workdir):
    """Given write_output of an input resource, we should copy the input's bytes there."""
    (workdir / "in.txt").write_text("as is\n")
    p = Pipeline()
    p.write_output(p.read_input(str(workdir / "in.txt")), str(workdir / "copy.txt"))
    p.run()
    assert (workdir / "copy.txt").read_text() == "as is\n"


def test_input_group_root_and_members_reach_the_files(workdir):
    """Given read_input_group, we should reach members by name and via '{rg}.<name>'."""
    (workdir / "x.bed").write_text("BED\n")
    (workdir / "x.bim").write_text("BIM\n")
    p = Pipeline()
    rg = p.read_input_group(bed=str(workdir / "x.bed"), bim=str(workdir / "x.bim"))
    t = p.new_task()
    t.command(f"cat {rg.bim} {rg}.bed {rg['bed']} > {t.ofile}")
    p.write_output(t.ofile, str(workdir / "out.txt"))
    p.run()
    assert (workdir / "out.txt").read_text() == "BIM\nBED\nBED\n"


def test_declared_group_is_published_with_member_extensions(workdir):
    """Given a declared '{root}.bed' group, we should publish it as <dest>.bed, <dest>.bim."""
    p = Pipeline()
    t = p.new_task("plink")
    t.declare_resource_group(bfile={"bed": "{root}.bed", "bim": "{root}.bim"})
    t.command(f"echo bed > {t.bfile.bed}; echo bim > {t.bfile}.bim")
    p.write_output(t.bfile, str(workdir / "out"))
    p.run()
    assert (workdir / "out.bed").read_text() == "bed\n"
    assert (workdir / "out.bim").read_text() == "bim\n"


def test_downstream_task_reads_a_whole_group_by_its_root(workdir):
    """Given a downstream command using '{rg}.bim', we should see the upstream group file."""
    p = Pipeline()
    t1 = p.new_task("make")
    t1.declare_resource_group(bfile={"bed": "{root}.bed", "bim": "{root}.bim"})
    t1.command(f"echo bed > {t1.bfile.bed}; echo bim > {t1.bfile.bim}")
    t2 = p.new_task("use")
    t2.command(f"cat {t1.bfile.bed} {t1.bfile}.bim > {t2.ofile}")
    p.write_output(t2.ofile, str(workdir / "out.txt"))
    p.run()
    assert (workdir / "out.txt").read_text() == "bed\nbim\n"


def test_write_output_twice_publishes_to_both_destinations(workdir):
    """Given two write_output calls for one file, we should publish to both destinations."""
    p = Pipeline()
    t = p.new_task()
    t.command(f"echo twice > {t.ofile}")
    p.write_output(t.ofile, str(workdir / "a.txt"))
    p.write_output(t.ofile, str(workdir / "b" / "b.txt"))
    p.run()
    assert (workdir / "a.txt").read_text() == "twice\n"
    assert (workdir / "b" / "b.txt").read_text() == "twice\n"


def test_resource_name_with_a_space_works_inside_user_quotes(workdir):
    """Given t['out file'] used inside double quotes, we should write and publish it."""
    p = Pipeline()
    t = p.new_task()
    t.command(f'echo spaced > "{t["out file"]}"')
    p.write_output(t["out file"], str(workdir / "out.txt"))
    p.run()
    assert (workdir / "out.txt").read_text() == "spaced\n"


def test_added_extension_is_part_of_the_path_a_command_sees(workdir):
    """Given add_extension('.txt'), we should see a path ending in '.txt' in the command."""
    p = Pipeline()
    t = p.new_task()
    t.ofile.add_extension(".txt")
    t.command(f"echo x > {t.ofile}; basename {t.ofile} > {t.name_file}")
    p.write_output(t.name_file, str(workdir / "name.txt"))
    p.run()
    assert (workdir / "name.txt").read_text().endswith(".txt\n")


def test_read_input_extension_is_part_of_the_path_a_command_sees(workdir):
    """Given read_input(extension='.gz'), we should see a path ending in '.gz'."""
    (workdir / "blob").write_text("b")
    p = Pipeline()
    inp = p.read_input(str(workdir / "blob"), extension=".gz")
    t = p.new_task()
    t.command(f"basename {inp} > {t.ofile}")
    p.write_output(t.ofile, str(workdir / "name.txt"))
    p.run()
    assert (workdir / "name.txt").read_text().endswith(".gz\n")


def test_dry_run_prints_a_script_and_publishes_nothing(workdir, capsys):
    """Given run(dry_run=True), we should print the commands and create no destination."""
    tutorial_pipeline(workdir / "out.txt").run(dry_run=True)
    out = capsys.readouterr().out
    assert "echo hello" in out
    assert "echo world" in out
    assert not (workdir / "out.txt").exists()


def test_dry_run_script_reproduces_the_run_when_fed_to_bash(workdir, capsys):
    """Given the printed dry-run script, we should get the real run's output by running it."""
    tutorial_pipeline(workdir / "out.txt").run(dry_run=True)
    script = capsys.readouterr().out
    (workdir / "dry.sh").write_text(script)
    subprocess.run(["bash", str(workdir / "dry.sh")], cwd=workdir, check=True, timeout=20)
    assert (workdir / "out.txt").read_text() == "hello\nworld\n"


def counting_pipeline(workdir):
    """A one-task pipeline that appends a line to counter.txt (not an output) per execution."""
    counter = workdir / "counter.txt"
    p = Pipeline()
    t = p.new_task("count")
    t.command(f"echo x >> {counter}; echo hi > {t.ofile}")
    p.write_output(t.ofile, str(workdir / "out.txt"))
    return p


def test_second_run_of_an_identical_pipeline_runs_nothing(workdir):
    """Given the same pipeline built twice in one directory, we should execute it once."""
    counting_pipeline(workdir).run()
    counting_pipeline(workdir).run()
    assert (workdir / "counter.txt").read_text() == "x\n"
    assert (workdir / "out.txt").read_text() == "hi\n"


def test_second_run_of_the_same_pipeline_object_runs_nothing(workdir):
    """Given p.run() called twice on one pipeline, we should execute its task once."""
    p = counting_pipeline(workdir)
    p.run()
    p.run()
    assert (workdir / "counter.txt").read_text() == "x\n"
    assert (workdir / "out.txt").read_text() == "hi\n"


def test_cache_lives_in_the_working_directory(workdir):
    """Given a run, we should keep pipebuild's cache under ./.pipebuild of the cwd."""
    tutorial_pipeline(workdir / "out.txt").run()
    assert (workdir / ".pipebuild").is_dir()


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_flag_does_not_change_the_outputs(workdir, verbose):
    """Given run(verbose=...), we should publish the same bytes either way."""
    tutorial_pipeline(workdir / "out.txt").run(verbose=verbose)
    assert (workdir / "out.txt").read_text() == "hello\nworld\n"
