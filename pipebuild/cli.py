"""The command line: `pipebuild make|watch|list|status|explain|log|graph|clean|gc`.

Exit status: 0 success, 1 a task failed, 2 a usage or definition error (one line, no
traceback), 130 interrupted (running tasks are stopped first).
"""

from __future__ import annotations

import functools
import gc as pygc
import os
import sys
from collections.abc import Callable
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer

from .exceptions import BuildFailed, DefinitionError, PipelineException, UsageError
from .fastmake import build_and_report, default_jobs, signals_interrupt

if TYPE_CHECKING:
    from .build import Options
    from .pipeline import Pipeline

P = ParamSpec("P")
R = TypeVar("R")


class Exit(IntEnum):
    """Exit statuses."""

    OK = 0
    FAILED = 1
    USAGE = 2
    INTERRUPTED = 130


app = typer.Typer(
    name="pipebuild",
    help="A file-target build tool for Pipefiles written with the hailtop.pipeline API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _complete_targets(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion of TARGET: task names and destinations from the Pipefile."""
    from .completion import complete_targets

    return complete_targets(ctx, incomplete)


FileOpt = Annotated[str | None, typer.Option("-f", "--file", help="The Pipefile (default: Pipefile.py).")]
DirOpt = Annotated[str | None, typer.Option("-C", "--directory", help="Change to DIR before anything else.")]
TargetsArg = Annotated[
    list[str] | None,
    typer.Argument(help="Destinations or task names (default: all).", autocompletion=_complete_targets),
]
JobsOpt = Annotated[
    int | None, typer.Option("-j", "--jobs", help="Commands at once (default: the backend's jobs, else the cores).")
]
KeepGoingOpt = Annotated[bool, typer.Option("-k", "--keep-going", help="Go on with what does not depend on a failure.")]
ExplainOpt = Annotated[bool, typer.Option("--explain", help="Say why each task ran or was skipped.")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="Print failures only.")]
VerboseOpt = Annotated[bool, typer.Option("-v", "--verbose", help="Also print skipped tasks.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Write every event as one JSON object per line on stdout.")]


class BackendName(str, Enum):
    """Where tasks run."""

    local = "local"
    batch = "batch"


RemoteCacheOpt = Annotated[
    str | None,
    typer.Option(
        "--remote-cache",
        metavar="gs://BUCKET/PREFIX",
        help="Share the cache across machines (default: $PIPEBUILD_REMOTE_CACHE).",
    ),
]
RemoteReadOnlyOpt = Annotated[
    bool,
    typer.Option(
        "--remote-cache-read-only",
        help="Read the remote cache, never write it (or PIPEBUILD_REMOTE_CACHE_READ_ONLY=1).",
    ),
]
BackendOpt = Annotated[
    BackendName | None,
    typer.Option(
        "--backend",
        help="Run tasks here (local) or on Google Cloud Batch (batch; settings from BatchBackend or "
        "PIPEBUILD_BATCH_*). Default: the Pipefile's backend.",
    ),
]


def _use_backend(pipeline: Pipeline, name: BackendName | None) -> None:
    """Put the chosen backend on the pipeline, unless it already has one of that kind."""
    from .backend import BatchBackend, LocalBackend

    if name is BackendName.batch and not isinstance(pipeline._backend, BatchBackend):
        pipeline._backend = BatchBackend()
    elif name is BackendName.local and not isinstance(pipeline._backend, LocalBackend):
        pipeline._backend = LocalBackend()


def _fail(message: str, code: Exit = Exit.USAGE) -> NoReturn:
    typer.echo(f"pipebuild: {message}", err=True)
    raise typer.Exit(int(code))


def _load(file: str | None, directory: str | None) -> Pipeline:
    from . import load

    path = load.find(file, directory)
    os.chdir(os.path.dirname(path))
    return load.load(path)


