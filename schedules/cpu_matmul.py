"""CPU schedule for the projections: ``y[m, n] = sum_k x[m, k] * W[n, k]`` (+ fused epilogue).

After ``FuseTransposeMatmul`` and ``FuseOps`` every projection is a PrimFunc holding one
``NT_matmul`` reduction block, followed by elementwise epilogue blocks (cast back to 16-bit,
residual add). LLVM alone leaves it on one core; this schedule:

- splits the output features ``n`` into blocks of ``ROWS`` weight rows and runs the blocks in
  parallel (each block's weight rows stay in cache while every token ``m`` passes over them);
- keeps ``k`` innermost and contiguous, so LLVM vectorises the dot product (the llvm target
  enables fast-math reassociation for exactly this);
- computes the epilogue for each token right after its block of outputs, inside the same
  parallel loop, instead of in separate single-threaded passes over the whole output.

This is the plain baseline; register-tiled GEMM and packed-weight GEMV kernels are issue #4.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

ROWS = 16
BLOCK_NAME = "NT_matmul"


def schedule_nt_matmul(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The scheduled function, or ``None`` when ``func`` is not a single NT matmul (or was
    scheduled by hand already)."""
    if func.attrs and func.attrs.get("tirx.is_scheduled"):
        return None
    sch = s_tir.Schedule(func)
    try:
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    except s_tir.ScheduleError:
        return None
    matmuls = [b for b in blocks if sch.get(b).name_hint == BLOCK_NAME]
    if len(matmuls) != 1 or blocks[0] != matmuls[0] or not _is_nt_matmul(sch, matmuls[0]):
        return None
    matmul = matmuls[0]
    *token_loops, n, k = sch.get_loops(matmul)
    tokens = sch.fuse(*token_loops) if len(token_loops) > 1 else token_loops[0]
    n_outer, n_inner = sch.split(n, factors=[None, ROWS])
    sch.reorder(n_outer, tokens, n_inner, k)
    sch.parallel(n_outer)
    for epilogue in blocks[1:]:
        try:
            sch.reverse_compute_at(epilogue, tokens)
        except s_tir.ScheduleError:
            break  # later blocks stay where they are: correct, only less fused
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _is_nt_matmul(sch: s_tir.Schedule, block) -> bool:
    iters = sch.get(block).iter_vars
    kinds = [it.iter_type for it in iters]
    spatial, reduce = tirx.IterVar.DataPar, tirx.IterVar.CommReduce
    return len(iters) >= 3 and kinds[-1] == reduce and all(t == spatial for t in kinds[:-1])


@tvm.transform.module_pass(opt_level=0, name="ScheduleCPUMatmul")
def schedule_cpu_matmuls(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Apply ``schedule_nt_matmul`` to every PrimFunc it fits; leave the others untouched."""
    updates = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            scheduled = schedule_nt_matmul(func)
            if scheduled is not None:
                updates[gvar] = scheduled
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
