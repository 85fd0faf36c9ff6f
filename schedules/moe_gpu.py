"""Mixture-of-experts kernels for NVIDIA GPUs, with thread bindings.

The same operations as ``moe.py`` with the same operands, organised for thousands of threads
instead of a few cores: no grouping by expert (the CPU kernels group so each expert's weights
stream through one core's cache; on the GPU every (token, slot) pair gets its own threads):

    route     one thread per token: softmax over E, top-k, optional renormalisation
    gate_up   a block per (token, slot) pair, a thread per intermediate feature:
              act[p, i] = silu(W1[e, i] · x[t]) * (W1[e, I + i] · x[t]), e = experts[t, s]
    down      a block per token, a thread per hidden feature:
              out[t, h] = Σ_s weights[t, s] · (W2[e, h] · act[t * k + s])
    stats     one thread (a few values per token)

Pairs routed to experts this shard does not hold (expert parallelism) contribute zero. All sums
are float32. Compiled here for sm_80/sm_90; never run (no GPU was available to this project).
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from qwen3c.schedules.moe import route_token, sum_router_stats

THREADS = 128  # threads per block of the per-feature kernels and of route


@functools.cache
def moe_route(num_experts: int, top_k: int, normalize: bool) -> tirx.PrimFunc:
    """``moe.route_token`` for every token, a thread each."""
    E, K = num_experts, top_k
    route_one = route_token(E, K, normalize)

    @T.prim_func(private=True, s_tir=True)
    def route(var_logits: T.handle, var_weights: T.handle, var_experts: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True,
                     "qwen3c.normalize": normalize})
        n = T.int64()
        logits = T.match_buffer(var_logits, (n, T.int64(E)), "float32")
        weights = T.match_buffer(var_weights, (n, T.int64(K)), "float32")
        experts = T.match_buffer(var_experts, (n, T.int64(K)), "int32")
        for block in T.thread_binding((n + THREADS - 1) // THREADS, thread="blockIdx.x"):
            for thread in T.thread_binding(THREADS, thread="threadIdx.x"):
                with T.sblock("route"):
                    probs = T.sblock_alloc_buffer((E,), "float32", scope="local")
                    stat = T.sblock_alloc_buffer((2,), "float32", scope="local")
                    best = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    if block * THREADS + thread < n:
                        route_one(logits, weights, experts, probs, stat, best,
                                  block * THREADS + thread)

    return route


@functools.cache
def moe_gate_up_silu(num_experts: int, top_k: int, hidden: int, intermediate: int,
                     dtype: str) -> tirx.PrimFunc:
    """act[t * k + s, i] for every pair, from the expert ids directly (no grouping)."""
    E, K, H, I = num_experts, top_k, hidden, intermediate

    @T.prim_func(private=True, s_tir=True)
    def gate_up(var_x: T.handle, weight: T.Buffer((E, 2 * I, H), dtype), var_experts: T.handle,
                first: T.Buffer((1,), "int64"), var_act: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, T.int64(H)), dtype)
        experts = T.match_buffer(var_experts, (n, T.int64(K)), "int32")
        act = T.match_buffer(var_act, (n * T.int64(K), T.int64(I)), dtype)
        for pair in T.thread_binding(n * K, thread="blockIdx.x"):
            for thread in T.thread_binding(THREADS, thread="threadIdx.x"):
                with T.sblock("gate_up"):
                    # Whole-buffer regions: indices read from local buffers are not regions.
                    T.reads(x[0:n, 0:H], weight[0:E, 0:2 * I, 0:H], experts[0:n, 0:K], first[0])
                    T.writes(act[pair, 0:I])
                    acc = T.sblock_alloc_buffer((2,), "float32", scope="local")
                    # local expert, feature (scalars live in buffers: TIR blocks take no lets)
                    at = T.sblock_alloc_buffer((2,), "int64", scope="local")
                    at[0] = T.Cast("int64", experts[pair // K, pair % K]) - first[0]
                    for chunk in range((I + THREADS - 1) // THREADS):
                        at[1] = chunk * THREADS + thread
                        if at[1] < I:
                            acc[0] = T.float32(0)
                            acc[1] = T.float32(0)
                            if at[0] >= 0 and at[0] < E:
                                for h in range(H):
                                    acc[0] = acc[0] + T.Cast("float32", x[pair // K, h]) * T.Cast(
                                        "float32", weight[at[0], at[1], h])
                                    acc[1] = acc[1] + T.Cast("float32", x[pair // K, h]) * T.Cast(
                                        "float32", weight[at[0], I + at[1], h])
                            act[pair, at[1]] = T.Cast(
                                dtype, acc[0] / (T.float32(1) + T.exp(-acc[0])) * acc[1])

    return gate_up


@functools.cache
def moe_down_sum(num_experts: int, top_k: int, hidden: int, intermediate: int,
                 dtype: str) -> tirx.PrimFunc:
    """out[t, h] = Σ_s weights[t, s] · (W2[e, h] · act[t * k + s]) in float32."""
    E, K, H, I = num_experts, top_k, hidden, intermediate

    @T.prim_func(private=True, s_tir=True)
    def down(var_act: T.handle, weight: T.Buffer((E, H, I), dtype), var_experts: T.handle,
             first: T.Buffer((1,), "int64"), var_routing: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        act = T.match_buffer(var_act, (n * T.int64(K), T.int64(I)), dtype)
        experts = T.match_buffer(var_experts, (n, T.int64(K)), "int32")
        routing = T.match_buffer(var_routing, (n, T.int64(K)), "float32")
        out = T.match_buffer(var_out, (n, T.int64(H)), "float32")
        for t in T.thread_binding(n, thread="blockIdx.x"):
            for thread in T.thread_binding(THREADS, thread="threadIdx.x"):
                with T.sblock("down"):
                    T.reads(act[0:n * K, 0:I], weight[0:E, 0:H, 0:I], experts[t, 0:K], first[0],
                            routing[t, 0:K])
                    T.writes(out[t, 0:H])
                    acc = T.sblock_alloc_buffer((2,), "float32", scope="local")
                    at = T.sblock_alloc_buffer((2,), "int64", scope="local")  # feature, expert
                    for chunk in range((H + THREADS - 1) // THREADS):
                        at[0] = chunk * THREADS + thread
                        if at[0] < H:
                            acc[0] = T.float32(0)
                            for s in range(K):
                                at[1] = T.Cast("int64", experts[t, s]) - first[0]
                                if at[1] >= 0 and at[1] < E:
                                    acc[1] = T.float32(0)
                                    for i in range(I):
                                        acc[1] = acc[1] + T.Cast(
                                            "float32", act[t * K + s, i]) * T.Cast(
                                            "float32", weight[at[1], at[0], i])
                                    acc[0] = acc[0] + routing[t, s] * acc[1]
                            out[t, at[0]] = acc[0]

    return down


@functools.cache
def moe_router_stats(num_experts: int, top_k: int) -> tirx.PrimFunc:
    """As ``moe.moe_router_stats``, on one GPU thread."""
    E, K = num_experts, top_k
    accumulate = sum_router_stats(E, K)

    @T.prim_func(private=True, s_tir=True)
    def router_stats(var_logits: T.handle, var_weights: T.handle, var_experts: T.handle,
                     stats: T.Buffer((3, E), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        logits = T.match_buffer(var_logits, (n, T.int64(E)), "float32")
        weights = T.match_buffer(var_weights, (n, T.int64(K)), "float32")
        experts = T.match_buffer(var_experts, (n, T.int64(K)), "int32")
        for _block in T.thread_binding(1, thread="blockIdx.x"):
            for _thread in T.thread_binding(1, thread="threadIdx.x"):
                with T.sblock("router_stats"):
                    stat = T.sblock_alloc_buffer((2,), "float32", scope="local")
                    accumulate(logits, weights, experts, stats, stat, n)

    return router_stats
