"""CPU attention for the paged KV cache: prefill over new tokens (its "ragged" kernel),
prefill over cached pages (a prompt's later chunks, a reused prefix), decode.

For query row q of head h (KV head g = h // group), over the keys it may see,

    s_j = (q · k_j) · sm_scale · log2(e)
    out = Σ_j 2^(s_j - m) v_j / Σ_j 2^(s_j - m),   lse = m + log2 Σ_j 2^(s_j - m)

TVM's CPU kernel runs this as one serial loop nest on one core, rescaling the output after
every key and computing the masked half too. Here (prefill) the keys and values are converted
to float32 once per call (keys transposed), and a parallel task takes the query rows that read
the same keys (the query heads of one KV head, for a few consecutive tokens) and walks the keys
in blocks of KEY_BLOCK with an online softmax (flash attention's running max and sum per row):

- with the keys transposed, the scores of all rows are an outer-product update per head
  dimension: rows x KEY_BLOCK accumulators in vector registers, no horizontal sums, no chain
  of dependent adds;
- each row's scores become probabilities (masked past what the row may see), its running sum
  and max are updated, and the values are summed into the row's float32 output in register
  chunks of the head dimension.

``lse`` is in log2 units, as TVM's, so the cache can merge partial results (a later prefill
chunk attends to cached pages with ``paged_prefill_attention`` and to its new tokens with the
ragged kernel). Both gather their keys through a ``source`` table (``ragged_sources``,
``paged_sources``; the tile kernels of ``tile_attention.py`` use the same tables) and keep TVM's
signatures (``ragged_kernel``, ``paged_kernel``), so the cache calls them unchanged. TVM's own
paged kernel walks every slot of the cache for every query row: a 2048-token prompt in
512-token chunks took 32 s with it. RoPE must have been applied before (the cache's "normal"
RoPE mode): the kernels refuse ``rotary_mode`` 1 at run time.

Decode (``paged_decode_attention``) uses the same online softmax: a task per KV head of a
sequence scores each key straight from the cache's pages (a dot product per query row) and
converts each block of values to float32. On the Intel host of an earlier session, with keys
gathered transposed, it took 0.53 against TVM's 0.58 ms per layer at 1024 tokens of context
and 0.025 against 0.054 at 100; on the Zen 5 host, scoring from the pages took it from 0.225 to
0.092 ms at 1000 keys and from 0.030 to 0.014 ms at 100 (8 KV heads of 128, 2 threads).
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from qwen3c.schedules.fast_math import LOG2E, exp2_nonpositive
from qwen3c.schedules.lane_sum import fold_lanes
from qwen3c.schedules.prefetch import CACHE_LINE, prefetch_to_l2
from qwen3c.schedules.scratch import stack_buffer

KEY_BLOCK = 32  # keys scored at once: two AVX-512 vectors per query row
DECODE_AHEAD = 32  # keys: decode prefetches the key and value rows this far ahead
TARGET_ROWS = 4  # query rows per task where the group size allows


def _lanes(head_dim: int) -> int:
    """The widest vector (up to 16 float32) that divides the head dimension."""
    return next(width for width in (16, 8, 4, 2, 1) if head_dim % width == 0)


def _score_block(rows: int, head_dim: int):
    """A TVMScript macro: ``scores[r, j]`` = query row r · key ``base + j`` of a block, from
    float32 keys transposed (``keys_t[head, D, base + j]``): an outer-product update per head
    dimension, rows x KEY_BLOCK accumulators in vector registers."""
    R, D, KB = rows, head_dim, KEY_BLOCK

    @T.macro
    def score(query, scores, keys_t, head, base):
        for r in T.unroll(R):
            for j in T.vectorized(KB):
                scores[r, j] = T.float32(0)
        for i in range(D):
            for r in T.unroll(R):
                for j in T.vectorized(KB):
                    scores[r, j] = scores[r, j] + query[r, i] * keys_t[head, i, base + j]

    return score


def _scratch_value(values, head, base, j, i):
    """Element i of key ``base + j``'s value in prefill's float32 scratch ``values[head, key,
    D]``."""
    return values[head, base + j, i]


def _fold_block(rows: int, head_dim: int, value=_scratch_value):
    """A TVMScript macro folding one block's ``scores`` and values (``value(values, head,
    base, j, i)``: element(s) i of the block's key j's value, float32) into ``rows`` rows'
    running state: ``state[r]`` is the running max, the running sum, the block's max and the
    rescale factor; row r sees the first ``visible[r]`` keys of the block (the rest must be
    finite)."""
    R, D, KB, VL = rows, head_dim, KEY_BLOCK, _lanes(head_dim)

    @T.macro
    def fold(acc, state, scores, values, head, base, visible, partial):
        for r in T.unroll(R):
            state[r, 2] = state[r, 0]
            for j in range(KB):
                state[r, 2] = T.max(state[r, 2], T.if_then_else(
                    j < visible[r], scores[r, j], T.float32(-3.0e38)))
            state[r, 3] = T.exp2(state[r, 0] - state[r, 2])
            state[r, 1] = state[r, 1] * state[r, 3]
            for j in T.vectorized(KB):
                scores[r, j] = T.Select(
                    j < visible[r], exp2_nonpositive(scores[r, j] - state[r, 2]), T.float32(0))
            for j in range(KB):
                state[r, 1] = state[r, 1] + scores[r, j]
            state[r, 0] = state[r, 2]
        for chunk in range(D // VL):
            for r in T.unroll(R):
                for lane in T.vectorized(VL):
                    partial[r, lane] = acc[r, chunk * VL + lane] * state[r, 3]
            for j in range(KB):
                for r in T.unroll(R):
                    for lane in T.vectorized(VL):
                        partial[r, lane] = partial[r, lane] + scores[r, j] * value(
                            values, head, base, j, chunk * VL + lane)
            for r in T.unroll(R):
                for lane in T.vectorized(VL):
                    acc[r, chunk * VL + lane] = partial[r, lane]

    return fold


def _store_row(head_dim: int, dtype: str):
    """A TVMScript macro writing row ``r``'s finished state as the output of ``token`` and
    ``head``: the weighted values over the sum of weights, and the log2-sum-exp."""
    D = head_dim

    @T.macro
    def store(output, lse, acc, state, r, token, head):
        for i in T.vectorized(D):
            output[token, head, i] = T.Cast(dtype, acc[r, i] / state[r, 1])
        lse[token, head] = state[r, 0] + T.log2(state[r, 1])

    return store


PHANTOM = -5.0e4  # TVM's kernels start each row at a key of this score, weight 1, value 0


def context_length(page_indptr, last_page_len, b, page_size: int):
    """How many keys sequence b holds in the cache's pages (0 without pages)."""
    pages = page_indptr[b + 1] - page_indptr[b]
    return T.if_then_else(pages > 0, (pages - 1) * page_size + last_page_len[b], 0)


