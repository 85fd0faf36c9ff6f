"""Ascend and MLU (BYOC): what the partitioning takes, the generated sources, and the host graph
around the partitions run on CPU with qwen3c's reference partitions against HF."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tvm
from click.testing import CliRunner
from tvm import relax

import qwen3c
from qwen3c.cli import main
from qwen3c.compile.config import load_config
from qwen3c.compile.model import Build, Qwen3ForCausalLM
from qwen3c.compile.sharding import Parallelism
from qwen3c.reference import HFReference
from qwen3c.runtime.artifact import read_manifest
from qwen3c.targets import get_target
from qwen3c.targets.byoc import partition_passes

BACKENDS = ["ascend", "mlu"]
TORCH_NPU = "torch-npu==2.14.0"  # ships the real ACL headers (not installed, only unpacked)
# What the host keeps: data movement, residual adds, attention inside the PagedKVCache.
OFFLOADED_OPS = {"relax.matmul", "relax.nn.rms_norm", "relax.nn.silu", "relax.multiply"}
OFFLOADED_KERNELS = {"moe_route", "moe_group", "moe_gate_up_silu", "moe_down_scatter"}


def prompt(vocab: int, length: int = 24) -> list[int]:
    return np.random.default_rng(7).integers(0, vocab, length).tolist()


def host_calls(mod: tvm.IRModule) -> set[str]:
    """Operators and call_tir kernels the entry functions still call themselves."""
    names = set()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.add(expr.args[0].name_hint if expr.op.name == "relax.call_tir"
                      else expr.op.name)

    for func in mod.functions.values():
        if isinstance(func, relax.Function) and "global_symbol" in (func.attrs or {}) \
                and "Codegen" not in func.attrs:
            relax.analysis.post_order_visit(func, visit)
    return names


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("moe", [False, True])
def test_partition_takes_every_claimed_op(backend, moe, make_checkpoint):
    config = load_config(make_checkpoint("moe" if moe else "tiny", moe=moe))
    with tvm.target.Target("llvm"):
        model = Qwen3ForCausalLM(config, Build("float32", Parallelism(1, False), None))
        mod = model.export_tvm(spec=model.get_default_spec())[0]
    expected = {"relax.matmul", "relax.nn.rms_norm"} | (
        OFFLOADED_KERNELS if moe else {"relax.nn.silu", "relax.multiply"})
    assert expected <= host_calls(mod)
    for transform in partition_passes(backend):
        mod = transform(mod)
    after = host_calls(mod)
    assert not after & (OFFLOADED_OPS | OFFLOADED_KERNELS), after
    assert {"relax.take", "relax.call_dps_packed"} <= after  # embedding, attention stay
    if moe:
        assert "moe_router_stats" in after  # statistics are the host's, not a routing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("moe", [False, True])
def test_reference_partitions_match_hf(backend, moe, make_checkpoint, make_artifact):
    checkpoint = make_checkpoint("moe" if moe else "tiny", moe=moe)
    artifact = make_artifact(checkpoint, target=backend)
    _, manifest = read_manifest(artifact)
    ops = {p["op"] for p in manifest.offload["partitions"]}
    assert ops == ({"matmul", "rms_norm", "moe_route", "moe_experts"} if moe
                   else {"matmul", "rms_norm", "swiglu"})
    model = qwen3c.load(artifact, reference_partitions=True)
    hf = HFReference(checkpoint)
    ids = prompt(model.vocab_size)
    ours, reference = model.logits(ids), hf.logits(ids)
    assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()
    generated = model.generate(ids[:8], max_new_tokens=12, stop=None).token_ids
    assert generated == hf.greedy(ids[:8], len(generated))


def test_reference_partitions_in_bfloat16_match_hf(tiny_checkpoint, make_artifact):
    model = qwen3c.load(make_artifact(tiny_checkpoint, "bfloat16", target="ascend"),
                        reference_partitions=True)
    ids = prompt(model.vocab_size)
    reference = HFReference(tiny_checkpoint, dtype="bfloat16").logits(ids)
    assert np.abs(model.logits(ids) - reference).max() <= 0.05 * np.abs(reference).max()


@pytest.fixture(scope="session")
def acl_headers(tmp_path_factory) -> Path:
    """The ACL and HCCL headers of the torch-npu wheel (downloaded, never installed)."""
    cache = Path.home() / ".cache" / "qwen3c" / TORCH_NPU.replace("==", "-")
    include = cache / "torch_npu" / "include"
    if not (include / "acl" / "acl.h").is_file():
        wheels = tmp_path_factory.mktemp("torch-npu")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", "--dest", str(wheels), TORCH_NPU], check=True)
        with zipfile.ZipFile(next(wheels.glob("*.whl"))) as wheel:
            members = [m for m in wheel.namelist() if m.startswith("torch_npu/include/")
                       and (m.startswith(("torch_npu/include/acl/",
                                          "torch_npu/include/third_party/hccl/")))]
            wheel.extractall(cache, members)
    return include


@pytest.mark.parametrize("backend", BACKENDS)
def test_generated_sources_are_deterministic_and_compile(backend, make_checkpoint, tmp_path,
                                                         request):
    checkpoint = make_checkpoint("moe", moe=True)
    first = qwen3c.compile_model(checkpoint, target=backend, output=tmp_path / "a")
    second = qwen3c.compile_model(checkpoint, target=backend, output=tmp_path / "b")
    _, manifest = read_manifest(first)
    assert manifest.offload["library"] is None and "not set" in manifest.offload["build"]
    vendor = first / "vendor"
    assert (vendor / "partitions.cc").read_bytes() == (second / "vendor/partitions.cc").read_bytes()
    source = (vendor / "partitions.cc").read_text()
    for partition in manifest.offload["partitions"]:
        assert f"TVM_FFI_DLL_EXPORT_TYPED_FUNC({partition['symbol']}," in source
    flags = [f"-I{request.getfixturevalue('acl_headers')}"] if backend == "ascend" else []
    target = get_target(backend)
    done = subprocess.run(target.compile_command(vendor, tmp_path / "partitions.o", flags),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    symbols = subprocess.run(["nm", str(tmp_path / "partitions.o")], capture_output=True,
                             text=True, check=True).stdout
    vendor_calls = {"ascend": "aclnnMatmul", "mlu": "cnnlMatMul"}[backend]
    assert f"U {vendor_calls}" in symbols  # the partitions call the vendor library


def test_byoc_refusals(tiny_checkpoint, make_artifact, tmp_path):
    with pytest.raises(qwen3c.ArtifactError, match="ASCEND_TOOLKIT_HOME"):
        qwen3c.load(make_artifact(tiny_checkpoint, target="ascend"))
    with pytest.raises(qwen3c.ArtifactError, match="Ascend and MLU"):
        qwen3c.load(make_artifact(tiny_checkpoint), reference_partitions=True)
    with pytest.raises(qwen3c.TargetError, match="quantized"):
        qwen3c.compile_model(tiny_checkpoint, target="mlu", quant="q8", output=tmp_path / "q")
    with pytest.raises(qwen3c.TargetError, match="sharding"):
        qwen3c.compile_model(tiny_checkpoint, target="ascend", tensor_parallel=2,
                             output=tmp_path / "tp")


def test_cli_runs_reference_partitions(tiny_checkpoint, make_artifact):
    artifact = make_artifact(tiny_checkpoint, target="mlu")
    result = CliRunner().invoke(main, ["run", str(artifact), "--prompt", "hello",
                                       "--max-new-tokens", "4", "--reference-partitions"])
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(main, ["inspect", str(artifact)]).output
    assert "partitions (matmul x" in shown and "NEUWARE_HOME is not set" in shown
    refused = CliRunner().invoke(main, ["run", str(artifact), "--prompt", "hello"])
    assert refused.exit_code != 0 and "NEUWARE_HOME" in refused.output
    assert "Traceback" not in refused.output
