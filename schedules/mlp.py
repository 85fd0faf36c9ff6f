"""The dense MLP's gate_up projection and SwiGLU as one kernel, and the pass that routes it.

``silu(x W_gateᵀ) * (x W_upᵀ)`` was our GEMM writing [tokens, 2I] float32, then TVM's legalized
cast, split, silu and multiply, which get no parallel schedule: at 128 tokens of the 0.6B shape
they took 1.5 ms a layer, 11 % of the prefill, once the GEMM ran on bfloat16 dot products. Here
the same GEMM (``cpu_gemm.projection``) writes a float32 scratch, and SwiGLU runs over it in
parallel, vectorised, with an arithmetic sigmoid (``fast_math``). SwiGLU in the GEMM's tile
epilogue (as the MoE kernels do) measured slower: scalar, and it made LLVM spill the tile's
accumulators (6144x1024 at 128 tokens: 8.3 ms against 4.4 for the GEMM alone).
"""

from __future__ import annotations

import functools

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from qwen3c.schedules import amx_gemm, bf16_dot, bf16_panel, moe
from qwen3c.schedules.cpu_gemm import (
    FLOATS,
    OUT_DTYPE,
    bound_value,
    call_per_token,
    fits,
    is_op,
    kernel_once,
    nt_matmul_operands,
    projection,
    relax_function_pass,
    vector_unit,
)
from qwen3c.schedules.rows import each_row

SWIGLU_CHUNKS = 4  # a token's SwiGLU runs in this many vectorised chunks