def ragged_sources(num_kv_heads: int, align: int):
    """A TVMScript macro ``sources((kv_indptr,), start, length, source, batch_size)`` for keys
    given as new tokens ``k``/``v[m, H_kv, D]``: sequence b's ``length[b]`` keys get slots from
    ``start[b]`` on (rounded up to ``align`` slots, the padding re-reading the last key), and
    ``source[slot]`` is the row of k / v (viewed as [m * H_kv, D]) of KV head 0."""
    @T.macro
    def sources(tables, start, length, source, batch_size):
        kv_indptr = tables[0]
        start[0] = 0
        for b in range(batch_size):
            length[b] = kv_indptr[b + 1] - kv_indptr[b]
            start[b + 1] = start[b] + (length[b] + align - 1) // align * align
        for b in range(batch_size):
            for j in range(start[b + 1] - start[b]):
                source[start[b] + j] = (kv_indptr[b] + T.min(j, length[b] - 1)) * num_kv_heads

    return sources


def paged_sources(num_kv_heads: int, page_size: int, align: int):
    """``ragged_sources`` for keys in the cache's pages (``pages[page, 0 = key | 1 = value,
    KV head, slot, D]``, viewed as rows of D), ``tables`` = (page_indptr, page_values,
    last_page_len): ``source[slot]`` is the row of the key for KV head 0 (its value is
    ``num_kv_heads * page_size`` rows on, the next head ``page_size``)."""
    P = page_size

    @T.macro
    def sources(tables, start, length, source, batch_size):
        page_indptr, page_values, last_page_len = tables
        start[0] = 0
        for b in range(batch_size):
            length[b] = context_length(page_indptr, last_page_len, b, P)
            start[b + 1] = start[b] + (length[b] + align - 1) // align * align
        for b in range(batch_size):
            for j in range(start[b + 1] - start[b]):
                key: T.let = T.min(j, length[b] - 1)
                source[start[b] + j] = page_values[page_indptr[b] + key // P] * (
                    2 * num_kv_heads * P) + key % P

    return sources


