"""Drives TVM's PagedKVCache runtime object: sequences, forward brackets, page accounting.

TVM aborts a forward whose pages run out and leaves the cache unusable afterwards, so every
forward is checked against the free pages first and refused with a ``RequestError`` instead.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from tvm.runtime import ShapeTuple

from qwen3c.errors import RequestError
from qwen3c.runtime.executor import Executor


@functools.lru_cache(maxsize=1)
def _shape_tuples(seq_ids: tuple[int, ...], lengths: tuple[int, ...]
                  ) -> tuple[ShapeTuple, ShapeTuple]:
    """A forward's sequences and lengths as TVM shapes; the last pair is kept, as every decode
    step of a steady batch asks for the same one (a ShapeTuple costs ~4 us to build)."""
    return ShapeTuple(seq_ids), ShapeTuple(lengths)


class PagedKVCache:
    """One cache for all sequences; on a sharded model each worker holds its kv heads' slice,
    and every operation here is applied to all slices alike."""

    def __init__(self, executor: Executor, *, max_batch_size: int, capacity_tokens: int,
                 prefill_chunk_size: int, page_size: int = 16):
        self.max_batch_size = max_batch_size
        self.prefill_chunk_size = prefill_chunk_size
        self.page_size = page_size
        self._executor = executor
        self.handle = executor.create_kv_cache(max_batch_size, capacity_tokens,
                                               prefill_chunk_size, page_size, 0)
        self.lengths: dict[int, int] = {}
        self._next_id = 0

    def _call(self, builtin: str, *args) -> object:
        return self._executor.builtin(f"vm.builtin.{builtin}", self.handle, *args)

    def free_pages(self) -> int:
        return int(self._call("attention_kv_cache_get_num_available_pages"))

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    def add_sequence(self) -> int:
        seq_id = self._new_id()
        self._call("kv_state_add_sequence", seq_id)
        self.lengths[seq_id] = 0
        return seq_id

    def fork_sequence(self, parent: int, length: int) -> int:
        """A new sequence sharing the parent's first ``length`` tokens (pages are shared, the
        partial last page is copied), so they need no prefill."""
        if not 0 < length <= self.lengths[parent]:
            raise ValueError(f"cannot fork {length} tokens of a {self.lengths[parent]}-token "
                             "sequence")
        seq_id = self._new_id()
        self._call("kv_state_fork_sequence", parent, seq_id, length)
        self.lengths[seq_id] = length
        return seq_id

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def remove_sequence(self, seq_id: int) -> None:
        self._call("kv_state_remove_sequence", seq_id)
        del self.lengths[seq_id]

    @contextmanager
    def forward(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> Iterator[None]:
        """Bracket one model call that appends ``lengths[i]`` tokens to sequence ``seq_ids[i]``."""
        if len(seq_ids) > self.max_batch_size:
            raise RequestError(f"a forward holds at most {self.max_batch_size} sequences")
        needed = sum(self.pages_for(self.lengths[s] + n) - self.pages_for(self.lengths[s])
                     for s, n in zip(seq_ids, lengths, strict=True))
        if needed and needed > self.free_pages():
            raise RequestError(
                f"the KV cache is full: this step needs {needed} more pages of {self.page_size} "
                f"tokens, {self.free_pages()} are free; use fewer or shorter requests, or load "
                "the model with a larger kv_cache_tokens")
        self._call("kv_state_begin_forward", *_shape_tuples(tuple(seq_ids), tuple(lengths)))
        try:
            yield
        finally:
            self._call("kv_state_end_forward")
        for seq_id, n in zip(seq_ids, lengths, strict=True):
            self.lengths[seq_id] += n
