"""Load a Pipefile: a Python program that builds one `Pipeline`.

The Pipefile runs with `__name__ == "__pipefile__"`, so a block under
`if __name__ == "__main__":` (e.g. `p.run()`) does not run; a bare `p.run()` at module
level is ignored while loading. Every error becomes one `DefinitionError` line with the
Pipefile's file and line, never a traceback.
"""

from __future__ import annotations

import atexit
import builtins
import os
import sys
import traceback
from types import TracebackType

from .exceptions import DefinitionError, PipelineException, UsageError
from .pipeline import Pipeline

PIPEFILE = "Pipefile.py"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_loading = 0  # > 0 while a Pipefile is being executed by `load`


def loading() -> bool:
    """True while `load` executes a Pipefile (Pipeline.run must then do nothing)."""
    return _loading > 0


def find(file: str | None = None, directory: str | None = None) -> str:
    """The absolute path of the Pipefile to use."""
    base = os.path.abspath(directory or ".")
    if directory is not None and not os.path.isdir(base):
        raise UsageError(f"no such directory: {directory}")
    path = os.path.join(base, file or PIPEFILE)
    if not os.path.isfile(path):
        if file is None:
            raise UsageError(f"no {PIPEFILE} in {base} (use -f FILE or -C DIR)")
        raise UsageError(f"no such file: {path}")
    return path


def _where(tb: TracebackType | None, path: str) -> tuple[str, int] | None:
    """The deepest frame in the Pipefile, else the deepest in user code."""
    frames = traceback.extract_tb(tb)
    for fr in reversed(frames):
        if fr.filename == path and fr.lineno is not None:
            return (os.path.relpath(fr.filename), fr.lineno)
    for fr in reversed(frames):
        if not fr.filename.startswith(_PACKAGE_DIR) and fr.lineno is not None and not fr.filename.startswith("<"):
            return (os.path.relpath(fr.filename), fr.lineno)
    return None


_namespaces: dict[str, dict[str, object]] = {}  # the last namespace of each Pipefile loaded


def _clear_namespaces() -> None:
    """At exit, after the Pipefile's own atexit functions: drop what each Pipefile's names
    hold, as the interpreter does with a script's module, so that a file the Pipefile left
    open is flushed and closed even though its functions keep the namespace in a reference
    cycle and the last garbage collection is skipped (fastmake._exit)."""
    for env in _namespaces.values():
        for name in list(env):
            if name != "__builtins__":
                env[name] = None


def load(path: str) -> Pipeline:
    """Execute the Pipefile at `path` and return the Pipeline it builds."""
    global _loading
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    rel = os.path.relpath(path)
    try:
        code = compile(source, path, "exec")
    except SyntaxError as e:
        raise DefinitionError(f"syntax error: {e.msg}", (rel, e.lineno or 0)) from None
    env: dict[str, object] = {"__name__": "__pipefile__", "__file__": path, "__builtins__": builtins}
    if not _namespaces:
        atexit.register(_clear_namespaces)  # before any the Pipefile registers: runs after them
    _namespaces[path] = env
    directory = os.path.dirname(path)
    sys.path.insert(0, directory)
    _loading += 1
    try:
        exec(code, env)
    except DefinitionError as e:
        if e.where is None:
            e.where = _where(e.__traceback__, path)
        raise
    except PipelineException as e:
        first = e.msg.splitlines()[0] if e.msg else type(e).__name__
        raise DefinitionError(first, _where(e.__traceback__, path)) from None
    except SystemExit as e:
        raise DefinitionError(f"the Pipefile called exit({e.code})", _where(e.__traceback__, path)) from None
    except Exception as e:  # noqa: BLE001 - any error in user code is a definition error
        text = str(e).splitlines()[0] if str(e) else ""
        raise DefinitionError(f"{type(e).__name__}: {text}".rstrip(": "), _where(e.__traceback__, path)) from None
    finally:
        _loading -= 1
        try:
            sys.path.remove(directory)
        except ValueError:
            pass
    found: dict[int, tuple[str, Pipeline]] = {}
    for name, value in env.items():
        if isinstance(value, Pipeline) and id(value) not in found:
            found[id(value)] = (name, value)
    if not found:
        raise DefinitionError("the Pipefile defines no Pipeline at module level", (rel, 1))
    if len(found) > 1:
        names = ", ".join(sorted(n for n, _ in found.values()))
        raise DefinitionError(f"the Pipefile defines several Pipelines ({names}); keep one at module level", (rel, 1))
    return next(iter(found.values()))[1]
