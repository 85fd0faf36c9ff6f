"""Group-wise symmetric weight quantization and the CPU kernels that read it.

A weight W [N, K] is cut along K into groups of G; each group keeps one float32 scale s and
integers q = round(w / s): for 8 bits s = max|w| / 127, q in [-127, 127]; for 4 bits, q in
[-8, 7], the element of largest magnitude m gives s = m / -8 (or, where that has less squared
error, a slightly smaller scale):

    int8   q  [N, K]      int8
    int4   qp [N, K / 2]  uint8, per group of G: byte i holds element i in its low nibble and
                          element i + G/2 in its high nibble, both offset by 8 (as llama.cpp's
                          q4_0), so each half of a group unpacks with one contiguous vector load
    scale     [N, K / G]  float32 (float16 would halve their bytes, but its conversion is
                          scalar code in TVM's x86 output and cost more than it saves)

``quantize`` (numpy) makes them at compile time. ``dequant_gemv`` computes y = x Wᵀ for a few
tokens straight from the integers (decode: the weights are read once, at 1 or 0.5 byte per
element); ``dequantize`` rebuilds W in the model dtype for prefill, whose many tokens then share
the register-tiled GEMM of ``cpu_gemm.py``. Sums are float32.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

SCALE_DTYPE = "float32"
INT4_SHRINKS = (0.95, 0.9, 0.85, 0.8, 0.75)  # scales tried below the exact-extreme one
ROWS_PER_TASK = 8  # weight rows per parallel step of the GEMV


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    bits: int  # 8 or 4
    group: int  # elements per scale, along K

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 7

    @property
    def qmin(self) -> int:  # magnitude of the most negative level
        return 127 if self.bits == 8 else 8

    @property
    def offset(self) -> float:  # what the stored integers are above the signed ones
        return 0.0 if self.bits == 8 else 8.0

    @property
    def storage_dtype(self) -> str:
        return "int8" if self.bits == 8 else "uint8"

    def storage_shape(self, n: int, k: int) -> tuple[int, int]:
        return (n, k) if self.bits == 8 else (n, k // 2)

    def scale_shape(self, n: int, k: int) -> tuple[int, int]:
        return (n, k // self.group)

    def fits(self, n: int, k: int) -> bool:
        return k % self.group == 0 and n % ROWS_PER_TASK == 0 and self.group % 2 == 0


def quantize(weight: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """(integers in storage layout, scales) for a float weight [N, K]."""
    n, k = weight.shape
    groups = weight.astype(np.float32).reshape(n, k // scheme.group, scheme.group)
    if scheme.bits == 8:
        scale, q = _rounded(groups, np.abs(groups).max(axis=-1, keepdims=True) / 127, scheme)
    else:
        # The largest magnitude maps to -8, so all 16 levels are used; then a few smaller
        # scales are tried (clipping that one element a little) and the least squared error
        # per group wins, which helps groups with one outlier.
        extreme = np.take_along_axis(groups, np.abs(groups).argmax(-1)[..., None], axis=-1)
        scale, q = _rounded(groups, extreme / -8, scheme)
        best = _squared_error(groups, scale, q)
        for shrink in INT4_SHRINKS:
            trial_scale, trial_q = _rounded(groups, extreme / -8 * shrink, scheme)
            error = _squared_error(groups, trial_scale, trial_q)
            better = error < best
            scale = np.where(better, trial_scale, scale)
            q = np.where(better, trial_q, q)
            best = np.minimum(error, best)
    if scheme.bits == 4:
        half = scheme.group // 2
        nibbles = (q + 8).astype(np.uint8)
        q = nibbles[..., :half] | (nibbles[..., half:] << 4)
    return q.reshape(scheme.storage_shape(n, k)), scale.reshape(scheme.scale_shape(n, k))


def _rounded(groups: np.ndarray, scale: np.ndarray,
             scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """(scale, integers) for the given scale; an all-zero group keeps scale 0."""
    safe = np.where(scale == 0, 1, scale)
    return scale, np.clip(np.rint(groups / safe), -scheme.qmin, scheme.qmax).astype(np.int8)


def _squared_error(groups: np.ndarray, scale: np.ndarray, q: np.ndarray) -> np.ndarray:
    return ((q * scale - groups) ** 2).sum(axis=-1, keepdims=True)


def dequantize_reference(q: np.ndarray, scale: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """The float32 weight [N, K] that ``q`` and ``scale`` stand for (numpy)."""
    n, groups = scale.shape
    if scheme.bits == 4:
        packed = q.reshape(n, groups, scheme.group // 2)
        ints = np.concatenate([packed & 0xF, packed >> 4], axis=-1).astype(np.int8) - 8
    else:
        ints = q.reshape(n, groups, scheme.group)
    weights = ints.astype(np.float32) * scale[..., None]
    return weights.reshape(n, groups * scheme.group)


def _group_halves(q: tirx.Buffer, row, g, lane, scheme: QuantScheme):
    """Element ``lane`` of each half of a group as float32, 4-bit ones still offset by 8."""
    half = scheme.group // 2
    if scheme.bits == 8:
        return (T.Cast("float32", q[row, g * scheme.group + lane]),
                T.Cast("float32", q[row, g * scheme.group + half + lane]))
    byte = q[row, g * half + lane]
    return (T.Cast("float32", T.bitwise_and(byte, T.uint8(15))),
            T.Cast("float32", T.shift_right(byte, T.uint8(4))))


def dequantize(n: int, k: int, scheme: QuantScheme, dtype: str) -> tirx.PrimFunc:
    """W [N, K] in ``dtype`` from its integers and scales."""
    N, K, G = n, k, scheme.group
    QN, QK = scheme.storage_shape(n, k)
    H, offset = G // 2, scheme.offset

    @T.prim_func(private=True, s_tir=True)
    def dequant(q: T.Buffer((QN, QK), scheme.storage_dtype),
                scale: T.Buffer((N, K // G), SCALE_DTYPE), w: T.Buffer((N, K), dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for row in T.parallel(N):
            for g in range(K // G):
                for lane in T.vectorized(H):
                    w[row, g * G + lane] = T.Cast(dtype, (
                        _group_halves(q, row, g, lane, scheme)[0] - T.float32(offset)
                    ) * scale[row, g])
                    w[row, g * G + H + lane] = T.Cast(dtype, (
                        _group_halves(q, row, g, lane, scheme)[1] - T.float32(offset)
                    ) * scale[row, g])

    return dequant


def dequant_gemv(n: int, k: int, scheme: QuantScheme, dtype: str) -> tirx.PrimFunc:
    """y[m, N] (float32) = x[m, K] · Wᵀ read from the integers, for a few tokens m.

    Each task takes 8 weight rows and walks their groups together, with one float32
    accumulator vector of G/2 lanes per row (in registers): x is converted once per token and
    loaded once per group for all 8 rows, and 8 independent chains hide the multiply-add
    latency. Per group a row sums both halves' products first and applies its scale once; the
    4-bit offset is folded out as 8 · s · (x_lo + x_hi), with x_lo + x_hi computed once per
    token for all rows.
    """
    assert scheme.fits(n, k), (n, k, scheme)
    N, K, G, NG = n, k, scheme.group, ROWS_PER_TASK
    QN, QK = scheme.storage_shape(n, k)
    H, offset = G // 2, scheme.offset

    @T.prim_func(private=True, s_tir=True)
    def gemv(var_x: T.handle, q: T.Buffer((QN, QK), scheme.storage_dtype),
             scale: T.Buffer((N, K // G), SCALE_DTYPE), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(var_x, (m, T.int64(K)), dtype)
        y = T.match_buffer(var_y, (m, T.int64(N)), "float32")
        for block in T.parallel(N // NG):
            for t in range(m):
                with T.sblock("dequant_gemv_rows"):
                    xf = T.sblock_alloc_buffer((K,), "float32", scope="local")
                    xs = T.sblock_alloc_buffer((K // 2,), "float32", scope="local")
                    acc = T.sblock_alloc_buffer((NG, H), "float32", scope="local")
                    for i in T.vectorized(K):
                        xf[i] = T.Cast("float32", x[t, i])
                    for g in range(K // G):
                        for lane in T.vectorized(H):
                            xs[g * H + lane] = xf[g * G + lane] + xf[g * G + H + lane]
                    for j in T.unroll(NG):
                        for lane in T.vectorized(H):
                            acc[j, lane] = T.float32(0)
                    for g in range(K // G):
                        for j in T.unroll(NG):
                            for lane in T.vectorized(H):
                                acc[j, lane] = acc[j, lane] + (
                                    xf[g * G + lane]
                                    * _group_halves(q, block * NG + j, g, lane, scheme)[0]
                                    + xf[g * G + H + lane]
                                    * _group_halves(q, block * NG + j, g, lane, scheme)[1]
                                    - T.float32(offset) * xs[g * H + lane]
                                ) * scale[block * NG + j, g]
                    for j in range(NG):
                        y[t, block * NG + j] = T.float32(0)
                        for lane in range(H):
                            y[t, block * NG + j] = y[t, block * NG + j] + acc[j, lane]

    return gemv
