"""Targets other than the host CPU: what can be checked on a machine without them."""

from __future__ import annotations

import struct

import pytest
from click.testing import CliRunner

import qwen3c
from qwen3c.cli import main
from qwen3c.runtime.artifact import read_manifest

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
FATBIN_KINDS = {1: "ptx", 2: "elf"}


def fatbin_entries(library: bytes) -> list[tuple[str, int]]:
    """(kind, sm arch) of each entry of the one CUDA fatbin in ``library``: a header (magic,
    version, header size, payload size), then entries each with a kind, a header size, a
    payload size and, at byte 28, the arch."""
    assert library.count(FATBIN_MAGIC) == 1
    start = library.find(FATBIN_MAGIC)
    _, _, header_size, size = struct.unpack_from("<IHHQ", library, start)
    entries, offset = [], start + header_size
    while offset < start + header_size + size:
        kind, _, entry_header_size, payload_size = struct.unpack_from("<HHIQ", library, offset)
        entries.append((FATBIN_KINDS[kind], struct.unpack_from("<I", library, offset + 28)[0]))
        offset += entry_header_size + payload_size
    return entries


@pytest.mark.parametrize("arch, dtype", [("sm_80", "float16"), ("sm_90", "bfloat16")])
def test_cuda_artifact_builds_and_embeds_device_code(tiny_checkpoint, tmp_path, arch, dtype):
    out = qwen3c.compile_model(tiny_checkpoint, target="cuda", arch=arch, dtype=dtype,
                               output=tmp_path / "cuda")
    _, manifest = read_manifest(out)
    assert (manifest.target.name, manifest.target.arch, manifest.dtype) == ("cuda", arch, dtype)
    library = (out / "model.so").read_bytes()
    # nvcc compiled the kernels at build time: machine code and PTX for the arch, no source.
    assert fatbin_entries(library) == [("ptx", int(arch[3:])), ("elf", int(arch[3:]))]
    assert b"__global__" not in library
    with pytest.raises(qwen3c.ArtifactError, match="no CUDA device"):
        qwen3c.load(out)


def test_cuda_refuses_moe_and_unknown_arch(make_checkpoint, tiny_checkpoint, tmp_path):
    with pytest.raises(qwen3c.TargetError, match="CPU-only"):
        qwen3c.compile_model(make_checkpoint("moe-cli", moe=True), target="cuda",
                             output=tmp_path / "moe")
    with pytest.raises(qwen3c.TargetError, match="sm_70"):
        qwen3c.compile_model(tiny_checkpoint, target="cuda", arch="sm_70",
                             output=tmp_path / "old")


def test_targets_command_says_what_was_verified():
    shown = CliRunner().invoke(main, ["targets"]).output
    assert "llvm" in shown and "cuda" in shown and "never run" in shown


def test_llvm_refuses_unknown_arch_and_cpu(tiny_checkpoint, tmp_path):
    with pytest.raises(qwen3c.TargetError, match="riscv64"):
        qwen3c.compile_model(tiny_checkpoint, arch="riscv64", output=tmp_path / "rv")
    with pytest.raises(qwen3c.TargetError, match="no aarch64 CPU named 'pentium'"):
        qwen3c.compile_model(tiny_checkpoint, arch="aarch64", cpu="pentium",
                             output=tmp_path / "bad-cpu")
