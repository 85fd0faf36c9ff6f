"""Vectorisable exponentials for the kernels' epilogues.

LLVM turns ``exp`` / ``exp2`` on vectors into one libm call per lane: in the attention that
cost more than the dot products. Arithmetic keeps the loops vectorised (the attention's
softmax, the dense SwiGLU).
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

LOG2E = math.log2(math.e)
_EXP2_TAYLOR = [math.log(2) ** k / math.factorial(k) for k in range(7)]  # 2^f = Σ (f ln 2)^k / k!


def exp2_nonpositive(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """2^x for x <= 0 as arithmetic: x = n + f with n an integer and |f| <= 1/2, 2^n built in
    the exponent bits, 2^f by its Taylor series to degree 6 (relative error below 2e-7).
    Results under 2^-126 flush to that."""
    x = T.max(x, T.float32(-126.0))
    n = T.floor(x + T.float32(0.5))
    f = x - n
    poly = T.float32(_EXP2_TAYLOR[-1])
    for coefficient in reversed(_EXP2_TAYLOR[:-1]):  # Horner
        poly = poly * f + T.float32(coefficient)
    scale = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
    return scale * poly


def sigmoid(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """1 / (1 + e^-x) from e^-|x| (never overflows): e^x / (1 + e^x) below zero."""
    small = exp2_nonpositive(-T.abs(x) * T.float32(LOG2E))
    return T.if_then_else(x >= T.float32(0), T.float32(1), small) / (T.float32(1) + small)
