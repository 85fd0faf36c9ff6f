"""bfloat16 prefill attention on tile products: the cache's two prefill kernels (new tokens
against themselves, and against the cached pages; ``attention.py``'s contracts) with both
products, QKᵀ and PV, as 2 x 2 blocks of 16 x 16 tile products (``Products``): AMX's
``tdpbf16ps`` where the CPU has tiles, else the same blocks in ``vdpbf16ps`` where
``bf16_dot``'s kernels pay (``bf16_dot.BLOCK_SYMBOL``).

The vector kernels of ``attention.py`` spend their time in float32 FMAs, so their cost grows
with the square of the prompt at a low rate. A layer of the 0.6B shape at 512 tokens (causal,
2 threads) took 20.7 ms on an Intel Xeon and 1.9 ms on its AMX tiles; on a Zen 4 11.5 ms, and
4.3 ms in ``vdpbf16ps`` blocks (2048 tokens: 370 and 61 ms). A parallel task takes TOKENS
consecutive tokens of one query head and walks the keys they may see CHUNK at a time:

    S = Q Kᵀ            (amx_gemm's 2 x 2 tile blocks: Q's rows are the A tiles, 32 keys the Bs)
    m' = max(m, rowmax S · c),  P = 2^(S · c - m'),  l = l · 2^(m - m') + Σ P
    O = O · 2^(m - m') + P V   (P rounded to bfloat16 is the A tile, 32 values the Bs)
    output = O / l             (l summed as P was rounded, see ``_softmax``)

with c = sm_scale · log2 e, so ``lse`` = m + log2 l is in log2 units as TVM's kernels (the
cache merges partial results). P is rounded to bfloat16 before it meets V, as Hugging Face's
bfloat16 attention rounds its softmax; S, m, l and O stay float32.

The keys and values are laid out once per call in the tiles' orders (each sequence from a
whole block on, re-reading its last key to fill it; masked): keys as ``amx_gemm`` lays out
tokens, ``[key / 16, D / 2, 16]`` words (a B tile is 1 KB of consecutive memory, the next 32
of D the next KB), values as ``[D / 16, key / 2, 16]`` words (each word the same feature of
two neighbouring keys: a B tile is 16 key pairs x 16 features, the next 32 keys the next KB).

Causal rows see more keys the later their tokens, so tasks take their tiles from both ends in
turn (``attention.interleaved``) and each thread gets early and late tokens alike.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import tirx
from tvm.script import tirx as T

from qwen3c.schedules import amx_gemm, attention, bf16_dot, quant_tiles
from qwen3c.schedules.attention import PHANTOM
from qwen3c.schedules.fast_math import LOG2E, exp2_nonpositive
from qwen3c.schedules.scratch import stack_buffer

TILE, BLOCK, WORD = amx_gemm.TILE, amx_gemm.BLOCK, amx_gemm.WORD
TOKENS = BLOCK  # query rows of a task: two A tiles
CHUNK = 256  # keys scored before their softmax is folded into the output
LOWEST = -3.0e38  # below any score


@dataclasses.dataclass(frozen=True)
class Products:
    """What runs the 2 x 2 blocks of tile products: ``symbol`` (``amx_gemm.SYMBOL``'s
    arguments), defined by the IR in ``annotations`` on the kernel's parallel loop."""

    name: str
    symbol: str
    annotations: dict


AMX = Products("amx", amx_gemm.SYMBOL, amx_gemm.IMPORT)
VDPBF16PS = Products("vdpbf16ps", bf16_dot.BLOCK_SYMBOL, bf16_dot.BLOCK_IMPORT)


def _slots(keys, sequences):
    """Key slots enough for every sequence's keys from a whole block on."""
    return amx_gemm.padded(keys) + sequences * BLOCK


def products_for(target: tvm.target.Target, dtype: str, head_dim: int) -> Products | None:
    """What runs prefill attention's products over ``dtype`` heads of ``head_dim`` for
    ``target``: AMX tiles where the CPU has them, ``vdpbf16ps`` where ``bf16_dot``'s kernels
    pay, else None (``attention.py``'s vector kernels)."""
    if amx_gemm.has_tiles(target) and bf16_dot.available(target, dtype, head_dim):
        return AMX
    return VDPBF16PS if bf16_dot.usable(target, dtype, head_dim) else None


