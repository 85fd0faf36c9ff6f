"""bfloat16 projections on weights stored in panels for ``vdpbf16ps``: y[m, n] = x[m, k] · W[n, k]ᵀ.

``vdpbf16ps`` adds the products of neighbouring bfloat16 pairs into 16 float32 lanes. The
dot-product tiles (``bf16_dot.tile``) give each lane a slice of one weight row, so every output
ends in a horizontal sum of 16 lanes; here each lane is a different weight row instead. The
weight is stored (at compile time, ``to_panels``) as panels of ``PANEL`` rows, k-pair by k-pair:

    panels[p, kp, c, :] = W[p * PANEL + c, 2 * kp : 2 * kp + 2]

so one k-pair of a panel is four 64-byte vectors, and a tile of ``TILE_TOKENS`` tokens x 64 rows
takes per k-pair four vector loads, six broadcast x pairs and 24 ``vdpbf16ps`` into 24 register
accumulators that already hold the outputs: no horizontal sums, vector stores. A panel is one
contiguous run of memory, which decode streams start to end. MoE experts run the same tiles
over each expert's grouped rows (``experts``); their gate_up panels pair 32 gate rows with the
32 up rows of the same features (``paired_halves``), so SwiGLU runs on the tile's vectors.

Measured alone (Zen 5, 2 threads, bfloat16, the 0.6B's four shapes, fastest of 30 calls): 128
tokens 990-1010 GFLOP/s against 620-660 for the dot-product tiles (6144x1024: 2.60 -> 1.62 ms),
32 tokens 880-910 against 550-600 (1.50-1.63x in all eight cases); decode (one token, weights
from memory) 6144x1024 47 -> 53 GB/s, four tokens 22 -> 44 GB/s (the row GEMV reads its rows
once per token). In the MoE-small model the experts on panels made bfloat16 prefill-32 1.25x
and prefill-128 1.48x faster than the dot-product tiles.
"""

from __future__ import annotations

import functools

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from qwen3c.schedules import bf16_dot, cpu_gemm, moe
from qwen3c.schedules.scratch import stack_buffer

LANES = bf16_dot.LANES
VECTORS = 4  # weight vectors per k-pair of a panel
PANEL = VECTORS * LANES  # weight rows per panel
TILE_TOKENS = 6  # tokens per tile: 24 accumulators, 4 weight vectors and a broadcast x
LAYOUT = "bf16-panels-64"  # the manifest's name for a weight stored this way
PAIRED_LAYOUT = "bf16-panels-64-gate-up-paired"  # MoE gate_up: see ``paired_halves``


def fits(n: int, k: int) -> bool:
    """Whether an [n, k] weight cuts into whole panels and whole dot-product steps."""
    return n % PANEL == 0 and k % bf16_dot.STEP == 0


