"""Tasks with an image run in Docker (pipebuild/executors/docker.py), against a real dockerd.

The image `pipebuild-test:bash` is built locally by tests/build_test_images.sh (busybox and
the host's bash, `docker import`ed: no registry). These tests skip when Docker, the `docker`
package or the image is missing, and fail instead when PIPEBUILD_REQUIRE_DOCKER=1 (.ci/run
sets it), so a green CI means they ran. Oracles: the cgroup files Docker writes for a limit,
`id -u` and file ownership, the daemon's own container list, and the exit statuses and
one-line errors of pipebuild/cli.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import docker_client_with, unavailable

from pipebuild.executors.docker import parse_cpu, parse_quantity, parse_run_flags

IMAGE = "pipebuild-test:bash"
TIMEOUT = 60
WORKSPACE_LABEL = "pipebuild.workspace"


@pytest.fixture(scope="module")
def docker_sdk():  # type: ignore[no-untyped-def]
    """The `docker` package."""
    try:
        import docker
    except ImportError:
        unavailable("the 'docker' package is not installed")
    return docker


@pytest.fixture(scope="module")
def client():  # type: ignore[no-untyped-def]
    """A client of a running dockerd that has the test image (built here if missing)."""
    c = docker_client_with(IMAGE)
    yield c
    c.close()


def make(root: Path, *args: str, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    """`pipebuild make ARGS` as a subprocess in `root`; `env` adds variables (None removes one)."""
    full = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run(
        [sys.executable, "-m", "pipebuild", "make", *args],
        cwd=root, capture_output=True, text=True, timeout=TIMEOUT, env=full, check=False,
    )  # fmt: skip


def pipefile(root: Path, body: str, header: str = "p = Pipeline()") -> None:
    """Write a Pipefile: imports, then `header`, then `body`."""
    root.mkdir(parents=True, exist_ok=True)
    text = "from pipebuild import LocalBackend, Pipeline\n\n" + header + "\n" + textwrap.dedent(body)
    (root / "Pipefile.py").write_text(text)


def containers(client, root: Path) -> list:  # type: ignore[no-untyped-def]
    """Containers (running or not) that a build in `root` started."""
    ws = str(root / ".pipebuild")
    return client.containers.list(all=True, filters={"label": f"{WORKSPACE_LABEL}={ws}"})


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The single line a usage or definition error prints."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    return lines[0]


# -- units: no Docker needed -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500M", 500 * 10**6),
        ("4G", 4 * 10**9),
        ("3.75Gi", int(3.75 * 2**30)),
        ("1k", 1000),
        ("2Ki", 2048),
        ("4GB", 4 * 10**9),
        ("1", 10**9),
        ("0.5", 5 * 10**8),
        (2, 2 * 10**9),
        ("512m", 512 * 2**20),
        ("+1Mi", 2**20),
    ],
)
def test_quantities_follow_kubernetes_and_bare_numbers_are_gb(text, expected):
    """Given k8s-style quantities, we should get bytes; a bare number is GB as the original docs say."""
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "4 GB x", "-1G", "1.2.3", "G"])
def test_bad_quantities_are_refused(text):
    """Given a malformed quantity, we should refuse it."""
    with pytest.raises(ValueError, match="not a quantity"):
        parse_quantity(text)


@pytest.mark.parametrize(("text", "expected"), [("0.5", 0.5), ("2", 2.0), ("500m", 0.5), (1, 1.0)])
def test_cpu_takes_cores_or_millicores(text, expected):
    """Given cores or millicores, we should get cores."""
    assert parse_cpu(text) == expected


@pytest.mark.parametrize("text", ["0", "0m", "two", "-1"])
def test_bad_cpu_is_refused(text):
    """Given zero or garbage, we should refuse it."""
    with pytest.raises(ValueError):
        parse_cpu(text)


def test_run_flags_map_to_sdk_arguments(tmp_path):
    """Given a flag string, we should get the SDK's keyword arguments."""
    os.environ["PB_TEST_PASSED_ENV"] = "from-host"
    try:
        got = parse_run_flags(
            f"-e A=1 --env=B=two -e PB_TEST_PASSED_ENV -v {tmp_path}:/data:ro --network host "
            "--add-host db:10.0.0.1 --cap-add SYS_PTRACE --shm-size 1g --privileged --rm -u 1:2"
        )
    finally:
        del os.environ["PB_TEST_PASSED_ENV"]
    assert got == {
        "environment": {"A": "1", "B": "two", "PB_TEST_PASSED_ENV": "from-host"},
        "volumes": {str(tmp_path): {"bind": "/data", "mode": "ro"}},
        "network_mode": "host",
        "extra_hosts": {"db": "10.0.0.1"},
        "cap_add": ["SYS_PTRACE"],
        "shm_size": "1g",
        "privileged": True,
        "user": "1:2",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("--frobnicate", "unsupported flag '--frobnicate'"),
        ("-e", "needs a value"),
        ("-v /x", "SRC:DEST"),
        ("'", "cannot parse"),
    ],
)
def test_bad_run_flags_are_one_usage_error(text, message):
    """Given an unknown flag or a missing value, we should raise one UsageError naming it."""
    from pipebuild.exceptions import UsageError

    with pytest.raises(UsageError, match=message) as e:
        parse_run_flags(text)
    assert "\n" not in e.value.msg


