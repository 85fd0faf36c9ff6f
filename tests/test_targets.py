"""Targets other than the host CPU: what can be checked on a machine without them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import qwen3c
from qwen3c.cli import main
from qwen3c.runtime.artifact import read_manifest


@pytest.mark.parametrize("arch, dtype", [("sm_80", "float16"), ("sm_90", "bfloat16")])
def test_cuda_artifact_builds_and_embeds_device_code(tiny_checkpoint, tmp_path, arch, dtype):
    out = qwen3c.compile_model(tiny_checkpoint, target="cuda", arch=arch, dtype=dtype,
                               output=tmp_path / "cuda")
    _, manifest = read_manifest(out)
    assert (manifest.target.name, manifest.target.arch, manifest.dtype) == ("cuda", arch, dtype)
    library = (out / "model.so").read_bytes()
    # TVM embeds CUDA C++ kernels, compiled for the device when the artifact is loaded.
    assert library.count(b"__global__") >= 10
    assert b"paged_kv" in library  # the attention kernels came along
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
