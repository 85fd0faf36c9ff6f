"""Bad input gets a qwen3c error type and, on the CLI, one line and a non-zero exit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import qwen3c
from qwen3c.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "qwen3c.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]


@pytest.fixture
def broken_checkpoint(tiny_checkpoint, tmp_path) -> Path:
    copy = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, copy)
    return copy


def test_missing_config(broken_checkpoint, tmp_path):
    (broken_checkpoint / "config.json").unlink()
    with pytest.raises(qwen3c.ConfigError, match=r"config\.json"):
        qwen3c.compile_model(broken_checkpoint, output=tmp_path / "out")
    assert_one_line_error(run_cli("compile", broken_checkpoint, "-o", tmp_path / "out"),
                          "config.json")


def test_wrong_path(tmp_path):
    assert_one_line_error(run_cli("compile", tmp_path / "nowhere", "-o", tmp_path / "out"),
                          "not a directory")
    assert_one_line_error(run_cli("run", tmp_path / "nowhere" / "model.so", "--prompt", "x"),
                          "not a qwen3c artifact")


@pytest.mark.parametrize("change, fragment", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "unsupported architecture"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
    ({"use_sliding_window": True, "sliding_window": 64}, "sliding-window"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4, "num_experts_per_tok": 8,
      "moe_intermediate_size": 8}, "num_experts_per_tok"),
    ({"architectures": ["Qwen3MoeForCausalLM"], "num_experts_per_tok": 2,
      "moe_intermediate_size": 8}, "num_experts"),
])
def test_unsupported_config(broken_checkpoint, tmp_path, change, fragment):
    config_file = broken_checkpoint / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(qwen3c.ConfigError, match=fragment):
        qwen3c.compile_model(broken_checkpoint, output=tmp_path / "out")


def test_truncated_safetensors(broken_checkpoint, tmp_path):
    weights = broken_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(qwen3c.CheckpointError, match="truncated or corrupt"):
        qwen3c.compile_model(broken_checkpoint, output=tmp_path / "out")
    assert_one_line_error(run_cli("compile", broken_checkpoint, "-o", tmp_path / "out"),
                          "truncated or corrupt")


def test_dense_weights_under_a_moe_config(broken_checkpoint, tmp_path):
    config_file = broken_checkpoint / "config.json"
    config_file.write_text(json.dumps({
        **json.loads(config_file.read_text()), "architectures": ["Qwen3MoeForCausalLM"],
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8}))
    with pytest.raises(qwen3c.CheckpointError, match="lacks"):
        qwen3c.compile_model(broken_checkpoint, output=tmp_path / "out")


def test_checkpoint_that_does_not_match_config(broken_checkpoint, tmp_path):
    config_file = broken_checkpoint / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "intermediate_size": 96}))
    with pytest.raises(qwen3c.CheckpointError, match="shape"):
        qwen3c.compile_model(broken_checkpoint, output=tmp_path / "out")


@pytest.fixture
def artifact_copy(make_artifact, tiny_checkpoint, tmp_path) -> Path:
    copy = tmp_path / "artifact"
    shutil.copytree(make_artifact(tiny_checkpoint), copy)
    return copy


def test_tampered_weight_file(artifact_copy):
    weights = next(artifact_copy.glob("weights-*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(qwen3c.ArtifactError, match="sha256"):
        qwen3c.load(artifact_copy)
    assert_one_line_error(run_cli("run", artifact_copy / "model.so", "--prompt", "x"), "sha256")


@pytest.mark.parametrize("field, value, fragment", [
    ("tvm_version", "0.19.0", "TVM 0.19.0"),
    ("target", {"name": "llvm", "arch": "aarch64", "cpu": "generic"}, "aarch64"),
    ("target", {"name": "llvm", "arch": "x86_64", "cpu": "a-cpu-that-is-not-here"},
     "a-cpu-that-is-not-here"),
    ("target", {"name": "llvm", "arch": "x86_64", "cpu": "generic",
                "features": ["a-feature-not-here"]}, "lacks: a-feature-not-here"),
])
def test_artifact_for_another_tvm_or_target(artifact_copy, field, value, fragment):
    manifest_file = artifact_copy / "manifest.json"
    manifest_file.write_text(json.dumps({**json.loads(manifest_file.read_text()),
                                         field: value}))
    with pytest.raises(qwen3c.ArtifactError, match=fragment):
        qwen3c.load(artifact_copy)


def test_prompt_longer_than_context(make_artifact, tiny_checkpoint, tmp_path):
    artifact = make_artifact(tiny_checkpoint, context_length=32)
    model = qwen3c.load(artifact)
    with pytest.raises(qwen3c.RequestError, match="context length 32"):
        model.generate(list(range(40)))
    with pytest.raises(qwen3c.RequestError, match="context length 32"):
        model.logits(list(range(40)))
    assert_one_line_error(run_cli("run", artifact, "--prompt", "word " * 80), "context length")
    assert len(model.generate(list(range(8)), max_new_tokens=4).token_ids) == 4  # still usable


def test_token_ids_outside_the_vocabulary(tiny_model):
    with pytest.raises(qwen3c.RequestError, match="outside the vocabulary"):
        tiny_model.logits([1, tiny_model.vocab_size])


def test_full_kv_cache_is_refused_and_the_cache_stays_usable(make_artifact, tiny_checkpoint):
    model = qwen3c.load(make_artifact(tiny_checkpoint, context_length=64), kv_cache_tokens=64)
    with pytest.raises(qwen3c.RequestError, match="KV cache is full"):
        model.generate_batch([list(range(1, 40))] * 3, max_new_tokens=8)
    assert model.kv_cache.lengths == {}
    assert len(model.generate(list(range(1, 40)), max_new_tokens=8).token_ids) == 8


def test_unknown_target_and_arch(tiny_checkpoint, tmp_path):
    with pytest.raises(qwen3c.TargetError, match="unknown target"):
        qwen3c.compile_model(tiny_checkpoint, target="tpu", output=tmp_path / "out")
    with pytest.raises(qwen3c.TargetError, match="unsupported arch"):
        qwen3c.compile_model(tiny_checkpoint, arch="riscv64", output=tmp_path / "out")


def test_cli_group_prints_errors_without_traceback_in_process(tmp_path):
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: ")
