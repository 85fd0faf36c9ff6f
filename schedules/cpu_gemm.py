"""Register-tiled CPU kernel for the projections ``y[m, n] = sum_k x[m, k] · W[n, k]``.

Each parallel task owns a block of weight rows. Prefill (``m >= ROWS_PER_TILE`` tokens) walks
tiles of 4 tokens x 4 weight rows with a 4x4 grid of float32 accumulator vectors (one machine
vector each: 16 lanes on AVX-512, 4 on NEON) that stays in registers, so every loaded vector of
x or W feeds four FMAs instead of one; about twice the GFLOP/s of the plain schedule in
``cpu_matmul.py`` on AVX-512. Decode (fewer tokens) reads each weight row start to end (one
sequential stream per thread, which the hardware prefetcher follows; interleaving 8 rows
measured 1.5x slower) into GEMV_LANES partial sums, several independent FMA chains on any
vector width. Sums are float32 whatever the
storage dtype; the last partial token tile re-reads a valid row instead of branching in the
inner loop, and only its valid rows are stored.

``dispatch_cpu_gemm`` routes ``matmul(x, permute_dims(W), out_dtype=float32)`` with a 2-D
weight whose sizes fit the tiles to this kernel, before legalization; other matmuls keep the
generic path.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

GEMV_LANES = 16  # partial sums per decoded row (a multiple of every machine vector width)
ROWS_PER_TILE = 4  # tokens per prefill tile
COLS_PER_TILE = 4  # weight rows per prefill tile
COLS_PER_GEMV = 8  # weight rows per decode task step
OUT_DTYPE = "float32"


def fits(n: int, k: int) -> bool:
    return k % GEMV_LANES == 0 and n % COLS_PER_GEMV == 0


def nt_gemm(n: int, k: int, dtype: str, lanes: int = 16) -> tirx.PrimFunc:
    """y[m, n] (float32) = x[m, k] · W[n, k]ᵀ for any token count m; ``lanes`` is the float32
    width of one machine vector (it must divide 16)."""
    assert fits(n, k) and GEMV_LANES % lanes == 0, (n, k, lanes)
    N, K, MT, NT, NG, LANES = n, k, ROWS_PER_TILE, COLS_PER_TILE, COLS_PER_GEMV, lanes
    KO, KG = K // LANES, K // GEMV_LANES

    @T.prim_func(private=True, s_tir=True)
    def gemm(var_x: T.handle, w: T.Buffer((N, K), dtype), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        m = T.int64()
        x = T.match_buffer(var_x, (m, T.int64(K)), dtype)
        y = T.match_buffer(var_y, (m, T.int64(N)), OUT_DTYPE)
        if m >= MT:
            for nb in T.parallel(N // NT):
                for mb in range((m + MT - 1) // MT):
                    with T.sblock("gemm_tile"):
                        acc = T.sblock_alloc_buffer((MT, NT, LANES), OUT_DTYPE, scope="local")
                        for i, j in T.grid(MT, NT):
                            for lane in T.vectorized(LANES):
                                acc[i, j, lane] = T.float32(0)
                        for ko in range(KO):
                            for i in T.unroll(MT):
                                for j in T.unroll(NT):
                                    for lane in T.vectorized(LANES):
                                        acc[i, j, lane] = acc[i, j, lane] + T.Cast(
                                            OUT_DTYPE,
                                            x[T.min(mb * MT + i, m - 1), ko * LANES + lane],
                                        ) * T.Cast(OUT_DTYPE, w[nb * NT + j, ko * LANES + lane])
                        for i, j in T.grid(MT, NT):
                            if mb * MT + i < m:
                                y[mb * MT + i, nb * NT + j] = T.float32(0)
                                for lane in range(LANES):
                                    y[mb * MT + i, nb * NT + j] = (y[mb * MT + i, nb * NT + j]
                                                                   + acc[i, j, lane])
        else:
            for nb in T.parallel(N // NG):
                for t, j in T.grid(m, NG):
                    with T.sblock("gemv_row"):
                        acc = T.sblock_alloc_buffer((GEMV_LANES,), OUT_DTYPE, scope="local")
                        for lane in T.vectorized(GEMV_LANES):
                            acc[lane] = T.float32(0)
                        for ko in range(KG):
                            for lane in T.vectorized(GEMV_LANES):
                                acc[lane] = acc[lane] + T.Cast(
                                    OUT_DTYPE, x[t, ko * GEMV_LANES + lane]) * T.Cast(
                                    OUT_DTYPE, w[nb * NG + j, ko * GEMV_LANES + lane])
                        y[t, nb * NG + j] = T.float32(0)
                        for lane in range(GEMV_LANES):
                            y[t, nb * NG + j] = y[t, nb * NG + j] + acc[lane]

    return gemm


@relax.expr_functor.mutator
class _GemmDispatcher(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.kernels: dict[tuple[int, int, str], tvm.ir.GlobalVar] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        transposed = self._bound(call.args[1]) if len(call.args) == 2 else None
        if not _is_nt_matmul(call, transposed):
            return call
        x, weight = call.args[0], transposed.args[0]
        (n, k), dtype = [int(d) for d in weight.ty.shape], weight.ty.dtype
        if not fits(n, k) or x.ty.dtype != dtype:
            return call
        key = (n, k, dtype)
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(nt_gemm(n, k, dtype, self.lanes),
                                                       f"nt_gemm_{n}x{k}_{dtype}")
        lead = list(x.ty.shape)[:-1]
        tokens = lead[0]
        for dim in lead[1:]:
            tokens = tokens * dim
        flat = self.builder_.emit(relax.op.reshape(x, [tokens, k]))
        y = self.builder_.emit(relax.call_tir(self.kernels[key], [flat, weight],
                                              relax.TensorType([tokens, n], OUT_DTYPE)))
        return relax.op.reshape(y, [*lead, n])

    def _bound(self, expr: relax.Expr) -> relax.Expr:
        """What a dataflow variable was bound to (nn emits every op as its own binding)."""
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            return bound if bound is not None else expr
        return expr


def _is_nt_matmul(call: relax.Call, rhs: relax.Expr | None) -> bool:
    """matmul(x, permute_dims(W)) into float32, W a 2-D tensor of static shape."""
    if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"):
        return False
    if not (isinstance(rhs, relax.Call) and isinstance(rhs.op, tvm.ir.Op)
            and rhs.op.name == "relax.permute_dims"):
        return False
    axes = rhs.attrs.axes
    weight = rhs.args[0]
    return (str(call.attrs.out_dtype) == OUT_DTYPE
            and (axes is None or [int(a) for a in axes] == [1, 0])
            and isinstance(weight.ty, relax.TensorType) and weight.ty.ndim == 2
            and all(isinstance(d, tirx.IntImm) for d in weight.ty.shape)
            and isinstance(call.args[0].ty, relax.TensorType) and call.args[0].ty.ndim >= 2)


def dispatch_cpu_gemm(lanes: int) -> tvm.transform.Pass:
    """The pass that routes fitting projections to ``nt_gemm`` tiled for ``lanes``-wide
    float32 vectors."""

    @tvm.transform.module_pass(opt_level=0, name="DispatchCPUGemm")
    def dispatch(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        dispatcher = _GemmDispatcher(mod, lanes)
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                dispatcher.builder_.update_func(gvar, dispatcher.visit_expr(func))
        return dispatcher.builder_.get()

    return dispatch
