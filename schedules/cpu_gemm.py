"""Register-tiled CPU kernel for the projections ``y[m, n] = sum_k x[m, k] · W[n, k]``.

Long prefills (``m`` >= PANEL_MIN_TOKENS) run a panel GEMM: x is converted to float32 once,
then each parallel task takes a panel of ``NB`` weight rows (four machine vectors: 64 on
AVX-512, 16 on NEON; two on AVX2: 16), transposes it into a float32 scratch ``[k, NB]``
(``panel_transposition``: by shuffles with AVX-512), and
walks the tokens in tiles of ``MT`` = 6 rows with an ``MT x NB`` accumulator in vector
registers: per step of k one broadcast x value per row meets the panel's vectors of W, so the
FMAs need no conversion and no horizontal sums (1.4 to 1.6x the GFLOP/s of the previous 4x4
dot-product tiles at m = 128, which spent half their issue slots converting bfloat16; on AVX2
the 6 x 2 tile is 1.2-1.5x the 2 x 4 one at 128 tokens and 1.4-1.7x at 64). The panel's
transposition costs the same for any token count, so shorter prefills (one tile of tokens up
to PANEL_MIN_TOKENS) run the MoE experts' dot-product tiles instead (``moe.expert_tile``: 6
tokens x 4 weight rows of vector partial sums along k, each weight vector converted once for
the 6 tokens; no transposition, horizontal sums at the end): 1.3-1.8x faster than the panels
at 32 tokens, slower from ~100 on. Decode (fewer tokens than a tile) reads each weight row
start to end (one sequential stream per thread, which the hardware prefetcher follows;
interleaving 8 rows measured 1.5x slower) into GEMV_LANES partial sums, several independent
FMA chains on any vector width, and asks for the same cache line of the row one task further
on (``prefetch_to_l2``): the hardware prefetcher alone kept each core stalling on its loads,
then computing (bf16 6144x1024 GEMV, 2 threads: 14.0 -> 19.7 GB/s; 0.6B decode 1.38x). Sums are
float32 whatever the storage dtype; the last partial token tile re-reads a valid row instead
of branching in the inner loop, and only its valid rows are stored.

On CPUs with AVX512-BF16, bfloat16 prefills of every length run the same 6 x 4 dot-product
tiles on ``vdpbf16ps`` instead (``bf16_projection``, ``bf16_dot.py``): no conversion, twice the
multiply-adds per instruction (Zen 5, 6144x1024 at 128 tokens: 5.5 -> 3.1 ms). The model's own
projections and an untied head do not come here on such CPUs: their weights are stored in
panels for ``vdpbf16ps`` (``bf16_panel.py``, 1.50-1.63x these tiles); what is left here is the
tied head (the embedding table, stored by rows) and weights whose sizes the panels do not fit.

On CPUs with AMX-BF16, bfloat16 prefills of 2 tokens or more run on AMX tiles instead
(``amx_gemm.py``: 6-7x these kernels at 128 tokens); decode keeps the GEMV.

``dispatch_cpu_gemm`` routes ``matmul(x, permute_dims(W), out_dtype=float32)`` with a 2-D
weight whose sizes fit the tiles to this kernel, before legalization; other matmuls keep the
generic path.
"""

from __future__ import annotations

import re

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from qwen3c.schedules import amx_gemm, bf16_dot, moe
from qwen3c.schedules.lane_sum import fold_lanes
from qwen3c.schedules.prefetch import CACHE_LINE, prefetch_to_l2
from qwen3c.schedules.scratch import stack_buffer

GEMV_LANES = 16  # partial sums per decoded row (a multiple of every machine vector width)
COLS_PER_GEMV = 8  # weight rows per decode task step, and per dot-tile task
PANEL_MIN_TOKENS = 64  # fewer tokens: dot-product tiles instead of panels (bf16, 2 threads,
#                        dot / panel speed: 32 tokens 1.31-1.83x, 64 1.03-1.32x, 128 0.82-0.95x)
OUT_DTYPE = "float32"
FLOATS = ("float32", "float16", "bfloat16")  # what the rewrite passes route to our kernels


def fits(n: int, k: int) -> bool:
    return k % GEMV_LANES == 0 and n % COLS_PER_GEMV == 0


