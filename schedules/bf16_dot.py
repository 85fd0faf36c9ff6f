"""bfloat16 dot products on AVX512-BF16 (``vdpbf16ps``), and the register tile built on them.

``vdpbf16ps`` multiplies 32 bfloat16 pairs and adds each two neighbouring products into one
of 16 float32 sums: twice the multiply-adds of a float32 FMA per instruction, and no
conversion of the weights (the float32 kernels spend about half their issue slots widening
bfloat16). The products of two bfloat16 values are exact in float32, so the sums are as
exact as the float32 kernels' (the instruction flushes denormals).

TVM cannot call it directly: its bfloat16 legalization turns ``bfloat16x32`` values into
``<32 x float>`` (math) or ``<32 x i16>`` (storage), and LLVM's intrinsic takes
``<32 x bfloat>``. So the kernels read the bfloat16 tensors through ``int32`` views (a pair of
bfloat16 per word) and call ``qwen3c_dpbf16ps``, a three-line LLVM IR function that bitcasts
and calls the intrinsic. The IR is linked into the kernel's module (the ``pragma_import_llvm``
loop annotation, ``IMPORT``) and inlined by LLVM, so no call remains.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T
from tvm.target import codegen

from qwen3c.schedules.lane_sum import fold_lanes
from qwen3c.schedules.prefetch import prefetch_to_l2

LANES = 16  # float32 sums per dot product
PAIRS = 2  # bfloat16 products per sum
STEP = LANES * PAIRS  # bfloat16 elements per dot product: one 64-byte cache line
WORD = "int32"  # how the kernels read bfloat16 pairs
SYMBOL = "qwen3c_dpbf16ps"

_IR = f"""
define linkonce_odr <16 x float> @{SYMBOL}(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b)
    alwaysinline {{
  %x = bitcast <16 x i32> %a to <32 x bfloat>
  %y = bitcast <16 x i32> %b to <32 x bfloat>
  %sum = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc,
                                                             <32 x bfloat> %x, <32 x bfloat> %y)
  ret <16 x float> %sum
}}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>,
                                                       <32 x bfloat>)
"""
IMPORT = {"pragma_import_llvm": _IR}  # annotate one loop of each kernel that calls ``dot``


# CPUs whose kernels on ``vdpbf16ps`` measured faster than the float32 ones: Zen 5 (panels
# 1.5-1.6x at 32 and 128 tokens, decode 1.06x; BENCHMARKS.md, 2026-11-23) and Zen 4 (panels
# 2.2-4.6x at 32 and 128 tokens, decode from memory equal; 2026-12-06). On an Intel Xeon with
# AVX512-BF16 (2026-12-05) every projection was slower on them: prefill-128 GEMMs 1.2-1.3x
# the time, decode GEMVs 1.07-1.12x.
PAYS_ON = ("znver5", "znver4")


def available(target: tvm.target.Target, dtype: str, *depths: int) -> bool:
    """Whether kernels over ``dtype`` with these dot-product lengths can use ``vdpbf16ps``:
    bfloat16, whole steps, and a CPU with the 512-bit instruction."""
    return (dtype == "bfloat16" and all(depth % STEP == 0 for depth in depths)
            and target.kind.name == "llvm"
            and all(codegen.target_has_features(f, target) for f in ("avx512f", "avx512bf16")))


def usable(target: tvm.target.Target, dtype: str, *depths: int) -> bool:
    """Whether a build for ``target`` takes the ``vdpbf16ps`` kernels: ``available`` on a CPU
    where they pay (``PAYS_ON``)."""
    return available(target, dtype, *depths) and str(target.attrs.get("mcpu", "")) in PAYS_ON


def dot(acc, a, b):
    """acc (float32x16) + the pairwise products of a and b (int32x16 views of 32 bfloat16)."""
    return T.call_pure_extern(f"float32x{LANES}", SYMBOL, acc, a, b)


def words(start):
    """The 16 words (32 bfloat16) of an int32 view from word ``start``."""
    return T.ramp(start, 1, LANES)


def tile(tokens: int, rows: int, depth: int, token_row, row_of, ahead: int = 0):
    """A TVMScript macro, ``moe.expert_tile`` on bfloat16: ``sums[i, j]`` (float32) = activation
    row ``token_row(order, first + min(t0 + i, last))`` of ``x`` · weight row ``row_of(base, j)``
    of expert ``e``, both read through int32 views (``x`` [., depth / 2], ``weight`` [E, N,
    depth / 2]), for ``i < tokens``, ``j < rows``.

    The sums stay in ``tokens * rows`` registers of 16 partial sums along the depth; each step
    loads the ``rows`` weight vectors once (``wv``, int32) for all tokens. With ``ahead`` > 0
    each step also prefetches the same cache line of row ``row_of(base + ahead, j)``, the row
    the next task reads (decode is bound by memory: see cpu_gemm.py)."""
    steps = depth // STEP
    fold = fold_lanes(LANES)

    @T.macro
    def run(x, weight, e, order, first, t0, last, base, sums, acc, wv):
        for i in T.unroll(tokens):
            for j in T.unroll(rows):
                for lane in T.vectorized(LANES):
                    acc[i, j, lane] = T.float32(0)
        for step in range(steps):
            for j in T.unroll(rows):
                if ahead > 0:
                    T.evaluate(prefetch_to_l2(T.address_of(weight[
                        e, T.min(row_of(base + ahead, j), weight.shape[1] - 1), step * LANES])))
                wv[j, words(0)] = weight[e, row_of(base, j), words(step * LANES)]
            for i in T.unroll(tokens):
                for j in T.unroll(rows):
                    acc[i, j, words(0)] = dot(
                        acc[i, j, words(0)],
                        x[token_row(order, first + T.min(t0 + i, last)), words(step * LANES)],
                        wv[j, words(0)])
        for i in T.unroll(tokens):
            for j in T.unroll(rows):
                fold(acc, (i, j))
                sums[i, j] = acc[i, j, 0]

    return run
