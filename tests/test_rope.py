"""qwen3c's RoPE kernel against numpy and against TVM's kernel it replaces in the KV cache."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import tvm
from conftest import host_target
from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

from qwen3c.schedules.rope import split_rotary

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
THETA = 1e6


def reference(qkv: np.ndarray, positions: np.ndarray, q_heads: int, kv_heads: int):
    """Rotate-half RoPE in float64 on q and k; v copied. The angles are float32, as in both
    kernels (at position 40,000 their rounding alone moves a result by ~5e-3)."""
    x = qkv.astype(np.float64)
    half = x.shape[-1] // 2
    exponents = (2 * np.arange(half) / x.shape[-1]).astype(np.float32)
    angles = (positions[:, None].astype(np.float32)
              / np.power(np.float32(THETA), exponents)).astype(np.float64)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    lo, hi = x[..., :half], x[..., half:]
    rotated = np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1)
    return (rotated[:, :q_heads], rotated[:, q_heads:q_heads + kv_heads],
            x[:, q_heads + kv_heads:])


def run(func, qkv, positions, q_heads, kv_heads, apply_rope):
    lib = tvm.tirx.build(func.with_attr("global_symbol", "main"),
                         target=host_target())
    n, _, d = qkv.shape
    dev = tvm.cpu()
    outs = [tvm.runtime.empty((n, heads, d), str(qkv.dtype), dev)
            for heads in (q_heads, kv_heads, kv_heads)]
    lib["main"](tvm.runtime.tensor(qkv, dev), tvm.runtime.tensor(positions, dev), *outs,
                apply_rope)
    return [out.numpy() for out in outs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, q_heads, kv_heads, head_dim", [(5, 4, 2, 16), (1, 3, 1, 8),
                                                            (33, 16, 8, 128)])
def test_rope_matches_numpy_and_tvms_kernel(dtype, n, q_heads, kv_heads, head_dim):
    """Against numpy at positions below 512 (float32 angles of larger ones differ by an ulp
    of ``pow`` times the position); against TVM's kernel up to position 40,000."""
    rng = np.random.default_rng(n)
    qkv = rng.standard_normal((n, q_heads + 2 * kv_heads, head_dim)).astype(DTYPES[dtype])
    ours = split_rotary(THETA, head_dim, q_heads, kv_heads, dtype)
    stock = llama_rope_with_position_map(THETA, 1, head_dim, q_heads, kv_heads, dtype, {})
    tolerance = 1e-4 if dtype == "float32" else 1.6e-2
    near = rng.integers(0, 512, n).astype(np.int32)
    for mine, expected in zip(run(ours, qkv, near, q_heads, kv_heads, 1),
                              reference(qkv, near, q_heads, kv_heads), strict=True):
        np.testing.assert_allclose(mine.astype(np.float64), expected, atol=tolerance,
                                   rtol=tolerance)
    far = rng.integers(0, 40000, n).astype(np.int32)
    for mine, tvms in zip(run(ours, qkv, far, q_heads, kv_heads, 1),
                          run(stock, qkv, far, q_heads, kv_heads, 1), strict=True):
        np.testing.assert_allclose(mine.astype(np.float64), tvms.astype(np.float64),
                                   atol=tolerance, rtol=tolerance)


def test_rope_off_copies_q_and_k():
    qkv = np.random.default_rng(0).standard_normal((3, 4, 8)).astype(np.float32)
    q, k, v = run(split_rotary(THETA, 8, 2, 1, "float32"), qkv,
                  np.arange(3, dtype=np.int32) + 7, 2, 1, 0)
    np.testing.assert_array_equal(np.concatenate([q, k, v], axis=1), qkv)
