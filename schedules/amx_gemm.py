"""bfloat16 prefill projections on AMX tiles (``tdpbf16ps``): y[m, n] = x[m, k] · W[n, k]ᵀ.

An AMX tile holds 16 rows of 64 bytes; ``tdpbf16ps`` multiplies a 16 x 32 bfloat16 tile A by a
tile B holding 16 k-pairs x 16 columns (each column's two bfloat16 of a pair side by side) and
adds the pairwise sums into a 16 x 16 float32 tile C: 8192 multiply-adds per instruction. The
weight's rows, k contiguous, are already A tiles (16 weight rows, 32 k, the row stride apart),
so the weight keeps its layout and the tokens take B's place: each prefill first copies x into
``xv[m / 16, k / 2, 16]`` (16 tokens' k-pair words side by side, so one B tile is 1 KB of
contiguous memory and the next k step the next KB), then each parallel task takes BLOCK weight
rows and walks the tokens BLOCK at a time with a 2 x 2 of C tiles, which accumulate the sums of
``weight rows x tokens`` over all of k (``SYMBOL``), and copies them, transposed, into y.

TVM has no type for a tile register, so the block is a short LLVM IR function (``_IR``, the
``x86_amx`` intrinsics LLVM configures the tiles for itself) linked into the kernel's module by
the ``pragma_import_llvm`` loop annotation (``IMPORT``), one call per block (LLVM inlines it).
The tile registers are off until the process asks Linux for them
(``targets.llvm.request_tile_data``); the runtime does that before running an artifact built
with AMX.

Measured alone against the vector kernels the build would otherwise use (Intel Xeon, LLVM
``rocketlake`` + cpuinfo features, 2 threads, fastest of 5 x 10 calls; ``cpu_gemm`` on
float32 FMAs): 4096 x 1024 at 128 tokens 0.61 vs 4.05 ms (6.6x), 32 tokens 0.20 vs 1.26 ms,
2 tokens 0.20 vs 0.26 ms, 1 token 0.19 vs 0.14 ms (so decode keeps the GEMV: ``MIN_TOKENS``);
1024 x 3072 and 6144 x 1024 alike (6.1x and 6.6x at 128 tokens). Copying x into ``xv`` and y
out of the tiles take under 2 % of it. MoE experts (``experts``) run the same blocks over each
expert's grouped rows, padded to whole blocks.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T
from tvm.target import codegen

TILE = 16  # rows of a tile; float32 columns of a C tile; tokens of a B tile
BLOCK = 2 * TILE  # weight rows and tokens per 2 x 2 block of C tiles
STEP = 32  # bfloat16 of k per tile product (one 64-byte tile row)
WORD = "int32"  # how the kernel moves bfloat16 pairs
MIN_TOKENS = 2  # one token (decode) streams the weight faster through the vector GEMV
FEATURES = ("amx-tile", "amx-bf16")
SYMBOL = "qwen3c_amx_bf16_block"
TRANSPOSE = "qwen3c_transpose_tiles"

# c[i, j] (float32, 16 x 16 each, written to `out` one after another) = the sums over k of
# the 16 weight rows from `weight{i}` (A tiles, `row_bytes` apart) times the B tiles of token
# block j (`block_bytes` apart in xv), for `steps` steps of 32 k.
_IR = f"""
define linkonce_odr void @{SYMBOL}(ptr %weight0, ptr %weight1, i64 %row_bytes, ptr %xv,
                                   i64 %block_bytes, ptr %out, i64 %steps) {{
entry:
  %zero = call x86_amx @llvm.x86.tilezero.internal(i16 16, i16 64)
  br label %step
step:
  %s = phi i64 [0, %entry], [%next, %step]
  %c00 = phi x86_amx [%zero, %entry], [%d00, %step]
  %c01 = phi x86_amx [%zero, %entry], [%d01, %step]
  %c10 = phi x86_amx [%zero, %entry], [%d10, %step]
  %c11 = phi x86_amx [%zero, %entry], [%d11, %step]
  %k_bytes = mul i64 %s, 64
  %a0_at = getelementptr i8, ptr %weight0, i64 %k_bytes
  %a1_at = getelementptr i8, ptr %weight1, i64 %k_bytes
  %b_bytes = mul i64 %s, 1024
  %b0_at = getelementptr i8, ptr %xv, i64 %b_bytes
  %b1_at = getelementptr i8, ptr %b0_at, i64 %block_bytes
  %a0 = call x86_amx @llvm.x86.tileloadd64.internal(i16 16, i16 64, ptr %a0_at, i64 %row_bytes)
  %a1 = call x86_amx @llvm.x86.tileloadd64.internal(i16 16, i16 64, ptr %a1_at, i64 %row_bytes)
  %b0 = call x86_amx @llvm.x86.tileloadd64.internal(i16 16, i16 64, ptr %b0_at, i64 64)
  %b1 = call x86_amx @llvm.x86.tileloadd64.internal(i16 16, i16 64, ptr %b1_at, i64 64)
  %d00 = call x86_amx @llvm.x86.tdpbf16ps.internal(i16 16, i16 64, i16 64, x86_amx %c00,
                                                   x86_amx %a0, x86_amx %b0)
  %d01 = call x86_amx @llvm.x86.tdpbf16ps.internal(i16 16, i16 64, i16 64, x86_amx %c01,
                                                   x86_amx %a0, x86_amx %b1)
  %d10 = call x86_amx @llvm.x86.tdpbf16ps.internal(i16 16, i16 64, i16 64, x86_amx %c10,
                                                   x86_amx %a1, x86_amx %b0)
  %d11 = call x86_amx @llvm.x86.tdpbf16ps.internal(i16 16, i16 64, i16 64, x86_amx %c11,
                                                   x86_amx %a1, x86_amx %b1)
  %next = add i64 %s, 1
  %done = icmp eq i64 %next, %steps
  br i1 %done, label %store, label %step
store:
  %out01 = getelementptr i8, ptr %out, i64 1024
  %out10 = getelementptr i8, ptr %out, i64 2048
  %out11 = getelementptr i8, ptr %out, i64 3072
  call void @llvm.x86.tilestored64.internal(i16 16, i16 64, ptr %out, i64 64, x86_amx %d00)
  call void @llvm.x86.tilestored64.internal(i16 16, i16 64, ptr %out01, i64 64, x86_amx %d01)
  call void @llvm.x86.tilestored64.internal(i16 16, i16 64, ptr %out10, i64 64, x86_amx %d10)
  call void @llvm.x86.tilestored64.internal(i16 16, i16 64, ptr %out11, i64 64, x86_amx %d11)
  ret void
}}
declare x86_amx @llvm.x86.tilezero.internal(i16, i16)
declare x86_amx @llvm.x86.tileloadd64.internal(i16, i16, ptr, i64)
declare x86_amx @llvm.x86.tdpbf16ps.internal(i16, i16, i16, x86_amx, x86_amx, x86_amx)
declare void @llvm.x86.tilestored64.internal(i16, i16, ptr, i64, x86_amx)
"""


def _transpose_ir() -> str:
    """An LLVM IR function transposing 4 consecutive 16 x 16 float32 tiles in place. Each of
    its 4 stages swaps one bit of the row index with the same bit of the column index across
    the 8 pairs of rows that differ in that bit: 2 two-vector shuffles per pair, 64 in all
    per tile, where reading a tile's columns costs a scalar load per element."""
    lines = [f"define linkonce_odr void @{TRANSPOSE}(ptr %tiles) alwaysinline {{", "entry:"]
    for t in range(4):
        for i in range(TILE):
            lines += [f"  %p{t}_{i} = getelementptr i8, ptr %tiles, i64 {(t * TILE + i) * 64}",
                      f"  %v{t}_0_{i} = load <16 x float>, ptr %p{t}_{i}, align 4"]
        for stage in range(4):
            bit = 1 << stage
            for low in (row for row in range(TILE) if not row & bit):
                high = low | bit
                for row, picks in ((low, [j if not j & bit else TILE + (j ^ bit)
                                          for j in range(TILE)]),
                                   (high, [j | bit if not j & bit else TILE + j
                                           for j in range(TILE)])):
                    mask = ", ".join(f"i32 {pick}" for pick in picks)
                    lines.append(f"  %v{t}_{stage + 1}_{row} = shufflevector <16 x float> "
                                 f"%v{t}_{stage}_{low}, <16 x float> %v{t}_{stage}_{high}, "
                                 f"<16 x i32> <{mask}>")
        lines += [f"  store <16 x float> %v{t}_4_{i}, ptr %p{t}_{i}, align 4"
                  for i in range(TILE)]
    return "\n".join([*lines, "  ret void", "}"])


