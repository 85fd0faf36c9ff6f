"""Quantized prefills on AMX tiles: each task rebuilds its weight rows in bfloat16, then
multiplies them with ``amx_gemm``'s tile blocks.

The integer kernels of ``quant.py`` multiply int8-rounded activations by the integers 64 bytes
at a time; an AMX tile product does 8192 multiply-adds, but only of bfloat16 (or int8 without a
scale per group of 32). So for prefills of MIN_TOKENS or more, each parallel task first turns
its BLOCK weight rows into bfloat16 (level times the group's scale, rounded to nearest even: the
rounding a bfloat16 model's weights already carry) in a scratch strip, once, and then walks all
the tokens' blocks over it. The cost of rebuilding is per weight and the tiles' gain per token,
so below MIN_TOKENS the integer kernel stays.

The strip keeps the storage's interleaved element order (``quant._position``: for 8 bits the
bytes as stored, for 4 bits a vector's low nibbles then its high ones), which spares a
transpose: a dot product over k does not care about the order of k as long as the tokens meet
the same order, so the tokens are copied into the B tiles in it (``source_word``). Each
bfloat16 pair of the strip holds two neighbouring elements of one group, so x moves in words.
The activations keep their bfloat16 values (no int8 rounding), so these prefills are closer to
the float model than the integer kernel's (``tests/test_quant.py``).
"""

from __future__ import annotations

import functools

import tvm
from tvm import tirx
from tvm.script import tirx as T

from qwen3c.schedules import amx_gemm, bf16_dot
from qwen3c.schedules.quant import (
    DOT,
    IntegerDots,
    QuantScheme,
    integer_projection,
    quantized_kernel,
)
from qwen3c.schedules.scratch import stack_buffer

MIN_TOKENS = 16  # about where the tiles overtake the integer kernel. q8, Intel Xeon, 4096 x 1024:
#                 2 threads at 12 tokens 1.01x, 16: 1.15x, 24: 1.47x; one thread (three runs,
#                 this host drifts 20 %) at 12 tokens 0.83x, 16: 0.89-1.19x, 24: 1.52-1.58x
BITS = (8, 4)  # the layouts rebuilt here; int6 (heads of 4-bit builds) keeps the integers
LANES = 16  # float32 per vector
PACK = "qwen3c_pack_bf16"

# The words of 32 bfloat16, rounded from two vectors of float32 (TVM's bfloat16 values are
# legalized to float32 or i16 vectors, and the intrinsic takes <32 x bfloat>; as in bf16_dot.py).
_IR = f"""
define linkonce_odr <16 x i32> @{PACK}(<16 x float> %high, <16 x float> %low) alwaysinline {{
  %packed = call <32 x bfloat> @llvm.x86.avx512bf16.cvtne2ps2bf16.512(<16 x float> %high,
                                                                      <16 x float> %low)
  %words = bitcast <32 x bfloat> %packed to <16 x i32>
  ret <16 x i32> %words
}}
declare <32 x bfloat> @llvm.x86.avx512bf16.cvtne2ps2bf16.512(<16 x float>, <16 x float>)
"""
IMPORT = {"pragma_import_llvm": _IR}


def usable(target: tvm.target.Target, scheme: QuantScheme, dtype: str, n: int, k: int) -> bool:
    """Whether an [n, k] projection quantized by ``scheme`` runs its prefills on AMX tiles."""
    return (scheme.bits in BITS and scheme.lanes(k) * DOT % (2 * LANES) == 0
            and amx_gemm.usable(target, dtype, n, k) and bf16_dot.available(target, dtype, k))


