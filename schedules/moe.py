"""Mixture-of-experts kernels for the CPU: routing, grouping by expert, grouped expert GEMMs.

A MoE layer runs, for n tokens, E experts and top-k routing:

    route     logits[n, E]         -> weights[n, k] (float32), experts[n, k]   softmax, top-k
    group     experts[n, k]        -> offsets[E + 1], order[n * k]             counting sort
    gate_up   x[n, H], W1[E, 2I, H] -> act[n * k, I]                            silu(g) * u
    down      act, W2[E, H, I]     -> out[n, H] (float32)                     weighted scatter-add

Grouped row ``r`` (``offsets[e] <= r < offsets[e + 1]``) serves token ``order[r] // k`` through
its slot ``order[r] % k``, so each expert's weights are read once per call for all its tokens,
and experts no token chose are not read at all (decode touches only k experts per layer).
Within an expert the output features are split in blocks of ``ROWS`` run in parallel: every
block is owned by one thread, so the scatter-add has no races. A block walks the expert's tokens
in register tiles (``expert_tile``: tokens x weight rows of vector partial sums, the weight
vectors converted to float32 once per step for all the tile's tokens). All sums are in float32.

TVM's own MoE kernels bind GPU threads only. ``moe_quant.py`` runs the same two expert steps
over quantized weights, ``bf16_panel.py`` over bfloat16 weights stored in panels (the build's
choice on AVX512-BF16 CPUs where they pay; the ``bf16`` tiles here serve the shapes panels do
not fit), and ``amx_gemm.experts`` runs bfloat16 prefills on AMX tiles (``amx``).
"""

from __future__ import annotations

import functools

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from qwen3c.schedules import amx_gemm, bf16_dot
from qwen3c.schedules.fast_math import sigmoid
from qwen3c.schedules.lane_sum import fold_lanes
from qwen3c.schedules.prefetch import prefetch_to_l2
from qwen3c.schedules.rows import each_row
from qwen3c.schedules.scratch import stack_buffer

ROWS = 16


def route_token(num_experts: int, top_k: int, normalize: bool):
    """The routing of token ``t`` (a TVMScript macro, shared with the GPU kernel): softmax over
    all experts, the k largest (lowest index first on ties, as torch.topk), renormalised to
    sum to one when ``normalize`` (HF's ``norm_topk_prob``). ``probs``, ``stat`` and ``best``
    are scratch buffers of E, 2 and 1 values."""
    E, K = num_experts, top_k

    @T.macro
    def route(logits, weights, experts, probs, stat, best, t):
        stat[0] = T.float32(-3.0e38)
        for e in range(E):
            stat[0] = T.max(stat[0], logits[t, e])
        stat[1] = T.float32(0)
        for e in range(E):
            probs[e] = T.exp(logits[t, e] - stat[0])
            stat[1] = stat[1] + probs[e]
        for e in range(E):
            probs[e] = probs[e] / stat[1]
        stat[1] = T.float32(0)
        for s in range(K):
            best[0] = 0
            for e in range(1, E):
                if probs[e] > probs[best[0]]:
                    best[0] = T.int32(e)
            weights[t, s] = probs[best[0]]
            experts[t, s] = best[0]
            stat[1] = stat[1] + probs[best[0]]
            probs[best[0]] = T.float32(-1.0)  # taken: below every probability
        if normalize:
            for s in range(K):
                weights[t, s] = weights[t, s] / stat[1]

    return route


@functools.cache
def moe_route(num_experts: int, top_k: int, normalize: bool) -> tirx.PrimFunc:
    """``route_token`` for every token (in parallel in a prefill, ``rows.each_row``)."""
    E, K = num_experts, top_k
    route_one = route_token(E, K, normalize)

    @T.macro
    def route_row(t, logits, weights, experts):
        with T.sblock("route"):
            probs = T.sblock_alloc_buffer((E,), "float32")
            stat = T.sblock_alloc_buffer((2,), "float32")  # running max, then sums
            best = T.sblock_alloc_buffer((1,), "int32")
            route_one(logits, weights, experts, probs, stat, best, t)

    route_rows = each_row(route_row)

    @T.prim_func(private=True, s_tir=True)
    def route(var_logits: T.handle, var_weights: T.handle, var_experts: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True,
                     "qwen3c.normalize": normalize})  # read by BYOC partitions
        n = T.int64()
        logits = T.match_buffer(var_logits, (n, T.int64(E)), "float32")
        weights = T.match_buffer(var_weights, (n, T.int64(K)), "float32")
        experts = T.match_buffer(var_experts, (n, T.int64(K)), "int32")
        route_rows(n, logits, weights, experts)

    return route


