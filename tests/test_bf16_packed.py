"""bfloat16 weights in 12 bits (``schedules/bf16_packed.py``): lossless packing, and the
kernel on the packed weights against numpy."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import tvm
from conftest import host_target

from qwen3c.schedules import bf16_dot, bf16_packed


def weight_with_outliers(n: int, k: int, seed: int) -> np.ndarray:
    """Gaussian weights (std 0.02) with zeros and values far outside the table's high bytes."""
    rng = np.random.default_rng(seed)
    weight = (rng.normal(size=(n, k)) * 0.02).astype(ml_dtypes.bfloat16)
    weight[0, :5] = 0
    weight[3, 7], weight[n - 1, k - 1], weight[n // 2, 1] = 3e-9, -12.5, -0.0
    return weight


@pytest.mark.parametrize("n, k", [(64, 32), (192, 96)])
def test_packing_is_lossless(n, k):
    weight = weight_with_outliers(n, k, k)
    packed = bf16_packed.pack(weight)
    assert packed.values.nbytes == weight.nbytes * 3 // 4
    high_bytes = np.unique(weight.view(np.uint16) >> 8)
    assert packed.exceptions >= len(high_bytes) - bf16_packed.CODES  # the rarest
    assert np.array_equal(bf16_packed.unpack(packed, n, k), weight.view(np.uint16))


def test_a_weight_with_few_high_bytes_has_no_exceptions():
    weight = np.tile(np.array([1, -2, 0.5, 0], ml_dtypes.bfloat16), (64, 8))
    packed = bf16_packed.pack(weight)
    assert packed.exceptions == 0 and len(packed.at) == len(packed.value) == 1
    assert np.array_equal(bf16_packed.unpack(packed, 64, 32), weight.view(np.uint16))


@pytest.mark.parametrize("n, k", [(64, 32), (192, 96)])
def test_packed_gemm_matches_numpy(n, k):
    target = host_target()
    if not bf16_dot.available(target, "bfloat16", k):
        pytest.skip("the packed kernel needs a CPU with AVX512-BF16")
    weight = weight_with_outliers(n, k, n)
    capacity = bf16_packed.count_exceptions(weight) + 3  # as if shared with another weight
    packed = bf16_packed.pack(weight, capacity)
    assert len(packed.at) == len(packed.value) == capacity > packed.exceptions
    kernel = tvm.compile(bf16_packed.packed_gemm(n, k, capacity).with_attr(
        "global_symbol", "gemm"), target=target)
    arrays = [tvm.runtime.tensor(a) for a in (packed.values, packed.table, packed.offsets,
                                              packed.at, packed.value)]
    rng = np.random.default_rng(k)
    # decode, a partial tile, one tile, tiles and a partial one; then the panel decoded once
    for m in (1, 2, 3, 6, 7, 10, 17, bf16_packed.WHOLE_PANEL_TOKENS,
              bf16_packed.WHOLE_PANEL_TOKENS + 5):
        x = rng.normal(size=(m, k)).astype(ml_dtypes.bfloat16)
        y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
        kernel(tvm.runtime.tensor(x), *arrays, y)
        # the same bfloat16 products as the unpacked weight, exact in float32
        exact = x.astype(np.float32) @ weight.astype(np.float32).T
        np.testing.assert_allclose(y.numpy(), exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


def test_packed_gate_up_swiglu_matches_numpy():
    """A packed gate_up [2I, k]: silu(gate) * up from its float32 sums, in one kernel."""
    target = host_target()
    n, k = 256, 64
    if not bf16_dot.available(target, "bfloat16", k):
        pytest.skip("the packed kernel needs a CPU with AVX512-BF16")
    weight = weight_with_outliers(n, k, 9)
    packed = bf16_packed.pack(weight)
    kernel = tvm.compile(bf16_packed.packed_gemm(n, k, packed.exceptions, "float32",
                                                 swiglu=True).with_attr("global_symbol", "g"),
                         target=target)
    arrays = [tvm.runtime.tensor(a) for a in (packed.values, packed.table, packed.offsets,
                                              packed.at, packed.value)]
    rng = np.random.default_rng(10)
    for m in (1, 7, bf16_packed.WHOLE_PANEL_TOKENS + 1):
        x = rng.normal(size=(m, k)).astype(ml_dtypes.bfloat16)
        act = tvm.runtime.tensor(np.zeros((m, n // 2), np.float32))
        kernel(tvm.runtime.tensor(x), *arrays, act)
        gate, up = np.split(x.astype(np.float32) @ weight.astype(np.float32).T, 2, axis=1)
        expected = gate / (1 + np.exp(-gate)) * up
        np.testing.assert_allclose(act.numpy(), expected, rtol=1e-4,
                                   atol=1e-4 * np.abs(expected).max())


def test_packed_rows_are_the_weight_rows():
    """The token lookup of a tied model from its packed head: every row, exceptions included."""
    n, k = 128, 64
    weight = weight_with_outliers(n, k, 3)
    packed = bf16_packed.pack(weight)
    kernel = tvm.compile(bf16_packed.packed_rows(n, k, packed.exceptions).with_attr(
        "global_symbol", "rows"), target=host_target())
    ids = np.array([3, 0, n - 1, n // 2, 70, 3], np.int32)  # rows with exceptions, repeated
    rows = tvm.runtime.tensor(np.zeros((len(ids), k), ml_dtypes.bfloat16))
    kernel(tvm.runtime.tensor(ids), *[tvm.runtime.tensor(a) for a in (
        packed.values, packed.table, packed.offsets, packed.at, packed.value)], rows)
    assert np.array_equal(rows.numpy().view(np.uint16), weight[ids].view(np.uint16))
