"""pipebuild: a file-target build tool whose build files use the hailtop.pipeline API."""

from .backend import BatchBackend, LocalBackend
from .exceptions import PipelineException
from .pipeline import Pipeline

__version__ = "0.1.0"
__all__ = ["Pipeline", "LocalBackend", "BatchBackend", "PipelineException"]