def swiglu_rows(intermediate: int, dtype: str):
    """A TVMScript macro ``run(n, y, act)``: act[t] = silu(y[t, :I]) * y[t, I:] for n tokens,
    in float32, vectorised (``fast_math``'s sigmoid); a task per token in a prefill, on the
    calling thread for decode (``rows.each_row``)."""
    I = intermediate
    S = SWIGLU_CHUNKS if I % SWIGLU_CHUNKS == 0 else 1

    @T.macro
    def token(t, y, act):
        for chunk in range(S):
            for i in T.vectorized(I // S):
                act[t, chunk * (I // S) + i] = T.Cast(dtype, moe.swiglu(
                    T.Cast("float32", y[t, chunk * (I // S) + i]),
                    T.Cast("float32", y[t, I + chunk * (I // S) + i])))

    return each_row(token)


@functools.cache
def gate_up_silu(hidden: int, intermediate: int, dtype: str, lanes: int = 16,
                 registers: int = 32, bf16: bool = False, panels: bool = False,
                 amx: bool = False) -> tirx.PrimFunc:
    """act[t] = silu(W[:I] · x[t]) * (W[I:] · x[t]) for a weight W [2I, H] (``bf16``: on
    bfloat16 dot products, see ``bf16_dot.usable``; ``panels``: W stored in bfloat16 panels,
    ``bf16_panel.py``; ``amx``: prefills on AMX tiles, see ``amx_gemm.usable``)."""
    H, I = hidden, intermediate
    if panels:
        body, stored = bf16_panel.projection(2 * I, H, OUT_DTYPE), bf16_panel.panel_shape(2 * I, H)
    else:
        body, stored = projection(2 * I, H, dtype, lanes, registers, bf16, amx), (2 * I, H)
    activate = swiglu_rows(I, dtype)

    @T.prim_func(private=True, s_tir=True)
    def gate_up(var_x: T.handle, weight: T.Buffer(stored, dtype), var_act: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, T.int64(H)), dtype)
        act = T.match_buffer(var_act, (n, T.int64(I)), dtype)
        with T.sblock("gate_up"):
            T.reads()  # runs once; nothing schedules this block
            T.writes()
            y = T.sblock_alloc_buffer((n, T.int64(2 * I)), OUT_DTYPE)
            body(x, weight, y, n)
            activate(n, y, act)

    return gate_up


@functools.cache
def swiglu(intermediate: int, dtype: str) -> tirx.PrimFunc:
    """act[t] = silu(y[t, :I]) * y[t, I:], for a y our GEMM does not make (quantized
    projections)."""
    I = intermediate
    activate = swiglu_rows(I, dtype)

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_y: T.handle, var_act: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        y = T.match_buffer(var_y, (n, T.int64(2 * I)), dtype)
        act = T.match_buffer(var_act, (n, T.int64(I)), dtype)
        with T.sblock("swiglu"):
            T.reads()  # runs once; nothing schedules this block
            T.writes()
            activate(n, y, act)

    return kernel


@relax.expr_functor.mutator
class _SwiGLUFuser(relax.PyExprMutator):
    """Rewrites ``multiply(silu(h[0]), h[1])``, ``h = split(y, 2, axis=-1)``, into one
    ``gate_up_silu`` call where y = x Wᵀ is a projection our GEMM takes (cast to W's dtype),
    else into a ``swiglu`` call over y; what it bypasses is left for dead-code elimination."""

    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        super().__init__(mod)
        self.target = target
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        y = self._swiglu_input(call)
        if y is None:
            return call
        projection = self._gate_up_projection(y)
        if projection is None:
            intermediate, dtype = int(y.ty.shape[-1]) // 2, y.ty.dtype
            kernel = kernel_once(self.builder_, self.kernels, ("swiglu", intermediate, dtype),
                                 lambda: swiglu(intermediate, dtype))
            return call_per_token(self.builder_, kernel, y, intermediate, dtype)
        x, weight = projection
        (rows, hidden), dtype = [int(d) for d in weight.ty.shape], weight.ty.dtype
        intermediate = rows // 2
        bf16 = bf16_dot.usable(self.target, dtype, hidden)
        amx = amx_gemm.usable(self.target, dtype, rows, hidden)
        kernel = kernel_once(self.builder_, self.kernels,
                             ("gate_up_silu", intermediate, hidden, dtype),
                             lambda: gate_up_silu(hidden, intermediate, dtype,
                                                  *vector_unit(self.target), bf16, amx=amx))
        return call_per_token(self.builder_, kernel, x, intermediate, dtype, weight)

    def _swiglu_input(self, call: relax.Call) -> relax.Expr | None:
        """y when ``call`` is SwiGLU over the two halves of y's last axis (static, float)."""
        if not is_op(call, "relax.multiply"):
            return None
        silu, up = (bound_value(self, arg) for arg in call.args)
        if not is_op(silu, "relax.nn.silu"):
            return None
        gate = bound_value(self, silu.args[0])
        if not (isinstance(gate, relax.TupleGetItem) and isinstance(up, relax.TupleGetItem)
                and gate.index == 0 and up.index == 1
                and gate.tuple_value.same_as(up.tuple_value)):
            return None
        halves = bound_value(self, gate.tuple_value)
        if not (is_op(halves, "relax.split") and len(halves.ty.fields) == 2):
            return None
        y = halves.args[0]
        last = y.ty.shape[-1] if isinstance(y.ty, relax.TensorType) else None
        if not (isinstance(last, tirx.IntImm) and int(last) % 2 == 0 and y.ty.ndim >= 2
                and int(halves.attrs.axis) in (-1, y.ty.ndim - 1)
                and y.ty.dtype in FLOATS):
            return None
        return y

    def _gate_up_projection(self, y: relax.Expr) -> tuple[relax.Expr, relax.Expr] | None:
        """(x, W) when y is a projection x Wᵀ our GEMM takes, cast to W's dtype."""
        matmul = bound_value(self, y)
        if is_op(matmul, "relax.astype"):  # back to the weight dtype (none for float32)
            matmul = bound_value(self, matmul.args[0])
        operands = nt_matmul_operands(self, matmul)
        if operands is None:
            return None
        x, weight = operands
        (rows, hidden), dtype = [int(d) for d in weight.ty.shape], weight.ty.dtype
        if not fits(rows, hidden) or x.ty.dtype != dtype or y.ty.dtype != dtype:
            return None
        return x, weight


def fuse_gate_up_silu(target: tvm.target.Target) -> tvm.transform.Pass:
    """The pass that routes the dense MLP's gate_up projection and SwiGLU to ``gate_up_silu``
    (before ``dispatch_cpu_gemm``, which would take the projection alone), and any other
    SwiGLU to ``swiglu``."""

    return relax_function_pass("FuseGateUpSiLU", lambda mod: _SwiGLUFuser(mod, target))