def source_word(scheme: QuantScheme, k: int):
    """word -> word: which bfloat16 pair of a token meets the strip's ``word`` (the inverse of
    ``quant._position`` on pairs)."""
    G, LANES_PER_BLOCK = scheme.group, scheme.lanes(k)
    V, B = LANES_PER_BLOCK * DOT, LANES_PER_BLOCK * G  # bytes of a vector; elements of a block

    def source(word):
        at = word * 2
        block, within = at // B, at % B
        group, element = within % V // DOT, within % DOT
        if scheme.bits == 8:
            natural = group * G + within // V * DOT + element
        else:  # vector within // (2V) of the nibbles, its low (0) or high (1) half
            half = within % (2 * V) // V
            natural = group * G + half * (G // 2) + within // (2 * V) * DOT + element
        return (block * B + natural) // 2

    return source


def pack(low, high):
    """Two float32x16 vectors -> the int32x16 words of their 32 bfloat16 (low's first),
    rounded to nearest even by one ``vcvtne2ps2bf16``."""
    return T.call_pure_extern(f"int32x{LANES}", PACK, high, low)


def rebuild_rows(scheme: QuantScheme, k: int):
    """A TVMScript macro ``rebuild(q, scale, strip, first)``: strip[r] (bfloat16 pairs as int32
    words) = weight row ``first + r`` for r < BLOCK, in the interleaved order (module
    docstring). Each group's levels are widened to float32 16 at a time and scaled by a
    vector of their groups' scales (``lane_scale``: each of a block's scales 4 times)."""
    G, LANES_PER_BLOCK, offset = scheme.group, scheme.lanes(k), scheme.offset
    V, B = LANES_PER_BLOCK * DOT, LANES_PER_BLOCK * G
    BLOCK_BYTES = B * scheme.bits // 8
    VECTORS = BLOCK_BYTES // V
    NIBBLES = 8 // scheme.bits  # levels per byte, each filling V elements of the strip
    assert V % (2 * LANES) == 0, "a dot-product vector packs into 32 bfloat16 at a time"

    def levels(q, row, at, shift: int):
        """16 levels from byte ``at`` as float32 (4 bits: the nibbles at ``shift``)."""
        ints = T.Cast(f"int32x{LANES}", q[row, T.ramp(at, 1, LANES)])
        if scheme.bits == 4:
            ints = T.bitwise_and(T.shift_right(ints, T.broadcast(shift, LANES)),
                                 T.broadcast(15, LANES))
        return T.Cast(f"float32x{LANES}", ints - T.broadcast(offset, LANES))

    def scaled(q, lane_scale, row, byte, c, shift):
        return levels(q, row, byte + c, shift) * lane_scale[T.ramp(c, 1, LANES)]

    @T.macro
    def rebuild(q, scale, strip, first):
        with T.sblock("rebuild"):
            T.reads()  # one task's rows; nothing schedules this block
            T.writes()
            lane_scale = stack_buffer((V,), "float32")
            for r in T.serial(amx_gemm.BLOCK, annotations=IMPORT):
                for block in range(k // B):
                    for lane in range(LANES_PER_BLOCK):
                        for d in T.vectorized(DOT):
                            lane_scale[lane * DOT + d] = T.Cast(
                                "float32", scale[first + r, block * LANES_PER_BLOCK + lane])
                    for v in range(VECTORS):
                        byte: T.let = block * BLOCK_BYTES + v * V
                        for pair in T.unroll(V // (2 * LANES)):
                            c: T.let = pair * 2 * LANES
                            for nibble in T.unroll(NIBBLES):
                                at: T.let = block * B + (v * NIBBLES + nibble) * V + c
                                strip[r, T.ramp(at // 2, 1, LANES)] = pack(
                                    scaled(q, lane_scale, first + r, byte, c, 4 * nibble),
                                    scaled(q, lane_scale, first + r, byte, c + LANES,
                                           4 * nibble))

    return rebuild


def tile_projection(n: int, k: int, scheme: QuantScheme, out_dtype: str):
    """A TVMScript macro ``run(x, q, scale, y, m)``: y = x · Wᵀ on AMX tiles from the rebuilt
    rows, for bfloat16 x of any m ≥ 1 (the last token block re-reads the last token)."""
    N, K, W = n, k, k // 2
    copy = amx_gemm.copy_tokens(W, source_word(scheme, K))
    rebuild = rebuild_rows(scheme, K)
    walk = amx_gemm.token_blocks(K, out_dtype)
    TILE, BLOCK = amx_gemm.TILE, amx_gemm.BLOCK

    @T.macro
    def run(x, q, scale, y, m):
        with T.sblock("amx_quantized"):
            T.reads()  # runs once; nothing schedules this block
            T.writes()
            xv = T.sblock_alloc_buffer((amx_gemm.padded(m) // TILE, T.int64(W), TILE),
                                       amx_gemm.WORD)
            copy(xv, x, m)
            for nb in T.parallel(N // BLOCK, annotations=amx_gemm.IMPORT):
                with T.sblock("rows"):
                    T.reads()  # independent tasks; nothing schedules this block
                    T.writes()
                    strip = T.sblock_alloc_buffer((BLOCK, W), amx_gemm.WORD)  # workspace pool
                    sums = T.sblock_alloc_buffer((2, 2, TILE, TILE), "float32")
                    rebuild(q, scale, strip, nb * BLOCK)
                    walk(T.address_of(strip[0, 0]), T.address_of(strip[TILE, 0]), xv, sums, y,
                         m, nb)

    return run


@functools.cache
def quantized_matmul(n: int, k: int, scheme: QuantScheme, dtype: str, dots: IntegerDots,
                     out_dtype: str = "float32") -> tirx.PrimFunc:
    """``quant.quantized_matmul`` with its prefills of MIN_TOKENS or more on AMX tiles (check
    ``usable`` first); fewer tokens, as decode, keep the integer kernel."""
    tiles = tile_projection(n, k, scheme, out_dtype)
    integers = integer_projection(n, k, scheme, dots, out_dtype)

    @T.macro
    def run(x, q, scale, y, m):
        if m >= MIN_TOKENS:
            tiles(x, q, scale, y, m)
        else:
            integers(x, q, scale, y, m)

    return quantized_kernel(run, n, k, scheme, dtype, out_dtype)
