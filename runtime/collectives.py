"""CPU collectives for TVM disco, on torch.distributed's gloo backend.

TVM ships collectives for NCCL/RCCL only. Disco looks a collective up by name,
``runtime.disco.<ccl>.<op>``, where ``<ccl>`` is the library named at ``init_ccl`` and empty
when none was; registering ``runtime.disco..allreduce`` and ``..broadcast_from_worker0`` here
gives CPU workers the two collectives the model and the driver use. The tensors are shared with
torch through DLPack, so nothing is copied on the way to gloo. A peer that died or hangs
fails the collective (gloo notices a closed connection at once, a hang after ``TIMEOUT``); see
``worker_side.contained`` for how that failure reaches the driver.
"""

from __future__ import annotations

import datetime
import threading

import torch
import torch.distributed as dist
import tvm
import tvm_ffi

from qwen3c.runtime.worker_side import contained, worker_id

TIMEOUT = datetime.timedelta(seconds=120)
SUM = 0  # TVM's ReduceKind::kSum

# The gloo group of each disco worker thread, by OS thread id: TVM calls into Python from its
# own threads with a fresh Python thread state each time, so threading.local would forget it.
_groups: dict[int, dist.ProcessGroup] = {}


@tvm_ffi.register_global_func("qwen3c.collectives.init")
@contained
def _init(store_path: str, num_workers: int) -> None:
    """Join this worker to the gloo group rendezvousing at ``store_path`` (a file)."""
    store = dist.FileStore(store_path, num_workers)
    _groups[threading.get_ident()] = dist.ProcessGroupGloo(store, worker_id(), num_workers,
                                                           TIMEOUT)


@tvm_ffi.register_global_func("runtime.disco..allreduce", override=True)
@contained
def _allreduce(send: tvm.runtime.Tensor, kind: int, in_group: bool,
               recv: tvm.runtime.Tensor) -> None:
    if kind != SUM:
        raise NotImplementedError(f"only sum all-reduce is implemented on CPU (kind {kind})")
    out = torch.from_dlpack(recv)
    out.copy_(torch.from_dlpack(send))
    _groups[threading.get_ident()].allreduce([out]).wait()


@tvm_ffi.register_global_func("runtime.disco..broadcast_from_worker0", override=True)
@contained
def _broadcast_from_worker0(send: tvm.runtime.Tensor | None, in_group: bool,
                            recv: tvm.runtime.Tensor) -> None:
    out = torch.from_dlpack(recv)
    if send is not None:
        out.copy_(torch.from_dlpack(send))
    _groups[threading.get_ident()].broadcast(out, 0).wait()
