"""Software prefetch from TIR, for the memory-bound decode kernels."""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

CACHE_LINE = 64  # bytes
PREFETCH_LOCALITY = 2  # llvm.prefetch's locality: 2 = into L2 (x86 prefetcht1; 3 measured the
#                       same, 0 (non-temporal) 1.6x slower than none)


def prefetch_to_l2(address: tirx.PrimExpr) -> tirx.PrimExpr:
    """A read prefetch of the cache line at ``address`` (``T.address_of``) into L2; a hint
    only, so an address past the data is harmless, but the kernels clamp theirs anyway."""
    return T.call_llvm_intrin("void", "llvm.prefetch.p0", address, T.int32(0),
                              T.int32(PREFETCH_LOCALITY), T.int32(1))
