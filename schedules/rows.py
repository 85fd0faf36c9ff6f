"""Loops over the rows of a call (its tokens, or tokens x experts): in parallel for a prefill,
on the calling thread for the few rows of a decode step.

A parallel region costs about 1.5 us to launch and join (Zen 4 host, 2 threads: TVM's pool
wakes its worker through ``sched_yield``), more than a decode token's norm, RoPE or activation
quantization takes; a 0.6B q4 decode step launched about 200 such regions besides its
projections and attention.
"""

from __future__ import annotations

from tvm.script import tirx as T

PARALLEL_ROWS = 4  # fewer rows than this run on the calling thread


def each_row(body):
    """A TVMScript macro ``run(n, *args)`` calling the macro ``body(row, *args)`` for rows
    0 .. n-1: in parallel from PARALLEL_ROWS rows on, else serially."""

    @T.macro
    def run(n, *args):
        if n >= PARALLEL_ROWS:
            for row in T.parallel(n):
                body(row, *args)
        else:
            for row in range(n):
                body(row, *args)

    return run
