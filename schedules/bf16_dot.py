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


BLOCK_SYMBOL = "qwen3c_dpbf16ps_block"
BLOCK_ROWS = 8  # A rows per register tile: 8 rows x 2 column vectors of sums


def _block_ir() -> str:
    """``amx_gemm.SYMBOL``'s 2 x 2 block of tile products on ``vdpbf16ps``: C[i, j] (16 x 16
    float32, at ``out`` + 1024 (2 i + j) bytes) = the 16 A rows from ``a{i}`` (``row_bytes``
    apart; 64 bytes a step) times B tile j (16 k-pairs x 16 column words, 1 KB a step, tile 1
    ``block_bytes`` after tile 0), over ``steps`` steps of 32 k. A tile product is 16 x 16
    ``vdpbf16ps`` of an A word broadcast against a B row; the 32 rows go BLOCK_ROWS at a time,
    whose 2 x BLOCK_ROWS sums stay in registers over all steps."""
    rows, pairs = BLOCK_ROWS, 16
    acc = [(r, j) for r in range(rows) for j in range(2)]
    lines = [
        f"define linkonce_odr void @{BLOCK_SYMBOL}(ptr %a0, ptr %a1, i64 %row_bytes, ptr %b,",
        "                                  i64 %block_bytes, ptr %out, i64 %steps) {",
        "entry:", "  br label %group", "group:",
        "  %g = phi i64 [0, %entry], [%g_next, %stored]",
        f"  %high = icmp uge i64 %g, {16 // rows}",
        "  %a_half = select i1 %high, ptr %a1, ptr %a0",
        f"  %part = urem i64 %g, {16 // rows}",
        f"  %first_row = mul i64 %part, {rows}",
        "  %skip = mul i64 %first_row, %row_bytes",
        "  %a_at = getelementptr i8, ptr %a_half, i64 %skip",
        "  %half = zext i1 %high to i64",
        "  %tile_bytes = mul i64 %half, 2048",
        f"  %row_skip = mul i64 %part, {rows * 64}",
        "  %out_skip = add i64 %tile_bytes, %row_skip",
        "  %out_at = getelementptr i8, ptr %out, i64 %out_skip",
        *(f"  %row{r}_bytes = mul i64 {r}, %row_bytes" for r in range(rows)),
        "  br label %step", "step:",
        "  %s = phi i64 [0, %group], [%s_next, %step]",
        *(f"  %c{r}_{j}_0 = phi <16 x float> [zeroinitializer, %group], "
          f"[%c{r}_{j}_{pairs}, %step]" for r, j in acc),
        "  %k_bytes = mul i64 %s, 64",
        "  %b_bytes = mul i64 %s, 1024",
        "  %b0_at = getelementptr i8, ptr %b, i64 %b_bytes",
        "  %b1_at = getelementptr i8, ptr %b0_at, i64 %block_bytes",
        "  %a_step = getelementptr i8, ptr %a_at, i64 %k_bytes",
        *(f"  %a{r}_at = getelementptr i8, ptr %a_step, i64 %row{r}_bytes" for r in range(rows)),
    ]
    for p in range(pairs):
        for j in range(2):
            lines += [f"  %b{j}_{p}_at = getelementptr i8, ptr %b{j}_at, i64 {64 * p}",
                      f"  %b{j}_{p}_words = load <16 x i32>, ptr %b{j}_{p}_at, align 4",
                      f"  %b{j}_{p} = bitcast <16 x i32> %b{j}_{p}_words to <32 x bfloat>"]
        for r in range(rows):
            lines += [f"  %a{r}_{p}_at = getelementptr i8, ptr %a{r}_at, i64 {4 * p}",
                      f"  %a{r}_{p}_word = load i32, ptr %a{r}_{p}_at, align 4",
                      f"  %a{r}_{p}_one = insertelement <16 x i32> poison, i32 %a{r}_{p}_word, "
                      "i64 0",
                      f"  %a{r}_{p}_all = shufflevector <16 x i32> %a{r}_{p}_one, <16 x i32> "
                      "poison, <16 x i32> zeroinitializer",
                      f"  %a{r}_{p} = bitcast <16 x i32> %a{r}_{p}_all to <32 x bfloat>"]
            lines += [f"  %c{r}_{j}_{p + 1} = call <16 x float> "
                      f"@llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %c{r}_{j}_{p}, "
                      f"<32 x bfloat> %a{r}_{p}, <32 x bfloat> %b{j}_{p})" for j in range(2)]
    lines += [
        "  %s_next = add i64 %s, 1",
        "  %s_done = icmp eq i64 %s_next, %steps",
        "  br i1 %s_done, label %stored, label %step", "stored:",
    ]
    for r, j in acc:
        lines += [f"  %out{r}_{j} = getelementptr i8, ptr %out_at, i64 {1024 * j + 64 * r}",
                  f"  store <16 x float> %c{r}_{j}_{pairs}, ptr %out{r}_{j}, align 4"]
    lines += [
        "  %g_next = add i64 %g, 1",
        f"  %g_done = icmp eq i64 %g_next, {32 // rows}",
        "  br i1 %g_done, label %exit, label %group", "exit:", "  ret void", "}",
        "declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>,",
        "                                                       <32 x bfloat>)",
    ]
    return "\n".join(lines)


BLOCK_IMPORT = {"pragma_import_llvm": _block_ir()}  # for kernels that call BLOCK_SYMBOL
