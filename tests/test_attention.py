"""qwen3c's attention kernels against numpy: ragged batches, GQA, odd lengths; the vector
kernels everywhere, the prefills on tile products where the CPU has their instructions."""

from __future__ import annotations

import functools
import math

import ml_dtypes
import numpy as np
import pytest
import tvm
from conftest import host_target

from qwen3c.schedules import amx_gemm, bf16_dot, tile_attention
from qwen3c.schedules.attention import (
    KEY_BLOCK,
    paged_decode_attention,
    paged_prefill_attention,
    ragged_prefill_attention,
)

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def reference(q, k, v, q_lens, kv_lens, sm_scale, causal):
    """Softmax attention per sequence in float64; lse in log2 units as TVM's kernels."""
    group = q.shape[1] // k.shape[1]
    out = np.zeros(q.shape, np.float64)
    lse = np.zeros(q.shape[:2], np.float64)
    q0 = kv0 = 0
    for q_len, kv_len in zip(q_lens, kv_lens, strict=True):
        for h in range(q.shape[1]):
            qs = q[q0:q0 + q_len, h].astype(np.float64)
            ks = k[kv0:kv0 + kv_len, h // group].astype(np.float64)
            vs = v[kv0:kv0 + kv_len, h // group].astype(np.float64)
            scores = qs @ ks.T * sm_scale
            if causal:
                allowed = np.arange(kv_len)[None, :] <= (kv_len - q_len + np.arange(q_len))[:, None]
                scores = np.where(allowed, scores, -np.inf)
            top = scores.max(axis=1, keepdims=True)
            weights = np.exp(scores - top)
            total = weights.sum(axis=1, keepdims=True)
            out[q0:q0 + q_len, h] = weights @ vs / total
            lse[q0:q0 + q_len, h] = (top[:, 0] + np.log(total[:, 0])) / math.log(2)
        q0, kv0 = q0 + q_len, kv0 + kv_len
    return out, lse


def build(kernel):
    return tvm.tirx.build(kernel.with_attr("global_symbol", "main"),
                          target=host_target())


def assert_matches(out, lse, expected_out, expected_lse, dtype):
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    got = out.numpy().astype(np.float64)
    assert np.abs(got - expected_out).max() <= tolerance * np.abs(expected_out).max() + 1e-6
    assert np.abs(lse.numpy() - expected_lse).max() <= 1e-4 * np.abs(expected_lse).max() + 1e-4


def run_ragged_prefill(kernel, q_lens, kv_heads, heads, head_dim, dtype, causal, seed):
    """The kernel over random q, k, v for sequences of ``q_lens`` new tokens, beside numpy."""
    rng = np.random.default_rng(seed)
    n = sum(q_lens)
    q, k, v = (rng.standard_normal((n, count, head_dim)).astype(DTYPES[dtype])
               for count in (heads, kv_heads, kv_heads))
    indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    device = tvm.cpu()
    out = tvm.runtime.empty((n, heads, head_dim), dtype, device)
    lse = tvm.runtime.empty((n, heads), "float32", device)
    arrays = [q, indptr, k, v, indptr, np.zeros(n, np.int32), np.zeros(len(q_lens), np.int32)]
    sm_scale = head_dim ** -0.5
    build(kernel)["main"](*(tvm.runtime.tensor(a, device) for a in arrays), out, lse,
                          causal, 0, 1.0, 1e6, sm_scale)
    assert_matches(out, lse, *reference(q, k, v, q_lens, q_lens, sm_scale, causal), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [1, 0])
def test_ragged_prefill_attention_matches_numpy(dtype, causal):
    # within a block, across blocks, a single token
    q_lens = [5, 2 * KEY_BLOCK + 3, 1]
    run_ragged_prefill(ragged_prefill_attention(2, 6, 24, dtype), q_lens, 2, 6, 24, dtype,
                       causal, seed=0)


TILE_PRODUCTS = {products.name: products
                 for products in (tile_attention.AMX, tile_attention.VDPBF16PS)}


def host_runs(products: tile_attention.Products) -> bool:
    """Whether this CPU has ``products``' instructions (whether or not builds pick them)."""
    target = host_target()
    if not bf16_dot.available(target, "bfloat16", 64):
        return False
    return products is not tile_attention.AMX or amx_gemm.has_tiles(target)


@pytest.mark.parametrize("products", TILE_PRODUCTS)
@pytest.mark.parametrize("causal", [1, 0])
def test_tile_prefill_attention_matches_numpy(products, causal):
    """Tiles of tokens that end mid-tile, a prompt over two chunks of keys, a single token,
    GQA of 3 query heads per KV head."""
    if not host_runs(TILE_PRODUCTS[products]):
        pytest.skip(f"this CPU has no {products} instructions")
    q_lens = [5, tile_attention.TOKENS * 2 + 3, tile_attention.CHUNK + 40, 1]
    kernel = tile_attention.ragged_prefill_attention(2, 6, 64, "bfloat16",
                                                     products=TILE_PRODUCTS[products])
    run_ragged_prefill(kernel, q_lens, 2, 6, 64, "bfloat16", causal, seed=2)


@pytest.mark.parametrize(("cpu", "products", "instruction"),
                         [("sapphirerapids", tile_attention.AMX, "tdpbf16ps"),
                          ("znver4", tile_attention.VDPBF16PS, "vdpbf16ps"),
                          ("cooperlake", None, None), ("znver3", None, None)])
def test_tile_prefill_attention_takes_the_products_of_the_cpu(cpu, products, instruction):
    """AMX tiles on an AMX CPU, ``vdpbf16ps`` blocks on a Zen 4 (this host need not be
    either), the vector kernels on an Intel CPU without tiles (``bf16_dot.PAYS_ON``) and
    without AVX512-BF16; both products on the chosen instructions, the probabilities rounded
    by ``vcvtne2ps2bf16``."""
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu})
    assert tile_attention.products_for(target, "bfloat16", 128) is products
    assert tile_attention.products_for(target, "float32", 128) is None
    assert tile_attention.products_for(target, "bfloat16", 24) is None
    if products is None:
        return
    kernel = tile_attention.ragged_prefill_attention(8, 16, 128, "bfloat16", products=products)
    assembly = tvm.tirx.build(kernel.with_attr("global_symbol", "main"),
                              target=target).inspect_source("asm")
    for expected in (instruction, "vcvtne2ps2bf16"):
        assert expected in assembly, expected