def _gather(num_kv_heads: int, head_dim: int, head_stride: int, value_offset: int):
    """A TVMScript macro ``gather(key_rows, value_rows, source, count, keys_t, values)``: the
    ``count`` slots' keys (row ``source[slot]`` + g · ``head_stride`` of ``key_rows``),
    float32 and transposed, into ``keys_t[g, D, slot]``, and their values (``value_offset``
    rows further in ``value_rows``) into ``values[g, slot, D]``; KEY_BLOCK zero keys past the
    last let a block run whole past a sequence's end."""
    D, KB = head_dim, KEY_BLOCK

    @T.macro
    def gather(key_rows, value_rows, source, count, keys_t, values):
        for g, i in T.grid(num_kv_heads, D):
            for j in T.vectorized(KB):
                keys_t[g, i, count + j] = T.float32(0)
        for g, j, i in T.grid(num_kv_heads, KB, D):
            values[g, count + j, i] = T.float32(0)
        for gj in T.parallel(num_kv_heads * count):
            g: T.let = gj // count
            row: T.let = source[gj % count] + g * head_stride
            for i in range(D):
                keys_t[g, i, gj % count] = T.Cast("float32", key_rows[row, i])
                values[g, gj % count, i] = T.Cast("float32", value_rows[row + value_offset, i])

    return gather