def _lay_out(num_kv_heads: int, head_dim: int, head_stride: int, value_offset: int):
    """A TVMScript macro ``lay_out(key_words, value_bits, source, count, keys, values,
    slots)``: the ``count`` key slots (``attention.ragged_sources`` / ``paged_sources``: row
    ``source[slot]`` + g · ``head_stride`` of ``key_words``, bfloat16 pairs as words; the
    values ``value_offset`` rows further in ``value_bits``, bfloat16 bits) of every KV head g
    into the tiles' layouts (module docstring), head g's from key slot g · ``slots`` on."""
    D, W = head_dim, head_dim // 2
    copy_key = amx_gemm.copy_row(W)

    @T.macro
    def lay_out(key_words, value_bits, source, count, keys, values, slots):
        for gp in T.parallel(num_kv_heads * (count // BLOCK)):
            g: T.let = gp % num_kv_heads
            first: T.let = gp // num_kv_heads * BLOCK
            for j in range(BLOCK):
                copy_key(keys, key_words, g * slots + first + j,
                         source[first + j] + g * head_stride)
            for pair in range(BLOCK // 2):
                even: T.let = source[first + 2 * pair] + g * head_stride + value_offset
                odd: T.let = source[first + 2 * pair + 1] + g * head_stride + value_offset
                for dt in range(D // TILE):
                    for lane in T.vectorized(TILE):
                        values[g, dt, first // 2 + pair, lane] = T.bitwise_or(
                            T.Cast(WORD, value_bits[even, dt * TILE + lane]),
                            T.shift_left(T.Cast(WORD, value_bits[odd, dt * TILE + lane]), 16))

    return lay_out


def _low_half(word):
    """The float32 value of the bfloat16 in the low half of an int32 word."""
    return T.reinterpret("float32", T.shift_left(word, 16))


def _high_half(word):
    """The float32 value of the bfloat16 in the high half of an int32 word."""
    return T.reinterpret("float32", T.bitwise_and(word, T.int32(-65536)))


def _softmax():
    """A TVMScript macro ``softmax(scores, probs, state, sees, weights, lanes, base, width,
    scale)``: folds one chunk's scores (``width`` keys from key ``base``, in the 2 x 2 tile
    blocks' layout) into each row's running state and writes its probabilities, bfloat16
    pairs, as the A tiles of P; row r sees ``sees[r]`` keys in all, the rest weigh 0.

    ``state[r]``: the running max; the sum of the weights (for ``lse``); the sum of the weights
    as rounded to bfloat16, which the output is divided by, so that the weights that met the
    values sum to 1 (the unrounded sum measured 1.5x Hugging Face bfloat16's error on a tiny
    MoE); and the rescale of what came before. (``T.Select``, not ``if_then_else``: TVM
    scalarizes a loop with a vector condition in the latter.)"""
    @T.macro
    def softmax(scores, probs, state, sees, weights, lanes, base, width, scale):
        for r in T.serial(TOKENS, annotations=quant_tiles.IMPORT):
            i: T.let = r // TILE
            visible: T.let = T.max(0, T.min(width, sees[r] - base))
            blocks: T.let = (width + BLOCK - 1) // BLOCK
            for lane in T.vectorized(TILE):
                lanes[0, lane] = T.float32(LOWEST)
            for kb, j in T.grid(blocks, 2):
                for lane in T.vectorized(TILE):
                    lanes[0, lane] = T.max(lanes[0, lane], T.Select(
                        kb * BLOCK + j * TILE + lane < visible,
                        scores[kb, i, j, r % TILE, lane] * scale, T.float32(LOWEST)))
            state[r, 3] = state[r, 0]  # the new max, until it has served
            for lane in range(TILE):
                state[r, 3] = T.max(state[r, 3], lanes[0, lane])
            for half, lane in T.grid(2, TILE):
                lanes[half, lane] = T.float32(0)
            for kb in range(blocks):
                for j in range(2):
                    for lane in T.vectorized(TILE):
                        weights[j, lane] = T.Select(
                            kb * BLOCK + j * TILE + lane < visible,
                            exp2_nonpositive(scores[kb, i, j, r % TILE, lane] * scale
                                             - state[r, 3]),
                            T.float32(0))
                        lanes[0, lane] = lanes[0, lane] + weights[j, lane]
                probs[r, T.ramp(kb * TILE, 1, TILE)] = quant_tiles.pack(
                    weights[0, T.ramp(0, 1, TILE)], weights[1, T.ramp(0, 1, TILE)])
                for lane in T.vectorized(TILE):
                    lanes[1, lane] = lanes[1, lane] + _low_half(probs[r, kb * TILE + lane]) + (
                        _high_half(probs[r, kb * TILE + lane]))
            rescale: T.let = exp2_nonpositive(state[r, 0] - state[r, 3])
            state[r, 0] = state[r, 3]
            state[r, 3] = rescale
            for half in range(2):
                state[r, 1 + half] = state[r, 1 + half] * rescale
                for lane in range(TILE):
                    state[r, 1 + half] = state[r, 1 + half] + lanes[half, lane]

    return softmax


def _values_times_probs(head_dim: int, products: Products):
    """A TVMScript macro ``accumulate(acc, probs, values, sums, state, at, steps, slots)``:
    acc = acc · rescale + P V for one chunk, ``steps`` blocks of 32 keys of P (``probs``)
    and of the values whose first pair is at ``at`` (the address of ``values[g, 0, pair,
    0]``), 32 features at a time through ``sums``."""
    D = head_dim

    @T.macro
    def accumulate(acc, probs, values, sums, state, at, steps, slots):
        for dp in range(D // BLOCK):
            T.evaluate(T.call_extern(
                "void", products.symbol, T.address_of(probs[0, 0]),
                T.address_of(probs[TILE, 0]), T.int64(2 * CHUNK),
                T.address_of(values[at[0], dp * 2, at[1], 0]), T.int64(slots // 2 * TILE * 4),
                T.address_of(sums[0, 0, 0, 0]), T.int64(steps)))
            for i, j, r in T.grid(2, 2, TILE):
                for lane in T.vectorized(TILE):
                    acc[i * TILE + r, (dp * 2 + j) * TILE + lane] = acc[
                        i * TILE + r, (dp * 2 + j) * TILE + lane] * state[
                        i * TILE + r, 3] + sums[i, j, r, lane]

    return accumulate


def _tasks(num_kv_heads: int, num_heads: int, head_dim: int, dtype: str, products: Products):
    """A TVMScript macro ``attend(q, q_indptr, start, length, keys, values, output, lse,
    causal, sm_scale, slots)``: every query row against its sequence's ``length[b]`` keys,
    laid out from slot ``start[b]`` by ``_lay_out`` (the last ``q_count`` of them the new
    tokens' own when causal). A task is TOKENS tokens of one query head (module docstring)."""
    H, D, G, W = num_heads, head_dim, num_heads // num_kv_heads, head_dim // 2
    softmax, accumulate = _softmax(), _values_times_probs(head_dim, products)

    @T.macro
    def attend(q, q_indptr, start, length, keys, values, output, lse, causal, sm_scale, slots):
        with T.sblock("tasks"):
            T.reads()  # runs once; nothing schedules this block
            T.writes()
            batch_size: T.let = q_indptr.shape[0] - 1
            q_words = T.decl_buffer((q.shape[0], H, W), WORD, data=q.data)
            first_tile = T.sblock_alloc_buffer((q_indptr.shape[0],), "int32")  # per sequence
            first_tile[0] = 0
            for b in range(batch_size):
                first_tile[b + 1] = first_tile[b] + (
                    q_indptr[b + 1] - q_indptr[b] + TOKENS - 1) // TOKENS
            for task in T.parallel(first_tile[batch_size] * H, annotations=products.annotations):
                with T.sblock("attend"):
                    T.reads()  # independent tasks; nothing schedules this block
                    T.writes()
                    rows = T.sblock_alloc_buffer((TOKENS, W), WORD)
                    scores = T.sblock_alloc_buffer((CHUNK // BLOCK, 2, 2, TILE, TILE), "float32")
                    probs = T.sblock_alloc_buffer((TOKENS, CHUNK // 2), WORD)
                    sums = T.sblock_alloc_buffer((2, 2, TILE, TILE), "float32")
                    acc = T.sblock_alloc_buffer((TOKENS, D), "float32")
                    state = stack_buffer((TOKENS, 4), "float32")  # see _softmax
                    sees = stack_buffer((TOKENS,), "int32")  # keys each row sees in all
                    weights = stack_buffer((2, TILE), "float32")
                    lanes = stack_buffer((2, TILE), "float32")
                    found = stack_buffer((1,), "int32")
                    h: T.let = task % H
                    tile: T.let = attention.interleaved(task // H, first_tile[batch_size])
                    found[0] = 0
                    for s in range(batch_size):  # the sequence of this tile
                        if first_tile[s + 1] <= tile:
                            found[0] = s + 1
                    b: T.let = found[0]
                    first_token: T.let = (tile - first_tile[b]) * TOKENS
                    q_begin: T.let = q_indptr[b]
                    q_count: T.let = q_indptr[b + 1] - q_begin
                    g: T.let = h // G
                    for r in range(TOKENS):
                        # rows past the sequence's end repeat its last token; not stored
                        t: T.let = T.min(first_token + r, q_count - 1)
                        for word in range(W):
                            rows[r, word] = q_words[q_begin + t, h, word]
                        state[r, 0] = T.float32(PHANTOM)
                        state[r, 1] = T.float32(1)
                        state[r, 2] = T.float32(1)
                        sees[r] = T.max(0, T.if_then_else(
                            causal > 0, length[b] - q_count + t + 1, length[b]))
                        for i in T.vectorized(D):
                            acc[r, i] = T.float32(0)
                    for chunk in range((sees[TOKENS - 1] + CHUNK - 1) // CHUNK):
                        width: T.let = T.min(CHUNK, sees[TOKENS - 1] - chunk * CHUNK)
                        slot: T.let = start[b] + chunk * CHUNK
                        for kb in range((width + BLOCK - 1) // BLOCK):
                            T.evaluate(amx_gemm.block_sums(
                                T.address_of(rows[0, 0]), T.address_of(rows[TILE, 0]),
                                T.address_of(keys[(g * slots + slot + kb * BLOCK) // TILE, 0, 0]),
                                T.address_of(scores[kb, 0, 0, 0, 0]), D, products.symbol))
                        softmax(scores, probs, state, sees, weights, lanes, chunk * CHUNK, width,
                                sm_scale * LOG2E)
                        accumulate(acc, probs, values, sums, state, (g, slot // 2),
                                   (width + BLOCK - 1) // BLOCK, slots)
                    for r in range(TOKENS):
                        if first_token + r < q_count:
                            for i in T.vectorized(D):
                                output[q_begin + first_token + r, h, i] = T.Cast(
                                    dtype, acc[r, i] / state[r, 2])
                            lse[q_begin + first_token + r, h] = state[r, 0] + T.log2(state[r, 1])

    return attend


def _laid_out_prefill(num_kv_heads: int, num_heads: int, head_dim: int, dtype: str,
                      head_stride: int, value_offset: int, sources, products: Products):
    """A TVMScript macro ``run(key_words, value_bits, tables, keys, q, q_indptr, output, lse,
    causal, sm_scale)``: ``sources`` (``attention.ragged_sources`` / ``paged_sources``,
    reading ``tables``) numbers the key slots of at most ``keys`` keys, ``_lay_out`` lays them
    out, ``_tasks`` runs the rows."""
    D, W = head_dim, head_dim // 2
    lay_out = _lay_out(num_kv_heads, head_dim, head_stride, value_offset)
    attend = _tasks(num_kv_heads, num_heads, head_dim, dtype, products)

    @T.macro
    def run(key_words, value_bits, tables, keys, q, q_indptr, output, lse, causal, sm_scale):
        with T.sblock("prefill"):
            T.reads()  # runs once; nothing schedules this block
            T.writes()
            start = T.sblock_alloc_buffer((q_indptr.shape[0],), "int32")
            length = T.sblock_alloc_buffer((q_indptr.shape[0] - 1,), "int32")
            source = T.sblock_alloc_buffer((_slots(keys, q_indptr.shape[0] - 1),), "int32")
            key_tiles = T.sblock_alloc_buffer(
                (num_kv_heads * _slots(keys, q_indptr.shape[0] - 1) // TILE, W, TILE), WORD)
            value_tiles = T.sblock_alloc_buffer(
                (num_kv_heads, D // TILE, _slots(keys, q_indptr.shape[0] - 1) // 2, TILE), WORD)
            sources(tables, start, length, source, q_indptr.shape[0] - 1)
            lay_out(key_words, value_bits, source, start[q_indptr.shape[0] - 1], key_tiles,
                    value_tiles, _slots(keys, q_indptr.shape[0] - 1))
            attend(q, q_indptr, start, length, key_tiles, value_tiles, output, lse, causal,
                   sm_scale, _slots(keys, q_indptr.shape[0] - 1))

    return run


def _rows(head_dim: int) -> tuple[attention.Rows, attention.Rows]:
    """How ``_lay_out`` reads the cache: keys as bfloat16 pairs in words, values as bits."""
    return (WORD, head_dim // 2), ("uint16", head_dim)


def ragged_prefill_attention(num_kv_heads: int, num_heads: int, head_dim: int, dtype: str, *,
                             products: Products) -> tirx.PrimFunc:
    """``attention.ragged_prefill_attention`` on ``products`` (see ``products_for``)."""
    run = _laid_out_prefill(num_kv_heads, num_heads, head_dim, dtype, 1, 0,
                            attention.ragged_sources(num_kv_heads, BLOCK), products)
    return attention.ragged_kernel(num_kv_heads, num_heads, head_dim, dtype, run,
                                   *_rows(head_dim))


def paged_prefill_attention(num_kv_heads: int, num_heads: int, head_dim: int, dtype: str,
                            page_size: int = 16, *, products: Products) -> tirx.PrimFunc:
    """``attention.paged_prefill_attention`` on ``products`` (see ``products_for``)."""
    P = page_size
    run = _laid_out_prefill(num_kv_heads, num_heads, head_dim, dtype, P, num_kv_heads * P,
                            attention.paged_sources(num_kv_heads, P, BLOCK), products)
    return attention.paged_kernel(num_kv_heads, num_heads, head_dim, dtype, P, run,
                                  *_rows(head_dim))