def _guard(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn pipebuild errors into one line and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except DefinitionError as e:
            _fail(e.one_line())
        except UsageError as e:
            _fail(e.msg)
        except BuildFailed:
            raise typer.Exit(int(Exit.FAILED)) from None
        except PipelineException as e:
            _fail(e.msg.splitlines()[0] if e.msg else type(e).__name__)
        except KeyboardInterrupt:
            typer.echo("pipebuild: interrupted", err=True)
            raise typer.Exit(int(Exit.INTERRUPTED)) from None

    return wrapper


def _options(**kwargs: Any) -> Options:
    from .build import Options

    return Options(workspace=os.getcwd(), **kwargs)


@app.command()
@_guard
def make(
    targets: TargetsArg = None,
    jobs: JobsOpt = None,
    dry_run: Annotated[bool, typer.Option("-n", "--dry-run", help="Show what would run, and the script.")] = False,
    keep_going: KeepGoingOpt = False,
    explain: ExplainOpt = False,
    force: Annotated[
        bool, typer.Option("-B", "--force", help="Rerun the targets' tasks (all tasks when no target) regardless.")
    ] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Exit 2 if another build holds the workspace.")] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
    remote_cache: RemoteCacheOpt = None,
    remote_cache_read_only: RemoteReadOnlyOpt = False,
    backend: BackendOpt = None,
    file: FileOpt = None,
    directory: DirOpt = None,
) -> None:
    """Build targets, running only the tasks that are stale."""
    _check_jobs(jobs)
    pipeline = _load(file, directory)
    _use_backend(pipeline, backend)
    from . import build

    force_all = force and not targets
    verbosity = _verbosity(quiet, verbose)
    opts = _build_options(
        default_jobs(pipeline, jobs),
        keep_going,
        explain,
        verbosity,
        targets,
        force_all=force_all,
        force=list(targets) if force and targets else [],
        wait=not no_wait,
        remote_cache=remote_cache,
        remote_cache_read_only=remote_cache_read_only,
    )
    if remote_cache:
        from .remote import parse

        parse(remote_cache)  # a malformed URL is a usage error before anything is loaded or run
    if dry_run:
        rows = build.preview(pipeline, opts)
        width = max((len(n) for n, _, _ in rows), default=0)
        for name, what, reason in rows:
            if what != "skip" or explain or verbose:
                typer.echo(f"{what:10} {name:{width}}  {reason}")
        todo = sum(1 for _, what, _ in rows if what != "skip")
        typer.echo(f"pipebuild: {todo} of {len(rows)} tasks would run or be restored")
        own = getattr(pipeline._backend, "_executor", None)
        if own is not None:
            from .executors.batch import dry_run as batch_dry_run

            opts.executor = own()
            typer.echo("\n# The Cloud Batch jobs these targets would submit:")
            typer.echo(batch_dry_run(pipeline, opts), nl=False)
            return
        typer.echo("\n# The script that builds these targets from scratch:")
        typer.echo(build.script(pipeline, opts), nl=False)
        return
    build_and_report(pipeline, opts, verbosity, explain, as_json)


def _check_jobs(jobs: int | None) -> None:
    """-j is checked before the Pipefile is loaded."""
    if jobs is not None and jobs < 1:
        raise UsageError(f"-j must be at least 1, not {jobs}")


def _verbosity(quiet: bool, verbose: bool) -> int:
    return -1 if quiet else (1 if verbose else 0)


def _build_options(
    jobs: int | None, keep_going: bool, explain: bool, verbosity: int, targets: list[str] | None, **more: Any
) -> Options:
    """The options `make` and `watch` share; `-j` defaults to the number of cores."""
    return _options(
        jobs=jobs or os.cpu_count() or 1,
        keep_going=keep_going,
        explain=explain,
        verbosity=verbosity,
        targets=targets or None,
        **more,
    )


@app.command()
@_guard
def watch(
    targets: TargetsArg = None,
    jobs: JobsOpt = None,
    keep_going: KeepGoingOpt = False,
    explain: ExplainOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
    settle: Annotated[
        float, typer.Option("--settle", min=0.0, help="Seconds without a new change before rebuilding.")
    ] = 0.2,
    remote_cache: RemoteCacheOpt = None,
    remote_cache_read_only: RemoteReadOnlyOpt = False,
    backend: BackendOpt = None,
    file: FileOpt = None,
    directory: DirOpt = None,
) -> None:
    """Build, then rebuild whenever an input, the Pipefile or a module it imports is saved."""
    _check_jobs(jobs)
    from . import load
    from . import watch as watching
    from .report import choose

    if remote_cache:
        from .remote import parse

        parse(remote_cache)
    path = load.find(file, directory)
    os.chdir(os.path.dirname(path))
    verbosity = _verbosity(quiet, verbose)
    reporter = choose(verbosity, explain, as_json)

    def options(pipeline: Pipeline) -> Options:
        """Each build's options, as `make` would choose them for the Pipefile just loaded."""
        _use_backend(pipeline, backend)
        return _build_options(
            default_jobs(pipeline, jobs), keep_going, explain, verbosity, targets, reporter=reporter,
            remote_cache=remote_cache, remote_cache_read_only=remote_cache_read_only,
        )  # fmt: skip

    with signals_interrupt():
        watching.run(path, targets or None, options, reporter, settle)


@app.command("list")
@_guard
def list_(file: FileOpt = None, directory: DirOpt = None) -> None:
    """List tasks and the targets they publish."""
    pipeline = _load(file, directory)
    from .build import Options
    from .graph import plan

    opts = Options(workspace=os.getcwd())
    graph = plan(pipeline, opts.workspace, opts.state_dir)
    for node in graph.nodes:
        dests = [os.path.relpath(d) for o in node.outputs for d in o.dests]
        typer.echo(node.name + (":  " + " ".join(dests) if dests else ""))


@app.command()
@_guard
def status(targets: TargetsArg = None, file: FileOpt = None, directory: DirOpt = None) -> None:
    """Show what is stale and why, without running anything."""
    pipeline = _load(file, directory)
    from . import build

    rows = build.preview(pipeline, _options(targets=targets or None))
    width = max((len(n) for n, _, _ in rows), default=0)
    stale = 0
    for name, what, reason in rows:
        state = "up to date" if what == "skip" else "stale"
        stale += state == "stale"
        typer.echo(f"{state:10} {name:{width}}  {reason}" if reason != state else f"{state:10} {name}")
    typer.echo(f"pipebuild: {stale} of {len(rows)} tasks stale")


@app.command("explain")
@_guard
def explain_(targets: TargetsArg = None, file: FileOpt = None, directory: DirOpt = None) -> None:
    """Say why each task of the targets would run or not, and when and how long it last ran."""
    pipeline = _load(file, directory)
    from . import history

    for line in history.explain(pipeline, _options(targets=targets or None)):
        typer.echo(line)


@app.command()
@_guard
def log(
    task: Annotated[
        str, typer.Argument(help="A task name, or a destination its task publishes.", autocompletion=_complete_targets)
    ],
    stdout: Annotated[bool, typer.Option("--stdout", help="Only the task's stdout, as it is.")] = False,
    stderr: Annotated[bool, typer.Option("--stderr", help="Only the task's stderr, as it is.")] = False,
    file: FileOpt = None,
    directory: DirOpt = None,
) -> None:
    """Show the log (stdout, stderr) of a task's last run."""
    from . import history, load

    path = load.find(file, directory)
    os.chdir(os.path.dirname(path))
    state_dir = _options().state_dir
    name = task
    if not history.has_log(state_dir, task):  # not a task that ran: maybe a destination
        name = history.task_for(load.load(path), _options(), task)
    streams = ("out",) if stdout and not stderr else ("err",) if stderr and not stdout else ("out", "err")
    sys.stdout.write(history.show_log(state_dir, name, streams))


class GraphFormat(str, Enum):
    """Output formats of `pipebuild graph`."""

    dot = "dot"
    svg = "svg"
    html = "html"
    mermaid = "mermaid"


@app.command()
@_guard
def graph(
    targets: TargetsArg = None,
    fmt: Annotated[GraphFormat, typer.Option("--format", "-F", help="dot, svg (needs Graphviz), html or mermaid.")] = (
        GraphFormat.dot
    ),
    output: Annotated[str | None, typer.Option("-o", "--output", help="Write to FILE instead of stdout.")] = None,
    file: FileOpt = None,
    directory: DirOpt = None,
) -> None:
    """Draw the task graph, coloured by state (up to date, stale, failed last time, ...)."""
    out = os.path.abspath(output) if output else None
    pipeline = _load(file, directory)
    from . import graphview

    v = graphview.view(pipeline, _options(targets=targets or None))
    text = graphview.render(v, fmt.value)
    if out is None:
        sys.stdout.write(text)
        return
    with open(out, "w") as f:
        f.write(text)
    typer.echo(f"pipebuild: wrote the graph of {len(v.names)} tasks to {output}", err=True)


@app.command()
@_guard
def clean(
    targets: TargetsArg = None,
    everything: Annotated[bool, typer.Option("--all", help="Also delete .pipebuild/ (cache and store).")] = False,
    file: FileOpt = None,
    directory: DirOpt = None,
) -> None:
    """Remove built outputs (the cache keeps them: the next make restores them)."""
    pipeline = _load(file, directory)
    from . import build

    removed = build.clean(pipeline, _options(targets=targets or None), everything)
    typer.echo(f"pipebuild: removed {len(removed)} output(s)")


@app.command()
@_guard
def gc(
    max_size: Annotated[str, typer.Option("--max-size", help="Keep the content store under SIZE (e.g. 500M, 2G).")],
    file: FileOpt = None,
    directory: DirOpt = None,
) -> None:
    """Trim the content store, least recently used first."""
    from . import build, load

    path = load.find(file, directory)
    os.chdir(os.path.dirname(path))
    removed, freed = build.gc(_options(), build.parse_size(max_size))
    typer.echo(f"pipebuild: removed {removed} blob(s), {freed} bytes")


def main() -> None:
    """Console entry point."""
    pygc.disable()  # a short-lived process: see build.paused_gc
    extra: dict[str, Any] = {}
    if "_PIPEBUILD_COMPLETE" in os.environ:  # a shell asks for completions: see completion.py
        from .completion import init

        init()
        extra["prog_name"] = "pipebuild"  # also under `python -m pipebuild`
    try:
        app(**extra)
    except KeyboardInterrupt:
        sys.exit(int(Exit.INTERRUPTED))