def interleaved(task_tile, tiles):
    """Task order -> tile: 0, last, 1, last - 1, ...: causal rows see more keys the later their
    tokens, and TVM splits a parallel loop into one run of consecutive tasks per thread, so
    every run mixes early and late tokens alike."""
    return T.if_then_else(task_tile % 2 == 0, task_tile // 2, tiles - 1 - task_tile // 2)


def _prefill_tasks(num_kv_heads: int, num_heads: int, head_dim: int, dtype: str):
    """A TVMScript macro ``attend(q, q_indptr, start, length, keys_t, values, output, lse,
    causal, sm_scale, batch_size)``: every query row against its sequence's keys (``length[b]``
    of them from slot ``start[b]`` of ``_gather``'s buffers; the last ``q_count`` of them are
    the new tokens' own when causal). A task is one KV head of a tile of TOKENS consecutive
    tokens of one sequence; tiles past a sequence's end do nothing."""
    D, G, KB = head_dim, num_heads // num_kv_heads, KEY_BLOCK
    TOKENS = max(1, TARGET_ROWS // G)
    R = TOKENS * G
    score, fold, store = _score_block(R, D), _fold_block(R, D), _store_row(D, dtype)

    @T.macro
    def attend(q, q_indptr, start, length, keys_t, values, output, lse, causal, sm_scale,
               batch_size):
        tiles: T.let = (q.shape[0] + TOKENS - 1) // TOKENS
        for task in T.parallel(num_kv_heads * tiles * batch_size):
            with T.sblock("attend"):
                T.reads()  # independent tasks; nothing schedules this block
                T.writes()
                query = T.sblock_alloc_buffer((R, D), "float32")
                acc = T.sblock_alloc_buffer((R, D), "float32")
                scores = stack_buffer((R, KB), "float32")
                partial = stack_buffer((R, _lanes(D)), "float32")
                state = stack_buffer((R, 4), "float32")
                sees = stack_buffer((R,), "int32")  # keys each row sees in all
                visible = stack_buffer((R,), "int32")  # ... in the current block
                g: T.let = task // (tiles * batch_size)
                b: T.let = task % batch_size
                first_token: T.let = interleaved(task // batch_size % tiles, tiles) * TOKENS
                q_begin: T.let = q_indptr[b]
                q_count: T.let = q_indptr[b + 1] - q_begin
                if first_token < q_count:
                    for r in range(R):
                        # rows past the sequence's end repeat its last token; not stored
                        t: T.let = T.min(first_token + r // G, q_count - 1)
                        sees[r] = T.if_then_else(causal > 0, length[b] - q_count + t + 1,
                                                 length[b])
                        state[r, 0] = T.float32(PHANTOM)
                        state[r, 1] = T.float32(1)
                        for i in range(D):
                            query[r, i] = T.Cast(
                                "float32", q[q_begin + t, g * G + r % G, i]) * (sm_scale * LOG2E)
                            acc[r, i] = T.float32(0)
                    for block in range((sees[R - 1] + KB - 1) // KB):
                        for r in range(R):
                            visible[r] = T.max(0, T.min(KB, sees[r] - block * KB))
                        score(query, scores, keys_t, g, start[b] + block * KB)
                        fold(acc, state, scores, values, g, start[b] + block * KB, visible,
                             partial)
                    for r in range(R):
                        if first_token + r // G < q_count:
                            store(output, lse, acc, state, r, q_begin + first_token + r // G,
                                  g * G + r % G)

    return attend


Rows = tuple[str, int]  # how a prefill reads keys or values: rows of (dtype, width) elements


def ragged_kernel(num_kv_heads: int, num_heads: int, head_dim: int, dtype: str, run,
                  key_rows: Rows, value_rows: Rows) -> tirx.PrimFunc:
    """TVM's ragged prefill signature (``_attention_prefill_ragged_cpu``: the new tokens
    ``q[n, H, D]`` against ``k``/``v[m, H_kv, D]``, sequences delimited by the indptrs) around
    the macro ``run(keys, values, tables, count, q, q_indptr, output, lse, causal,
    sm_scale)``: k and v as [m · H_kv] rows of ``key_rows`` / ``value_rows``, ``tables`` =
    (kv_indptr,) for ``ragged_sources``, at most ``count`` keys."""
    H, D = num_heads, head_dim
    (KEY_DTYPE, KEY_WIDTH), (VALUE_DTYPE, VALUE_WIDTH) = key_rows, value_rows

    @T.prim_func(private=True, s_tir=True)
    def attention(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
                  var_kv_indptr: T.handle, var_q_rope_position: T.handle,
                  var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
                  causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32,
                  rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size, qo_len, kv_len = T.int32(), T.int32(), T.int32()
        q_indptr_offset, kv_indptr_offset = T.int32(), T.int32()
        q_rope_offset, k_rope_offset = T.int32(), T.int32()
        q = T.match_buffer(var_q, (qo_len, H, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32",
                                  elem_offset=q_indptr_offset)
        k = T.match_buffer(var_k, (kv_len, num_kv_heads, D), dtype)
        v = T.match_buffer(var_v, (kv_len, num_kv_heads, D), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32",
                                   elem_offset=kv_indptr_offset)
        T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",
                       elem_offset=k_rope_offset)
        output = T.match_buffer(var_output, (qo_len, H, D), dtype)
        lse = T.match_buffer(var_lse, (qo_len, H), "float32")
        assert rotary_mode == 0, "qwen3c's prefill attention expects RoPE applied before it"
        run(T.decl_buffer((kv_len * num_kv_heads, KEY_WIDTH), KEY_DTYPE, data=k.data),
            T.decl_buffer((kv_len * num_kv_heads, VALUE_WIDTH), VALUE_DTYPE, data=v.data),
            (kv_indptr,), kv_len, q, q_indptr, output, lse, causal, sm_scale)

    return attention


def paged_kernel(num_kv_heads: int, num_heads: int, head_dim: int, dtype: str,
                 page_size: int, run, key_rows: Rows, value_rows: Rows) -> tirx.PrimFunc:
    """TVM's paged prefill signature (``_attention_prefill_cpu``: new tokens against what
    their sequences hold in the cache's pages) around ``run`` as in ``ragged_kernel``: the
    pages as rows, ``tables`` = (page_indptr, page_values, last_page_len) for
    ``paged_sources``."""
    H, D, P = num_heads, head_dim, page_size
    (KEY_DTYPE, KEY_WIDTH), (VALUE_DTYPE, VALUE_WIDTH) = key_rows, value_rows

    @T.prim_func(private=True, s_tir=True)
    def attention(var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle,
                  var_page_indptr: T.handle, var_page_values: T.handle,
                  var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
                  var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle,
                  causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32,
                  rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size, total_len, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32(), T.int32()
        q_indptr_offset, page_indptr_offset, values_offset = T.int32(), T.int32(), T.int32()
        length_offset, k_rope_offset, q_rope_offset = T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (total_len, H, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32",
                                  elem_offset=q_indptr_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, num_kv_heads, P, D), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32",
                                     elem_offset=page_indptr_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32",
                                     elem_offset=values_offset)
        last_page_len = T.match_buffer(var_length_info, (batch_size,), "int32",
                                       elem_offset=length_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(var_output, (total_len, H, D), dtype)
        lse = T.match_buffer(var_lse, (total_len, H), "float32")
        assert rotary_mode == 0, "qwen3c's prefill attention expects RoPE applied before it"
        rows: T.let = max_num_pages * 2 * num_kv_heads * P
        run(T.decl_buffer((rows, KEY_WIDTH), KEY_DTYPE, data=pages.data),
            T.decl_buffer((rows, VALUE_WIDTH), VALUE_DTYPE, data=pages.data),
            (page_indptr, page_values, last_page_len), nnz_pages * P, q, q_indptr, output, lse,
            causal, sm_scale)

    return attention


def _gathered_prefill(num_kv_heads: int, head_dim: int, head_stride: int, value_offset: int,
                      sources, attend):
    """A TVMScript macro ``run(key_rows, value_rows, tables, keys, q, q_indptr, output, lse,
    causal, sm_scale)``: ``sources`` (``ragged_sources`` / ``paged_sources``, reading
    ``tables``) numbers the key slots (at most ``keys``), ``_gather`` converts them,
    ``attend`` (``_prefill_tasks``) runs the rows."""
    D, KB = head_dim, KEY_BLOCK
    gather = _gather(num_kv_heads, head_dim, head_stride, value_offset)

    @T.macro
    def run(key_rows, value_rows, tables, keys, q, q_indptr, output, lse, causal, sm_scale):
        with T.sblock("prefill"):
            T.reads()  # runs once; nothing schedules this block
            T.writes()
            start = T.sblock_alloc_buffer((q_indptr.shape[0],), "int32")
            length = T.sblock_alloc_buffer((q_indptr.shape[0] - 1,), "int32")
            source = T.sblock_alloc_buffer((keys,), "int32")
            keys_t = T.sblock_alloc_buffer((num_kv_heads, D, keys + KB), "float32")
            values = T.sblock_alloc_buffer((num_kv_heads, keys + KB, D), "float32")
            sources(tables, start, length, source, q_indptr.shape[0] - 1)
            gather(key_rows, value_rows, source, start[q_indptr.shape[0] - 1], keys_t, values)
            attend(q, q_indptr, start, length, keys_t, values, output, lse, causal, sm_scale,
                   q_indptr.shape[0] - 1)

    return run


def ragged_prefill_attention(num_kv_heads: int, num_heads: int, head_dim: int,
                             dtype: str) -> tirx.PrimFunc:
    """Each new token attends to the new tokens of its sequence (up to itself when causal)."""
    run = _gathered_prefill(num_kv_heads, head_dim, 1, 0, ragged_sources(num_kv_heads, 1),
                            _prefill_tasks(num_kv_heads, num_heads, head_dim, dtype))
    return ragged_kernel(num_kv_heads, num_heads, head_dim, dtype, run, (dtype, head_dim),
                         (dtype, head_dim))


def paged_prefill_attention(num_kv_heads: int, num_heads: int, head_dim: int, dtype: str,
                            page_size: int = 16) -> tirx.PrimFunc:
    """New tokens attend to what their sequences hold in the cache's pages (a prompt's earlier
    chunks, a shared prefix): TVM's kernel for this walks every slot of the cache for every
    query row. The keys are gathered once per call, then the tasks are the ragged kernel's; a
    sequence with no pages gets output 0 and lse -5e4."""
    P = page_size
    run = _gathered_prefill(num_kv_heads, head_dim, P, num_kv_heads * P,
                            paged_sources(num_kv_heads, P, 1),
                            _prefill_tasks(num_kv_heads, num_heads, head_dim, dtype))
    return paged_kernel(num_kv_heads, num_heads, head_dim, dtype, P, run, (dtype, head_dim),
                        (dtype, head_dim))


def _paged_value(pages, g, located, j, i):
    """Element(s) i of the value of key j of a decode block, in KV head g's cache pages."""
    return T.Cast("float32", pages[located[0, j], 1, g, located[1, j], i])


def paged_decode_attention(num_kv_heads: int, num_heads: int, head_dim: int, dtype: str,
                           page_size: int = 16) -> tirx.PrimFunc:
    """One new token per sequence attends to its whole context in the cache's pages
    (``pages[page, 0 = key | 1 = value, KV head, slot, D]``). A task is one KV head of one
    sequence: the query heads that share it are the rows. Each key of a block of KEY_BLOCK is
    scored straight from its page (a dot product per row in VL-wide partial sums, then summed
    across lanes); ``_fold_block`` then reads its values from the page too, converting them
    as it sums (Zen 3, 0.6B shape, per layer, against converting a block of values into
    float32 scratch first, as prefill does: 64 keys in cache 20.1 -> 17.0 us, 512 keys from
    memory 150 -> 138 us).
    Gathering the keys transposed instead, as prefill's scoring wants, cost a scalar store per
    element: that made the kernel 3x slower than the memory at 1000 keys. Keys past the
    context repeat its last key, and the rows see none of them. Each key prefetches the key
    and value rows DECODE_AHEAD keys on (pages need not be consecutive, and a task reads its
    two streams a page at a time): Zen 4, 0.6B shape, caches from memory, 2048 keys 0.47 ->
    0.31 ms (18 -> 27 GB/s), 8192 keys 1.76 -> 1.06 ms (19 -> 32 GB/s); 16 to 64 keys ahead
    measured alike."""
    H, D, G, P, KB = num_heads, head_dim, num_heads // num_kv_heads, page_size, KEY_BLOCK
    VL = _lanes(D)
    per_line = max(1, CACHE_LINE // (tvm.DataType(dtype).bits // 8))  # elements
    fold, store, sum_lanes = _fold_block(G, D, _paged_value), _store_row(D, dtype), fold_lanes(VL)

    @T.prim_func(private=True, s_tir=True)
    def attention(var_q: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
                  var_page_values: T.handle, var_length_info: T.handle,
                  var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
                  var_output: T.handle, var_lse: T.handle, rotary_mode: T.int32,
                  rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32()
        indptr_offset, values_offset, length_offset = T.int32(), T.int32(), T.int32()
        k_rope_offset, q_rope_offset = T.int32(), T.int32()
        q = T.match_buffer(var_q, (batch_size, H, D), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, num_kv_heads, P, D), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32",
                                     elem_offset=indptr_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32",
                                     elem_offset=values_offset)
        last_page_len = T.match_buffer(var_length_info, (batch_size,), "int32",
                                       elem_offset=length_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(var_q_rope_position, (batch_size,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(var_output, (batch_size, H, D), dtype)
        lse = T.match_buffer(var_lse, (batch_size, H), "float32")
        assert rotary_mode == 0, "qwen3c's decode attention expects RoPE applied before it"

        for task in T.parallel(batch_size * num_kv_heads):
            with T.sblock("attend"):
                T.reads()  # independent tasks; nothing schedules this block
                T.writes()
                query = T.sblock_alloc_buffer((G, D), "float32")
                acc = T.sblock_alloc_buffer((G, D), "float32")
                scores = stack_buffer((G, KB), "float32")
                partial = stack_buffer((G, _lanes(D)), "float32")
                dots = stack_buffer((G, VL), "float32")
                located = stack_buffer((2, KB), "int32")  # page and slot of the block's keys
                state = stack_buffer((G, 4), "float32")
                visible = stack_buffer((G,), "int32")
                b: T.let = task // num_kv_heads
                g: T.let = task % num_kv_heads
                first_page: T.let = page_indptr[b]
                length: T.let = context_length(page_indptr, last_page_len, b, P)
                for r in range(G):
                    # a phantom key of score -5e4 and value 0 (as TVM's kernel): a sequence
                    # with no pages at this level of a shared prefix gets output 0 and an lse
                    # that weighs nothing when the cache merges levels
                    state[r, 0] = T.float32(-5.0e4)
                    state[r, 1] = T.float32(1)
                    for i in T.vectorized(D):
                        query[r, i] = T.Cast("float32", q[b, g * G + r, i]) * (
                            sm_scale * LOG2E)
                        acc[r, i] = T.float32(0)
                for block in range((length + KB - 1) // KB):
                    for j in range(KB):
                        key: T.let = T.min(block * KB + j, length - 1)
                        page: T.let = page_values[first_page + key // P]
                        ahead: T.let = T.min(key + DECODE_AHEAD, length - 1)
                        ahead_page: T.let = page_values[first_page + ahead // P]
                        for part, line in T.grid(2, D // per_line):
                            T.evaluate(prefetch_to_l2(T.address_of(
                                pages[ahead_page, part, g, ahead % P, line * per_line])))
                        for r in T.unroll(G):
                            for lane in T.vectorized(VL):
                                dots[r, lane] = T.float32(0)
                        for chunk in range(D // VL):
                            for r in T.unroll(G):
                                for lane in T.vectorized(VL):
                                    dots[r, lane] = dots[r, lane] + query[
                                        r, chunk * VL + lane] * T.Cast(
                                        "float32", pages[page, 0, g, key % P, chunk * VL + lane])
                        for r in T.unroll(G):
                            sum_lanes(dots, (r,))
                            scores[r, j] = dots[r, 0]
                        located[0, j] = page
                        located[1, j] = key % P
                    for r in range(G):
                        visible[r] = T.min(KB, length - block * KB)
                    fold(acc, state, scores, pages, g, located, visible, partial)
                for r in range(G):
                    store(output, lse, acc, state, r, b, g * G + r)

    return attention
