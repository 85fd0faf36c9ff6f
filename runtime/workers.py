"""The worker processes of a sharded model, and the entry point each of them runs.

TVM disco starts workers through a "process pool" function it looks up by name. Ours keeps
the ``Popen`` handles, so the driver can tell a dead worker from a slow one and can always stop
every worker it started; and it keeps its copy of each worker's pipe ends open until disco
is done with them, so disco's final shutdown message to a worker that already died does not
hit a broken pipe (which TVM turns into an abort of the driver).

Run as ``[LAUNCHER] python -m qwen3c.runtime.workers ID N GROUPS READ_FD WRITE_FD`` by disco.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from typing import Any

import tvm
import tvm_ffi

from qwen3c.runtime.worker_side import process_alive

EXIT_WAIT_S = 5.0
_pool_ids = itertools.count()


def disco_module() -> Any:
    """``tvm.runtime.disco``, imported cleanly.

    ``import tvm`` tries to import disco before the library that registers its functions is
    loaded, fails quietly and leaves a disco module without functions cached; importing it
    again after dropping that stale copy (but not ``process_pool``, which registered a
    function already) works.
    """
    module = sys.modules.get("tvm.runtime.disco")
    if module is not None and hasattr(module, "ProcessSession"):
        return module
    for name in [n for n in sys.modules if n.startswith("tvm.runtime.disco")]:
        if not name.endswith("process_pool"):
            del sys.modules[name]
    import tvm.runtime.disco as disco

    return disco


class WorkerProcesses:
    """Workers 1..N-1 of a disco session as child processes (worker 0 is a driver thread),
    each started behind ``launcher`` (e.g. ``mpiexec -n 1``, so the worker itself may be a
    grandchild: its pid is recorded once it reports it)."""

    def __init__(self, launcher: list[str]):
        self.launcher = launcher
        self.procs: dict[int, subprocess.Popen] = {}
        self.worker_pids: dict[int, int] = {}
        self.stopped = False
        self._held_fds: list[int] = []
        self.name = f"qwen3c.workers.process_pool.{os.getpid()}.{next(_pool_ids)}"
        tvm_ffi.register_global_func(self.name, self._create_pool, override=True)

    def _create_pool(self, num_workers: int, num_groups: int, entrypoint: str):
        def start_or_stop(worker_id: int):
            if worker_id == 0:  # disco has sent its last message: release the pipes too
                self.stop()
                for fd in self._held_fds:
                    os.close(fd)
                self._held_fds.clear()
                return None
            return tvm.runtime.ShapeTuple(
                self._start(worker_id, num_workers, num_groups, entrypoint))

        return start_or_stop

    def _start(self, worker_id: int, num_workers: int, num_groups: int,
               entrypoint: str) -> list[int]:
        driver_read, worker_write = os.pipe()
        worker_read, driver_write = os.pipe()
        cmd = [*self.launcher, sys.executable, "-m", entrypoint, str(worker_id),
               str(num_workers), str(num_groups), str(worker_read), str(worker_write)]
        self.procs[worker_id] = subprocess.Popen(
            cmd, pass_fds=(worker_read, worker_write), stdin=subprocess.DEVNULL,
            stdout=2)  # a launcher's reports must not mix into our output
        self._held_fds += [worker_read, worker_write]
        return [driver_read, driver_write]

    def dead(self) -> dict[int, str]:
        """Worker id -> how it ended, for every worker that has."""
        ended = {wid: f"exited with code {proc.returncode}"
                 for wid, proc in self.procs.items() if proc.poll() is not None}
        for wid, pid in self.worker_pids.items():
            if wid not in ended and not process_alive(pid):
                ended[wid] = f"process {pid} is gone"
        return ended

    def stop(self, grace_s: float = 0.0) -> None:
        """Reap every worker, killing those still running after ``grace_s`` (they hold
        nothing to save)."""
        self.stopped = True
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in self.procs.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in self.worker_pids.values():
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs.values():
            try:
                proc.wait(EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve_as_worker(argv: list[str]) -> None:
    """Register qwen3c's worker-side functions, then run disco's worker loop until shutdown."""
    import qwen3c.runtime.collectives  # noqa: F401 (registers the CPU collectives)

    worker_id, num_workers, num_groups, read_fd, write_fd = (int(a) for a in argv)
    disco_module()
    tvm.get_global_func("runtime.disco.WorkerProcess")(worker_id, num_workers, num_groups,
                                                       read_fd, write_fd)


if __name__ == "__main__":
    serve_as_worker(sys.argv[1:])
