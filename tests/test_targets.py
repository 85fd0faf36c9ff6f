"""Targets other than the host CPU: what can be checked on a machine without them."""

from __future__ import annotations

import ctypes
import errno
import shutil
import struct

import pytest
import tvm
from click.testing import CliRunner

import qwen3c
from qwen3c.cli import main
from qwen3c.runtime.artifact import read_manifest
from qwen3c.targets import llvm
from qwen3c.targets.llvm import LlvmTarget, features_beyond, host_kernel_features

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
    if not tvm.cuda(0).exist:  # where there is a GPU, test_gpu.py runs such artifacts
        with pytest.raises(qwen3c.ArtifactError, match="no CUDA device"):
            qwen3c.load(out)
    versus_cpu = CliRunner().invoke(main, ["bench", str(out), "--vs-llama-cpp", "llama-bench",
                                           "--gguf", "m.gguf"])
    assert versus_cpu.exit_code == 2 and "compares CPU artifacts" in versus_cpu.output


def test_cuda_refuses_unknown_arch(tiny_checkpoint, tmp_path):
    with pytest.raises(qwen3c.TargetError, match="sm_70"):
        qwen3c.compile_model(tiny_checkpoint, target="cuda", arch="sm_70",
                             output=tmp_path / "old")


CLI_TARGETS = {
    "llvm": [],
    "llvm-aarch64": ["--arch", "aarch64"],
    "cuda": ["--arch", "sm_90"],
    "ascend": [],
    "mlu": [],
}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("name", CLI_TARGETS)
def test_every_target_compiles_from_the_cli(name, moe, make_checkpoint, tmp_path):
    if name == "llvm-aarch64" and shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("needs aarch64-linux-gnu-g++ (apt-get install g++-aarch64-linux-gnu)")
    checkpoint = make_checkpoint("moe" if moe else "tiny", moe=moe)
    target = name.split("-")[0]
    result = CliRunner().invoke(main, ["compile", str(checkpoint), "--target", target,
                                       *CLI_TARGETS[name], "--dtype", "bfloat16",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    _, manifest = read_manifest(tmp_path / "out")
    assert manifest.target.name == target and manifest.architecture.endswith(
        "MoeForCausalLM" if moe else "Qwen3ForCausalLM")


def test_unknown_target_and_arch_are_refused_from_the_cli(tiny_checkpoint, tmp_path):
    for options, message in ((["--target", "tpu"], "unknown target 'tpu'"),
                             (["--target", "cuda", "--arch", "sm_75"], "unsupported arch"),
                             (["--arch", "riscv64"], "unsupported arch")):
        result = CliRunner().invoke(main, ["compile", str(tiny_checkpoint), *options,
                                           "-o", str(tmp_path / "x")])
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_targets_command_says_what_was_verified():
    shown = CliRunner().invoke(main, ["targets"]).output
    for name in ("llvm", "cuda", "ascend", "mlu"):
        assert f"\n{name}" in "\n" + shown
    assert "never run" in shown and "qemu" in shown and "compile" in shown


def test_llvm_refuses_unknown_arch_and_cpu(tiny_checkpoint, tmp_path):
    with pytest.raises(qwen3c.TargetError, match="riscv64"):
        qwen3c.compile_model(tiny_checkpoint, arch="riscv64", output=tmp_path / "rv")
    with pytest.raises(qwen3c.TargetError, match="no aarch64 CPU named 'pentium'"):
        qwen3c.compile_model(tiny_checkpoint, arch="aarch64", cpu="pentium",
                             output=tmp_path / "bad-cpu")


def test_a_host_build_uses_every_kernel_feature_of_the_host():
    """A CPU name from an older model than the host's features (a VM) must not hide them."""
    llvm = LlvmTarget()
    target = llvm.tvm_target(llvm.resolve(None, None))
    for feature in host_kernel_features():
        assert tvm.target.codegen.target_has_features(feature, target), feature


def test_a_kernel_refused_the_tile_registers_is_a_clear_error(monkeypatch):
    """Linux before 5.16 (or a sandbox) refuses the AMX tile data: the process must not go on
    to die of SIGILL at the first prefill. (The OS is stood in for; the request that succeeds
    runs for real wherever builds take AMX, test_bfloat16.py.)"""
    class RefusingLibc:
        def syscall(self, *args: int) -> int:
            ctypes.set_errno(errno.EINVAL)
            return -1

    monkeypatch.setattr(llvm.ctypes, "CDLL", lambda *args, **kwargs: RefusingLibc())
    with pytest.raises(qwen3c.TargetError, match="AMX tiles, and the OS refused them"):
        llvm.request_tile_data()


def test_features_beyond_a_cpu_name():
    x86 = "x86_64-linux-gnu"
    assert features_beyond("rocketlake", x86, frozenset({"avx2", "avx512vnni", "avx512bf16"})) \
        == ("avx512bf16",)
    assert features_beyond("rocketlake", x86, frozenset({"amx-tile", "amx-bf16"})) \
        == ("amx-bf16", "amx-tile")
    assert features_beyond("sapphirerapids", x86, frozenset({"amx-tile", "amx-bf16"})) == ()
    assert features_beyond("haswell", x86, frozenset({"avx2", "fma"})) == ()
    assert features_beyond("generic", x86, frozenset({"fma", "avx2"})) == ("avx2", "fma")