class PagedCache:
    """Random keys and values for sequences of ``kv_lens`` tokens in shuffled pages of the
    cache's layout ``[page, 0 = key | 1 = value, KV head, slot, D]``, one page owned by none."""

    def __init__(self, kv_lens, kv_heads, head_dim, dtype, rng, page_size=16):
        counts = [-(-length // page_size) for length in kv_lens]
        num_pages = sum(counts) + 1
        self.kv_lens, self.page_size = kv_lens, page_size
        self.pages = rng.standard_normal(
            (num_pages, 2, kv_heads, page_size, head_dim)).astype(DTYPES[dtype])
        self.page_ids = rng.permutation(num_pages)[:sum(counts)].astype(np.int32)
        self.page_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        self.last_page_len = np.array([length - max(count - 1, 0) * page_size
                                       for length, count in zip(kv_lens, counts, strict=True)],
                                      np.int32)

    def arrays(self):
        return [self.pages, self.page_indptr, self.page_ids, self.last_page_len]

    def context(self, part: int, sequences) -> np.ndarray:
        """Keys (0) or values (1) of these sequences in order, [tokens, kv_heads, head_dim]."""
        P = self.page_size
        rows = [self.pages[self.page_ids[self.page_indptr[b] + t // P], part, :, t % P]
                for b in sequences for t in range(self.kv_lens[b])]
        return np.stack(rows)


def assert_no_context_gives_zero(out, lse, rows):
    """TVM's contract for a sequence with no pages (at a level of a shared prefix it does not
    reach): output 0 and lse -5e4, which weighs nothing when the cache merges levels."""
    assert not out.numpy()[rows].astype(np.float32).any()
    np.testing.assert_array_equal(lse.numpy()[rows], -5e4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention_matches_numpy(dtype):
    """Sequences whose contexts end mid-page and mid-block, in shuffled pages, and one with
    no pages."""
    kv_heads, heads, head_dim = 2, 6, 24
    kv_lens = [1, 2 * KEY_BLOCK + 5, 0, 16]
    rng = np.random.default_rng(1)
    cache = PagedCache(kv_lens, kv_heads, head_dim, dtype, rng)
    q = rng.standard_normal((len(kv_lens), heads, head_dim)).astype(DTYPES[dtype])

    kernel = build(paged_decode_attention(kv_heads, heads, head_dim, dtype))
    device = tvm.cpu()
    out = tvm.runtime.empty(q.shape, dtype, device)
    lse = tvm.runtime.empty(q.shape[:2], "float32", device)
    zeros = np.zeros(len(kv_lens), np.int32)
    kernel["main"](*(tvm.runtime.tensor(a, device) for a in [q, *cache.arrays(), zeros, zeros]),
                   out, lse, 0, 1.0, 1e6, head_dim ** -0.5)

    seen = [b for b, length in enumerate(kv_lens) if length]
    expected = reference(q[seen], cache.context(0, seen), cache.context(1, seen),
                         [1] * len(seen), [kv_lens[b] for b in seen], head_dim ** -0.5,
                         causal=False)
    assert_matches(tvm.runtime.tensor(out.numpy()[seen]), tvm.runtime.tensor(lse.numpy()[seen]),
                   *expected, dtype)
    assert_no_context_gives_zero(out, lse, kv_lens.index(0))


PAGED_PREFILLS = {"vector": (paged_prefill_attention, 24),
                  **{name: (functools.partial(tile_attention.paged_prefill_attention,
                                              products=products), 64)
                     for name, products in TILE_PRODUCTS.items()}}


@pytest.mark.parametrize("kernel", PAGED_PREFILLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [0, 1])
def test_paged_prefill_attention_matches_numpy(kernel, dtype, causal):
    """New tokens against their sequences' cached pages (a prompt's later chunk): contexts
    ending mid-page, over a chunk of the tile kernels' keys, and a sequence with no pages."""
    make, head_dim = PAGED_PREFILLS[kernel]
    if kernel in TILE_PRODUCTS and dtype != "bfloat16":
        pytest.skip("the tile kernels are for bfloat16")
    if kernel in TILE_PRODUCTS and not host_runs(TILE_PRODUCTS[kernel]):
        pytest.skip(f"this CPU has no {kernel} instructions")
    kv_heads, heads = 2, 6
    kv_lens = [20, tile_attention.CHUNK + 45, 0, 3]
    q_lens = [7, 40, 2, 3]  # causal: the last q_len keys are the new tokens' own
    rng = np.random.default_rng(4)
    cache = PagedCache(kv_lens, kv_heads, head_dim, dtype, rng)
    n = sum(q_lens)
    q = rng.standard_normal((n, heads, head_dim)).astype(DTYPES[dtype])
    q_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)

    device = tvm.cpu()
    out = tvm.runtime.empty(q.shape, dtype, device)
    lse = tvm.runtime.empty(q.shape[:2], "float32", device)
    zeros = np.zeros(len(kv_lens), np.int32)
    arrays = [q, q_indptr, *cache.arrays(), zeros, np.zeros(n, np.int32)]
    build(make(kv_heads, heads, head_dim, dtype))["main"](
        *(tvm.runtime.tensor(a, device) for a in arrays), out, lse, causal, 0, 1.0, 1e6,
        head_dim ** -0.5)

    seen = [b for b, length in enumerate(kv_lens) if length]
    rows = np.concatenate([np.arange(q_indptr[b], q_indptr[b + 1]) for b in seen])
    expected = reference(q[rows], cache.context(0, seen), cache.context(1, seen),
                         [q_lens[b] for b in seen], [kv_lens[b] for b in seen],
                         head_dim ** -0.5, causal)
    assert_matches(tvm.runtime.tensor(out.numpy()[rows]), tvm.runtime.tensor(lse.numpy()[rows]),
                   *expected, dtype)
    empty = kv_lens.index(0)
    assert_no_context_gives_zero(out, lse, slice(q_indptr[empty], q_indptr[empty + 1]))
