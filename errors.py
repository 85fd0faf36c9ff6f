"""The error types qwen3c raises for anything a user can get wrong.

The CLI prints the message of a ``Qwen3cError`` on one line and exits non-zero; anything else is
a bug in qwen3c and keeps its traceback.
"""


class Qwen3cError(Exception):
    """Base of every error a user can cause and fix."""


class ConfigError(Qwen3cError):
    """config.json is missing, malformed, or asks for something qwen3c does not support."""


class CheckpointError(Qwen3cError):
    """The checkpoint's weight files are missing, truncated, corrupt or do not match the config."""


class ArtifactError(Qwen3cError):
    """A compiled artifact is missing, tampered with, or was built for another TVM or target."""


class TargetError(Qwen3cError):
    """An unknown target or architecture, or one this machine cannot build or run."""


class RequestError(Qwen3cError):
    """A generation request the loaded model cannot serve (too long, bad token ids, bad options)."""


class WorkerError(Qwen3cError):
    """A worker process of a sharded model died or failed; its workers have been stopped."""