@functools.cache
def moe_group(num_experts: int, top_k: int) -> tirx.PrimFunc:
    """A stable counting sort of the (token, slot) pairs by expert, over the ``num_experts``
    local experts ``first[0] ..``: pairs routed to other experts (held by other shards under
    expert parallelism) are left out, so rows past ``offsets[E]`` of ``order`` are unused."""
    E, K = num_experts, top_k

    @T.prim_func(private=True, s_tir=True)
    def group(var_experts: T.handle, first: T.Buffer((1,), "int64"), var_offsets: T.handle,
              var_order: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        experts = T.match_buffer(var_experts, (n, T.int64(K)), "int32")
        offsets = T.match_buffer(var_offsets, (T.int64(E + 1),), "int32")
        order = T.match_buffer(var_order, (n * T.int64(K),), "int32")
        with T.sblock("group"):
            cursor = T.sblock_alloc_buffer((E,), "int32")
            for e in range(E + 1):
                offsets[e] = 0
            for t, s in T.grid(n, K):
                local: T.let = T.Cast("int64", experts[t, s]) - first[0]
                if local >= 0 and local < E:
                    offsets[local + 1] = offsets[local + 1] + 1
            for e in range(E):
                offsets[e + 1] = offsets[e + 1] + offsets[e]
                cursor[e] = offsets[e]
            for t, s in T.grid(n, K):
                local: T.let = T.Cast("int64", experts[t, s]) - first[0]
                if local >= 0 and local < E:
                    order[cursor[local]] = T.Cast("int32", t * T.int64(K) + T.int64(s))
                    cursor[local] = cursor[local] + 1

    return group


def same_row(order, r):
    """``token_row`` of activations already in the grouped rows' order."""
    return r


def expert_tile(tokens: int, rows: int, lanes: int, depth: int, row_of, token_row=same_row,
                ahead: int = 0):
    """A TVMScript macro: ``sums[i, j]`` = the float32 row ``token_row(order, first + min(t0 + i,
    last))`` of ``xf`` · weight row ``row_of(base, j)`` of expert ``e``, for a tile of ``tokens``
    x ``rows``.

    The tile's sums stay in ``tokens * rows`` vector registers of ``lanes`` partial sums along
    the depth; each step loads the ``rows`` weight vectors once (converted to float32 once) and
    uses each for every token. Rows past the last token repeat it (their sums are not stored).
    With ``ahead`` > 0 each step also prefetches the same part of row ``row_of(base + ahead,
    j)`` into L2."""
    steps, tail = depth // lanes, depth % lanes
    fold = fold_lanes(lanes)

    @T.macro
    def tile(xf, weight, e, order, first, t0, last, base, sums, acc, wv):
        for i in T.unroll(tokens):
            for j in T.unroll(rows):
                for lane in T.vectorized(lanes):
                    acc[i, j, lane] = T.float32(0)
        for step in range(steps):
            for j in T.unroll(rows):
                if ahead > 0:
                    T.evaluate(prefetch_to_l2(T.address_of(weight[
                        e, T.min(row_of(base + ahead, j), weight.shape[1] - 1), step * lanes])))
                for lane in T.vectorized(lanes):
                    wv[j, lane] = T.Cast("float32",
                                         weight[e, row_of(base, j), step * lanes + lane])
            for i in T.unroll(tokens):
                for j in T.unroll(rows):
                    for lane in T.vectorized(lanes):
                        acc[i, j, lane] = acc[i, j, lane] + xf[token_row(
                            order, first + T.min(t0 + i, last)), step * lanes + lane] * wv[j, lane]
        for i in T.unroll(tokens):
            for j in T.unroll(rows):
                fold(acc, (i, j))
                sums[i, j] = acc[i, j, 0]
                for d in range(tail):
                    sums[i, j] = sums[i, j] + xf[token_row(
                        order, first + T.min(t0 + i, last)), steps * lanes + d] * T.Cast(
                        "float32", weight[e, row_of(base, j), steps * lanes + d])

    return tile


def tile_rows(registers: int) -> int:
    """Weight rows per tile: 4 with 32 vector registers (AVX-512, NEON), else 2 (AVX2)."""
    return 4 if registers >= 32 else 2


def tile_tokens(registers: int, rows: int) -> int:
    """Tokens per tile: ``tokens * rows`` accumulators, ``rows`` weight vectors and one x
    value fit in the vector registers (6 tokens on AVX-512/NEON and on AVX2)."""
    return (registers - rows - 1) // rows


def expert_regions(num_experts: int, tasks: int, decode_below: int, task_over,
                   annotations: dict | None = None):
    """A TVMScript macro ``run(offsets, tokens, *operands)`` running ``task_over(*operands,
    first_expert, end_expert, task)`` for ``tasks`` parallel tasks over every expert with grouped
    rows. Below ``decode_below`` tokens (decode) one parallel region's tasks walk every expert: a
    region per expert had the threads meet at a barrier after each expert's few microseconds of
    work. From there on each expert gets its own region, so all its tasks reuse its tokens'
    activations while they are in cache. ``annotations`` go on both regions' loops."""
    E = num_experts
    annotations = annotations or {}

    @T.macro
    def run(offsets, tokens, *operands):
        if tokens < decode_below:
            for task in T.parallel(tasks, annotations=annotations):
                task_over(*operands, 0, E, task)
        else:
            for e in range(E):
                if offsets[e + 1] > offsets[e]:
                    for task in T.parallel(tasks, annotations=annotations):
                        task_over(*operands, e, e + 1, task)

    return run


def expert_rows(num_experts: int, features: int, width: int, rows: int, lanes: int,
                registers: int, depth: int, row_of, epilogue, bf16: bool = False,
                token_row=same_row, annotations: dict | None = None,
                prefetch_next: bool = False):
    """A TVMScript macro running every expert over its grouped rows of ``x`` (activation rows
    ``token_row(order, r)``): ``features`` output features in units of ``width`` (weight rows
    ``row_of(base, j)``, ``j < rows``), a parallel task per ROWS features. Each unit walks the
    expert's tokens in tiles (one token at a time when there are fewer than a tile, as in
    decode) and hands each tile's sums to ``epilogue(dst, routing, order, sums, first, t0,
    count, base, tokens)``. ``bf16``: ``x`` and ``weight`` are int32 views of bfloat16 read by
    ``bf16_dot.tile``; else ``x`` is float32 and ``weight`` any float dtype. The parallel
    regions are ``expert_regions``'s, one for all experts below a tile of tokens (decode);
    ``annotations`` go on their loops.

    ``prefetch_next`` (float tiles): one token at a time, also prefetch the rows the task's
    next unit of features reads. It paid for the down projection's short rows (Zen 3, AVX2,
    four experts of 1024 x 384 from memory: 171-187 -> 140-153 us) and cost gate_up's pairs
    of far-apart rows (1024 long) about 10 %."""
    E, MT = num_experts, tile_tokens(registers, rows)
    units = (features + width - 1) // width
    per_task = max(1, ROWS // width)
    tasks = (units + per_task - 1) // per_task
    assert not bf16 or lanes == bf16_dot.LANES, lanes  # the accumulators hold 16 sums
    if bf16:
        tile, single = (bf16_dot.tile(t, rows, depth, token_row, row_of) for t in (MT, 1))
        vector = bf16_dot.WORD
    else:
        tile, single = (expert_tile(t, rows, lanes, depth, row_of, token_row,
                                    per_task * width if t == 1 and prefetch_next else 0)
                        for t in (MT, 1))
        vector = "float32"

    @T.macro
    def task_over(x, weight, offsets, dst, routing, order, first_expert, end_expert, task):
        """Task ``task``'s features for experts ``first_expert`` up to ``end_expert``."""
        with T.sblock("expert_rows"):
            T.reads()  # independent tasks; nothing schedules this block
            T.writes()
            # up to 1.5 KB: too large for the stack (schedules/scratch.py), so the workspace
            # pool serves it, once per task
            acc = T.sblock_alloc_buffer((MT, rows, lanes), "float32", scope="global")
            wv = stack_buffer((rows, lanes), vector)
            sums = stack_buffer((MT, rows), "float32")
            for e in range(first_expert, end_expert):
                first: T.let = offsets[e]
                count: T.let = offsets[e + 1] - offsets[e]
                if count > 0:
                    for u in range(per_task):
                        if task * per_task + u < units:
                            base: T.let = (task * per_task + u) * width
                            if count >= MT:
                                for t in range((count + MT - 1) // MT):
                                    tile(x, weight, e, order, first, t * MT, count - 1, base, sums,
                                         acc, wv)
                                    epilogue(dst, routing, order, sums, first, t * MT, count,
                                             base, MT)
                            else:
                                for t in range(count):
                                    single(x, weight, e, order, first, t, count - 1, base, sums,
                                           acc, wv)
                                    epilogue(dst, routing, order, sums, first, t, count, base, 1)

    regions = expert_regions(E, tasks, MT, task_over, annotations)

    @T.macro
    def run(x, weight, offsets, dst, routing, order, tokens):
        regions(offsets, tokens, x, weight, offsets, dst, routing, order)

    return run


def paired_rows(intermediate: int, pairs: int):
    """``row_of`` for gate_up units of ``pairs`` features: their gate rows, then their up rows
    (``intermediate`` rows further), so SwiGLU can run on one unit's sums."""
    def row_of(base, j):
        feature = T.min(base + j % pairs, intermediate - 1)
        return T.if_then_else(j < pairs, feature, intermediate + feature)

    return row_of


def paired_units(weight: np.ndarray, pairs: int) -> np.ndarray:
    """A [..., 2I, K] gate_up weight with its rows reordered unit by unit: ``pairs`` gate rows,
    then the up rows of the same features. A unit's rows are then one contiguous run of
    memory (``unit_rows``), where ``paired_rows`` reads two runs ``I`` rows apart."""
    *lead, rows, k = weight.shape
    gate, up = (part.reshape(*lead, rows // 2 // pairs, pairs, k)
                for part in np.split(weight, 2, axis=-2))
    return np.concatenate([gate, up], axis=-2).reshape(*lead, rows, k)


def unit_rows(base, j):
    """``row_of`` for a gate_up weight in ``paired_units``: the unit of features from ``base``
    starts at row 2 · base."""
    return 2 * base + j


def swiglu(gate, up):
    """silu(gate) · up = gate · sigmoid(gate) · up, in float32."""
    return gate * sigmoid(gate) * up


def swiglu_store(intermediate: int, pairs: int, dtype: str):
    """An epilogue macro: act[row, feature] = silu(gate) * up from a tile's sums of a unit's
    rows (``paired_rows`` or ``unit_rows``: ``pairs`` gate rows, then their up rows;
    ``routing`` and ``order`` unused). Where every unit is whole, a row's features are stored
    as one vector (element by element, and with gate and up rows read from two places, the
    fused quantized dense MLP made 0.6B q4 prefill 0.87-0.90x the separate kernels)."""
    whole = intermediate % pairs == 0

    @T.macro
    def unit(act, sums, row, i, base, j):
        act[row, base + j] = T.Cast(dtype, swiglu(sums[i, j], sums[i, pairs + j]))

    @T.macro
    def store(act, routing, order, sums, first, t0, count, base, tokens):
        for i in T.unroll(tokens):
            if t0 + i < count:
                if whole:
                    for j in T.vectorized(pairs):
                        unit(act, sums, first + t0 + i, i, base, j)
                else:
                    for j in T.unroll(pairs):
                        if base + j < intermediate:
                            unit(act, sums, first + t0 + i, i, base, j)

    return store


def scatter_add(hidden: int, rows: int, top_k: int):
    """An epilogue macro: out[token, feature] += routing weight · sum, for each grouped row of
    a tile (rows in grouped order; ``order`` maps them back to (token, slot))."""
    K = top_k

    @T.macro
    def scatter(out, routing, order, sums, first, t0, count, base, tokens):
        for i in T.unroll(tokens):
            if t0 + i < count:
                for j in T.unroll(rows):
                    if base + j < hidden:
                        out[order[first + t0 + i] // K, base + j] = (
                            out[order[first + t0 + i] // K, base + j]
                            + routing[order[first + t0 + i] // K,
                                      order[first + t0 + i] % K] * sums[i, j])

    return scatter


def float_experts(num_experts: int, depth: int, token_row, run, decode_below: int):
    """A TVMScript macro: ``run`` (``expert_rows``) over the activations of the ``count``
    grouped rows (``token_row`` of each) converted to float32 once (by one thread below
    ``decode_below`` tokens: a few rows are not worth a parallel region)."""
    E = num_experts

    @T.macro
    def convert(x, xf, offsets, order, r):
        if r < T.Cast("int64", offsets[E]):
            for c in T.vectorized(depth):
                xf[r, c] = T.Cast("float32", x[token_row(order, r), c])

    @T.macro
    def experts(x, weight, offsets, dst, routing, order, count, tokens):
        with T.sblock("float32_rows"):
            T.reads()  # runs once; nothing schedules this block
            T.writes()
            xf = T.sblock_alloc_buffer((count, depth), "float32")
            if tokens < decode_below:
                for r in range(count):
                    convert(x, xf, offsets, order, r)
            else:
                for r in T.parallel(count):
                    convert(x, xf, offsets, order, r)
            run(xf, weight, offsets, dst, routing, order, tokens)

    return experts


def bf16_experts(num_experts: int, rows: int, depth: int, run):
    """``float_experts`` on bfloat16 dot products: int32 views of the activations x [., depth]
    (read in place, so ``count`` is not needed) and weights [E, rows, depth]."""
    E, W = num_experts, depth // bf16_dot.PAIRS

    @T.macro
    def experts(x, weight, offsets, dst, routing, order, count, tokens):
        x_words = T.decl_buffer((x.shape[0], W), bf16_dot.WORD, data=x.data)
        w_words = T.decl_buffer((E, rows, W), bf16_dot.WORD, data=weight.data)
        run(x_words, w_words, offsets, dst, routing, order, tokens)

    return experts


def gathered_token(top_k: int):
    """``token_row`` of grouped row ``r`` in the tokens' own activations."""
    def token_row(order, r):
        return order[r] // top_k

    return token_row


def swiglu_tiles(intermediate: int, dtype: str):
    """An ``amx_gemm.experts`` store: act[row, feature] = silu(gate) * up, block ``nb``'s
    sums holding 16 gate features (tile row 0) and their up rows (tile row 1)."""
    @T.macro
    def store(act, routing, order, sums, first, valid, nb):
        for t in range(T.min(valid, amx_gemm.BLOCK)):
            for r in T.vectorized(amx_gemm.TILE):
                act[first + t, nb * amx_gemm.TILE + r] = T.Cast(dtype, swiglu(
                    sums[0, t // amx_gemm.TILE, t % amx_gemm.TILE, r],
                    sums[1, t // amx_gemm.TILE, t % amx_gemm.TILE, r]))

    return store


def scatter_tiles(top_k: int):
    """An ``amx_gemm.experts`` store: out[token, feature] += routing weight · sum for block
    ``nb``'s 32 features."""
    K, TILE = top_k, amx_gemm.TILE

    @T.macro
    def store(out, routing, order, sums, first, valid, nb):
        for t in range(T.min(valid, amx_gemm.BLOCK)):
            for i in range(2):
                for r in T.vectorized(TILE):
                    out[order[first + t] // K, nb * amx_gemm.BLOCK + i * TILE + r] = (
                        out[order[first + t] // K, nb * amx_gemm.BLOCK + i * TILE + r]
                        + routing[order[first + t] // K, order[first + t] % K]
                        * sums[i, t // TILE, t % TILE, r])

    return store


def prefill_on_tiles(tiles, vectors):
    """An experts macro: ``tiles`` (``amx_gemm.experts``) from ``amx_gemm.MIN_TOKENS``
    tokens, ``vectors`` below."""
    @T.macro
    def experts(x, weight, offsets, dst, routing, order, count, tokens):
        if tokens >= amx_gemm.MIN_TOKENS:
            tiles(x, weight, offsets, dst, routing, order, count, tokens)
        else:
            vectors(x, weight, offsets, dst, routing, order, count, tokens)

    return experts


@functools.cache
def moe_gate_up_silu(num_experts: int, top_k: int, hidden: int, intermediate: int,
                     dtype: str, lanes: int = 16, registers: int = 32,
                     bf16: bool = False, amx: bool = False) -> tirx.PrimFunc:
    """act[r] = silu(W1[e, :I] · x[token]) * (W1[e, I:] · x[token]) for each grouped row.

    A unit's weight rows are ``P`` gate rows and the up rows of the same features, so SwiGLU
    is applied straight to the tile's sums. The float kernel gathers the rows of x in the
    grouped order, converted to float32, once per call; with ``bf16`` (bfloat16 on
    AVX512-BF16, ``bf16_dot``) the tiles read each token's row where it is; with ``amx``
    (``amx_gemm.experts_usable``) prefills run on AMX tiles."""
    E, K, H, I = num_experts, top_k, hidden, intermediate
    J = tile_rows(registers)
    P = J // 2
    run = expert_rows(E, I, P, J, lanes, registers, H, paired_rows(I, P),
                      swiglu_store(I, P, dtype), bf16,
                      gathered_token(K) if bf16 else same_row,  # xf is gathered already
                      bf16_dot.IMPORT if bf16 else None)
    experts = (bf16_experts(E, 2 * I, H, run) if bf16
               else float_experts(E, H, gathered_token(K), run, tile_tokens(registers, J)))
    if amx:
        tiles = amx_gemm.experts(E, H, I // amx_gemm.TILE,
                                 lambda nb: (nb * amx_gemm.TILE, I + nb * amx_gemm.TILE),
                                 gathered_token(K), swiglu_tiles(I, dtype))
        experts = prefill_on_tiles(tiles, experts)
    return gate_up_kernel(E, K, H, I, dtype, (2 * I, H), experts)


def gate_up_kernel(num_experts: int, top_k: int, hidden: int, intermediate: int, dtype: str,
                   weight_shape: tuple[int, ...], experts) -> tirx.PrimFunc:
    """The grouped gate_up + SwiGLU kernel around ``experts(x, weight, offsets, act, None,
    order, rows, tokens)``, each expert's weight stored in ``weight_shape``."""
    E, K, H, I = num_experts, top_k, hidden, intermediate

    @T.prim_func(private=True, s_tir=True)
    def gate_up(var_x: T.handle, weight: T.Buffer((E, *weight_shape), dtype),
                offsets: T.Buffer((E + 1,), "int32"), var_order: T.handle, var_act: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, T.int64(H)), dtype)
        order = T.match_buffer(var_order, (n * T.int64(K),), "int32")
        act = T.match_buffer(var_act, (n * T.int64(K), T.int64(I)), dtype)
        with T.sblock("gate_up"):
            T.reads()  # runs once; nothing schedules this block
            T.writes()
            experts(x, weight, offsets, act, None, order, n * T.int64(K), n)

    return gate_up


@functools.cache
def moe_down_scatter(num_experts: int, top_k: int, hidden: int, intermediate: int,
                     dtype: str, lanes: int = 16, registers: int = 32,
                     bf16: bool = False, amx: bool = False) -> tirx.PrimFunc:
    """out[token] = Σ_slots weight[token, slot] · (W2[e] · act[r]), in float32. Each task
    owns its output features and a token meets an expert at most once, so the scatter-add has
    no races. ``bf16`` and ``amx`` as in ``moe_gate_up_silu`` (act is already in the grouped
    order)."""
    E, K, H, I = num_experts, top_k, hidden, intermediate
    J = tile_rows(registers)
    run = expert_rows(E, H, J, J, lanes, registers, I, lambda base, j: T.min(base + j, H - 1),
                      scatter_add(H, J, K), bf16, annotations=bf16_dot.IMPORT if bf16 else None,
                      prefetch_next=True)
    experts = (bf16_experts(E, H, I, run) if bf16
               else float_experts(E, I, same_row, run, tile_tokens(registers, J)))
    if amx:
        tiles = amx_gemm.experts(E, I, H // amx_gemm.BLOCK,
                                 lambda nb: (nb * amx_gemm.BLOCK, nb * amx_gemm.BLOCK
                                             + amx_gemm.TILE),
                                 same_row, scatter_tiles(K))
        experts = prefill_on_tiles(tiles, experts)
    return down_kernel(E, K, H, I, dtype, (H, I), experts)


def cleared_rows(width: int):
    """A TVMScript macro ``run(n, out)`` zeroing the first n rows of ``out`` [., width]."""

    @T.macro
    def clear(t, out):
        for h in T.vectorized(width):
            out[t, h] = T.float32(0)

    return each_row(clear)


def down_kernel(num_experts: int, top_k: int, hidden: int, intermediate: int, dtype: str,
                weight_shape: tuple[int, ...], experts) -> tirx.PrimFunc:
    """The grouped down projection + weighted scatter-add kernel around ``experts(act, weight,
    offsets, out, routing, order, rows, tokens)`` (``out`` zeroed first), each expert's weight
    stored in ``weight_shape``."""
    E, K, H, I = num_experts, top_k, hidden, intermediate
    clear_rows = cleared_rows(H)

    @T.prim_func(private=True, s_tir=True)
    def down(var_act: T.handle, weight: T.Buffer((E, *weight_shape), dtype),
             offsets: T.Buffer((E + 1,), "int32"), var_order: T.handle,
             var_routing: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        act = T.match_buffer(var_act, (n * T.int64(K), T.int64(I)), dtype)
        order = T.match_buffer(var_order, (n * T.int64(K),), "int32")
        routing = T.match_buffer(var_routing, (n, T.int64(K)), "float32")
        out = T.match_buffer(var_out, (n, T.int64(H)), "float32")
        clear_rows(n, out)
        with T.sblock("down"):
            T.reads()  # runs once; nothing schedules this block
            T.writes()
            experts(act, weight, offsets, out, routing, order, n * T.int64(K), n)

    return down


def sum_router_stats(num_experts: int, top_k: int):
    """Accumulate the router statistics of all tokens into ``stats`` (a TVMScript macro, shared
    with the GPU kernel); ``stat`` is a scratch buffer of 2 values."""
    E, K = num_experts, top_k

    @T.macro
    def accumulate(logits, weights, experts, stats, stat, n):
        for r, e in T.grid(3, E):
            stats[r, e] = T.float32(0)
        for t in range(n):
            for s in range(K):
                stats[0, experts[t, s]] = stats[0, experts[t, s]] + T.float32(1)
                stats[1, experts[t, s]] = stats[1, experts[t, s]] + weights[t, s]
            stat[0] = T.float32(-3.0e38)
            for e in range(E):
                stat[0] = T.max(stat[0], logits[t, e])
            stat[1] = T.float32(0)
            for e in range(E):
                stat[1] = stat[1] + T.exp(logits[t, e] - stat[0])
            for e in range(E):
                stats[2, e] = stats[2, e] + T.exp(logits[t, e] - stat[0]) / stat[1]

    return accumulate


@functools.cache
def moe_router_stats(num_experts: int, top_k: int) -> tirx.PrimFunc:
    """Per expert: tokens routed to it, their summed routing weight, and the summed softmax
    probability over all tokens (the P_i of the Switch-Transformer balance loss)."""
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
        with T.sblock("router_stats"):
            stat = T.sblock_alloc_buffer((2,), "float32")  # max, sum of exp
            accumulate(logits, weights, experts, stats, stat, n)

    return router_stats
