"""The huge-page arena that holds host weights: exact bytes, TVM's alignment, lifetime."""

from __future__ import annotations

import gc

import ml_dtypes
import numpy as np
import pytest

from qwen3c.runtime.host_memory import TENSOR_ALIGN, HugePageArena

ARRAYS = [
    np.arange(-7, 8, dtype=np.int32).reshape(3, 5),
    np.linspace(-2, 2, 33, dtype=np.float32).astype(ml_dtypes.bfloat16),  # odd byte count
    np.random.default_rng(0).integers(0, 256, (17, 9), dtype=np.uint8),
    np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32),
]


def test_tensors_hold_the_arrays_and_outlive_the_arena():
    arena = HugePageArena(sum(HugePageArena.footprint(a.nbytes) for a in ARRAYS))
    tensors = [arena.tensor(a, str(a.dtype)) for a in ARRAYS]
    del arena
    gc.collect()
    for array, tensor in zip(ARRAYS, tensors, strict=True):
        assert str(tensor.dtype) == str(array.dtype)
        assert tuple(tensor.shape) == array.shape
        assert tensor.data_ptr() % TENSOR_ALIGN == 0
        np.testing.assert_array_equal(tensor.numpy().view(np.uint8), array.view(np.uint8))


def test_an_arena_refuses_more_than_its_capacity():
    arena = HugePageArena(HugePageArena.footprint(ARRAYS[0].nbytes))
    arena.tensor(ARRAYS[0], "int32")
    with pytest.raises(ValueError, match="bytes left"):
        arena.tensor(ARRAYS[0], "int32")