def panel_vectors(registers: int) -> int:
    """Machine vectors of weight rows per prefill panel: 4 with 32 vector registers (AVX-512,
    NEON), 2 with 16 (AVX2: the 6 x 2 tile's 12 accumulators leave room for the W vectors and
    a broadcast x; the 2 x 4 tile ran 1.2-1.5x slower on Zen 3 at 128 tokens)."""
    return 4 if registers >= 32 else 2


def panel_rows(n: int, lanes: int, registers: int) -> int:
    """Weight rows per prefill panel: ``panel_vectors`` machine vectors where they divide
    ``n``."""
    return next(width for width in (panel_vectors(registers) * lanes, 2 * lanes, lanes,
                                    COLS_PER_GEMV) if n % width == 0)


def tile_tokens(registers: int) -> int:
    """Tokens per prefill tile: the accumulators (``panel_vectors`` per token) leave room in
    the vector registers for the W vectors and a broadcast x (6 on every vector unit)."""
    vectors = panel_vectors(registers)
    return (registers - vectors - 2) // vectors


def vector_unit(target: tvm.target.Target) -> tuple[int, int]:
    """(float32 lanes, count) of the vector registers the kernels should use."""
    if "arm_cpu" in target.keys:
        return 4, 32  # NEON; SVE's width is only known at run time
    if tvm.target.codegen.llvm_cpu_has_features("avx512f", target):
        return 16, 32
    if tvm.target.codegen.llvm_cpu_has_features("avx2", target):
        return 8, 16
    return 4, 16  # SSE