def panel_shape(n: int, k: int) -> tuple[int, int, int, int]:
    """The stored shape of an [n, k] weight."""
    return (n // PANEL, k // bf16_dot.PAIRS, PANEL, bf16_dot.PAIRS)


def weight_shape(stored: tuple[int, ...]) -> tuple[int, ...]:
    """The [..., n, k] shape of a weight stored as ``stored``."""
    *lead, panels, pairs, rows, pair = stored
    return (*lead, panels * rows, pairs * pair)


def to_panels(weight: np.ndarray) -> np.ndarray:
    """A [..., n, k] weight in its stored layout (``panel_shape`` of the last two axes)."""
    *lead, n, k = weight.shape
    panels, pairs, rows, pair = panel_shape(n, k)
    return np.ascontiguousarray(
        weight.reshape(*lead, panels, rows, pairs, pair).swapaxes(-3, -2))


def paired_halves(weight: np.ndarray) -> np.ndarray:
    """A [..., 2I, k] gate_up weight with its rows reordered so that each panel holds 32 gate
    rows and then the up rows of the same features (SwiGLU on one panel's sums)."""
    return moe.paired_units(weight, PANEL // 2)


LAYOUTS = {  # the manifest's layout name -> how a weight is stored in it
    LAYOUT: to_panels,
    PAIRED_LAYOUT: lambda weight: to_panels(paired_halves(weight)),
}


def tile_sums(tokens: int, pairs: int, token_row):
    """A TVMScript macro: ``acc[i]`` (VECTORS x LANES float32, one lane per weight row) = the
    activation row ``token_row(order, first + min(t0 + i, last))`` · panel ``p`` of expert
    ``e`` (dense weights are one expert's), for ``i < tokens``; rows past the last token repeat
    it."""

    @T.macro
    def run(x_words, panels, acc, e, p, order, first, t0, last):
        for i in T.unroll(tokens):
            for v in T.unroll(VECTORS):
                for lane in T.vectorized(LANES):
                    acc[i, v, lane] = T.float32(0)
        for kp in range(pairs):
            for i in T.unroll(tokens):
                for v in T.unroll(VECTORS):
                    acc[i, v, bf16_dot.words(0)] = bf16_dot.dot(
                        acc[i, v, bf16_dot.words(0)],
                        T.broadcast(x_words[token_row(order, first + T.min(t0 + i, last)), kp],
                                    LANES),
                        panels[e, p, kp, bf16_dot.words(v * LANES)])

    return run


def panel_rows(pairs: int, token_row, epilogue):
    """A TVMScript macro: panel ``p`` of expert ``e`` over the ``count`` activation rows from
    ``first``, in tiles of TILE_TOKENS (one row at a time when there is one), each tile's sums
    handed to ``epilogue(dst, routing, order, acc, first, t0, count, p, tokens)``."""
    tile, single = tile_sums(TILE_TOKENS, pairs, token_row), tile_sums(1, pairs, token_row)

    @T.macro
    def run(x_words, panels, e, p, order, first, count, dst, routing):
        with T.sblock("panel"):
            T.reads()  # independent tasks; nothing schedules this block
            T.writes()
            if count > 1:
                # 1.5 KB: the workspace pool serves it, once per panel
                acc = T.sblock_alloc_buffer((TILE_TOKENS, VECTORS, LANES), "float32",
                                            scope="global")
                for t in range((count + TILE_TOKENS - 1) // TILE_TOKENS):
                    tile(x_words, panels, acc, e, p, order, first, t * TILE_TOKENS, count - 1)
                    epilogue(dst, routing, order, acc, first, t * TILE_TOKENS, count, p,
                             TILE_TOKENS)
            else:
                one = stack_buffer((1, VECTORS, LANES), "float32")
                for t in range(count):
                    single(x_words, panels, one, e, p, order, first, t, count - 1)
                    epilogue(dst, routing, order, one, first, t, count, p, 1)

    return run


def store(out_dtype: str):
    """An epilogue: dst[first + t0 + i, panel rows] = the sums, rounded to ``out_dtype``."""

    @T.macro
    def run(dst, routing, order, acc, first, t0, count, p, tokens):
        for i in T.unroll(tokens):
            if t0 + i < count:
                for v in T.unroll(VECTORS):
                    for lane in T.vectorized(LANES):
                        dst[first + t0 + i, p * PANEL + v * LANES + lane] = T.Cast(
                            out_dtype, acc[i, v, lane])

    return run


def projection(n: int, k: int, out_dtype: str):
    """A TVMScript macro ``run(x, w, y, m)``: y[m, n] (``out_dtype``, rounded from float32
    sums) = x[m, k] · Wᵀ, W in panels; a parallel task per panel walks all the tokens (one at
    a time for a single token, as in decode, else in tiles of TILE_TOKENS)."""
    N, K = n, k
    pairs = K // bf16_dot.PAIRS
    rows = panel_rows(pairs, moe.same_row, store(out_dtype))

    @T.macro
    def run(x, w, y, m):
        with T.sblock("panel_gemm"):
            x_words = T.decl_buffer((m, T.int64(pairs)), bf16_dot.WORD, data=x.data)
            panels = T.decl_buffer((1, N // PANEL, pairs, PANEL), bf16_dot.WORD,
                                   data=w.data)  # as one expert's
            for p in T.parallel(N // PANEL, annotations=bf16_dot.IMPORT):
                rows(x_words, panels, 0, p, None, 0, m, y, None)

    return run


@functools.cache
def panel_gemm(n: int, k: int, out_dtype: str) -> tirx.PrimFunc:
    """``projection`` as a kernel."""
    return cpu_gemm.gemm_kernel(projection(n, k, out_dtype), n, k, "bfloat16",
                                panel_shape(n, k), out_dtype)


def experts_fit(hidden: int, intermediate: int) -> bool:
    """Whether a MoE layer's gate_up [2I, H] and down [H, I] weights fit panels, with gate and
    up rows paired in each."""
    return (fits(2 * intermediate, hidden) and fits(hidden, intermediate)
            and intermediate % (PANEL // 2) == 0)


def swiglu_pairs(dtype: str):
    """An epilogue: act[first + t0 + i, features of panel p] = silu(gate) * up, from a panel of
    ``paired_halves`` (its first two vectors gate, the last two up)."""
    half = VECTORS // 2

    @T.macro
    def run(act, routing, order, acc, first, t0, count, p, tokens):
        for i in T.unroll(tokens):
            if t0 + i < count:
                for v in T.unroll(half):
                    for lane in T.vectorized(LANES):
                        act[first + t0 + i, p * (PANEL // 2) + v * LANES + lane] = T.Cast(
                            dtype, moe.swiglu(acc[i, v, lane], acc[i, half + v, lane]))

    return run


def scatter_add(top_k: int):
    """An epilogue: out[token, panel rows] += routing weight · sums, for each grouped row
    (``order`` maps it back to its token and slot); each panel's task owns its rows."""
    K = top_k

    @T.macro
    def run(out, routing, order, acc, first, t0, count, p, tokens):
        for i in T.unroll(tokens):
            if t0 + i < count:
                for v in T.unroll(VECTORS):
                    for lane in T.vectorized(LANES):
                        out[order[first + t0 + i] // K, p * PANEL + v * LANES + lane] = (
                            out[order[first + t0 + i] // K, p * PANEL + v * LANES + lane]
                            + routing[order[first + t0 + i] // K, order[first + t0 + i] % K]
                            * acc[i, v, lane])

    return run


def experts(num_experts: int, panels: int, depth: int, token_row, epilogue):
    """A TVMScript macro (``moe``'s experts macro; the row and token counts are not needed):
    for each expert with grouped rows, a parallel task per panel of its weight over its rows
    (``panel_rows``)."""
    E, NP, pairs = num_experts, panels, depth // bf16_dot.PAIRS
    rows = panel_rows(pairs, token_row, epilogue)

    @T.macro
    def run(x, weight, offsets, dst, routing, order, count, tokens):
        x_words = T.decl_buffer((x.shape[0], pairs), bf16_dot.WORD, data=x.data)
        w_panels = T.decl_buffer((E, NP, pairs, PANEL), bf16_dot.WORD, data=weight.data)
        for e in T.serial(E, annotations=bf16_dot.IMPORT):
            if offsets[e + 1] > offsets[e]:
                for p in T.parallel(NP):
                    rows(x_words, w_panels, e, p, order, offsets[e], offsets[e + 1] - offsets[e],
                         dst, routing)

    return run


@functools.cache
def expert_gate_up_silu(num_experts: int, top_k: int, hidden: int,
                        intermediate: int) -> tirx.PrimFunc:
    """``moe.moe_gate_up_silu`` for bfloat16 weights in ``PAIRED_LAYOUT``: act[r] =
    silu(gate_e · x[token]) * (up_e · x[token]) for each grouped row r."""
    E, K, H, I = num_experts, top_k, hidden, intermediate
    run = experts(E, 2 * I // PANEL, H, moe.gathered_token(K), swiglu_pairs("bfloat16"))
    return moe.gate_up_kernel(E, K, H, I, "bfloat16", panel_shape(2 * I, H), run)


@functools.cache
def expert_down_scatter(num_experts: int, top_k: int, hidden: int,
                        intermediate: int) -> tirx.PrimFunc:
    """``moe.moe_down_scatter`` for bfloat16 weights in ``LAYOUT``: out[token] = Σ_slots
    routing weight · (down_e · act[r]), in float32."""
    E, K, H, I = num_experts, top_k, hidden, intermediate
    run = experts(E, H // PANEL, I, moe.same_row, scatter_add(K))
    return moe.down_kernel(E, K, H, I, "bfloat16", panel_shape(H, I), run)
