"""The huge-page arena that holds host weights: exact bytes, TVM's alignment, lifetime."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from qwen3c.runtime.host_memory import HUGE_PAGE, TENSOR_ALIGN, HugePageArena, ReusedInputs

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


def test_reused_inputs_write_over_their_tensors_while_the_shape_holds():
    inputs = ReusedInputs()
    first = inputs([np.array([3], np.int32), np.array([0, 1], np.int32)])
    again = inputs([np.array([7], np.int32), np.array([5, 6], np.int32)])
    assert [t.data_ptr() for t in again] == [t.data_ptr() for t in first]
    assert [t.numpy().tolist() for t in again] == [[7], [5, 6]]
    wider = inputs([np.array([1, 2], np.int32), np.array([4, 5], np.int64)])
    assert wider[0].data_ptr() != first[0].data_ptr()
    assert [t.numpy().tolist() for t in wider] == [[1, 2], [4, 5]]
    assert [str(t.dtype) for t in wider] == ["int32", "int64"]
    assert all(t.data_ptr() % TENSOR_ALIGN == 0 for t in wider)


def thp_mode() -> str | None:
    """Linux's transparent huge page mode ("always", "madvise", "never"), None elsewhere."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    found = re.search(r"\[(\w+)\]", path.read_text()) if path.exists() else None
    return found.group(1) if found else None


def mapping_of(address: int) -> str:
    """This process's /proc/self/smaps entry for the mapping holding ``address``."""
    entries = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text())
    for entry in entries:
        start, end = (int(a, 16) for a in entry.split(" ", 1)[0].split("-"))
        if start <= address < end:
            return entry
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="no transparent huge pages")
def test_the_arena_asks_for_huge_pages():
    """Under THP "madvise" only an advised mapping may get huge pages (smaps: THPeligible 1);
    the weights start on a huge page."""
    weight = np.ones((4 * HUGE_PAGE // 4,), np.float32)
    tensor = HugePageArena(HugePageArena.footprint(weight.nbytes)).tensor(weight, "float32")
    assert tensor.data_ptr() % HUGE_PAGE == 0
    assert re.search(r"^THPeligible:\s+1$", mapping_of(tensor.data_ptr()), re.MULTILINE)
