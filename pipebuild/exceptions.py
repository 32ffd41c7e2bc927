"""The exception hierarchy.

    PipelineException                 the hail name; every pipebuild error is one
     ├── DefinitionError              the pipeline or Pipefile is wrong (exit 2)
     │    ├── CycleError              the dependency graph has a cycle (names the path)
     │    ├── DuplicateResourceError  a task declares a resource name twice
     │    └── MissingInputError       a read_input path does not exist
     ├── UsageError                   the command line is wrong (exit 2)
     │    ├── WorkspaceBusy           another build holds the workspace lock
     │    └── CacheError              the cache database cannot be written (read-only, full)
     └── BuildFailed                  one or more tasks failed (exit 1); names them

Definition and usage errors are printed as one line, never a traceback. A build failure
is printed as a report per failed task (name, exit code, log path, last lines of stderr).
"""

from __future__ import annotations

import os
from collections.abc import Sequence


class PipelineException(Exception):
    """Base of every pipebuild error; `.msg` holds the message, as in hailtop.pipeline."""

    def __init__(self, msg: str = "") -> None:
        super().__init__(msg)
        self.msg = msg


class DefinitionError(PipelineException):
    """The pipeline is ill-defined: reported as one line, exit status 2."""

    def __init__(self, msg: str, where: tuple[str, int] | None = None) -> None:
        super().__init__(msg)
        self.where = where

    def one_line(self) -> str:
        """The message prefixed with 'file:line: ' when the place is known."""
        first = self.msg.splitlines()[0] if self.msg else type(self).__name__
        if self.where is None:
            return first
        path = os.path.relpath(self.where[0])
        if path.startswith(".."):
            path = self.where[0]
        return f"{path}:{self.where[1]}: {first}"


class CycleError(DefinitionError):
    """A dependency cycle; the message keeps the original prefix and adds the path."""


class DuplicateResourceError(DefinitionError, AssertionError):
    """A resource name declared twice (the original raised a bare AssertionError)."""


class MissingInputError(DefinitionError):
    """An input file named by read_input does not exist."""


class UsageError(PipelineException):
    """The command line asks for something that cannot be done: exit status 2."""


class WorkspaceBusy(UsageError):
    """Another pipebuild holds this workspace's lock."""


class CacheError(UsageError):
    """The cache database cannot be opened or written (read-only, disk full, I/O error)."""


class BuildFailed(PipelineException):
    """Some tasks failed; `.failed` lists their names."""

    def __init__(self, failed: Sequence[str], msg: str | None = None) -> None:
        self.failed = list(failed)
        names = ", ".join(self.failed)
        super().__init__(msg or f"{len(self.failed)} task(s) failed: {names}")
