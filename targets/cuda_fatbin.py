"""Put nvcc-compiled device code into a cuda library instead of CUDA C++ source.

Where the CUDA driver is missing (a build machine without a GPU), TVM's CUDA runtime library
does not load and codegen stores each cuda module as source (format ``"cuda"``), which TVM
would compile when the library is loaded on a GPU machine. qwen3c compiles that source with
nvcc at build time, for the requested arch, and packs the result instead:
``export_library(fpack_imports=...)`` hands us the packing of the imported modules, where we
rewrite every cuda module's payload to a fatbin. Where the driver is present, codegen compiles
each module at once through the global ``tvm_callback_cuda_compile`` (by default nvrtc, to a
cubin): ``nvcc_as_cuda_compiler`` makes that the same nvcc fatbin for the requested arch, so an
artifact does not depend on the machine that built it.

The packed layout (TVM's ``ModuleSerializer``, src/target/codegen.cc): an 8-byte length, two
u64 vectors (the import tree), then per module group its kind (a string) and, except for the
host library ``_lib``, its bytes. A cuda module's bytes are ``format, function table, code``;
strings, vectors and bytes are each a little-endian u64 count followed by the items.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import tvm
import tvm_ffi
from tvm.support import nvcc

COMPILE_CALLBACK = "tvm_callback_cuda_compile"
HOST_LIBRARY = "_lib"
CUDA_KIND = "cuda"
SOURCE_FORMAT = "cuda"
FATBIN_FORMAT = "fatbin"


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.offset = data, 0

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.data, self.offset)
        self.offset += 8
        return value

    def take(self, count: int) -> bytes:
        chunk = self.data[self.offset:self.offset + count]
        self.offset += count
        return chunk

    def sized(self) -> bytes:
        """A string or byte array: its length, then its bytes."""
        return self.take(self.u64())

    def u64_vector(self) -> bytes:
        """A vector of u64, kept encoded: its count, then the items."""
        count = self.u64()
        return struct.pack("<Q", count) + self.take(8 * count)


def _sized(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def compile_cuda_modules(packed: bytes, compile_source: Callable[[str], bytes]) -> bytes:
    """``packed`` (TVM's packed imports) with each cuda module's source replaced by
    ``compile_source(source)`` in fatbin format."""
    reader = _Reader(packed)
    reader.u64()  # total length, rewritten below
    row_ptr = reader.u64_vector()
    children = reader.u64_vector()
    groups = struct.unpack_from("<Q", row_ptr)[0] - 1
    body = [row_ptr, children]
    for _ in range(groups):
        kind = reader.sized()
        body.append(_sized(kind))
        if kind.decode() == HOST_LIBRARY:
            continue
        payload = reader.sized()
        if kind.decode() == CUDA_KIND:
            payload = _to_fatbin(payload, compile_source)
        body.append(_sized(payload))
    if reader.offset != len(packed):
        raise ValueError("unexpected layout of TVM's packed modules")
    content = b"".join(body)
    return struct.pack("<Q", len(content)) + content


def _to_fatbin(payload: bytes, compile_source: Callable[[str], bytes]) -> bytes:
    module = _Reader(payload)
    fmt = module.sized().decode()
    if fmt != SOURCE_FORMAT:
        return payload  # already device code
    code_offset = _source_offset(payload)
    table = payload[module.offset:code_offset]
    source = payload[code_offset + 8:].decode()
    return _sized(FATBIN_FORMAT.encode()) + table + _sized(compile_source(source))


def _source_offset(payload: bytes) -> int:
    """Where the trailing (length, source) item starts. The function table's layout is not
    ours to parse, so search back from the end for the u64 that counts the bytes after it:
    source text holds no NUL byte, so no u64 read inside it is that small."""
    for offset in range(len(payload) - 8, -1, -1):
        if struct.unpack_from("<Q", payload, offset)[0] == len(payload) - offset - 8:
            return offset
    raise ValueError("no source in a cuda module")


def nvcc_fatbin(arch: str) -> Callable[[str], bytes]:
    """Compile CUDA source for ``arch`` (e.g. sm_90): its machine code plus PTX for newer GPUs."""
    compute = arch.replace("sm_", "compute_")
    gencode = ["-gencode", f"arch={compute},code={arch}",
               "-gencode", f"arch={compute},code={compute}"]

    def compile_source(source: str) -> bytes:
        with tvm.target.Target({"kind": "cuda", "arch": arch}):  # nvcc.py reads its version
            return bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=gencode,
                                           compiler="nvcc"))

    return compile_source


@contextmanager
def nvcc_as_cuda_compiler(arch: str) -> Iterator[None]:
    """Within the block, TVM compiles cuda modules with ``nvcc_fatbin(arch)`` (used where the
    CUDA runtime is present); TVM's own callback (``tvm.support.nvcc``) is restored after."""
    previous = tvm_ffi.get_global_func(COMPILE_CALLBACK)
    tvm_ffi.register_global_func(COMPILE_CALLBACK, nvcc_fatbin(arch), override=True)
    try:
        yield
    finally:
        tvm_ffi.register_global_func(COMPILE_CALLBACK, previous, override=True)


def fatbin_packer(arch: str) -> Callable[..., str]:
    """An ``fpack_imports`` for ``export_library`` that packs the imports with device code."""
    compile_source = nvcc_fatbin(arch)

    def pack(module: tvm.runtime.Module, system_lib: bool, prefix: str, workspace: str) -> str:
        packed = tvm.get_global_func("runtime.ModulePackImportsToTensor")(module).numpy()
        blob = compile_cuda_modules(packed.tobytes(), compile_source)
        host_target = _host_module(module).get_function("_get_target_string")()
        obj = tvm.get_global_func("codegen.codegen_blob")(blob, system_lib, host_target, prefix)
        path = str(Path(workspace) / f"{prefix}devc.o")
        obj.write_to_file(path)
        return path

    return pack


def _host_module(module: tvm.runtime.Module) -> tvm.runtime.Module:
    """The LLVM module (host code) in ``module``'s import tree."""
    pending = [module]
    while pending:
        current = pending.pop()
        if current.kind == "llvm":
            return current
        pending.extend(current.imports)
    raise ValueError("a cuda library without host code")
