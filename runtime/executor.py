"""Where the compiled functions run: in this process, or on the workers of a sharded model.

``Model`` and ``PagedKVCache`` talk only to an ``Executor``, so the same generation, batching
and serving code drives one device or N. A sharded artifact runs on a TVM disco session: one
worker per device (worker 0 is a thread of this process, the others are child processes), each
holding its weight shard and its kv-head slice of the KV cache; every call is broadcast to all
workers, and results are read from worker 0.
"""

from __future__ import annotations

import atexit
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm.runtime import ShapeTuple

from qwen3c.errors import TargetError, WorkerError
from qwen3c.runtime.artifact import LIBRARY, Manifest, load_params
from qwen3c.runtime.host_memory import ReusedInputs, is_host
from qwen3c.runtime.offload import attach_partitions
from qwen3c.runtime.worker_side import take_failure
from qwen3c.runtime.workers import WorkerProcesses, disco_module
from qwen3c.targets import Target, get_target

WORKER_ENTRYPOINT = "qwen3c.runtime.workers"


class Executor(ABC):
    threads: int | None  # host threads per worker, where kernels run on host threads

    @abstractmethod
    def builtin(self, name: str, *args: Any) -> Any:
        """Call the TVM global function ``name`` (KV-cache bookkeeping) on every shard; return
        shard 0's result."""

    @abstractmethod
    def create_kv_cache(self, *sizes: int) -> Any:
        """The compiled ``create_paged_kv_cache`` (each shard makes its slice)."""

    @abstractmethod
    def run(self, entry: str, inputs: Sequence[np.ndarray], kv_cache: Any,
            outputs: int = 1) -> list[np.ndarray]:
        """Call a compiled entry point with the weights appended; return its ``outputs``
        results from shard 0 as numpy arrays."""

    @abstractmethod
    def close(self) -> None:
        """Release workers; a closed sharded executor refuses further calls."""

    def worker_pids(self) -> list[int]:
        """Processes computing for this executor besides this one."""
        return []


class LocalExecutor(Executor):
    def __init__(self, directory: Path, manifest: Manifest, device: tvm.runtime.Device,
                 threads: int | None, reference_partitions: bool = False):
        self.threads = threads
        self._device = device
        library = tvm.runtime.load_module(str(directory / LIBRARY))
        attach_partitions(library, directory, manifest, reference_partitions)
        self._vm = tvm.relax.VirtualMachine(library, device)
        self._params = load_params(directory, manifest, device)
        self._entries: dict[str, Any] = {}  # the VM's functions, looked up once
        self._globals: dict[str, Any] = {}
        self._inputs = ReusedInputs() if is_host(device) else None

    def builtin(self, name: str, *args: Any) -> Any:
        if name not in self._globals:
            self._globals[name] = tvm.get_global_func(name)
        return self._globals[name](*args)

    def create_kv_cache(self, *sizes: int) -> Any:
        return self._vm["create_paged_kv_cache"](*(ShapeTuple([s]) for s in sizes))

    def run(self, entry: str, inputs: Sequence[np.ndarray], kv_cache: Any,
            outputs: int = 1) -> list[np.ndarray]:
        on_device = (self._inputs(list(inputs)) if self._inputs is not None
                     else (tvm.runtime.tensor(a, self._device) for a in inputs))
        if entry not in self._entries:
            self._entries[entry] = self._vm[entry]
        result = self._entries[entry](*on_device, kv_cache, self._params)
        return [_host_view(result)] if outputs == 1 else [_host_view(r) for r in result]

    def close(self) -> None:
        """Nothing to release: the VM and weights go with the last reference."""


