"""qwen3c: an ahead-of-time compiler for Qwen3 language models, built on Apache TVM Relax."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qwen3c")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

from qwen3c.compile import compile_model
from qwen3c.errors import (
    ArtifactError,
    CheckpointError,
    ConfigError,
    Qwen3cError,
    RequestError,
    TargetError,
)
from qwen3c.runtime import load

__all__ = [
    "ArtifactError",
    "CheckpointError",
    "ConfigError",
    "Qwen3cError",
    "RequestError",
    "TargetError",
    "__version__",
    "compile_model",
    "load",
]
