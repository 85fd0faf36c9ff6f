"""Summing the lanes of a vector of partial sums as a tree.

TIR keeps a reduction's order and LLVM keeps it too (no fast-math), so ``for lane in range(L):
s = s + acc[lane]`` compiles to L - 1 dependent scalar adds, each after a lane extract: at the
end of every weight row of a GEMV or tile, and for every key of the decode attention. Folding
the upper lanes onto the lower ones instead takes log2 L vector adds, and the chain they make
is log2 L adds long.
"""

from __future__ import annotations

from tvm.script import tirx as T

WIDEST = 16  # lanes ``fold_lanes`` handles: four halvings


def _at(vector: tuple, lane) -> tuple:
    return (*vector, lane)


def fold_lanes(lanes: int):
    """A TVMScript macro ``fold(acc, vector)``: adds lanes 1 .. ``lanes`` - 1 of
    ``acc[*vector, :]`` onto its lane 0. Each step adds the lanes past the largest power of two
    below the width onto the first ones (12 lanes: 8..11 onto 0..3, then 8 -> 4 -> 2 -> 1), so
    any count up to WIDEST works."""
    assert 1 <= lanes <= WIDEST, lanes

    @T.macro
    def fold(acc, vector):
        if lanes > 8:
            for lane in T.vectorized(lanes - 8):
                acc[_at(vector, lane)] = acc[_at(vector, lane)] + acc[_at(vector, lane + 8)]
        if lanes > 4:
            for lane in T.vectorized(min(lanes, 8) - 4):
                acc[_at(vector, lane)] = acc[_at(vector, lane)] + acc[_at(vector, lane + 4)]
        if lanes > 2:
            for lane in T.vectorized(min(lanes, 4) - 2):
                acc[_at(vector, lane)] = acc[_at(vector, lane)] + acc[_at(vector, lane + 2)]
        if lanes > 1:
            acc[_at(vector, 0)] = acc[_at(vector, 0)] + acc[_at(vector, 1)]

    return fold