class ShardedExecutor(Executor):
    """A disco session over N workers. A worker that dies or fails stops them all: every
    later call raises ``WorkerError`` with the first failure."""

    def __init__(self, directory: Path, manifest: Manifest, target: Target,
                 device_ids: list[int], threads: int | None):
        self.threads = threads
        self._failure: str | None = None
        self._scratch = tempfile.TemporaryDirectory(prefix="qwen3c-workers-")
        self._workers = WorkerProcesses(target.worker_launcher())
        disco_module()
        self._session = tvm.get_global_func("runtime.disco.SessionProcess")(
            len(device_ids), 1, self._workers.name, WORKER_ENTRYPOINT)
        self._functions: dict[str, Any] = {}
        atexit.register(self.close)  # workers exit cleanly even if the model is never closed
        try:
            target.start_collectives(self._session, device_ids, Path(self._scratch.name))
            self._module = self._session.load_vm_module(str(directory / LIBRARY))
            self._params = self._function("qwen3c.worker.load_shard")(str(directory))
            self._session.sync_worker_0()
            self._check()
            pids = self._function("qwen3c.worker.pid")()
            for worker in range(1, len(device_ids)):
                self._workers.worker_pids[worker] = pids.debug_get_from_remote(worker)
        except BaseException:
            self.close()
            raise

    def worker_pids(self) -> list[int]:
        """The worker processes (all but worker 0, which is a thread of this process)."""
        return list(self._workers.worker_pids.values())

    def builtin(self, name: str, *args: Any) -> Any:
        self._check_open()
        result = self._function(name)(*args).debug_get_from_remote(0)
        self._check()
        return result

    def create_kv_cache(self, *sizes: int) -> Any:
        self._check_open()
        cache = self._module["create_paged_kv_cache"](*(ShapeTuple([s]) for s in sizes))
        self._session.sync_worker_0()
        self._check()
        return cache

    def run(self, entry: str, inputs: Sequence[np.ndarray], kv_cache: Any,
            outputs: int = 1) -> list[np.ndarray]:
        self._check_open()
        result = self._module[entry](*(self._session.broadcast(a) for a in inputs), kv_cache,
                                     self._params)
        items = [result] if outputs == 1 else [
            self._function("vm.builtin.tuple_getitem")(result, i) for i in range(outputs)]
        arrays = [item.debug_get_from_remote(0).numpy() for item in items]
        self._check()
        return arrays

    def close(self) -> None:
        """Let the workers finish (or stop them, after a failure). The session object itself
        ends when its last reference does; its pipes stay writable until then (see
        ``workers.py``)."""
        if self._workers.stopped:
            return
        grace_s = 0.0
        if self._failure is None:
            self._session.shutdown()  # each worker leaves its loop and exits
            self._failure, grace_s = "the model was closed", 5.0
        self._workers.stop(grace_s)
        self._scratch.cleanup()

    def _function(self, name: str) -> Any:
        if name not in self._functions:
            self._functions[name] = self._session.get_global_func(name)
        return self._functions[name]

    def _check_open(self) -> None:
        if self._failure is None:
            dead = self._workers.dead()
            if dead:
                self._fail(_describe_exits(dead))
        if self._failure is not None:
            raise WorkerError(_stopped_message(self._failure))

    def _check(self) -> None:
        """After worker 0 finished a step: did it record a failure, or did a worker exit?"""
        failure = take_failure()
        dead = self._workers.dead()
        if failure or dead:
            self._fail("; ".join(filter(None, [_describe_exits(dead), failure])))

    def _fail(self, reason: str) -> None:
        self._failure = reason
        self._workers.stop()
        raise WorkerError(_stopped_message(reason))


def _host_view(tensor: tvm.runtime.Tensor) -> np.ndarray:
    """A numpy array of a result: a view of a CPU tensor's memory (it keeps the tensor alive),
    a copy from any other device; a view spares a copy of the logits every step."""
    if is_host(tensor.device):
        return np.from_dlpack(tensor)
    return tensor.numpy()


def _stopped_message(reason: str) -> str:
    return f"the sharded model's workers are stopped ({reason}); load the model again"


def _describe_exits(dead: dict[int, str]) -> str:
    return ", ".join(f"worker {wid} {how}" for wid, how in dead.items())


def parse_devices(text: str, kind: str) -> list[int]:
    """``cpu:0,cpu:1`` -> [0, 1]; every device must be of the artifact's ``kind``."""
    ids = []
    for item in text.split(","):
        name, _, index = item.strip().partition(":")
        if name != kind or not index.isdigit():
            raise TargetError(f"--devices {text!r}: expected {kind}:INDEX items separated by "
                              f"commas (this artifact runs on {kind}), e.g. {kind}:0,{kind}:1")
        ids.append(int(index))
    if len(set(ids)) != len(ids):
        raise TargetError(f"--devices {text!r} names a device twice")
    return ids


def open_executor(directory: Path, manifest: Manifest, devices: str | None,
                  threads: int | None, reference_partitions: bool = False) -> Executor:
    """An executor for the artifact: local for one shard, a disco session for several."""
    target = get_target(manifest.target.name)
    shards = manifest.parallel.shards
    ids = parse_devices(devices, target.device_kind) if devices else list(range(shards))
    if len(ids) != shards:
        raise TargetError(
            f"this artifact was compiled for {shards} device(s) and --devices names "
            f"{len(ids)}; recompile with --tensor-parallel {len(ids)} to use that many")
    threads = target.configure_threads(threads, workers=shards)
    target.prepare_process(manifest.target)  # worker 0 is a thread of this process
    if shards == 1:
        return LocalExecutor(directory, manifest, tvm.device(target.device_kind, ids[0]),
                             threads, reference_partitions)
    return ShardedExecutor(directory, manifest, target, ids, threads)
