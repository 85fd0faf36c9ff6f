"""RoPE for the paged KV cache: split the fused qkv projection and rotate q and k.

For token s at position p and frequency index j < D/2 (D the head dimension, θ the base),

    φ = p / θ^(2j / D)
    x'[j]       = x[j] cos φ - x[j + D/2] sin φ
    x'[j + D/2] = x[j + D/2] cos φ + x[j] sin φ

for every query and key head (rotate-half, as Qwen3); values are copied. TVM's CPU kernel
(``llama_rope_with_position_map``) is one serial loop over tokens x heads x D that calls libm's
``pow``, ``cos`` and ``sin`` for every element: 3,072 of each per token of Qwen3-0.6B, about a
fifth of a 128-token prefill. Here a task per token (parallel in a prefill, ``rows.each_row``)
computes the D/2 angles once and rotates all heads with vector arithmetic. Same signature as
TVM's, so the cache calls it unchanged; the angles are computed the same way (float32, libm),
so results match it exactly.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from qwen3c.schedules.rows import each_row
from qwen3c.schedules.scratch import stack_buffer


def split_rotary(theta: float, head_dim: int, q_heads: int, kv_heads: int,
                 dtype: str) -> tirx.PrimFunc:
    """(qkv [n, q_heads + 2 kv_heads, D], positions [n]) -> rotated q, rotated k, v."""
    D, HALF, QH, KVH = head_dim, head_dim // 2, q_heads, kv_heads
    assert head_dim % 2 == 0, head_dim

    @T.macro
    def rotate_heads(qkv, out, s, first, heads, cos, sin):
        for h in range(heads):
            for j in T.vectorized(HALF):
                out[s, h, j] = T.Cast(dtype, cos[j] * T.Cast("float32", qkv[s, first + h, j])
                                      - sin[j] * T.Cast("float32", qkv[s, first + h, j + HALF]))
                out[s, h, j + HALF] = T.Cast(
                    dtype, cos[j] * T.Cast("float32", qkv[s, first + h, j + HALF])
                    + sin[j] * T.Cast("float32", qkv[s, first + h, j]))

    @T.macro
    def copy_heads(qkv, out, s, first, heads):
        for h in range(heads):
            for d in T.vectorized(D):
                out[s, h, d] = qkv[s, first + h, d]

    @T.macro
    def rotate_token(s, qkv, position_map, q, k, v, apply_rope):
        with T.sblock("token"):
            T.reads()  # a task per token; nothing schedules this block
            T.writes()
            cos = stack_buffer((HALF,), "float32")
            sin = stack_buffer((HALF,), "float32")
            if apply_rope > 0:
                for j in range(HALF):
                    angle: T.let = T.Cast("float32", position_map[s]) / T.pow(
                        T.float32(theta), T.Cast("float32", j * 2) / T.float32(D))
                    cos[j] = T.cos(angle)
                    sin[j] = T.sin(angle)
                rotate_heads(qkv, q, s, 0, QH, cos, sin)
                rotate_heads(qkv, k, s, QH, KVH, cos, sin)
            else:
                copy_heads(qkv, q, s, 0, QH)
                copy_heads(qkv, k, s, QH, KVH)
            copy_heads(qkv, v, s, QH + KVH, KVH)

    rotate_rows = each_row(rotate_token)

    @T.prim_func(private=True, s_tir=True)
    def rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle,
             var_v: T.handle, apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        n = T.int32()
        position_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (n, QH + 2 * KVH, D), dtype)
        q = T.match_buffer(var_q, (n, QH, D), dtype)
        k = T.match_buffer(var_k, (n, KVH, D), dtype)
        v = T.match_buffer(var_v, (n, KVH, D), dtype)
        position_map = T.match_buffer(var_position_map, (n,), "int32",
                                      elem_offset=position_offset)
        rotate_rows(n, qkv, position_map, q, k, v, apply_rope)

    return rope
