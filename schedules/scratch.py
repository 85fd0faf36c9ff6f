"""Per-task scratch buffers of the CPU kernels, kept on the stack.

TVM 0.27 lowers a buffer of scope "local" on a CPU target, and one of scope "global" of 1 KB
or more, to a ``TVMBackendAllocWorkspace`` / ``TVMBackendFreeWorkspace`` pair around its scope:
a workspace-pool search per call. Inside a parallel loop that is a pair per task (the int8
lm_head of the 0.6B model has 9,496 tasks), and took 8 % of a q4 decode step's CPU time in perf.
Only a "global" buffer under 1 KB becomes a stack slot, which LLVM can also keep in registers.
The same holds for TVMScript's ``x = expr``, which in 0.27 declares a mutable scalar buffer of
scope "local": our kernels bind values with ``x: T.let = expr`` instead.
"""

from __future__ import annotations

import math

import tvm
from tvm import tirx
from tvm.script import tirx as T

STACK_LIMIT = 1024  # bytes: LowerTVMBuiltin's kMaxStackAlloca


def stack_buffer(shape: tuple[int, ...], dtype: str) -> tirx.Buffer:
    """A block's scratch buffer on the stack (inside ``T.sblock``); too large a one fails
    here rather than falling back to the workspace pool unnoticed."""
    element = tvm.DataType(dtype)
    size = math.prod(shape) * element.lanes * element.bits // 8
    assert size < STACK_LIMIT, f"{shape} {dtype}: {size} bytes would not be on the stack"
    return T.sblock_alloc_buffer(shape, dtype, scope="global")
