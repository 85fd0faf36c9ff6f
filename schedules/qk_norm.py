"""Qwen3's q/k RMSNorm over the fused qkv projection, as one CPU kernel.

The model normalises each query head and each key head of ``qkv`` [tokens, Hq + 2 Hkv, D]
(statistics in float32, as HF) and concatenates them with the untouched value heads for the
paged KV cache. Legalized, that is a split, two casts up, two norms, two casts down and a
concatenate: six kernel launches per layer and token (plus the VM's shape bookkeeping), each a
few microseconds around almost no work in decode. ``fuse_qk_norm`` routes that chain to
``qk_norm``: one pass over the heads, tokens in parallel.
"""

from __future__ import annotations

import functools

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from qwen3c.schedules.cpu_gemm import (
    FLOATS,
    bound_value,
    call_per_token,
    is_op,
    kernel_once,
    relax_function_pass,
)
from qwen3c.schedules.rows import each_row
from qwen3c.schedules.scratch import stack_buffer


@functools.cache
def qk_norm(q_heads: int, kv_heads: int, head_dim: int, eps: float,
            dtype: str) -> tirx.PrimFunc:
    """y[t] = qkv[t] with head h < Hq scaled by rsqrt(mean(h²) + eps) · w_q, heads Hq .. Hq +
    Hkv likewise with w_k, the value heads copied; qkv and y are [tokens, (Hq + 2 Hkv) · D]."""
    H, KV, D = q_heads, kv_heads, head_dim
    W = (H + 2 * KV) * D

    @T.macro
    def normalise(t, qkv, w_q, w_k, y):
        with T.sblock("token"):
            T.reads()  # a task per token; nothing schedules this block
            T.writes()
            squares = stack_buffer((1,), "float32")
            for h in range(H + KV):
                squares[0] = T.float32(0)
                for i in range(D):
                    squares[0] = squares[0] + T.Cast("float32", qkv[t, h * D + i]) * T.Cast(
                        "float32", qkv[t, h * D + i])
                scale: T.let = T.rsqrt(squares[0] / T.float32(D) + T.float32(eps))
                for i in T.vectorized(D):
                    y[t, h * D + i] = T.Cast(dtype, T.Cast("float32", qkv[t, h * D + i])
                                             * scale * T.if_then_else(h < H, w_q[i], w_k[i]))
            for i in T.vectorized(KV * D):
                y[t, (H + KV) * D + i] = qkv[t, (H + KV) * D + i]

    normalise_rows = each_row(normalise)

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_qkv: T.handle, w_q: T.Buffer((D,), "float32"),
               w_k: T.Buffer((D,), "float32"), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        qkv = T.match_buffer(var_qkv, (n, T.int64(W)), dtype)
        y = T.match_buffer(var_y, (n, T.int64(W)), dtype)
        normalise_rows(n, qkv, w_q, w_k, y)

    return kernel


def _without_cast(mutator: relax.PyExprMutator, expr: relax.Expr) -> relax.Expr:
    """The value under an ``astype`` (none is emitted where the dtypes already agree)."""
    value = bound_value(mutator, expr)
    return bound_value(mutator, value.args[0]) if is_op(value, "relax.astype") else value


@relax.expr_functor.mutator
class _QKNormFuser(relax.PyExprMutator):
    """Rewrites ``concat([norm_q(q), norm_k(k), v], axis=2)``, ``q, k, v = split(qkv)``, into
    one ``qk_norm`` call over qkv; what it bypasses is left for dead-code elimination."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        match = self._match(call)
        if match is None:
            return call
        qkv, w_q, w_k, q_heads, kv_heads, eps = match
        *lead, heads, head_dim = list(qkv.ty.shape)
        heads, head_dim, dtype = int(heads), int(head_dim), qkv.ty.dtype
        kernel = kernel_once(self.builder_, self.kernels,
                             ("qk_norm", q_heads, kv_heads, head_dim, eps, dtype),
                             lambda: qk_norm(q_heads, kv_heads, head_dim, eps, dtype))
        rows = self.builder_.emit(relax.op.reshape(qkv, [*lead, heads * head_dim]))
        normed = self.builder_.emit(call_per_token(self.builder_, kernel, rows,
                                                   heads * head_dim, dtype, w_q, w_k))
        return relax.op.reshape(normed, qkv.ty.shape)

    def _match(self, call: relax.Call) -> tuple | None:
        """(qkv, w_q, w_k, Hq, Hkv, eps) when ``call`` is the q/k-norm chain over qkv's
        heads axis (static heads and head size, float, one epsilon, float32 weights)."""
        if not is_op(call, "relax.concat"):
            return None
        parts = bound_value(self, call.args[0])
        if not isinstance(parts, relax.Tuple) or len(parts.fields) != 3:
            return None
        q_norm, k_norm = (_without_cast(self, part) for part in parts.fields[:2])
        v = bound_value(self, parts.fields[2])
        if not (is_op(q_norm, "relax.nn.rms_norm") and is_op(k_norm, "relax.nn.rms_norm")):
            return None
        q, k = (_without_cast(self, norm.args[0]) for norm in (q_norm, k_norm))
        gets = (q, k, v)
        if not all(isinstance(g, relax.TupleGetItem) and g.index == i
                   and g.tuple_value.same_as(q.tuple_value) for i, g in enumerate(gets)):
            return None
        split = bound_value(self, q.tuple_value)
        if not is_op(split, "relax.split"):
            return None
        qkv = split.args[0]
        ndim = qkv.ty.ndim if isinstance(qkv.ty, relax.TensorType) else -1
        if not (ndim >= 3 and int(split.attrs.axis) in (-2, ndim - 2)
                and int(call.attrs.axis) in (-2, ndim - 2) and qkv.ty.dtype in FLOATS
                and all(isinstance(d, tirx.IntImm) for d in list(qkv.ty.shape)[-2:])):
            return None
        eps = float(q_norm.attrs.epsilon)
        weights = (q_norm.args[1], k_norm.args[1])
        if not (float(k_norm.attrs.epsilon) == eps
                and all(list(n.attrs.axes) in ([-1], [ndim - 1]) for n in (q_norm, k_norm))
                and all(w.ty.dtype == "float32" and w.ty.ndim == 1 for w in weights)):
            return None
        q_heads = int(split.attrs.indices_or_sections[0])
        kv_heads = int(split.attrs.indices_or_sections[1]) - q_heads
        if int(qkv.ty.shape[-2]) != q_heads + 2 * kv_heads:
            return None
        return qkv, *weights, q_heads, kv_heads, eps


def fuse_qk_norm() -> tvm.transform.Pass:
    """The pass that routes Qwen3's q/k-norm chain to ``qk_norm``."""
    return relax_function_pass("FuseQKNorm", _QKNormFuser)
