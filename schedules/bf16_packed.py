"""bfloat16 weights stored losslessly in 12 bits: y[m, n] = x[m, k] · W[n, k]ᵀ on ``vdpbf16ps``.

A bfloat16's high byte is its sign and seven of its eight exponent bits. A trained (or random)
weight matrix uses few of the 256 high bytes: the 15 most frequent cover nearly all of its
values, so each weight is stored as its low byte (one exponent bit and the mantissa) and a 4-bit
code of its high byte, an entry of a 16-byte table per matrix. A value whose high byte is not
in the table (an "exception": far smaller or larger than the rest) is stored as code
``ZERO_CODE`` with a zero low byte, which decodes to +0.0, and its product is added from a
list kept per panel. Decoding is exact: the kernel multiplies the same bfloat16 values as the
panel kernel (``bf16_panel``), reading 3/4 of the bytes, which is what bounds decode.

Layout: the panels of ``bf16_panel`` (64 rows, k-pair by k-pair), each k-pair's 128 bfloat16
(four vectors of 32) stored as 192 bytes: their 128 low bytes, then 64 bytes of codes, byte j
holding the codes of vector 2 (j // 32) + 0 (low nibble) and + 1 (high nibble), element j % 32.
A vector decodes with one ``vpshufb`` (the table) and one byte interleave, in LLVM IR.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from qwen3c.schedules import bf16_dot, bf16_panel, mlp, moe
from qwen3c.schedules.prefetch import CACHE_LINE, prefetch_to_l2
from qwen3c.schedules.scratch import stack_buffer

LANES, VECTORS, PANEL = bf16_panel.LANES, bf16_panel.VECTORS, bf16_panel.PANEL
ELEMENTS = LANES * bf16_dot.PAIRS  # bfloat16 per vector
PAIR_BYTES = VECTORS * ELEMENTS * 3 // 2  # bytes per k-pair of a panel: 128 low, 64 codes
CODES = 16
ZERO_CODE = CODES - 1  # the table's +0.0 high byte: exceptions and true zeros' high byte
TILE_TOKENS = bf16_panel.TILE_TOKENS
WHOLE_PANEL_TOKENS = 32  # from here on a task decodes its panel once (see ``projection``)
PREFETCH_AHEAD = 8192  # bytes: one token, and a panel's decoding into scratch, prefetch the
#                        values this far ahead (see ``projection``)
LAYOUT = "bf16-packed12-panels-64"  # the manifest's name; each part is ``part_layout(role)``

SYMBOL = "qwen3c_bf16_from12"
_INTERLEAVE = ", ".join(f"i32 {i // 2 + (i % 2) * ELEMENTS}" for i in range(2 * ELEMENTS))
_IR = f"""
define linkonce_odr <16 x i32> @{SYMBOL}(<32 x i8> %low, <32 x i8> %code, <32 x i8> %table)
    alwaysinline {{
  %high = call <32 x i8> @llvm.x86.avx2.pshuf.b(<32 x i8> %table, <32 x i8> %code)
  %w = shufflevector <32 x i8> %low, <32 x i8> %high, <64 x i32> <{_INTERLEAVE}>
  %words = bitcast <64 x i8> %w to <16 x i32>
  ret <16 x i32> %words
}}
declare <32 x i8> @llvm.x86.avx2.pshuf.b(<32 x i8>, <32 x i8>)
"""
IMPORT = {"pragma_import_llvm": bf16_dot.IMPORT["pragma_import_llvm"] + _IR}


@dataclasses.dataclass(frozen=True)
class Packed:
    """One [n, k] bfloat16 weight, packed: ``values`` [n / PANEL, k / 2, PAIR_BYTES], the
    ``table`` of high bytes (twice, for a 32-byte ``vpshufb``), and the exceptions of panel p
    at ``offsets[p]:offsets[p + 1]`` of ``at`` (k-pair · 128 + element of the k-pair) and
    ``value`` (float32; both one unused entry long if there are none)."""
    values: np.ndarray
    table: np.ndarray
    offsets: np.ndarray
    at: np.ndarray
    value: np.ndarray

    @property
    def exceptions(self) -> int:
        return int(self.offsets[-1])


def high_byte_counts(bits: np.ndarray) -> np.ndarray:
    """How often each of the 256 high bytes occurs in these bfloat16 bit patterns; a million
    at a time (bincount's int64 copy of a whole head took 17x as long)."""
    flat, chunk = bits.reshape(-1), 1 << 20
    return sum((np.bincount(flat[i:i + chunk] >> 8, minlength=256)
                for i in range(0, flat.size, chunk)), np.zeros(256, np.int64))


def high_byte_table(counts: np.ndarray) -> np.ndarray:
    """The CODES high bytes of a table, from ``high_byte_counts``: the most frequent non-zero
    ones, then 0 (``ZERO_CODE``)."""
    table = np.zeros(CODES, np.uint8)
    table[:CODES - 1] = np.argsort(-np.where(np.arange(256) == 0, 0, counts),
                                   kind="stable")[:CODES - 1]
    return table


def count_exceptions(weight: np.ndarray) -> int:
    """How many values of ``weight`` (bfloat16) ``pack`` keeps in its exception list: the
    compiler needs the count (a parameter's shape) before it builds the graph."""
    bits = np.ascontiguousarray(weight).view(np.uint16)
    counts = high_byte_counts(bits)
    return int(bits.size - counts[np.unique(high_byte_table(counts))].sum())


def parameter_shapes(n: int, k: int, exceptions: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype of each part (``Packed``'s fields) of a packed [n, k] weight."""
    E = max(exceptions, 1)
    return {"values": ((n // PANEL, k // 2, PAIR_BYTES), "uint8"),
            "table": ((2 * CODES,), "uint8"), "offsets": ((n // PANEL + 1,), "int32"),
            "at": ((E,), "int32"), "value": ((E,), "float32")}


def part_buffers(n: int, k: int, exceptions: int) -> list[tirx.Buffer]:
    """The kernels' buffers of the parts, in ``parameter_shapes``' (and ``Packed``'s) order."""
    return [T.Buffer(shape, dtype)
            for shape, dtype in parameter_shapes(n, k, exceptions).values()]


def part_layout(role: str) -> str:
    """The manifest's layout of one part of a packed weight."""
    return f"{LAYOUT}:{role}"


def part_role(layout: str | None) -> str | None:
    """The part a parameter of this layout holds, or None if it is not part of a packed weight."""
    prefix, _, role = (layout or "").partition(":")
    return role if prefix == LAYOUT else None


def part_source(name: str, role: str) -> str:
    """The name of the weight a part's parameter is packed from."""
    return name if role == "values" else name.removesuffix(f"_{role}")


def pack(weight: np.ndarray, capacity: int = 1) -> Packed:
    """``weight`` ([n, k] bfloat16, n a multiple of PANEL, k of ``bf16_dot.STEP``) packed, its
    exception list padded to ``capacity`` entries (the graph's, shared by a shape's weights)."""
    n, k = weight.shape
    bits = np.ascontiguousarray(weight).view(np.uint16)
    table = high_byte_table(high_byte_counts(bits))
    code_of = np.full(256, ZERO_CODE, np.uint8)
    code_of[table[:CODES - 1]] = np.arange(CODES - 1, dtype=np.uint8)
    code_of[0] = ZERO_CODE  # also where the table is short of non-zero high bytes
    listed_apart = table[code_of] != np.arange(256)  # the high bytes the table lacks
    # [panels, pairs, 128]: the panel order of bf16_panel.to_panels, a k-pair's elements in a row
    panels = bf16_panel.to_panels(bits).reshape(n // PANEL, k // 2, VECTORS * ELEMENTS)
    low, high = np.moveaxis(panels.view(np.uint8).reshape(*panels.shape, 2), -1, 0)  # x86, LE
    exception = listed_apart[high]
    code = code_of[high].reshape(n // PANEL, k // 2, VECTORS // 2, 2, ELEMENTS)
    values = np.empty((n // PANEL, k // 2, PAIR_BYTES), np.uint8)
    values[..., :VECTORS * ELEMENTS] = np.where(exception, np.uint8(0), low)
    values[..., VECTORS * ELEMENTS:] = (code[..., 0, :] | (code[..., 1, :] << 4)).reshape(
        n // PANEL, k // 2, -1)
    panel, pair, element = np.nonzero(exception)
    offsets = np.zeros(n // PANEL + 1, np.int32)
    np.cumsum(np.bincount(panel, minlength=n // PANEL), out=offsets[1:])
    at = (pair * VECTORS * ELEMENTS + element).astype(np.int32)
    exact = (panels[panel, pair, element].astype(np.uint32) << 16).view(np.float32)
    unused = max(capacity, 1) - len(at)  # never read: the kernels' buffers are never empty
    if unused > 0:
        at, exact = np.pad(at, (0, unused)), np.pad(exact, (0, unused))
    return Packed(values, np.tile(table, 2), offsets, at, exact)


def unpack(packed: Packed, n: int, k: int) -> np.ndarray:
    """The [n, k] bfloat16 bit patterns (uint16) ``packed`` holds: the reference decoder."""
    values = packed.values.reshape(n // PANEL, k // 2, -1)
    low = values[..., :VECTORS * ELEMENTS].astype(np.uint16)
    codes = values[..., VECTORS * ELEMENTS:].reshape(n // PANEL, k // 2, VECTORS // 2, ELEMENTS)
    code = np.stack([codes & 15, codes >> 4], axis=3).reshape(low.shape)
    bits = low | (packed.table[code].astype(np.uint16) << 8)
    for p in range(n // PANEL):
        for j in range(packed.offsets[p], packed.offsets[p + 1]):
            pair, element = divmod(int(packed.at[j]), VECTORS * ELEMENTS)
            bits[p, pair, element] = packed.value[j:j + 1].view(np.uint32)[0] >> 16
    # back from panel order: [panels, pairs, rows, 2] -> [n, k]
    return bits.reshape(n // PANEL, k // 2, PANEL, 2).swapaxes(1, 2).reshape(n, k)


def _decoded(values, p, kp, v, table):
    """Vector v of k-pair kp of panel p as 16 words (32 bfloat16, ``bf16_dot``'s int32 view),
    its exceptions zero."""
    code_bytes = values[p, kp, T.ramp(VECTORS * ELEMENTS + v // 2 * ELEMENTS, 1, ELEMENTS)]
    shift = T.broadcast(T.Cast("uint8", 4 * (v % 2)), ELEMENTS)  # v is a loop variable
    code = T.bitwise_and(T.shift_right(code_bytes, shift), T.broadcast(T.uint8(15), ELEMENTS))
    return T.call_pure_extern(f"int32x{LANES}", SYMBOL,
                              values[p, kp, T.ramp(v * ELEMENTS, 1, ELEMENTS)], code,
                              table[T.ramp(0, 1, 2 * CODES)])


def projection(n: int, k: int, out_dtype: str):
    """A TVMScript macro ``run(x, values, table, offsets, at, value, y, m)``: y[m, n] (float32
    sums rounded to ``out_dtype``) = x[m, k] · Wᵀ for a packed W; a parallel task per panel,
    one token at a time (decode), in tiles of TILE_TOKENS (the last of its own size) that each
    decode the panel as they go, or, from WHOLE_PANEL_TOKENS tokens on, ``bf16_panel``'s
    tiles over the panel decoded once into scratch.

    One token, and the decoding of a panel into scratch, also prefetch k-pair by k-pair the
    values PREFETCH_AHEAD bytes on (past the panel's end: the next panel's). Decoding a vector
    keeps the core busy long enough that the hardware prefetcher alone left it waiting on its
    loads. Zen 5, 2 threads, weights rotated past L3, against no prefetch in the same process:
    one token 6144x1024 1.17-1.36x (1 thread 1.40x), 4096x1024 1.21x, 1024x3072 1.20x,
    1024x2048 1.18x, the 151936x1024 head 1.11x (4 and 8 KB ahead beat 2 KB, 12-16 KB gained
    no more); 32 tokens 1.12-1.15x, 64 tokens 1.09x, 128 tokens 1.01x. The tiles that decode
    as they go are bound by compute, not memory (4 tokens: 1.02x), and do not prefetch."""
    N, K = n, k
    pairs = K // bf16_dot.PAIRS
    values_bytes = N // PANEL * pairs * PAIR_BYTES
    panel_tile = bf16_panel.tile_sums(TILE_TOKENS, pairs, moe.same_row)

    @T.macro
    def prefetch(values, p, kp, ahead):
        """Prefetch k-pair kp of panel p's values ``ahead`` bytes on (into the next panel)."""
        flat = T.decl_buffer((values_bytes,), "uint8", data=values.data)
        for line in T.unroll(PAIR_BYTES // CACHE_LINE):
            T.evaluate(prefetch_to_l2(T.address_of(flat[T.min(
                (p * pairs + kp) * PAIR_BYTES + ahead + line * CACHE_LINE, values_bytes - 1)])))

    @T.macro
    def sums(x, x_words, values, table, offsets, at, value, acc, wv, p, t0, tokens, last, ahead):
        for i in T.unroll(tokens):
            for v in T.unroll(VECTORS):
                for lane in T.vectorized(LANES):
                    acc[i, v, lane] = T.float32(0)
        for kp in range(pairs):
            if ahead > 0:
                prefetch(values, p, kp, ahead)
            for v in T.unroll(VECTORS):  # each vector decoded once for all the tokens
                wv[v, bf16_dot.words(0)] = _decoded(values, p, kp, v, table)
            for i in T.unroll(tokens):
                for v in T.unroll(VECTORS):
                    acc[i, v, bf16_dot.words(0)] = bf16_dot.dot(
                        acc[i, v, bf16_dot.words(0)],
                        T.broadcast(x_words[T.min(t0 + i, last), kp], LANES),
                        wv[v, bf16_dot.words(0)])
        for j in range(offsets[p], offsets[p + 1]):
            pair: T.let = at[j] // (VECTORS * ELEMENTS)
            element: T.let = at[j] % (VECTORS * ELEMENTS)
            for i in T.unroll(tokens):
                acc[i, element // ELEMENTS, element % ELEMENTS // 2] = (
                    acc[i, element // ELEMENTS, element % ELEMENTS // 2]
                    + T.Cast("float32", x[T.min(t0 + i, last), 2 * pair + element % 2])
                    * value[j])

    @T.macro
    def unpack_panel(values, table, offsets, at, value, p, panel):
        """panel[0, 0] = panel p of W in ``bf16_panel``'s layout, exceptions included."""
        for kp in range(pairs):
            prefetch(values, p, kp, PREFETCH_AHEAD)
            for v in T.unroll(VECTORS):
                panel[0, 0, kp, bf16_dot.words(v * LANES)] = _decoded(values, p, kp, v, table)
        bits = T.decl_buffer((pairs * VECTORS * ELEMENTS,), "uint16", data=panel.data)
        for j in range(offsets[p], offsets[p + 1]):
            bits[at[j]] = T.Cast("uint16", T.shift_right(T.reinterpret("uint32", value[j]),
                                                        T.uint32(16)))

    @T.macro
    def store(y, acc, p, t0, tokens, m):
        for i in T.unroll(tokens):
            if t0 + i < m:
                for v in T.unroll(VECTORS):
                    for lane in T.vectorized(LANES):
                        y[t0 + i, p * PANEL + v * LANES + lane] = T.Cast(out_dtype,
                                                                         acc[i, v, lane])

    def tile(tokens: int):
        """A TVMScript macro: the ``tokens`` tokens from t0, summed and stored."""

        @T.macro
        def run(x, x_words, values, table, offsets, at, value, acc, wv, p, t0, y, m):
            sums(x, x_words, values, table, offsets, at, value, acc, wv, p, t0, tokens, m - 1, 0)
            store(y, acc, p, t0, tokens, m)

        return run

    full_tile = tile(TILE_TOKENS)

    def last_tile(tokens: int):
        """A TVMScript macro: the last m - t0 tokens, ``tokens`` to TILE_TOKENS of them, in a
        tile of their number (a tile's decoding is shared by its tokens, its dot products are
        not: two tokens in a tile of six took 1.9x the time of one)."""
        if tokens == TILE_TOKENS:
            return full_tile
        this, larger = tile(tokens), last_tile(tokens + 1)

        @T.macro
        def run(x, x_words, values, table, offsets, at, value, acc, wv, p, t0, y, m):
            if m - t0 == tokens:
                this(x, x_words, values, table, offsets, at, value, acc, wv, p, t0, y, m)
            else:
                larger(x, x_words, values, table, offsets, at, value, acc, wv, p, t0, y, m)

        return run

    partial_tile = last_tile(1)

    @T.macro
    def run(x, values, table, offsets, at, value, y, m):
        with T.sblock("packed_gemm"):
            x_words = T.decl_buffer((m, T.int64(pairs)), bf16_dot.WORD, data=x.data)
            for p in T.parallel(N // PANEL, annotations=IMPORT):
                with T.sblock("panel"):
                    T.reads()  # independent tasks; nothing schedules this block
                    T.writes()
                    wv = stack_buffer((VECTORS, LANES), bf16_dot.WORD)  # a k-pair, decoded
                    if m >= WHOLE_PANEL_TOKENS:
                        # K * 128 bytes (128-384 KB for the 0.6B shape): the workspace pool's
                        panel = T.sblock_alloc_buffer((1, 1, pairs, PANEL), bf16_dot.WORD,
                                                      scope="global")
                        acc = T.sblock_alloc_buffer((TILE_TOKENS, VECTORS, LANES), "float32",
                                                    scope="global")
                        unpack_panel(values, table, offsets, at, value, p, panel)
                        for t in range((m + TILE_TOKENS - 1) // TILE_TOKENS):
                            panel_tile(x_words, panel, acc, 0, 0, None, 0, t * TILE_TOKENS,
                                       m - 1)
                            store(y, acc, p, t * TILE_TOKENS, TILE_TOKENS, m)
                    elif m > 1:
                        acc = T.sblock_alloc_buffer((TILE_TOKENS, VECTORS, LANES), "float32",
                                                    scope="global")
                        for t in range((m - 1) // TILE_TOKENS):
                            full_tile(x, x_words, values, table, offsets, at, value, acc, wv,
                                      p, t * TILE_TOKENS, y, m)
                        partial_tile(x, x_words, values, table, offsets, at, value, acc, wv, p,
                                     (m - 1) // TILE_TOKENS * TILE_TOKENS, y, m)
                    else:
                        one = stack_buffer((1, VECTORS, LANES), "float32")
                        sums(x, x_words, values, table, offsets, at, value, one, wv, p,
                             T.int64(0), 1, T.int64(0), PREFETCH_AHEAD)
                        store(y, one, p, T.int64(0), 1, m)

    return run


@functools.cache
def packed_gemm(n: int, k: int, exceptions: int, out_dtype: str = "float32",
                swiglu: bool = False) -> tirx.PrimFunc:
    """``projection`` as a kernel, for a weight with this many exceptions; with ``swiglu``, of
    a gate_up weight [2I, k]: its float32 sums, then act = silu(gate) * up ([m, I],
    ``out_dtype``), in one kernel."""
    K, outputs = k, n // 2 if swiglu else n
    body = projection(n, k, "float32" if swiglu else out_dtype)
    activate = mlp.swiglu_rows(n // 2, out_dtype) if swiglu else None
    VALUES, TABLE, OFFSETS, AT, VALUE = part_buffers(n, k, exceptions)

    @T.prim_func(private=True, s_tir=True)
    def gemm(var_x: T.handle, values: VALUES, table: TABLE, offsets: OFFSETS, at: AT,
             value: VALUE, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        m = T.int64()
        x = T.match_buffer(var_x, (m, T.int64(K)), "bfloat16")
        y = T.match_buffer(var_y, (m, T.int64(outputs)), out_dtype)
        if swiglu:
            with T.sblock("gate_up"):
                T.reads()  # runs once; nothing schedules this block
                T.writes()
                sums = T.sblock_alloc_buffer((m, T.int64(n)), "float32")
                body(x, values, table, offsets, at, value, sums, m)
                activate(m, sums, y)
        else:
            body(x, values, table, offsets, at, value, y, m)

    return gemm


@functools.cache
def packed_rows(n: int, k: int, exceptions: int) -> tirx.PrimFunc:
    """rows[t] = W[ids[t]] in bfloat16, decoded from a packed [n, k] W: the token lookup of a
    tied model whose embedding table is its packed head (one table, not two). Scalar code:
    k values per token, a few microseconds."""
    K = k
    pairs, SPAN = K // bf16_dot.PAIRS, VECTORS * ELEMENTS
    VALUES, TABLE, OFFSETS, AT, VALUE = part_buffers(n, k, exceptions)

    @T.prim_func(private=True, s_tir=True)
    def lookup(var_ids: T.handle, values: VALUES, table: TABLE, offsets: OFFSETS, at: AT,
               value: VALUE, var_rows: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        m = T.int64()
        ids = T.match_buffer(var_ids, (m,), "int32")
        rows = T.match_buffer(var_rows, (m, T.int64(K)), "bfloat16")
        with T.sblock("packed_rows"):
            bits = T.decl_buffer((m, T.int64(K)), "uint16", data=rows.data)
            for t in range(m):
                p: T.let = ids[t] // PANEL
                r: T.let = ids[t] % PANEL
                for kp, h in T.grid(pairs, 2):
                    e: T.let = 2 * r + h  # the element of the k-pair (panel order)
                    code: T.let = T.bitwise_and(T.shift_right(
                        values[p, kp, SPAN + e // (2 * ELEMENTS) * ELEMENTS + e % ELEMENTS],
                        T.Cast("uint8", 4 * (e // ELEMENTS % 2))), T.uint8(15))
                    bits[t, 2 * kp + h] = T.bitwise_or(
                        T.Cast("uint16", values[p, kp, e]),
                        T.shift_left(T.Cast("uint16", table[code]), T.uint16(8)))
                for j in range(offsets[p], offsets[p + 1]):
                    if at[j] % SPAN // 2 == r:
                        bits[t, 2 * (at[j] // SPAN) + at[j] % 2] = T.Cast("uint16", T.shift_right(
                            T.reinterpret("uint32", value[j]), T.uint32(16)))

    return lookup
