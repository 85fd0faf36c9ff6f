"""Host weights in transparent huge pages.

A decode step streams every weight once. In 4 KB pages that is a TLB miss and a page walk for
every 4 KB read; TVM allocates tensors with the C library, which on a Linux set to give huge
pages only on request ("madvise", the common default) leaves them in 4 KB pages. Here the
weights share one anonymous mapping advised ``MADV_HUGEPAGE``, so the kernel backs it with 2 MB
pages where it can (llama.cpp's weights, mapped from the page cache, get them partly too).
Elsewhere (no THP, not Linux) the same mapping simply stays in small pages.
"""

from __future__ import annotations

import contextlib
import mmap

import numpy as np
import tvm

TENSOR_ALIGN = 64  # bytes: TVM's tensor alignment (``from_dlpack`` refuses less)
HUGE_PAGE = 2 << 20


def is_host(device: tvm.runtime.Device) -> bool:
    """Whether ``device`` is this process's CPU memory (numpy can share it)."""
    return device.dlpack_device_type() == tvm.cpu().dlpack_device_type()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def aligned_tensor(array: np.ndarray) -> tuple[tvm.runtime.Tensor, np.ndarray]:
    """A CPU tensor holding a copy of ``array``, and a numpy view of the same memory (a 64-byte
    aligned numpy allocation handed to TVM by DLPack)."""
    padded = np.empty(array.size + TENSOR_ALIGN // array.itemsize, array.dtype)
    start = (-padded.ctypes.data % TENSOR_ALIGN) // array.itemsize
    aligned = padded[start:start + array.size].reshape(array.shape)
    aligned[...] = array
    return tvm.runtime.from_dlpack(aligned), aligned


class ReusedInputs:
    """CPU tensors for a model call's inputs (token ids, positions), each kept and written over
    while its shape stays the same, as in every step of a steady decode. After the weights
    have streamed through the caches, Python runs cold: on the Zen 3 host
    ``tvm.runtime.tensor`` took 173 us per decode step, a fresh ``aligned_tensor`` 73 us,
    writing into the kept one 20 us. The compiled functions do not keep their inputs."""

    def __init__(self) -> None:
        self._kept: list[tuple[tvm.runtime.Tensor, np.ndarray]] = []

    def __call__(self, inputs: list[np.ndarray]) -> list[tvm.runtime.Tensor]:
        for index, array in enumerate(inputs):
            if index == len(self._kept):
                self._kept.append(aligned_tensor(array))
                continue
            view = self._kept[index][1]
            if view.shape == array.shape and view.dtype == array.dtype:
                view[...] = array
            else:
                self._kept[index] = aligned_tensor(array)
        return [tensor for tensor, _ in self._kept[:len(inputs)]]


class HugePageArena:
    """Host tensors carved, one after another, out of one mapping of ``capacity`` bytes (at
    least the sum of the tensors' sizes, each rounded up to TENSOR_ALIGN). The mapping lives
    as long as any tensor made from it."""

    def __init__(self, capacity: int):
        mapping = mmap.mmap(-1, capacity + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):  # THP off: small pages, same tensors
                mapping.madvise(mmap.MADV_HUGEPAGE)
        self._bytes = np.frombuffer(mapping, dtype=np.uint8)
        self._offset = (-self._bytes.ctypes.data) % HUGE_PAGE  # start on a huge page
        self._end = self._offset + capacity

    @staticmethod
    def footprint(nbytes: int) -> int:
        """The capacity one tensor of ``nbytes`` takes."""
        return _round_up(nbytes, TENSOR_ALIGN)

    def tensor(self, array: np.ndarray, dtype: str) -> tvm.runtime.Tensor:
        """A copy of ``array`` as a CPU tensor of ``dtype`` (numpy cannot hand bfloat16 to
        DLPack, so the bytes go over as uint8 and the tensor is a typed view of them)."""
        start, size = self._offset, array.nbytes
        if start + self.footprint(size) > self._end:
            raise ValueError(f"the arena has {self._end - start} bytes left, {size} asked")
        region = self._bytes[start:start + size]
        region[:] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self._offset += self.footprint(size)
        return tvm.runtime.from_dlpack(region)._create_view(array.shape, dtype)
