"""Shell completion: the committed scripts match the CLI, and targets complete from the Pipefile.

Oracles: the scripts regenerated from the CLI right now (a difference means someone
changed the CLI or typer and must run `python -m pipebuild.completion`), bash itself
running the committed bash script, and the task names and destinations the Pipefile
defines.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipebuild.completion import COMPLETE_VAR, SCRIPTS, script

ROOT = Path(__file__).resolve().parent.parent
BIN = str(Path(sys.executable).parent)
TIMEOUT = 30

PIPEFILE = """\
from pipebuild import Pipeline

print("the Pipefile talks while loading")
p = Pipeline(name="comp")
src = p.read_input("in.txt")
upper = p.new_task(name="upper")
upper.command(f"tr a-z A-Z < {src} > {upper.ofile}")
p.write_output(upper.ofile, "out/upper.txt")
count = p.new_task(name="count")
count.command(f"wc -c < {upper.ofile} > {count.ofile}")
p.write_output(count.ofile, "out/count.txt")
p.write_output(count.ofile, "summary.txt")
"""

ALL = ["upper", "count", "out/count.txt", "out/upper.txt", "summary.txt"]


def project(root: Path, text: str = PIPEFILE) -> Path:
    """A two-task project in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "in.txt").write_text("hello\n")
    (root / "Pipefile.py").write_text(text)
    return root


def complete(cwd: Path, shell: str, words: str) -> subprocess.CompletedProcess:
    """Ask pipebuild for completions the way `shell`'s script does, for the command line `words`."""
    env = {**os.environ, COMPLETE_VAR: f"complete_{shell}", "PATH": BIN + os.pathsep + os.environ["PATH"]}
    if shell == "bash":
        parts = words.split(" ")
        env |= {"COMP_WORDS": words, "COMP_CWORD": str(len(parts) - 1)}
    else:
        env["_TYPER_COMPLETE_ARGS"] = words
        if shell == "fish":
            env["_TYPER_COMPLETE_FISH_ACTION"] = "get-args"
    return subprocess.run(["pipebuild"], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.parametrize("shell", sorted(SCRIPTS))
def test_committed_script_matches_the_cli(shell):
    """Given the CLI as it is now, completions/<script> should be exactly what it generates."""
    committed = (ROOT / "completions" / SCRIPTS[shell]).read_text()
    assert committed == script(shell), f"completions/{SCRIPTS[shell]} is stale: run python -m pipebuild.completion"
    assert "_PIPEBUILD_COMPLETE=complete_" + shell in committed


def test_script_is_what_the_installed_command_prints(tmp_path):
    """Given the console script (not python -m), `_PIPEBUILD_COMPLETE=source_bash pipebuild` should
    print the committed script, so the two ways of installing it agree."""
    env = {**os.environ, COMPLETE_VAR: "source_bash"}
    proc = subprocess.run(
        [os.path.join(BIN, "pipebuild")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip("\n") + "\n" == (ROOT / "completions" / "pipebuild.bash").read_text()


def test_bash_completes_task_names_and_destinations(tmp_path):
    """Given the committed bash script sourced in a real bash, `pipebuild make <TAB>` should offer the
    Pipefile's task names and destinations, and nothing the Pipefile printed."""
    project(tmp_path)
    program = f"""
        source {ROOT / "completions" / "pipebuild.bash"}
        complete -p pipebuild
        COMP_WORDS=(pipebuild make "")
        COMP_CWORD=2
        _pipebuild_completion pipebuild
        printf '%s\\n' "${{COMPREPLY[@]}}"
        COMP_WORDS=(pipebuild make out/c)
        _pipebuild_completion pipebuild
        printf 'prefix:%s\\n' "${{COMPREPLY[@]}}"
    """
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(
        ["bash", "--norc", "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "complete -o default -F _pipebuild_completion pipebuild"
    assert [x for x in lines[1:] if not x.startswith("prefix:")] == ALL
    assert [x for x in lines if x.startswith("prefix:")] == ["prefix:out/count.txt"]


@pytest.mark.parametrize(
    "words, expected",
    [
        ("pipebuild wa", ["watch"]),
        ("pipebuild ex", ["explain"]),
        ("pipebuild status ", ALL),
        ("pipebuild watch u", ["upper"]),
        ("pipebuild graph out/", ["out/count.txt", "out/upper.txt"]),
        ("pipebuild log c", ["count"]),
        ("pipebuild clean s", ["summary.txt"]),
        ("pipebuild explain ", ALL),
        ("pipebuild make upper ", ALL),
    ],
)
def test_commands_and_targets_complete(tmp_path, words, expected):
    """Given a partial command line, bash completion should offer the matching commands or targets."""
    project(tmp_path)
    proc = complete(tmp_path, "bash", words)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == expected


def test_directory_option_completes_from_that_pipefile(tmp_path):
    """Given -C DIR before the target, targets should come from DIR's Pipefile, relative to DIR
    (where make resolves them)."""
    project(tmp_path / "sub")
    proc = complete(tmp_path, "bash", "pipebuild make -C sub ")
    assert proc.stdout.splitlines() == ALL


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_complete_targets(tmp_path, shell):
    """Given zsh's or fish's protocol, the targets should come back in that shell's format."""
    project(tmp_path)
    proc = complete(tmp_path, shell, "pipebuild make out/")
    assert proc.returncode == 0, proc.stderr
    if shell == "zsh":
        assert proc.stdout.strip() == """_arguments '*: :(("out/count.txt"\n"out/upper.txt"))'"""
    else:
        assert proc.stdout.splitlines() == ["out/count.txt", "out/upper.txt"]


@pytest.mark.parametrize(
    "text",
    [
        "from pipebuild import Pipeline\np = Pipeline(\n",  # syntax error
        "import os\nprint('noise'); os.system('echo more noise; echo err >&2')\nraise RuntimeError('x')\n",
    ],
)
def test_broken_pipefile_completes_nothing_and_prints_nothing(tmp_path, text):
    """Given a Pipefile that does not load (even one that prints, also from a child process),
    completion should offer nothing and say nothing."""
    project(tmp_path, text)
    proc = complete(tmp_path, "bash", "pipebuild make ")
    assert proc.returncode == 0
    assert proc.stdout.strip() == "" and proc.stderr == ""  # a bare newline is an empty COMPREPLY


def test_no_pipefile_completes_nothing(tmp_path):
    """Given no Pipefile at all, completion should offer nothing (bash then falls back to files)."""
    proc = complete(tmp_path, "bash", "pipebuild make ")
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, "", "")
