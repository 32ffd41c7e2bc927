"""Console entry point: `pipebuild make` with common options, without importing typer.

Importing typer and letting it parse the arguments costs ~90 ms before `make` starts
(35 ms of imports, ~55 ms of parameter set-up), 15% of a 10,000-task no-op and most of a
small one. The plain `make` argv is parsed here by hand and run as `cli.make` runs it
(both call default_jobs and build_and_report below); anything else (another command,
`-n`, `--backend`, `--remote-cache`, `--help`, combined short flags, an option this
parser does not know) goes to the typer app in cli.py, unchanged. Keep the two in step:
tests/test_fastmake.py runs the same argv both ways.
"""

from __future__ import annotations

import contextlib
import gc as pygc
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn, TextIO

if TYPE_CHECKING:
    from .build import Options
    from .pipeline import Pipeline

# option -> (keyword, takes a value)
_OPTIONS: dict[str, tuple[str, bool]] = {
    "-j": ("jobs", True),
    "--jobs": ("jobs", True),
    "-k": ("keep_going", False),
    "--keep-going": ("keep_going", False),
    "--explain": ("explain", False),
    "-B": ("force", False),
    "--force": ("force", False),
    "--no-wait": ("no_wait", False),
    "-q": ("quiet", False),
    "--quiet": ("quiet", False),
    "-v": ("verbose", False),
    "--verbose": ("verbose", False),
    "--json": ("as_json", False),
    "-f": ("file", True),
    "--file": ("file", True),
    "-C": ("directory", True),
    "--directory": ("directory", True),
}


def parse(argv: list[str]) -> dict[str, object] | None:
    """The arguments of `make ...` as keywords, or None if typer must handle `argv`."""
    if not argv or argv[0] != "make":
        return None
    opts: dict[str, object] = {"targets": []}
    i = 1
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-") or arg == "-":
            opts["targets"].append(arg)  # type: ignore[attr-defined]
            continue
        value: str | None = None
        if arg.startswith("--") and "=" in arg:
            arg, value = arg.split("=", 1)
        elif arg.startswith("-j") and len(arg) > 2 and not arg.startswith("--"):
            arg, value = "-j", arg[2:]
        spec = _OPTIONS.get(arg)
        if spec is None:
            return None
        key, takes_value = spec
        if takes_value:
            if value is None:
                if i >= len(argv):
                    return None
                value = argv[i]
                i += 1
            if key == "jobs":
                try:
                    opts[key] = int(value)
                except ValueError:
                    return None  # typer says why
            else:
                opts[key] = value
        elif value is not None:
            return None
        else:
            opts[key] = True
    return opts


def run(opts: dict[str, object]) -> int:
    """Run `make` as cli.make does (without -n and --remote-cache); returns the exit status."""
    from .exceptions import BuildFailed, DefinitionError, PipelineException, UsageError

    try:
        _make(**opts)  # type: ignore[arg-type]
    except DefinitionError as e:
        return _fail(e.one_line())
    except UsageError as e:
        return _fail(e.msg)
    except BuildFailed:
        return 1
    except PipelineException as e:
        return _fail(e.msg.splitlines()[0] if e.msg else type(e).__name__)
    except KeyboardInterrupt:
        sys.stderr.write("pipebuild: interrupted\n")
        return 130
    except BrokenPipeError:  # `pipebuild make | head`: exit 1 quietly, as click does
        _to_devnull(sys.stdout)
        return 1
    return 0


def _fail(message: str) -> int:
    sys.stderr.write(f"pipebuild: {message}\n")
    return 2


def _make(
    targets: list[str],
    jobs: int | None = None,
    keep_going: bool = False,
    explain: bool = False,
    force: bool = False,
    no_wait: bool = False,
    quiet: bool = False,
    verbose: bool = False,
    as_json: bool = False,
    file: str | None = None,
    directory: str | None = None,
) -> None:
    from . import load, noop
    from .exceptions import UsageError
    from .report import choose

    if jobs is not None and jobs < 1:
        raise UsageError(f"-j must be at least 1, not {jobs}")
    path = load.find(file, directory)
    os.chdir(os.path.dirname(path))
    pipeline = load.load(path)
    verbosity = -1 if quiet else (1 if verbose else 0)
    reporter = choose(verbosity, explain, as_json)
    fp = None
    try:
        if not force:  # nothing to do, shown by the no-op certificate: the engine is not even imported
            done, fp = noop.make(pipeline, os.getcwd(), targets or None, not no_wait, reporter, time.perf_counter())
            if done:
                return
    finally:
        reporter.close()
    from . import build

    opts = build.Options(
        workspace=os.getcwd(),
        jobs=default_jobs(pipeline, jobs),
        keep_going=keep_going,
        explain=explain,
        verbosity=verbosity,
        targets=targets or None,
        force_all=force and not targets,
        force=list(targets) if force and targets else [],
        wait=not no_wait,
        noop_fp=fp,
    )
    build_and_report(pipeline, opts, verbosity, explain, as_json)


def default_jobs(pipeline: Pipeline, jobs: int | None) -> int:
    """-j, else the backend's `jobs` (LocalBackend(jobs=N); 64 for Cloud Batch), else the cores."""
    backend = pipeline._backend
    return jobs or getattr(backend, "_jobs", None) or getattr(backend, "default_jobs", None) or os.cpu_count() or 1


def build_and_report(pipeline: Pipeline, opts: Options, verbosity: int, explain: bool, as_json: bool) -> None:
    """Build with the reporter the flags choose; SIGTERM and SIGHUP stop tasks as Ctrl-C does."""
    from . import build
    from .report import choose

    opts.reporter = choose(verbosity, explain, as_json)
    try:
        with signals_interrupt():
            result = build.build(pipeline, opts)
    finally:
        opts.reporter.close()
    result.raise_for_failure()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (terminal closed) raise KeyboardInterrupt, as Ctrl-C does."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit(code: int) -> NoReturn:
    """Exit as usual, but without the final garbage collection.

    The build is over. The interpreter's last collection scans every object the Pipefile
    made (~40 ms at 10,000 tasks, a fifth of a no-op) only to free memory the process is
    about to give back; `gc.freeze` takes them out of its reach. Everything else of a normal
    exit still happens: threads are joined, `atexit` functions run, and the names the
    Pipefile defined are dropped (load.py), so a file it holds open is flushed.
    Output the Pipefile printed is flushed here: a reader that went away (`make | head`)
    means exit 1 without a message, as in `run`.
    """
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with that descriptor closed (`make >&-`)
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1
            _to_devnull(stream)
    pygc.freeze()
    sys.exit(code)


def _to_devnull(stream: TextIO) -> None:
    """Point a stream whose reader went away at /dev/null: the flush at exit must not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def main() -> None:
    """Console entry point: the fast path above, else the typer app."""
    if "_PIPEBUILD_COMPLETE" not in os.environ:
        opts = parse(sys.argv[1:])
        if opts is not None:
            pygc.disable()  # a short-lived process: see build.paused_gc
            _exit(run(opts))
    from .cli import main as typer_main

    typer_main()
