"""Group-wise symmetric weight quantization and the CPU kernels that read it.

A weight W [N, K] is cut along K into groups of G; each group keeps one bfloat16 scale s and
integers q = round(w / s): for 8 bits s = max|w| / 127, q in [-127, 127]; for 4 bits, q in
[-8, 7], the element of largest magnitude m gives s = m / -8 (or, where that has less squared
error, a slightly smaller scale); 6 bits likewise with q in [-32, 31] and s = m / -32. Each
scale is rounded to bfloat16 *before* the integers are chosen (the extreme element may then
round to one level past the range, and is clipped), so the stored scale is exact and takes 2
bytes per group instead of 4 (a tenth of an int4 model's bytes).

The kernel multiplies in integers: each token's activations are quantized per group of G to int8
(scale max|x| / 127, as llama.cpp's q8_0), and the products of a group are summed by 4-byte
dot products (``IntegerDots``): AVX512-VNNI's ``vpdpbusd`` (unsigned x signed bytes) makes 16
int32 sums of 4 from 64 bytes of weights and 64 of activations; AVX2 makes 8 from 32 bytes with
``vpmaddubsw`` (pairs, into int16) and ``vpmaddwd`` (pairs of pairs, into int32); other CPUs
run the same sums as plain integer code (LLVM's generic ``vector.partial.reduce.add`` cannot be
used: which products land in which lane is unspecified). To have each lane belong to one group,
the integers of 16 consecutive groups (a *block*; 8, 12 or fewer where 16 do not divide a row's
groups: ``QuantScheme.lanes``) are stored interleaved, 4 elements of each group in turn, offset
to be unsigned:

    int8   [N, K]      uint8, q + 128; within a block, element i of group g at
                       (i // 4) · 64 + g · 4 + i % 4
    int4   [N, K / 2]  uint8, q + 8 in nibbles; within a block, byte (j // 4) · 64 + g · 4 +
                       j % 4 holds element j of group g (low nibble) and element j + G/2 (high)
    int6   [N, 3K / 4] uint8, q + 32: a block of B elements is its low four bits as int4
                       (B / 2 bytes), then their top two bits (B / 4 bytes): byte
                       (s // 4) · 64 + g · 4 + d of those holds at bits 2 (s % 4) the top bits
                       of the element that dot-product step s (the int4 layout's nibble s % 2
                       of vector s // 2) puts at g · 4 + d
    scale  [N, K / G]  bfloat16

(with L < 16 groups per block, 64 becomes 4L), so a block's int32 lanes end as its groups'
sums, scaled by a contiguous vector of weight scales times activation scales; the offset is
removed as offset · Σx per group, once per token. G must be a multiple of 8 (of 16 for 6 bits).
With the scales a weight costs 1.06 bytes in int8, 0.81 in int6 (llama.cpp's Q6_K: 0.82) and
0.56 in int4; the lm_head of 4-bit builds takes int6 (``compile/quantization.py``).

``quantize`` (numpy) makes them at compile time. ``quantized_matmul`` computes y = x Wᵀ for any
number of tokens: for prefill too it beat rebuilding W and running the float32 GEMM of
``cpu_gemm.py`` (6144x1024, q4, 2 threads: 2.4 vs 8.2 ms at 32 tokens, 5.1 vs 15.7 ms at 128;
later 0.9 and 3.2 ms; on the Zen 5 host 0.8 and 2.8 ms), since a task's weight rows stay in L1
while the tokens pass over them, TILE_TOKENS at a time so that each weight vector is loaded
(and, for 4 and 6 bits, unpacked) once for all of them.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T
from tvm.target import codegen

from qwen3c.schedules.lane_sum import fold_lanes
from qwen3c.schedules.moe import paired_units, same_row, swiglu_store, unit_rows
from qwen3c.schedules.prefetch import CACHE_LINE, prefetch_to_l2
from qwen3c.schedules.rows import each_row
from qwen3c.schedules.scratch import stack_buffer

SCALE_DTYPE = "bfloat16"
TOP_SHIFTS = (2 * np.arange(4, dtype=np.uint8))[:, None]  # int6: step s's top bits at 2 (s % 4)
SHRINKS = (0.95, 0.9, 0.85, 0.8, 0.75)  # int4/int6 scales tried below the exact-extreme one
QUANTIZE_ROWS = 256  # weight rows quantized at once (in cache)
ROWS_PER_TASK = 16  # weight rows per parallel task (int8 lm_head of 151936 rows streamed from
#                   memory: 9.6 ms with 8, 7.3 with 16, 7.8 with 32; prefill 6144x1024 at 128
#                   tokens 1.15x faster than 8)
GATE_UP_UNIT = ROWS_PER_TASK // 2  # features per task of a gate_up weight with SwiGLU
GATE_UP_LAYOUT = "quant-gate-up-units-8"  # the manifest's name: ``paired_units`` of GATE_UP_UNIT
LAYOUTS = {GATE_UP_LAYOUT: lambda weight: paired_units(weight, GATE_UP_UNIT)}  # before quantize
MAX_LANES = 16  # groups per block, at most: one int32 lane of the dot products each
DOT = 4  # products per lane of one dot product
TILE_ROWS = 4  # weight rows sharing each activation vector in a tile, with VNNI (row_tile)
TILE_TOKENS = 3  # tokens sharing each weight vector. 6144x1024 at 128 tokens, 2 threads, Zen 5,
#                 q4 / q8: 2 tokens 3.58 / 3.46 ms, 3 tokens 2.82 / 2.98, 4 tokens 2.93 / 3.20
#                 (at 32 tokens 4 is 3 % ahead of 3). Before the accumulator shrank to one row
#                 (Intel host), 3 or 4 measured slower than 2.


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    bits: int  # 8, 6 or 4
    group: int  # elements per scale, along K

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:  # magnitude of the most negative level
        return 127 if self.bits == 8 else 2 ** (self.bits - 1)

    @property
    def offset(self) -> int:  # what the stored integers are above the signed ones
        return 2 ** (self.bits - 1)

    @property
    def group_multiple(self) -> int:
        """What G must divide by: int6 keeps the top bits of four dot-product steps (of G/4
        per group) in one byte."""
        return 16 if self.bits == 6 else 8

    @property
    def group_fits(self) -> bool:
        return self.group >= self.group_multiple and self.group % self.group_multiple == 0

    @property
    def storage_dtype(self) -> str:
        return "uint8"

    def lanes(self, k: int) -> int:
        """Groups per block: the first of 16 (a 512-bit dot product), 8, 12, 4, 2, 1 that
        divides a row's groups. 12 serves rows of 12 or 36 groups (the MoE-small experts' down
        projection: 384 = 12 · 32) with an AVX2 dot product and an SSE one per step, where
        blocks of 4 took three SSE ones."""
        return next(lanes for lanes in (MAX_LANES, 8, 12, 4, 2, 1)
                    if k // self.group % lanes == 0)

    def storage_shape(self, n: int, k: int) -> tuple[int, int]:
        return (n, k * self.bits // 8)

    def scale_shape(self, n: int, k: int) -> tuple[int, int]:
        return (n, k // self.group)

    def fits(self, n: int, k: int) -> bool:
        return k % self.group == 0 and n % ROWS_PER_TASK == 0 and self.group_fits


def quantize(weight: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """(integers in storage layout, scales) for a float weight [..., N, K], row by row (the
    leading axes, e.g. experts, are kept). Chunks of rows are quantized on all cores (numpy
    releases the GIL) and in cache: a 6144x1024 int4 weight took 0.41 s in one piece on the Zen
    4 host, 0.18 s in chunks on its 2 cores."""
    *lead, k = weight.shape
    n = int(np.prod(lead))
    groups = weight.reshape(n, k // scheme.group, scheme.group)
    q = np.empty(groups.shape, np.int16)
    scale = np.empty((n, k // scheme.group, 1), np.float32)

    def quantize_rows(first: int) -> None:
        rows = slice(first, first + QUANTIZE_ROWS)
        scale[rows], q[rows] = _quantized_groups(groups[rows].astype(np.float32), scheme)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(quantize_rows, range(0, n, QUANTIZE_ROWS)))
    stored = (q.reshape(n, k) + scheme.offset).astype(np.uint8)
    return (_interleave(stored, scheme).reshape(*lead, -1),
            scale.reshape(*lead, k // scheme.group).astype(ml_dtypes.bfloat16))


def _quantized_groups(groups: np.ndarray,
                      scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """(scales, integers) of float32 ``groups`` [rows, groups, G]."""
    if scheme.bits == 8:
        return _rounded(groups, np.abs(groups).max(axis=-1, keepdims=True) / 127, scheme)
    # The largest magnitude maps to the lowest level (-8, -32), so all levels are used; then a
    # few smaller scales are tried (clipping that one element a little) and the least squared
    # error per group wins, which helps groups with one outlier.
    extreme = np.take_along_axis(groups, np.abs(groups).argmax(-1)[..., None], axis=-1)
    scale, q = _rounded(groups, extreme / -scheme.qmin, scheme)
    best = _squared_error(groups, scale, q)
    for shrink in SHRINKS:
        trial_scale, trial_q = _rounded(groups, extreme / -scheme.qmin * shrink, scheme)
        error = _squared_error(groups, trial_scale, trial_q)
        better = error < best
        scale = np.where(better, trial_scale, scale)
        q = np.where(better, trial_q, q)
        best = np.minimum(error, best)
    return scale, q


def _rounded(groups: np.ndarray, scale: np.ndarray,
             scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """(scale as stored, integers) for the given scale; an all-zero group keeps scale 0."""
    scale = scale.astype(ml_dtypes.bfloat16).astype(np.float32)
    safe = np.where(scale == 0, 1, scale)
    return scale, np.clip(np.rint(groups / safe), -scheme.qmin, scheme.qmax).astype(np.int16)


def _squared_error(groups: np.ndarray, scale: np.ndarray, q: np.ndarray) -> np.ndarray:
    return ((q * scale - groups) ** 2).sum(axis=-1, keepdims=True)


def _blocked_shape(n: int, k: int, scheme: QuantScheme) -> tuple[int, ...]:
    """[row, block, group, (4/6-bit: half,) step, element of step] in natural element order."""
    steps = scheme.group // DOT if scheme.bits == 8 else scheme.group // (2 * DOT)
    halves = () if scheme.bits == 8 else (2,)
    lanes = scheme.lanes(k)
    return (n, k // (lanes * scheme.group), lanes, *halves, steps, DOT)


def _step_axes(scheme: QuantScheme) -> tuple[int, ...]:
    """The transposition of ``_blocked_shape`` that puts a block's elements in the order the
    dot products meet them: [row, block, step, (half,) group, element]; its own inverse."""
    return (0, 1, 3, 2, 4) if scheme.bits == 8 else (0, 1, 4, 3, 2, 5)


def _step_grid(n: int, k: int, scheme: QuantScheme) -> tuple[int, int, int, int]:
    """[row, block, dot-product step, byte of the step's vector]: the shape the packing reads."""
    lanes = scheme.lanes(k)
    return (n, k // (lanes * scheme.group), scheme.group // DOT, lanes * DOT)


def _by_step(stored: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """Natural order [N, K] -> ``_step_grid``."""
    n, k = stored.shape
    blocked = stored.reshape(_blocked_shape(n, k, scheme)).transpose(_step_axes(scheme))
    return blocked.reshape(_step_grid(n, k, scheme))


def _interleave(stored: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """Natural order [N, K] (offset integers) -> the storage layout."""
    steps = _by_step(stored, scheme)
    if scheme.bits == 8:
        return steps.reshape(stored.shape[0], -1)
    low = steps & 15
    packed = low[:, :, 0::2] | (low[:, :, 1::2] << 4)  # step 2i: low nibbles, 2i + 1: high
    if scheme.bits == 6:  # then the top two bits of steps 4i .. 4i + 3, two bits a step
        n, blocks, count, width = steps.shape
        top = (steps >> 4).reshape(n, blocks, count // 4, 4, width) << TOP_SHIFTS
        packed = np.concatenate([packed, np.bitwise_or.reduce(top, axis=3)], axis=2)
    return packed.reshape(stored.shape[0], -1)


def _natural(q: np.ndarray, scheme: QuantScheme, k: int) -> np.ndarray:
    """The storage layout -> natural order [N, K] (offset integers)."""
    n, blocks, count, width = _step_grid(q.shape[0], k, scheme)
    packed = q.reshape(n, blocks, -1, width)
    steps = packed
    if scheme.bits != 8:
        nibbles = packed[:, :, :count // 2]
        steps = np.stack([nibbles & 15, nibbles >> 4], axis=3).reshape(n, blocks, count, width)
    if scheme.bits == 6:
        top = (packed[:, :, count // 2:, None] >> TOP_SHIFTS) & 3
        steps = steps | (top.reshape(n, blocks, count, width) << 4)
    shape = _blocked_shape(n, k, scheme)
    axes = _step_axes(scheme)
    return steps.reshape([shape[a] for a in axes]).transpose(axes).reshape(n, k)


def dequantize_reference(q: np.ndarray, scale: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """The float32 weight [..., N, K] that ``q`` and ``scale`` stand for (numpy)."""
    *lead, groups = scale.shape
    n, k = int(np.prod(lead)), groups * scheme.group
    ints = _natural(q.reshape(n, -1), scheme, k).astype(np.float32) - scheme.offset
    weights = ints.reshape(n, groups, scheme.group) * scale.reshape(n, groups, 1).astype(
        np.float32)
    return weights.reshape(*lead, k)


def _position(group, i, scheme: QuantScheme, lanes: int):
    """Where element ``i`` of ``group`` sits in the activations' (and the int8 weights')
    interleaved order, with ``lanes`` groups per block."""
    vector = lanes * DOT
    base = group // lanes * lanes * scheme.group + group % lanes * DOT
    if scheme.bits == 8:
        return base + i // DOT * vector + i % DOT
    half, j = i // (scheme.group // 2), i % (scheme.group // 2)
    return base + j // DOT * 2 * vector + half * vector + j % DOT


class IntegerDots(enum.Enum):
    """How a CPU sums four byte products into each int32 lane."""

    VNNI = "vnni"  # AVX512-VNNI vpdpbusd: 16 lanes an instruction
    MADDUBS = "maddubs"  # AVX2 vpmaddubsw then vpmaddwd: 8 lanes (4 in SSSE3's xmm form)
    PLAIN = "plain"  # widening multiplies and adds: NEON, generic CPUs


def integer_dots(target: tvm.target.Target) -> IntegerDots:
    """The fastest ``IntegerDots`` that ``target`` has."""
    def has(*features: str) -> bool:
        return (target.kind.name == "llvm"
                and all(codegen.target_has_features(f, target) for f in features))

    if has("avx512vnni", "avx512vl"):
        return IntegerDots.VNNI
    return IntegerDots.MADDUBS if has("avx2") else IntegerDots.PLAIN


def row_tile(dots: IntegerDots) -> int:
    """Weight rows per tile of tokens: TILE_ROWS with VNNI, whose 32 vector registers hold
    the 4 x 3 tile's integer sums and float32 sums (per step 4 weight and 3 activation loads
    for 12 dot products, where one row took 1 and 3 for 3). Zen 4, 2 threads, 128 tokens,
    q8 / q4: 6144x1024 4.83 -> 2.80 / 4.33 -> 3.27 ms, 1024x3072 1.84 -> 1.41 / 1.89 -> 1.53;
    32 tokens 1.2-1.6x. AVX2 has 16 registers: rows of 2 or 4 there made the same GEMMs
    1.1-2.2x slower (znver3 code on the Zen 4), so it keeps one."""
    return TILE_ROWS if dots is IntegerDots.VNNI else 1


def keeps_magnitudes(scheme: QuantScheme, k: int, dots: IntegerDots) -> bool:
    """Whether the activations keep |x| after x: the AVX2 int8 path multiplies |x| by
    q · sign x (``row_dots``), and |x| is the same for every weight row, so a tile of tokens
    loads it rather than computing it once per weight vector and token: one vector op fewer of
    the five per product (with the lane sums of ``lane_sum``: a 6144x1024 GEMM at 128 tokens
    13.5 -> 11.1 ms on Zen 3, 2 threads). A single token (decode) still computes |x|: there
    the kernel streams weights from memory, and the extra load made GEMVs 7-25 % slower."""
    return dots is IntegerDots.MADDUBS and scheme.lanes(k) % 4 == 0 and scheme.bits == 8


def activation_width(scheme: QuantScheme, k: int, dots: IntegerDots) -> int:
    """Bytes of one token's quantized activations: its k levels, then, where
    ``keeps_magnitudes``, their k magnitudes in the same order."""
    return 2 * k if keeps_magnitudes(scheme, k, dots) else k


def activation_quantizer(scheme: QuantScheme, k: int, dots: IntegerDots):
    """A TVMScript macro quantizing row ``r`` of ``x`` [., k] into row ``r`` of ``xa`` (int8
    levels in the interleaved order, ``activation_width`` bytes), ``x_scale`` and ``x_offset``
    (offset · Σ levels), one group of G at a time: scale max|x| / 127, as llama.cpp's q8_0.
    ``tokens`` is the most rows one weight row meets in the call: below TILE_TOKENS (decode)
    no tile reads the magnitudes, so they are not stored."""
    G, LANES = scheme.group, scheme.lanes(k)
    offset = scheme.offset
    magnitudes = keeps_magnitudes(scheme, k, dots)

    @T.macro
    def quantize(r, x, xa, x_scale, x_offset, tokens):
        for group in range(k // G):
            with T.sblock("quantize_x"):
                T.reads()  # independent groups; nothing schedules this block
                T.writes()
                top = stack_buffer((1,), "float32")
                total = stack_buffer((1,), "int32")
                top[0] = T.float32(0)
                for i in range(G):
                    top[0] = T.max(top[0], T.abs(T.Cast("float32", x[r, group * G + i])))
                x_scale[r, group] = top[0] / T.float32(127)
                inverse: T.let = T.if_then_else(top[0] > T.float32(0),
                                                T.float32(127) / top[0], T.float32(0))
                total[0] = 0
                for i in range(G):
                    at: T.let = _position(group, i, scheme, LANES)
                    xa[r, at] = T.Cast("int8", T.round(T.Cast("float32", x[r, group * G + i])
                                                       * inverse))
                    total[0] = total[0] + T.Cast("int32", xa[r, at])
                x_offset[r, group] = total[0] * offset
                if magnitudes and tokens >= TILE_TOKENS:
                    for i in range(G):
                        at: T.let = _position(group, i, scheme, LANES)
                        xa[r, at + k] = T.abs(xa[r, at])

    return quantize


def row_dots(scheme: QuantScheme, k: int, rows: int, tokens: int, dots: IntegerDots, row_of,
             experts: bool, activation_row, ahead: int, tile_rows: int = 1):
    """A TVMScript macro: ``dots[i, j]`` (float32) = weight row ``row_of(base, j)`` (of expert
    ``e`` when ``experts``: weights [E, N, .]) · quantized activation row
    ``activation_row(order, first + min(t0 + i, last))``, for ``j < rows`` and ``i < tokens``.

    It walks the blocks of ``tile_rows`` rows at a time: per row, block and token, one int32
    vector of LANES group sums (STEPS dot products, two per weight vector for 4 and 6 bits:
    low and high nibbles, and for 6 bits the top two bits of four steps from one more vector;
    each weight vector is loaded once for all the tokens, each activation vector once for the
    tile's rows), folded into a float32 accumulator vector per row and token with the weight
    and activation scales; the offset is removed once per group.

    With ``ahead`` > 0 it also prefetches, block by block, the same block of row
    ``row_of(base + ahead, j)``: the row the next task reads. Decode is memory-bound, and the
    hardware prefetcher alone left each core waiting on its loads and then computing: a q4
    6144x1024 GEMV streamed 16.7 GB/s without, 22.5 GB/s with (2 threads)."""
    K, G = k, scheme.group
    LANES = scheme.lanes(k)
    B, V = LANES * G, LANES * DOT  # elements per block, bytes per dot product
    BLOCKS, STEPS = K // B, B // V  # blocks per row, dot products per block
    BLOCK_BYTES = B * scheme.bits // 8  # for 6 bits: B / 2 of nibbles, then B / 4 of top bits
    fold = fold_lanes(LANES)

    def weights(q, e, row, block, step, first, count):
        """``count`` unsigned levels from byte ``first`` of the weights that meet
        activations xa[block, step]."""
        def at(base):
            index = T.ramp(base + first, 1, count) if count > 1 else base + first
            return q[e, row, index] if experts else q[row, index]

        def splat(value):
            value = T.Cast("uint8", value)
            return T.broadcast(value, count) if count > 1 else value

        start = block * BLOCK_BYTES
        if scheme.bits == 8:
            return at(start + step * V)
        byte = at(start + step // 2 * V)
        nibble = T.if_then_else(step % 2 == 0, T.bitwise_and(byte, splat(15)),
                                T.shift_right(byte, splat(4)))
        if scheme.bits == 4:
            return nibble
        top = T.bitwise_and(T.shift_right(at(start + B // 2 + step // 4 * V),
                                          splat(2 * (step % 4))), splat(3))
        return T.bitwise_or(nibble, T.shift_left(top, splat(4)))

    @T.macro
    def prefetch(q, e, base, j, block):
        row: T.let = T.min(row_of(base + ahead, j), q.shape[-2] - 1)
        for line in T.unroll(max(1, BLOCK_BYTES // CACHE_LINE)):
            byte: T.let = block * BLOCK_BYTES + line * CACHE_LINE
            T.evaluate(prefetch_to_l2(T.address_of(q[e, row, byte] if experts else q[row, byte])))

    def weight_scale(scale, e, row, group):
        return T.Cast("float32", scale[e, row, group] if experts else scale[row, group])

    # A block's lanes in machine dot products: as many of the widest that fit (vpdpbusd: 16 in a
    # zmm, vpmaddubsw: 8 in a ymm), then one of half that width for 12 lanes.
    chunked = dots is not IntegerDots.PLAIN and LANES % 4 == 0
    WHOLE = 1 << (min(LANES, 16 if dots is IntegerDots.VNNI else 8).bit_length() - 1)
    PARTS, TAIL = LANES // WHOLE, LANES % WHOLE
    # vpmaddubsw's int16 pair sums could overflow for unsigned int8 levels (255 · 127 · 2), so
    # the AVX2 path sums signed levels as |x| · (q · sign x), and has no offset to remove;
    # |x| comes with the activations (computed here for a single token: ``keeps_magnitudes``).
    signed = keeps_magnitudes(scheme, k, dots)

    def maddubs_sums(w, x, x_magnitudes, width: int):
        """The int32 sums of 4 of ``width`` lanes: bytes w (unsigned levels) times x (signed)."""
        avx2 = width == 8  # else SSSE3's 128-bit forms
        pairs = "llvm.x86.avx2.pmadd.ub.sw" if avx2 else "llvm.x86.ssse3.pmadd.ub.sw.128"
        words = "llvm.x86.avx2.pmadd.wd" if avx2 else "llvm.x86.sse2.pmadd.wd"
        sign = "llvm.x86.avx2.psign.b" if avx2 else "llvm.x86.ssse3.psign.b.128"
        n = width * DOT
        unsigned_bytes, signed_bytes = w, x
        if signed:
            levels = T.bitwise_xor(w, T.broadcast(T.uint8(scheme.offset), n))
            unsigned_bytes = (x_magnitudes if tokens > 1 else
                              T.call_llvm_pure_intrin(f"int8x{n}", sign, x, x))
            signed_bytes = T.call_llvm_pure_intrin(f"int8x{n}", sign, levels, x)  # q · sign x
        pair_sums = T.call_llvm_pure_intrin(f"int16x{2 * width}", pairs, unsigned_bytes,
                                            signed_bytes)
        return T.call_llvm_pure_intrin(f"int32x{width}", words, pair_sums,
                                       T.broadcast(T.int16(1), 2 * width))

    @T.macro
    def add_chunk(sums, i, q, xa, e, row, t, block, step, first, width):
        """sums[i, first:first + width] += one machine dot product's sums."""
        w: T.let = weights(q, e, row, block, step, first * DOT, width * DOT)
        at: T.let = block * B + step * V + first * DOT
        if dots is IntegerDots.VNNI:
            sums[i, T.ramp(first, 1, width)] = T.call_llvm_pure_intrin(
                f"int32x{width}", f"llvm.x86.avx512.vpdpbusd.{width * 32}",
                sums[i, T.ramp(first, 1, width)], w, xa[t, T.ramp(at, 1, width * DOT)])
        else:
            sums[i, T.ramp(first, 1, width)] = sums[i, T.ramp(first, 1, width)] + maddubs_sums(
                w, xa[t, T.ramp(at, 1, width * DOT)], xa[t, T.ramp(at + K, 1, width * DOT)],
                width)

    @T.macro
    def add_dot_products(sums, i, q, xa, e, row, t, block, step):
        """sums[i, lane] += the DOT products of lane's group in this step."""
        if chunked:
            for part in T.unroll(PARTS):
                add_chunk(sums, i, q, xa, e, row, t, block, step, part * WHOLE, WHOLE)
            if TAIL > 0:
                add_chunk(sums, i, q, xa, e, row, t, block, step, PARTS * WHOLE, TAIL)
        else:
            for lane in T.vectorized(LANES):
                for d in T.unroll(DOT):
                    sums[i, lane] = sums[i, lane] + T.Cast(
                        "int32", weights(q, e, row, block, step, lane * DOT + d, 1)) * T.Cast(
                        "int32", xa[t, block * B + step * V + lane * DOT + d])

    def unbiased(sums, x_offset, t, group):
        return sums if signed else sums - x_offset[t, group]

    def token(order, first, t0, i, last):
        return activation_row(order, first + T.min(t0 + i, last))

    R = tile_rows

    @T.macro
    def dot(q, scale, xa, x_scale, x_offset, order, e, base, first, t0, last, acc, sums, dots):
        # acc and sums: one vector per (token i, row r of the R in a row tile), at i * R + r
        for jb in range(rows // R):
            for i, r in T.grid(tokens, R):
                for lane in T.vectorized(LANES):
                    acc[i * R + r, lane] = T.float32(0)
            for block in range(BLOCKS):
                for i, r in T.grid(tokens, R):
                    for lane in T.vectorized(LANES):
                        sums[i * R + r, lane] = 0
                if ahead > 0:
                    for r in T.unroll(R):
                        prefetch(q, e, base, jb * R + r, block)
                for step in T.unroll(STEPS):
                    for r in T.unroll(R):
                        for i in T.unroll(tokens):
                            add_dot_products(sums, i * R + r, q, xa, e, row_of(base, jb * R + r),
                                             token(order, first, t0, i, last), block, step)
                for i in T.unroll(tokens):
                    for r in T.unroll(R):
                        for lane in T.vectorized(LANES):
                            acc[i * R + r, lane] = acc[i * R + r, lane] + T.Cast(
                                "float32", unbiased(sums[i * R + r, lane], x_offset,
                                                    token(order, first, t0, i, last),
                                                    block * LANES + lane)) * (
                                weight_scale(scale, e, row_of(base, jb * R + r),
                                             block * LANES + lane)
                                * x_scale[token(order, first, t0, i, last), block * LANES + lane])
            for i in T.unroll(tokens):
                for r in T.unroll(R):
                    fold(acc, (i * R + r,))
                    dots[i, jb * R + r] = acc[i * R + r, 0]

    return dot


def tiled_row_dots(scheme: QuantScheme, k: int, rows: int, dots: IntegerDots, row_of, experts: bool,
                   epilogue, ahead: int, activation_row=same_row):
    """A TVMScript macro: ``row_dots`` over the ``count`` rows from ``first``, in tiles of
    TILE_TOKENS (one row at a time when there are fewer, as in decode), each tile's dots
    handed to ``epilogue(dst, routing, order, dots, first, t0, count, base, tokens)``. Rows
    past the last of a partial tile repeat it; the epilogue stores only valid ones.

    ``ahead`` is how far the next task's ``base`` is: the one-row path and the first tile of
    tokens prefetch its weights (later tiles read this task's rows from cache; prefetching in
    every tile made prefill-32 1.7x slower). The first tile's prefetch, Zen 4, 6144x1024 from
    memory, 2 threads: q4 at 4 tokens 0.367 -> 0.179 ms, 8 tokens 0.528 -> 0.298, 32 tokens
    1.05 -> 0.87, 128 tokens 3.98 -> 3.78; q8 at 4 tokens 0.53 -> 0.31."""
    MT = TILE_TOKENS
    RT = row_tile(dots)
    assert rows % RT == 0, (rows, RT)
    tile = row_dots(scheme, k, rows, MT, dots, row_of, experts, activation_row, 0, RT)
    first_tile = row_dots(scheme, k, rows, MT, dots, row_of, experts, activation_row, ahead, RT)
    single = row_dots(scheme, k, rows, 1, dots, row_of, experts, activation_row, ahead)

    lanes = scheme.lanes(k)

    @T.macro
    def run(q, scale, xa, x_scale, x_offset, e, base, first, count, dst, routing, order):
        acc = stack_buffer((MT * RT, lanes), "float32")  # per row: float32 sums of its groups
        sums = stack_buffer((MT * RT, lanes), "int32")  # per block: integer sums of its groups
        dots = stack_buffer((MT, rows), "float32")
        if count >= MT:
            for t in range((count + MT - 1) // MT):
                if t == 0:
                    first_tile(q, scale, xa, x_scale, x_offset, order, e, base, first, t * MT,
                               count - 1, acc, sums, dots)
                else:
                    tile(q, scale, xa, x_scale, x_offset, order, e, base, first, t * MT,
                         count - 1, acc, sums, dots)
                epilogue(dst, routing, order, dots, first, t * MT, count, base, MT)
        else:
            for t in range(count):
                single(q, scale, xa, x_scale, x_offset, order, e, base, first, t, count - 1, acc,
                       sums, dots)
                epilogue(dst, routing, order, dots, first, t, count, base, 1)

    return run


def integer_projection(n: int, k: int, scheme: QuantScheme, dots: IntegerDots,
                       out_dtype: str = "float32"):
    """A TVMScript macro ``run(x, q, scale, y, m)``: y[m, N] = x[m, K] · Wᵀ from the integers,
    for any token count m (``task_projection``, a task per ROWS_PER_TASK rows). Sums are
    float32; y is rounded to ``out_dtype`` as it is stored (a separate cast was a kernel launch
    per projection and token)."""
    assert scheme.fits(n, k), (n, k, scheme)
    N, NG = n, ROWS_PER_TASK

    @T.macro
    def store(y, routing, order, dots, first, t0, count, base, tokens):
        for i in T.unroll(tokens):
            if t0 + i < count:
                for j in T.vectorized(NG):
                    y[t0 + i, base + j] = T.Cast(out_dtype, dots[i, j])

    return task_projection(k, scheme, dots, N // NG, NG, NG, lambda base, j: base + j, store)


def gate_up_silu_projection(hidden: int, intermediate: int, scheme: QuantScheme,
                            dots: IntegerDots, dtype: str):
    """A TVMScript macro ``run(x, q, scale, act, m)``: act[m, I] = silu(x · W[:I]ᵀ) * (x ·
    W[I:]ᵀ) for a gate_up weight W [2I, H] stored in GATE_UP_LAYOUT, as ``moe_quant``'s
    experts: a task's rows are GATE_UP_UNIT gate rows and the up rows of the same features,
    one run of memory, so SwiGLU runs on its sums and the [m, 2I] projection is never
    stored."""
    assert scheme.fits(2 * intermediate, hidden), (intermediate, hidden, scheme)
    P = GATE_UP_UNIT
    return task_projection(hidden, scheme, dots, intermediate // P, 2 * P, P, unit_rows,
                           swiglu_store(intermediate, P, dtype))


def task_projection(k: int, scheme: QuantScheme, dots: IntegerDots, tasks: int, rows: int,
                    stride: int, row_of, epilogue):
    """A TVMScript macro ``run(x, q, scale, y, m)`` for any token count m: each token's
    activations are quantized once, then parallel task t takes the weight rows
    ``row_of(t * stride, j)``, j < ``rows``, past all the tokens (``tiled_row_dots``), and
    ``epilogue`` stores its sums."""
    K, G = k, scheme.group
    quantize_rows = each_row(activation_quantizer(scheme, K, dots))
    tiles = tiled_row_dots(scheme, K, rows, dots, row_of, False, epilogue, stride)

    @T.macro
    def run(x, q, scale, y, m):
        with T.sblock("integer_projection"):
            xa = T.sblock_alloc_buffer((m, T.int64(activation_width(scheme, K, dots))),
                                       "int8")  # levels, interleaved (then |levels|)
            x_scale = T.sblock_alloc_buffer((m, T.int64(K // G)), "float32")
            x_offset = T.sblock_alloc_buffer((m, T.int64(K // G)), "int32")
            quantize_rows(m, x, xa, x_scale, x_offset, m)
            for task in T.parallel(tasks):
                with T.sblock("rows"):
                    T.reads()  # independent tasks; nothing schedules this block
                    T.writes()
                    tiles(q, scale, xa, x_scale, x_offset, 0, task * stride, 0, m, y, None, None)

    return run


def quantized_kernel(body, n: int, k: int, scheme: QuantScheme, dtype: str,
                     out_dtype: str, features: int | None = None) -> tirx.PrimFunc:
    """A kernel y[m, features] (``out_dtype``, ``features`` n unless given) = ``body(x, q,
    scale, y, m)`` for x [m, k] in ``dtype`` and an [n, k] weight quantized by ``scheme``,
    any token count m."""
    N, K, G, F = n, k, scheme.group, features or n
    QN, QK = scheme.storage_shape(n, k)

    @T.prim_func(private=True, s_tir=True)
    def matmul(var_x: T.handle, q: T.Buffer((QN, QK), "uint8"),
               scale: T.Buffer((N, K // G), SCALE_DTYPE), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(var_x, (m, T.int64(K)), dtype)
        y = T.match_buffer(var_y, (m, T.int64(F)), out_dtype)
        body(x, q, scale, y, m)

    return matmul


@functools.cache
def quantized_matmul(n: int, k: int, scheme: QuantScheme, dtype: str, dots: IntegerDots,
                     out_dtype: str = "float32") -> tirx.PrimFunc:
    """``integer_projection`` as a kernel."""
    return quantized_kernel(integer_projection(n, k, scheme, dots, out_dtype), n, k, scheme,
                            dtype, out_dtype)


@functools.cache
def dense_gate_up_silu(hidden: int, intermediate: int, scheme: QuantScheme, dtype: str,
                       dots: IntegerDots) -> tirx.PrimFunc:
    """``gate_up_silu_projection`` as a kernel: act [m, I] in ``dtype`` from x [m, H]. From
    memory, 2 threads, q4 6144x1024 against the projection and a separate SwiGLU kernel: 1
    token 0.120 / 0.126 ms, 32 tokens 0.957 / 1.002, 512 tokens 14.8 / 15.4 (reading the gate
    and up rows of a task from two places, as ``paired_rows``: 0.128, 1.041, 16.0)."""
    return quantized_kernel(gate_up_silu_projection(hidden, intermediate, scheme, dots, dtype),
                            2 * intermediate, hidden, scheme, dtype, dtype, intermediate)