TRANSPOSE_IMPORT = {"pragma_import_llvm": _transpose_ir()}  # for kernels without tiles
IMPORT = {"pragma_import_llvm": _IR + TRANSPOSE_IMPORT["pragma_import_llvm"]}


def has_tiles(target: tvm.target.Target) -> bool:
    """Whether ``target``'s CPU has the AMX tiles and their bfloat16 products."""
    return target.kind.name == "llvm" and all(
        codegen.target_has_features(feature, target) for feature in FEATURES)


def usable(target: tvm.target.Target, dtype: str, n: int, k: int) -> bool:
    """Whether an [n, k] ``dtype`` projection's prefills run on AMX tiles for ``target``."""
    return dtype == "bfloat16" and n % BLOCK == 0 and k % STEP == 0 and has_tiles(target)


def block_sums(weight0, weight1, xv_block, sums, depth: int, symbol: str = SYMBOL):
    """The call that fills ``sums[i, j]`` [16, 16] with weight rows ``weight{i}``.. (addresses
    of 16 rows each) times the tokens of B tile column ``j`` from ``xv_block``, over ``depth``
    (by ``symbol``: this module's tiles, or ``bf16_dot.BLOCK_SYMBOL``)."""
    return T.call_extern("void", symbol, weight0, weight1, T.int64(2 * depth), xv_block,
                         T.int64(2 * depth * TILE), sums, T.int64(depth // STEP))


@T.macro
def token_sums(weight0, weight1, xv_block, sums, depth):
    """A TVMScript macro: ``block_sums``, then each tile transposed, so that
    ``sums[i, j, c, r]`` holds token 16 j + c of weight row 16 i + r: stores to [token,
    feature] outputs read a row of 16 features per vector."""
    T.evaluate(block_sums(weight0, weight1, xv_block, sums, depth))
    T.evaluate(T.call_extern("void", TRANSPOSE, sums))


def padded(tokens):
    """``tokens`` rounded up to whole blocks."""
    return (tokens + BLOCK - 1) // BLOCK * BLOCK


def copy_row(words: int, source_word=lambda word: word):
    """A TVMScript macro: row ``row`` of ``x_words`` into token position ``at`` of ``xv``;
    ``source_word(word)`` is the word of x that meets the weight's ``word`` (the identity for
    weights in their natural order)."""
    @T.macro
    def copy(xv, x_words, at, row):
        for word in range(words):
            xv[at // TILE, word, at % TILE] = x_words[row, source_word(word)]

    return copy


def copy_tokens(words: int, source_word=lambda word: word):
    """A TVMScript macro ``copy(xv, x, m)``: the m tokens of x into ``xv``'s B tiles, the last
    re-read to fill the last block (``copy_row``)."""
    copy = copy_row(words, source_word)

    @T.macro
    def copy_all(xv, x, m):
        x_words = T.decl_buffer((m, T.int64(words)), WORD, data=x.data)
        for r in T.parallel(padded(m)):
            copy(xv, x_words, r, T.min(r, m - 1))

    return copy_all


def token_blocks(depth: int, out_dtype: str):
    """A TVMScript macro ``walk(weight0, weight1, xv, sums, y, m, nb)``: for every block of
    tokens in ``xv``, the sums of the weight rows at addresses ``weight0`` and ``weight1``
    (16 each, ``depth`` apart in elements) over ``depth``, stored transposed into the columns
    of output block ``nb`` of y [m, .], rounded to ``out_dtype``."""
    @T.macro
    def walk(weight0, weight1, xv, sums, y, m, nb):
        for mb in range(padded(m) // BLOCK):
            token_sums(weight0, weight1, T.address_of(xv[mb * 2, 0, 0]),
                       T.address_of(sums[0, 0, 0, 0]), depth)
            for t in range(BLOCK):
                if mb * BLOCK + t < m:
                    for i in range(2):
                        for r in T.vectorized(TILE):
                            y[mb * BLOCK + t, nb * BLOCK + i * TILE + r] = T.Cast(
                                out_dtype, sums[i, t // TILE, t % TILE, r])

    return walk


def projection(n: int, k: int):
    """A TVMScript macro ``run(x, w, y, m)``: y[m, n] (float32) = x[m, k] · W[n, k]ᵀ for
    bfloat16 x and W, on AMX tiles; the last token block re-reads the last token."""
    assert n % BLOCK == 0 and k % STEP == 0, (n, k)
    N, K = n, k
    W = K // 2  # words of a row
    copy = copy_tokens(W)
    walk = token_blocks(K, "float32")

    @T.macro
    def run(x, w, y, m):
        with T.sblock("amx_projection"):
            T.reads()  # runs once; nothing schedules this block
            T.writes()
            xv = T.sblock_alloc_buffer((padded(m) // TILE, T.int64(W), TILE), WORD)
            copy(xv, x, m)
            for nb in T.parallel(N // BLOCK, annotations=IMPORT):
                with T.sblock("rows"):
                    T.reads()  # independent tasks; nothing schedules this block
                    T.writes()
                    # 4 KB: the workspace pool serves it, once per task
                    sums = T.sblock_alloc_buffer((2, 2, TILE, TILE), "float32")
                    walk(T.address_of(w[nb * BLOCK, 0]), T.address_of(w[nb * BLOCK + TILE, 0]),
                         xv, sums, y, m, nb)

    return run


def experts_usable(target: tvm.target.Target, dtype: str, hidden: int,
                   intermediate: int) -> bool:
    """Whether MoE experts of these sizes run their prefills on AMX tiles for ``target``
    (gate_up's blocks pair 16 gate rows with the 16 up rows of the same features)."""
    return (dtype == "bfloat16" and hidden % BLOCK == 0 and intermediate % BLOCK == 0
            and has_tiles(target))


def experts(num_experts: int, depth: int, blocks: int, rows_of, token_row, store):
    """A TVMScript macro ``experts(x, weight, offsets, dst, routing, order, count, tokens)``
    (``moe.expert_rows``' contract) on AMX tiles: each expert's grouped rows are copied into
    ``xv`` from a whole block on (``token_row`` of each; the last re-read to fill the block),
    then each parallel task takes one of ``blocks`` blocks of output features, whose two
    16-row weight halves of expert ``e`` start at ``rows_of(nb)`` (rows of ``weight[e]``), and
    walks every expert's token blocks; ``store(dst, routing, order, sums, first, valid, nb)``
    takes each block's sums, ``valid`` of its tokens real."""
    E, W = num_experts, depth // 2
    copy = copy_row(W)

    @T.macro
    def run(x, weight, offsets, dst, routing, order, count, tokens):
        with T.sblock("amx_experts"):
            T.reads()  # runs once; nothing schedules this block
            T.writes()
            x_words = T.decl_buffer((x.shape[0], T.int64(W)), WORD, data=x.data)
            start = T.sblock_alloc_buffer((E + 1,), "int32")  # each expert's first block row
            start[0] = 0
            for e in range(E):
                start[e + 1] = start[e] + padded(offsets[e + 1] - offsets[e])
            xv = T.sblock_alloc_buffer(((count + E * BLOCK) // TILE, T.int64(W), TILE), WORD)
            for e in T.parallel(E):
                for p in range(padded(offsets[e + 1] - offsets[e])):
                    copy(xv, x_words, start[e] + p,
                         token_row(order, T.min(offsets[e] + p, offsets[e + 1] - 1)))
            for nb in T.parallel(blocks, annotations=IMPORT):
                with T.sblock("expert_blocks"):
                    T.reads()  # independent tasks; nothing schedules this block
                    T.writes()
                    sums = T.sblock_alloc_buffer((2, 2, TILE, TILE), "float32")
                    for e in range(E):
                        for mb in range(padded(offsets[e + 1] - offsets[e]) // BLOCK):
                            token_sums(
                                T.address_of(weight[e, rows_of(nb)[0], 0]),
                                T.address_of(weight[e, rows_of(nb)[1], 0]),
                                T.address_of(xv[(start[e] + mb * BLOCK) // TILE, 0, 0]),
                                T.address_of(sums[0, 0, 0, 0]), depth)
                            store(dst, routing, order, sums, offsets[e] + mb * BLOCK,
                                  offsets[e + 1] - offsets[e] - mb * BLOCK, nb)

    return run