# -- running in containers ---------------------------------------------------------------


def test_image_task_runs_in_its_image_in_its_task_dir_beside_host_tasks(client, tmp_path):
    """Given a docker task between two host tasks, each should run where it belongs, and outputs be the user's."""
    root = tmp_path / "p"
    pipefile(
        root,
        f"""
        src = p.read_input("in.txt")
        first = p.new_task(name="first")
        first.command(f"test -e {root / "Pipefile.py"}; tr a-z A-Z < {{src}} > {{first.ofile}}")
        box = p.new_task(name="box").image("{IMAGE}")
        box.command(f"test ! -e {root / "Pipefile.py"}")  # the host's files are not there
        box.command(f"cat {{first.ofile}} /etc/passwd > {{box.ofile}}")
        box.command(f"pwd >> {{box.ofile}}; echo $PIPEBUILD_TASK_DIR >> {{box.ofile}}; id -u >> {{box.ofile}}")
        last = p.new_task(name="last")
        last.command(f"test -e {root / "Pipefile.py"}; cat {{box.ofile}} > {{last.ofile}}")
        p.write_output(last.ofile, "out/result.txt")
        p.write_output(box.ofile, "out/box.txt")
        """,
    )
    (root / "in.txt").write_text("hello\n")
    r = make(root)
    assert r.returncode == 0, r.stdout + r.stderr
    taskdir = str(root / ".pipebuild" / "tmp" / "box")
    expected = f"HELLO\nroot:x:0:0:root:/:/bin/sh\n{taskdir}\n{taskdir}\n{os.getuid()}\n"
    assert (root / "out" / "result.txt").read_text() == expected
    assert (root / "out" / "box.txt").stat().st_uid == os.getuid()
    assert containers(client, root) == []
    again = make(root)
    assert again.returncode == 0, again.stderr
    assert "0 ran" in again.stdout and "3 up to date" in again.stdout, again.stdout


def test_container_runs_as_the_invoking_users_uid_and_gid(client, tmp_path, monkeypatch):
    """Given an invoking user 4321:4322, the command should run as that user and its files be theirs."""
    from pipebuild import LocalBackend, Pipeline

    monkeypatch.setattr(os, "getuid", lambda: 4321)
    monkeypatch.setattr(os, "getgid", lambda: 4322)
    monkeypatch.chdir(tmp_path)
    old = os.umask(0)  # so that uid 4321 can write in the directories root creates for it
    try:
        p = Pipeline(backend=LocalBackend(jobs=1))
        t = p.new_task(name="who").image(IMAGE)
        t.command(f"echo $(id -u):$(id -g) > {t.ofile}; stat -c %u:%g {t.ofile} >> {t.ofile}")
        p.write_output(t.ofile, "who.txt")
        p.run()
    finally:
        os.umask(old)
    assert (tmp_path / "who.txt").read_text() == "4321:4322\n4321:4322\n"


def cgroup_read(kind: str) -> str:
    """A bash snippet printing a cgroup limit, on cgroup v2 or v1."""
    if kind == "memory":
        return "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes"
    return (
        "cat /sys/fs/cgroup/cpu.max 2>/dev/null"
        " || echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"
    )


def test_cpu_and_memory_become_the_containers_limits(client, tmp_path):
    """Given cpu('500m') with memory('3.75Gi'), and memory(1), the containers should have those cgroup limits."""
    root = tmp_path / "p"
    pipefile(
        root,
        f"""
        a = p.new_task(name="a").image("{IMAGE}").cpu("500m").memory("3.75Gi")
        a.command(f"({cgroup_read("memory")}) > {{a.ofile}}; ({cgroup_read("cpu")}) >> {{a.ofile}}")
        p.write_output(a.ofile, "a.txt")
        b = p.new_task(name="b").image("{IMAGE}").memory(1)
        b.command(f"({cgroup_read("memory")}) > {{b.ofile}}")
        p.write_output(b.ofile, "b.txt")
        """,
    )
    r = make(root)
    assert r.returncode == 0, r.stdout + r.stderr
    mem, cpu = (root / "a.txt").read_text().splitlines()
    assert int(mem) == int(3.75 * 2**30)
    quota, period = cpu.split()
    assert int(quota) / int(period) == 0.5
    one_gb = int((root / "b.txt").read_text())
    assert 0 <= 10**9 - one_gb < 4096  # the kernel rounds down to a page