def gemv(n: int, k: int, dtype: str):
    """A TVMScript macro: y[t] = W · x[t] for the m tokens of a decode step, row by row, each
    row read start to end into GEMV_LANES float32 partial sums while prefetching the same cache
    line of the row one task (COLS_PER_GEMV rows) further on."""
    N, NG, KG = n, COLS_PER_GEMV, k // GEMV_LANES
    # steps of GEMV_LANES weights per cache line: one prefetch each (every step if uneven)
    per_line = max(1, CACHE_LINE // (GEMV_LANES * tvm.DataType(dtype).bits // 8))
    per_line = per_line if KG % per_line == 0 else 1
    fold = fold_lanes(GEMV_LANES)

    def column(line, step):
        return (line * per_line + step) * GEMV_LANES

    @T.macro
    def run(x, w, y, m):
        for nb in T.parallel(N // NG):
            for t, j in T.grid(m, NG):
                with T.sblock("gemv_row"):
                    acc = stack_buffer((GEMV_LANES,), OUT_DTYPE)
                    for lane in T.vectorized(GEMV_LANES):
                        acc[lane] = T.float32(0)
                    for line in range(KG // per_line):
                        T.evaluate(prefetch_to_l2(T.address_of(
                            w[T.min(nb * NG + j + NG, N - 1), column(line, 0)])))
                        for step in T.unroll(per_line):
                            for lane in T.vectorized(GEMV_LANES):
                                acc[lane] = acc[lane] + T.Cast(
                                    OUT_DTYPE, x[t, column(line, step) + lane]) * T.Cast(
                                    OUT_DTYPE, w[nb * NG + j, column(line, step) + lane])
                    fold(acc, ())
                    y[t, nb * NG + j] = acc[0]

    return run


def store_tile(rows: int):
    """A TVMScript macro: y[t0 + i, base + j] = sums[i, j] for the tile's tokens below m."""
    @T.macro
    def store(y, sums, t0, tokens, m, base):
        for i in T.unroll(tokens):
            if t0 + i < m:
                for j in T.unroll(rows):
                    y[t0 + i, base + j] = sums[i, j]

    return store


def dot_tiles(n: int, tile, tokens: int, rows: int, lanes: int, vector: str,
              annotations: dict):
    """A TVMScript macro: y[m, n] from register tiles ``tile`` (``moe.expert_tile`` or
    ``bf16_dot.tile``: ``tokens`` x ``rows`` sums of ``lanes`` partial sums, weight vectors
    held as ``vector``) over x and the weight viewed as one expert's [1, n, .], COLS_PER_GEMV
    weight rows per parallel task (its loop annotated with ``annotations``)."""
    N, NG = n, COLS_PER_GEMV
    store = store_tile(rows)

    @T.macro
    def run(x, w, y, m):
        for task in T.parallel(N // NG, annotations=annotations):
            with T.sblock("dot_tiles"):
                T.reads()  # independent tasks; nothing schedules this block
                T.writes()
                # up to 1.5 KB: too large for the stack (schedules/scratch.py), so the workspace
                # pool serves it, once per task of COLS_PER_GEMV rows and all the tokens
                acc = T.sblock_alloc_buffer((tokens, rows, lanes), OUT_DTYPE, scope="global")
                wv = stack_buffer((rows, lanes), vector)
                sums = stack_buffer((tokens, rows), OUT_DTYPE)
                for mb in range((m + tokens - 1) // tokens):
                    for g in range(NG // rows):
                        tile(x, w, 0, None, 0, mb * tokens, m - 1, task * NG + g * rows, sums,
                             acc, wv)
                        store(y, sums, mb * tokens, tokens, m, task * NG + g * rows)

    return run


def panel_transposition(rows: int, k: int, lanes: int):
    """A TVMScript macro ``transpose(w, wp, nb)``: weight rows ``nb * rows`` on, converted to
    float32 and transposed into ``wp[k, rows]``. With AVX-512, blocks of 16 rows x 64 k go
    through ``amx_gemm.TRANSPOSE`` (four 16 x 16 tiles by shuffles; rows read and the panel
    written a vector at a time): the gather across the panel's 64 rows it replaces (a scalar
    load and an insert per element) made a Zen 4's float32-FMA GEMMs 1.5-2.0x slower at 128
    tokens, 2.3-2.9x at 64 (1.15-1.28x at 512). Narrower vectors keep that gather: on AVX2 (a
    16-row panel) the shuffles measured the same at 64 and 128 tokens and up to 12 % slower at
    512."""
    T16, KB = amx_gemm.TILE, 4 * amx_gemm.TILE
    if lanes < 16 or rows % T16 or k % KB:
        @T.macro
        def gather(w, wp, nb):
            for kk in range(k):
                for c in T.vectorized(rows):
                    wp[kk, c] = T.Cast(OUT_DTYPE, w[nb * rows + c, kk])

        return gather

    @T.macro
    def transpose(w, wp, nb):
        tiles = T.sblock_alloc_buffer((4, T16, T16), OUT_DTYPE)
        for rb, kb in T.grid(rows // T16, k // KB):
            for t, r in T.grid(4, T16):
                for c in T.vectorized(T16):
                    tiles[t, r, c] = T.Cast(OUT_DTYPE, w[nb * rows + rb * T16 + r,
                                                         kb * KB + t * T16 + c])
            T.evaluate(T.call_extern("void", amx_gemm.TRANSPOSE, T.address_of(tiles[0, 0, 0])))
            for t, c in T.grid(4, T16):
                for r in T.vectorized(T16):
                    wp[kb * KB + t * T16 + c, rb * T16 + r] = tiles[t, c, r]

    return transpose


def float_projection(n: int, k: int, dtype: str, lanes: int, registers: int):
    """A TVMScript macro: y[m, n] (float32) = x[m, k] · W[n, k]ᵀ on float32 FMAs; ``lanes`` is
    the float32 width of one machine vector (it must divide 16), ``registers`` how many there
    are."""
    assert fits(n, k) and GEMV_LANES % lanes == 0, (n, k, lanes)
    N, K = n, k
    NB, MT = panel_rows(n, lanes, registers), tile_tokens(registers)
    DJ = moe.tile_rows(registers)
    DMT = moe.tile_tokens(registers, DJ)
    tiles = dot_tiles(n, moe.expert_tile(DMT, DJ, lanes, K, lambda base, j: base + j), DMT, DJ,
                      lanes, OUT_DTYPE, {})
    decode = gemv(n, k, dtype)
    transpose_panel = panel_transposition(NB, K, lanes)

    @T.macro
    def run(x, w, y, m):
        if m >= MT:
            with T.sblock("prefill"):
                xf = T.sblock_alloc_buffer((m, T.int64(K)), OUT_DTYPE)
                w_rows = T.decl_buffer((1, N, K), dtype, data=w.data)  # as one expert's
                for r in T.parallel(m):
                    for c in T.vectorized(K):
                        xf[r, c] = T.Cast(OUT_DTYPE, x[r, c])
                if m >= PANEL_MIN_TOKENS:
                    for nb in T.parallel(N // NB, annotations=amx_gemm.TRANSPOSE_IMPORT):
                        with T.sblock("panel"):
                            wp = T.sblock_alloc_buffer((K, NB), OUT_DTYPE)
                            transpose_panel(w, wp, nb)
                            for mb in range((m + MT - 1) // MT):
                                with T.sblock("tile"):
                                    acc = T.sblock_alloc_buffer((MT, NB), OUT_DTYPE, scope="local")
                                    for i in T.unroll(MT):
                                        for c in T.vectorized(NB):
                                            acc[i, c] = T.float32(0)
                                    for kk in range(K):
                                        for i in T.unroll(MT):
                                            for c in T.vectorized(NB):
                                                acc[i, c] = acc[i, c] + xf[
                                                    T.min(mb * MT + i, m - 1), kk] * wp[kk, c]
                                    for i in T.unroll(MT):
                                        if mb * MT + i < m:
                                            for c in T.vectorized(NB):
                                                y[mb * MT + i, nb * NB + c] = acc[i, c]
                else:
                    tiles(xf, w_rows, y, m)
        else:
            decode(x, w, y, m)

    return run


def bf16_projection(n: int, k: int):
    """``float_projection`` for bfloat16 on AVX512-BF16 (``bf16_dot.usable``): prefills of any
    length run dot-product tiles of 6 tokens x 4 weight rows (no panels: there is no conversion
    left to amortise); decode keeps the float32 GEMV, which already streams at the memory's
    speed (the 1 x 4 dot-product tile, four row streams at once, was slower from memory)."""
    assert fits(n, k) and k % bf16_dot.STEP == 0, (n, k)
    N, K = n, k
    J = moe.tile_rows(32)
    MT = moe.tile_tokens(32, J)
    W = K // bf16_dot.PAIRS
    tiles = dot_tiles(n, bf16_dot.tile(MT, J, K, moe.same_row, lambda base, j: base + j), MT, J,
                      bf16_dot.LANES, bf16_dot.WORD, bf16_dot.IMPORT)
    decode = gemv(n, k, "bfloat16")

    @T.macro
    def run(x, w, y, m):
        if m >= MT:
            with T.sblock("prefill"):
                x_words = T.decl_buffer((m, T.int64(W)), bf16_dot.WORD, data=x.data)
                w_words = T.decl_buffer((1, N, W), bf16_dot.WORD, data=w.data)  # one expert's
                tiles(x_words, w_words, y, m)
        else:
            decode(x, w, y, m)

    return run


def projection(n: int, k: int, dtype: str, lanes: int = 16, registers: int = 32,
               bf16: bool = False, amx: bool = False):
    """A TVMScript macro ``run(x, w, y, m)``: y[m, n] (float32) = x[m, k] · W[n, k]ᵀ for any
    token count m (``bf16``: on bfloat16 dot products, see ``bf16_dot.usable``; ``amx``:
    prefills of ``amx_gemm.MIN_TOKENS`` or more on AMX tiles, see ``amx_gemm.usable``)."""
    vectors = bf16_projection(n, k) if bf16 else float_projection(n, k, dtype, lanes, registers)
    if not amx:
        return vectors
    tiles = amx_gemm.projection(n, k)

    @T.macro
    def run(x, w, y, m):
        if m >= amx_gemm.MIN_TOKENS:
            tiles(x, w, y, m)
        else:
            vectors(x, w, y, m)

    return run


def nt_gemm(n: int, k: int, dtype: str, lanes: int = 16, registers: int = 32,
            bf16: bool = False, amx: bool = False) -> tirx.PrimFunc:
    """``projection`` as a kernel."""
    return gemm_kernel(projection(n, k, dtype, lanes, registers, bf16, amx), n, k, dtype,
                       (n, k))


def gemm_kernel(body, n: int, k: int, dtype: str, weight_shape: tuple[int, ...],
                out_dtype: str = OUT_DTYPE) -> tirx.PrimFunc:
    """A kernel y[m, n] (``out_dtype``) = ``body(x, w, y, m)`` for x [m, k] in ``dtype`` and a
    weight stored as ``weight_shape``, any token count m; opaque to operator fusion."""
    N, K = n, k

    @T.prim_func(private=True, s_tir=True)
    def gemm(var_x: T.handle, w: T.Buffer(weight_shape, dtype), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        m = T.int64()
        x = T.match_buffer(var_x, (m, T.int64(K)), dtype)
        y = T.match_buffer(var_y, (m, T.int64(N)), out_dtype)
        body(x, w, y, m)

    return gemm


@relax.expr_functor.mutator
class _GemmDispatcher(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        super().__init__(mod)
        self.target = target
        self.lanes, self.registers = vector_unit(target)
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        operands = nt_matmul_operands(self, call)
        if operands is None:
            return call
        x, weight = operands
        (n, k), dtype = [int(d) for d in weight.ty.shape], weight.ty.dtype
        if not fits(n, k) or x.ty.dtype != dtype:
            return call
        kernel = kernel_once(self.builder_, self.kernels, ("nt_gemm", f"{n}x{k}", dtype),
                             lambda: nt_gemm(n, k, dtype, self.lanes, self.registers,
                                             bf16_dot.usable(self.target, dtype, k),
                                             amx_gemm.usable(self.target, dtype, n, k)))
        return call_per_token(self.builder_, kernel, x, n, OUT_DTYPE, weight)


def kernel_once(builder: relax.BlockBuilder, kernels: dict[tuple, tvm.ir.GlobalVar],
                key: tuple, make) -> tvm.ir.GlobalVar:
    """The module's function for ``key``: ``make()`` added on first use, named after the key
    (a rewrite pass asks once per layer for the same few kernels)."""
    if key not in kernels:
        kernels[key] = builder.add_func(make(), re.sub(r"\W", "_", "_".join(map(str, key))))
    return kernels[key]


def call_per_token(builder: relax.BlockBuilder, kernel: tvm.ir.GlobalVar, x: relax.Expr,
                   features: int, dtype: str, *weights: relax.Expr) -> relax.Expr:
    """``kernel(x as [tokens, k], *weights)`` -> [tokens, features], reshaped back to x's
    leading axes."""
    lead = list(x.ty.shape)[:-1]
    tokens = token_count(lead)
    flat = builder.emit(relax.op.reshape(x, [tokens, x.ty.shape[-1]]))
    y = builder.emit(relax.call_tir(kernel, [flat, *weights],
                                    relax.TensorType([tokens, features], dtype)))
    return relax.op.reshape(y, [*lead, features])


def token_count(lead: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """How many rows a tensor's leading axes (all but the features) hold."""
    tokens = lead[0]
    for dim in lead[1:]:
        tokens = tokens * dim
    return tokens


def bound_value(mutator: relax.PyExprMutator, expr: relax.Expr) -> relax.Expr:
    """What a dataflow variable was bound to (nn emits every op as its own binding)."""
    if isinstance(expr, relax.Var):
        bound = mutator.lookup_binding(expr)
        return bound if bound is not None else expr
    return expr


def is_op(expr: relax.Expr, name: str) -> bool:
    """Whether ``expr`` is a call of the Relax operator ``name``."""
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def nt_matmul_operands(mutator: relax.PyExprMutator,
                       expr: relax.Expr) -> tuple[relax.Expr, relax.Expr] | None:
    """(x, W) when ``expr`` is matmul(x, permute_dims(W)) into float32, W a 2-D tensor of static
    shape and x of at least 2 axes."""
    if not is_op(expr, "relax.matmul"):
        return None
    rhs = bound_value(mutator, expr.args[1])
    if not is_op(rhs, "relax.permute_dims"):
        return None
    axes = rhs.attrs.axes
    x, weight = expr.args[0], rhs.args[0]
    if (str(expr.attrs.out_dtype) == OUT_DTYPE
            and (axes is None or [int(a) for a in axes] == [1, 0])
            and isinstance(weight.ty, relax.TensorType) and weight.ty.ndim == 2
            and all(isinstance(d, tirx.IntImm) for d in weight.ty.shape)
            and isinstance(x.ty, relax.TensorType) and x.ty.ndim >= 2):
        return x, weight
    return None


def relax_function_pass(name: str, make_mutator) -> tvm.transform.Pass:
    """A module pass running ``make_mutator(mod)`` (a ``PyExprMutator``) over every Relax
    function of the module; the functions it adds go into the module too."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def rewrite(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mutator = make_mutator(mod)
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gvar, mutator.visit_expr(func))
        return mutator.builder_.get()

    return rewrite


def dispatch_cpu_gemm(target: tvm.target.Target) -> tvm.transform.Pass:
    """The pass that routes fitting projections to ``nt_gemm``: on bfloat16 dot products where
    the target has AVX512-BF16, else tiled for its vector registers."""
    return relax_function_pass("DispatchCPUGemm", lambda mod: _GemmDispatcher(mod, target))
