"""The grouped expert kernels of ``moe.py`` over quantized expert weights (``quant.py``).

Same grouping (``moe_group``: offsets and order) and the same two steps, gate_up with SwiGLU and
down with the weighted scatter-add, but the weights are the integers and bfloat16 scales of
``quantize`` per expert ([E, N, .]) and the products are integer dot products
(``quant.tiled_row_dots``): the activations are quantized to int8 per group once per call, then
every task takes ROWS_PER_TASK weight rows of one expert past the expert's tokens, in tiles.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from qwen3c.schedules.moe import (
    cleared_rows,
    expert_regions,
    scatter_add,
    swiglu_store,
    unit_rows,
)
from qwen3c.schedules.quant import (
    GATE_UP_UNIT,
    ROWS_PER_TASK,
    SCALE_DTYPE,
    TILE_TOKENS,
    IntegerDots,
    QuantScheme,
    activation_quantizer,
    activation_width,
    tiled_row_dots,
)
from qwen3c.schedules.rows import each_row


def each_expert(num_experts: int, features: int, width: int, run):
    """A TVMScript macro: for each expert with tokens, a parallel task per ``width`` output
    features running ``run`` (``tiled_row_dots``) over the expert's grouped rows, in
    ``moe.expert_regions`` (one region for all experts below a tile of tokens, as in decode)."""
    tasks = (features + width - 1) // width

    @T.macro
    def task_over(q, scale, xa, x_scale, x_offset, offsets, dst, routing, order, first_expert,
                  end_expert, task):
        with T.sblock("rows"):
            T.reads()  # independent tasks; nothing schedules this block
            T.writes()
            for e in range(first_expert, end_expert):
                if offsets[e + 1] > offsets[e]:
                    run(q, scale, xa, x_scale, x_offset, e, task * width, offsets[e],
                        offsets[e + 1] - offsets[e], dst, routing, order)

    regions = expert_regions(num_experts, tasks, TILE_TOKENS, task_over)

    @T.macro
    def each(q, scale, xa, x_scale, x_offset, offsets, dst, routing, order, tokens):
        regions(offsets, tokens, q, scale, xa, x_scale, x_offset, offsets, dst, routing, order)

    return each


@functools.cache
def quantized_gate_up_silu(num_experts: int, top_k: int, hidden: int, intermediate: int,
                           scheme: QuantScheme, dtype: str,
                           dots: IntegerDots) -> tirx.PrimFunc:
    """act[r] = silu(W1[e, :I] · x[token]) * (W1[e, I:] · x[token]) for each grouped row; W1
    is stored in ``quant.GATE_UP_LAYOUT``: a task's rows are P gate rows and the up rows of
    the same features, in one run. Each token's activations are quantized once; grouped row r
    reads those of token ``order[r] // K``."""
    E, K, H, I, G = num_experts, top_k, hidden, intermediate, scheme.group
    P = GATE_UP_UNIT
    QN, QH = scheme.storage_shape(2 * I, H)
    quantize_rows = each_row(activation_quantizer(scheme, H, dots))
    run = tiled_row_dots(scheme, H, 2 * P, dots, unit_rows, True,
                         swiglu_store(I, P, dtype), P, lambda order, r: order[r] // K)
    experts = each_expert(E, I, P, run)

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
            xa = T.sblock_alloc_buffer((n, T.int64(activation_width(scheme, H, dots))), "int8")
            x_scale = T.sblock_alloc_buffer((n, T.int64(H // G)), "float32")
            x_offset = T.sblock_alloc_buffer((n, T.int64(H // G)), "int32")
            quantize_rows(n, x, xa, x_scale, x_offset, n)
            experts(q, scale, xa, x_scale, x_offset, offsets, act, None, order, n)

    return gate_up


@functools.cache
def quantized_down_scatter(num_experts: int, top_k: int, hidden: int, intermediate: int,
                           scheme: QuantScheme, dtype: str,
                           dots: IntegerDots) -> tirx.PrimFunc:
    """out[token] = Σ_slots weight[token, slot] · (W2[e] · act[r]), in float32; each task owns
    its output features and a token meets an expert at most once, so no two tasks add to
    the same element."""
    E, K, H, I, G = num_experts, top_k, hidden, intermediate, scheme.group
    NG = ROWS_PER_TASK
    QN, QI = scheme.storage_shape(H, I)
    quantize_rows = each_row(activation_quantizer(scheme, I, dots))
    run = tiled_row_dots(scheme, I, NG, dots, lambda base, j: T.min(base + j, H - 1), True,
                         scatter_add(H, NG, K), NG)
    experts = each_expert(E, H, NG, run)
    clear_rows = cleared_rows(H)

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
            xa = T.sblock_alloc_buffer((n * T.int64(K), T.int64(activation_width(scheme, I, dots))),
                                       "int8")
            x_scale = T.sblock_alloc_buffer((n * T.int64(K), T.int64(I // G)), "float32")
            x_offset = T.sblock_alloc_buffer((n * T.int64(K), T.int64(I // G)), "int32")
            clear_rows(n, out)
            quantize_rows(T.Cast("int64", offsets[E]), act, xa, x_scale, x_offset, n)
            experts(q, scale, xa, x_scale, x_offset, offsets, out, routing, order, n)

    return down