def test_timeout_kills_the_container_and_fails_the_task(client, tmp_path):
    """Given timeout(1) on a task that sleeps a minute, the task should fail 'timed out' and no container stay."""
    root = tmp_path / "p"
    pipefile(
        root,
        f"""
        t = p.new_task(name="slow").image("{IMAGE}").timeout(1)
        t.command(f"sleep 60; echo late > {{t.ofile}}")
        p.write_output(t.ofile, "late.txt")
        """,
    )
    r = make(root)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "timed out after 1 s" in r.stdout + r.stderr
    assert not (root / "late.txt").exists()
    assert containers(client, root) == []


def test_failing_image_task_reports_exit_code_and_stderr_and_leaves_no_container(client, tmp_path):
    """Given a docker task that fails while another one runs (-j2, no -k), both containers should be gone after."""
    root = tmp_path / "p"
    pipefile(
        root,
        f"""
        bad = p.new_task(name="bad").image("{IMAGE}")
        bad.command(f"echo broken >&2; exit 3; echo > {{bad.ofile}}")
        p.write_output(bad.ofile, "bad.txt")
        busy = p.new_task(name="busy").image("{IMAGE}")
        busy.command(f"sleep 1; echo done > {{busy.ofile}}")
        p.write_output(busy.ofile, "busy.txt")
        """,
    )
    r = make(root, "-j2")
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "exit code 3" in out and "broken" in out
    assert (root / ".pipebuild" / "logs" / "bad.err").read_text() == "broken\n"
    assert containers(client, root) == []


def test_a_failure_without_keep_going_stops_a_running_container(client, tmp_path):
    """Given a host task failing while a container sleeps (-j2, no -k), the container should be stopped and removed."""
    root = tmp_path / "p"
    pipefile(
        root,
        f"""
        slow = p.new_task(name="slow").image("{IMAGE}")
        slow.command(f"sleep 120; echo done > {{slow.ofile}}")
        p.write_output(slow.ofile, "slow.txt")
        bad = p.new_task(name="bad")
        bad.command(f"sleep 2; exit 4; echo > {{bad.ofile}}")
        p.write_output(bad.ofile, "bad.txt")
        """,
    )
    r = make(root, "-j2")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "not run slow: the build stopped after a failure" in r.stdout, r.stdout
    assert containers(client, root) == []
    assert not (root / "slow.txt").exists()


def test_extra_run_flags_are_part_of_the_key(client, tmp_path):
    """Given `-e GREETING=...` in the extra docker run flags, changing it should rerun the image task."""
    root = tmp_path / "p"
    pipefile(
        root,
        f"""
        t = p.new_task(name="greet").image("{IMAGE}")
        t.command(f"echo $GREETING > {{t.ofile}}")
        p.write_output(t.ofile, "greeting.txt")
        """,
    )
    for word, ran in (("hello", 1), ("hello", 0), ("bonjour", 1)):
        r = make(root, env={"PIPEBUILD_EXTRA_DOCKER_RUN_FLAGS": f"-e GREETING={word}"})
        assert r.returncode == 0, r.stdout + r.stderr
        assert (root / "greeting.txt").read_text() == f"{word}\n"
        assert f"pipebuild: {ran} ran" in r.stdout, r.stdout


