"""The grouped expert kernels of ``moe.py`` over quantized expert weights (``quant.py``).

Same grouping (``moe_group``: offsets and order) and the same two steps, gate_up with SwiGLU and
down with the weighted scatter-add, but the weights are the integers and bfloat16 scales of
``quantize`` per expert ([E, N, .]) and the products are integer dot products
(``quant.row_dots``): each token's activations are quantized to int8 per group once per call,
then every task takes ROWS_PER_TASK weight rows of one expert past each of the expert's tokens.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from qwen3c.schedules.quant import (
    ROWS_PER_TASK,
    SCALE_DTYPE,
    QuantScheme,
    activation_quantizer,
    row_dots,
)


def quantized_gate_up_silu(num_experts: int, top_k: int, hidden: int, intermediate: int,
                           scheme: QuantScheme, dtype: str, vnni: bool) -> tirx.PrimFunc:
    """act[r] = silu(W1[e, :I] · x[token]) * (W1[e, I:] · x[token]) for each grouped row; a
    task's rows are P gate rows and the up rows of the same features."""
    E, K, H, I, G = num_experts, top_k, hidden, intermediate, scheme.group
    P = ROWS_PER_TASK // 2
    QN, QH = scheme.storage_shape(2 * I, H)
    LANES = scheme.lanes(H)

    def row_of(base, j):
        feature = T.min(base + j % P, I - 1)
        return T.if_then_else(j < P, feature, I + feature)

    quantize = activation_quantizer(scheme, H)
    dot = row_dots(scheme, H, 2 * P, vnni, row_of, experts=True)

    @T.prim_func(private=True, s_tir=True)
    def gate_up(var_x: T.handle, q: T.Buffer((E, QN, QH), "uint8"),
                scale: T.Buffer((E, 2 * I, H // G), SCALE_DTYPE),
                offsets: T.Buffer((E + 1,), "int32"), var_order: T.handle, var_act: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, T.int64(H)), dtype)
        order = T.match_buffer(var_order, (n * T.int64(K),), "int32")
        act = T.match_buffer(var_act, (n * T.int64(K), T.int64(I)), dtype)
        with T.sblock("gate_up"):
            xa = T.sblock_alloc_buffer((n, T.int64(H)), "int8")
            x_scale = T.sblock_alloc_buffer((n, T.int64(H // G)), "float32")
            x_offset = T.sblock_alloc_buffer((n, T.int64(H // G)), "int32")
            for t in T.parallel(n):
                quantize(x, t, t, xa, x_scale, x_offset)
            for e in range(E):
                if offsets[e + 1] > offsets[e]:
                    first = offsets[e]
                    for task in T.parallel((I + P - 1) // P):
                        for r in range(offsets[e + 1] - first):
                            with T.sblock("rows"):
                                T.reads()  # independent tasks; nothing schedules this block
                                T.writes()
                                acc = T.sblock_alloc_buffer((2 * P, LANES), "float32",
                                                            scope="local")
                                sums = T.sblock_alloc_buffer((LANES,), "int32", scope="local")
                                dots = T.sblock_alloc_buffer((2 * P,), "float32", scope="local")
                                dot(q, scale, xa, x_scale, x_offset, e, task * P,
                                    order[first + r] // K, acc, sums, dots)
                                for j in range(P):
                                    if task * P + j < I:
                                        act[first + r, task * P + j] = T.Cast(
                                            dtype, dots[j] / (T.float32(1) + T.exp(-dots[j]))
                                            * dots[P + j])

    return gate_up


def quantized_down_scatter(num_experts: int, top_k: int, hidden: int, intermediate: int,
                           scheme: QuantScheme, dtype: str, vnni: bool) -> tirx.PrimFunc:
    """out[token] = Σ_slots weight[token, slot] · (W2[e] · act[r]), in float32; each task owns
    its output features and a token meets an expert at most once, so no two tasks add to
    the same element."""
    E, K, H, I, G = num_experts, top_k, hidden, intermediate, scheme.group
    NG = ROWS_PER_TASK
    QN, QI = scheme.storage_shape(H, I)
    LANES = scheme.lanes(I)
    quantize = activation_quantizer(scheme, I)
    dot = row_dots(scheme, I, NG, vnni, lambda base, j: T.min(base + j, H - 1), experts=True)

    @T.prim_func(private=True, s_tir=True)
    def down(var_act: T.handle, q: T.Buffer((E, QN, QI), "uint8"),
             scale: T.Buffer((E, H, I // G), SCALE_DTYPE), offsets: T.Buffer((E + 1,), "int32"),
             var_order: T.handle, var_routing: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        act = T.match_buffer(var_act, (n * T.int64(K), T.int64(I)), dtype)
        order = T.match_buffer(var_order, (n * T.int64(K),), "int32")
        routing = T.match_buffer(var_routing, (n, T.int64(K)), "float32")
        out = T.match_buffer(var_out, (n, T.int64(H)), "float32")
        with T.sblock("down"):
            xa = T.sblock_alloc_buffer((n * T.int64(K), T.int64(I)), "int8")
            x_scale = T.sblock_alloc_buffer((n * T.int64(K), T.int64(I // G)), "float32")
            x_offset = T.sblock_alloc_buffer((n * T.int64(K), T.int64(I // G)), "int32")
            for t in T.parallel(n):
                for h in T.vectorized(H):
                    out[t, h] = T.float32(0)
            for r in T.parallel(n * T.int64(K)):
                if r < T.Cast("int64", offsets[E]):
                    quantize(act, r, r, xa, x_scale, x_offset)
            for e in range(E):
                if offsets[e + 1] > offsets[e]:
                    first = offsets[e]
                    for task in T.parallel((H + NG - 1) // NG):
                        for r in range(offsets[e + 1] - first):
                            with T.sblock("rows"):
                                T.reads()  # independent tasks; nothing schedules this block
                                T.writes()
                                acc = T.sblock_alloc_buffer((NG, LANES), "float32",
                                                            scope="local")
                                sums = T.sblock_alloc_buffer((LANES,), "int32", scope="local")
                                dots = T.sblock_alloc_buffer((NG,), "float32", scope="local")
                                dot(q, scale, xa, x_scale, x_offset, e, task * NG, first + r,
                                    acc, sums, dots)
                                token = order[first + r] // K
                                for j in range(NG):
                                    if task * NG + j < H:
                                        out[token, task * NG + j] = (
                                            out[token, task * NG + j]
                                            + routing[token, order[first + r] % K] * dots[j])

    return down
