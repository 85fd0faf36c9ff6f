"""What qwen3c runs inside every disco worker besides the compiled model: a guard that keeps a
failure on worker 0 from aborting the driver, and the loader of a worker's weight shard.

Worker 0 runs on a thread of the driver process, and an exception escaping a disco worker
thread aborts the whole process. So on worker 0 a failure (a peer that died, a timeout, a weight
file that cannot be read) is recorded instead of raised, and the driver reads it with
``take_failure()`` after each step; on the other workers it is raised, which ends that worker
process, and the driver sees the process gone.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi

from qwen3c.runtime.artifact import load_params, read_manifest
from qwen3c.targets import get_target

_failures: list[str] = []  # failures seen on worker 0 (a thread of this process)
_lock = threading.Lock()


def take_failure() -> str | None:
    """The first failure seen on worker 0 since the last call, if any."""
    with _lock:
        failure = _failures[0] if _failures else None
        _failures.clear()
    return failure


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def worker_id() -> int:
    return int(tvm.get_global_func("runtime.disco.worker_id")()[0])


def contained(func: Callable[..., Any]) -> Callable[..., Any]:
    """Record instead of raise on worker 0 (see the module docstring)."""

    @functools.wraps(func)
    def wrapper(*args: Any) -> Any:
        try:
            return func(*args)
        except Exception as error:
            if worker_id() != 0:
                raise
            with _lock:
                _failures.append(f"{type(error).__name__}: {error}")
            return None

    return wrapper


@tvm_ffi.register_global_func("qwen3c.worker.load_shard")
@contained
def load_shard(directory: str) -> list[tvm.runtime.Tensor]:
    """This worker's weights, on its device, in the order the compiled functions take them."""
    artifact, manifest = read_manifest(Path(directory))
    get_target(manifest.target.name).prepare_process(manifest.target)
    device = tvm.get_global_func("runtime.disco.device")()
    return load_params(artifact, manifest, device, shard=worker_id())


@tvm_ffi.register_global_func("qwen3c.worker.pid")
def process_id() -> int:
    return os.getpid()