def test_interrupt_stops_and_removes_running_containers(client, tmp_path):
    """Given Ctrl-C while two docker tasks sleep, we should exit 130 and leave no container behind."""
    root = tmp_path / "p"
    pipefile(
        root,
        f"""
        for i in range(2):
            t = p.new_task(name=f"sleeper{{i}}").image("{IMAGE}")
            t.command(f"sleep 120; echo {{i}} > {{t.ofile}}")
            p.write_output(t.ofile, f"s{{i}}.txt")
        """,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipebuild", "make", "-j2"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while len([c for c in containers(client, root) if c.status == "running"]) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the containers never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err
    assert containers(client, root) == []
    assert not (root / "s0.txt").exists()


def test_unknown_image_is_one_line_naming_image_and_task_before_anything_runs(client, tmp_path):
    """Given an image that is neither present nor pullable, we should exit 2 with one line, running nothing."""
    root = tmp_path / "p"
    missing = "127.0.0.1:9/pipebuild-missing:1"  # a registry that refuses at once
    pipefile(
        root,
        f"""
        host = p.new_task(name="host_first")
        host.command(f"echo ran > {{host.ofile}}")
        p.write_output(host.ofile, "host.txt")
        boxed = p.new_task(name="boxed").image("{missing}")
        boxed.command(f"cat {{host.ofile}} > {{boxed.ofile}}")
        p.write_output(boxed.ofile, "boxed.txt")
        """,
    )
    r = make(root)
    assert r.returncode == 2, r.stdout + r.stderr
    line = one_error_line(r)
    assert missing in line and "'boxed'" in line, line
    assert not (root / "host.txt").exists()
    assert not (root / ".pipebuild" / "logs" / "host_first.out").exists()


def test_unreachable_daemon_is_one_line_exit_2_before_anything_runs(docker_sdk, tmp_path):
    """Given DOCKER_HOST pointing nowhere, we should exit 2 with one line about the daemon, running nothing."""
    root = tmp_path / "p"
    pipefile(
        root,
        f"""
        host = p.new_task(name="host_first")
        host.command(f"echo ran > {{host.ofile}}")
        p.write_output(host.ofile, "host.txt")
        boxed = p.new_task(name="boxed").image("{IMAGE}")
        boxed.command(f"echo hi > {{boxed.ofile}}")
        p.write_output(boxed.ofile, "boxed.txt")
        """,
    )
    r = make(root, env={"DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock"})
    assert r.returncode == 2, r.stdout + r.stderr
    line = one_error_line(r)
    assert "cannot reach the Docker daemon" in line and "no-daemon.sock" in line, line
    assert not (root / "host.txt").exists()


def test_host_only_pipelines_do_not_need_docker(tmp_path):
    """Given no task with an image, a build should work with DOCKER_HOST pointing nowhere."""
    root = tmp_path / "p"
    pipefile(root, 't = p.new_task(name="t")\nt.command(f"echo hi > {t.ofile}")\np.write_output(t.ofile, "t.txt")\n')
    r = make(root, env={"DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock"})
    assert r.returncode == 0, r.stderr
    assert (root / "t.txt").read_text() == "hi\n"


def test_bad_memory_on_an_image_task_is_one_line_naming_the_task(client, tmp_path):
    """Given memory('lots'), we should exit 2 with one line naming the task and its Pipefile line."""
    root = tmp_path / "p"
    pipefile(root, f't = p.new_task(name="greedy").image("{IMAGE}").memory("lots")\nt.command("true")\n')
    r = make(root)
    assert r.returncode == 2, r.stdout + r.stderr
    line = one_error_line(r)
    assert "'greedy'" in line and "'lots'" in line and "Pipefile.py:4" in line, line


def test_image_id_is_in_the_key_tag_names_are_not(client, tmp_path):
    """Given a tag moved to a new image, only its task should rerun; a new tag for the same ID reruns nothing."""
    base = client.images.get(IMAGE)
    base.tag("pipebuild-test", "moving")
    root = tmp_path / "p"
    body = """
        boxed = p.new_task(name="boxed").image("{image}")
        boxed.command(f"echo same > {{boxed.ofile}}")
        after = p.new_task(name="after")
        after.command(f"cat {{boxed.ofile}} > {{after.ofile}}")
        p.write_output(after.ofile, "after.txt")
        other = p.new_task(name="other")
        other.command(f"echo other > {{other.ofile}}")
        p.write_output(other.ofile, "other.txt")
        """
    try:
        pipefile(root, body.format(image="pipebuild-test:moving"))
        first = make(root)
        assert first.returncode == 0, first.stderr
        assert "3 ran" in first.stdout, first.stdout
        noop = make(root)
        assert "0 ran" in noop.stdout and "3 up to date" in noop.stdout, noop.stdout
        box = client.containers.run(IMAGE, ["bash", "-c", "echo 2 > /version"], detach=True)
        box.wait()
        box.commit("pipebuild-test", "moving")
        box.remove()
        rebuilt = make(root, "--explain")
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert "1 ran" in rebuilt.stdout and "2 up to date" in rebuilt.stdout, rebuilt.stdout
        assert "ran boxed" in rebuilt.stdout, rebuilt.stdout
        client.images.get("pipebuild-test:moving").tag("pipebuild-test", "alias")
        pipefile(root, body.format(image="pipebuild-test:alias"))
        aliased = make(root)
        assert "0 ran" in aliased.stdout and "3 up to date" in aliased.stdout, aliased.stdout
    finally:
        for tag in ("pipebuild-test:moving", "pipebuild-test:alias"):
            try:
                client.images.remove(tag, noprune=False)
            except Exception:  # noqa: BLE001 - cleanup only
                pass


def test_extra_run_flags_from_the_backend(client, tmp_path):
    """Given LocalBackend(extra_docker_run_flags=...), the container should get the env, volume and network."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "f.txt").write_text("mounted\n")
    root = tmp_path / "p"
    flags = f"-e GREETING=hi --network none -v {data}:/data:ro"
    pipefile(
        root,
        f"""
        t = p.new_task(name="flags").image("{IMAGE}")
        t.command(f"echo $GREETING > {{t.ofile}}; cat /data/f.txt >> {{t.ofile}}; ls /sys/class/net >> {{t.ofile}}")
        p.write_output(t.ofile, "flags.txt")
        """,
        header=f"p = Pipeline(backend=LocalBackend(extra_docker_run_flags={flags!r}))",
    )
    r = make(root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (root / "flags.txt").read_text() == "hi\nmounted\nlo\n"


@pytest.mark.parametrize("variable", ["PIPEBUILD_EXTRA_DOCKER_RUN_FLAGS", "HAIL_PIPELINE_EXTRA_DOCKER_RUN_FLAGS"])
def test_extra_run_flags_from_the_environment(client, tmp_path, variable):
    """Given the flags in either environment variable, the container should get them."""
    root = tmp_path / "p"
    pipefile(
        root,
        f'''
        t = p.new_task(name="flags").image("{IMAGE}")
        t.command(f"echo $GREETING > {{t.ofile}}")
        p.write_output(t.ofile, "flags.txt")
        ''',
    )
    env: dict[str, str | None] = {
        "PIPEBUILD_EXTRA_DOCKER_RUN_FLAGS": None,
        "HAIL_PIPELINE_EXTRA_DOCKER_RUN_FLAGS": None,
    }
    env[variable] = "--env GREETING=from-env"
    r = make(root, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (root / "flags.txt").read_text() == "from-env\n"


def test_unknown_extra_flag_is_one_line_exit_2(client, tmp_path):
    """Given an unsupported flag in the environment, we should exit 2 with one line naming it."""
    root = tmp_path / "p"
    pipefile(root, f't = p.new_task(name="t").image("{IMAGE}")\nt.command("true")\n')
    r = make(root, env={"PIPEBUILD_EXTRA_DOCKER_RUN_FLAGS": "--frobnicate 3"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "'--frobnicate'" in one_error_line(r)


def test_gsa_key_file_is_mounted_at_gsa_key_key_json(client, tmp_path):
    """Given gsa_key_file, the container should see it read-only at /gsa-key/key.json."""
    key = tmp_path / "key.json"
    key.write_text('{"type": "service_account"}\n')
    root = tmp_path / "p"
    pipefile(
        root,
        f"""
        t = p.new_task(name="keyed").image("{IMAGE}")
        t.command(f"cat /gsa-key/key.json > {{t.ofile}}; echo $GOOGLE_APPLICATION_CREDENTIALS >> {{t.ofile}}")
        t.command(f"if echo x >> /gsa-key/key.json; then echo writable >> {{t.ofile}}; fi 2>/dev/null")
        p.write_output(t.ofile, "key.txt")
        """,
        header=f"p = Pipeline(backend=LocalBackend(gsa_key_file={str(key)!r}))",
    )
    r = make(root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (root / "key.txt").read_text() == '{"type": "service_account"}\n/gsa-key/key.json\n'


def test_long_script_runs_in_the_container(client, tmp_path):
    """Given a command longer than one exec argument may be, the docker task should still run it."""
    root = tmp_path / "p"
    pipefile(
        root,
        f"""
        t = p.new_task(name="long").image("{IMAGE}")
        t.command(": " + "x" * 150_000)
        t.command(f"echo ok > {{t.ofile}}")
        p.write_output(t.ofile, "long.txt")
        """,
    )
    r = make(root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (root / "long.txt").read_text() == "ok\n"


def test_p_run_uses_docker_and_is_incremental(client, tmp_path):
    """Given a hail-style script with an image task, p.run() should run it in Docker, then do nothing."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from pipebuild import Pipeline
            p = Pipeline()
            t = p.new_task(name="t").image("{IMAGE}")
            t.command(f"cat /etc/passwd > {{t.ofile}}")
            p.write_output(t.ofile, "out.txt")
            p.run()
            """
        )
    )
    for _ in range(2):
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
    assert "0 ran" in r.stdout, r.stdout
    assert (tmp_path / "out.txt").read_text() == "root:x:0:0:root:/:/bin/sh\n"
