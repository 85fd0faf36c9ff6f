"""Tensor and expert parallelism on CPU workers (TVM disco + MPI) against the unsharded model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import openai
import pytest
from click.testing import CliRunner
from conftest import live_server

import qwen3c
from qwen3c.cli import main
from qwen3c.compile.sharding import ShardSpec
from qwen3c.errors import ConfigError, TargetError, WorkerError
from qwen3c.runtime.artifact import read_manifest

PROMPT = [5, 17, 230, 4, 99, 310, 42, 7, 120, 64, 8, 311, 2, 45, 97, 501, 33, 12, 250, 3]
# Four kv heads, so the model can be cut four ways.
MHA = dict(num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture(scope="module")
def dense(make_checkpoint):
    return make_checkpoint("parallel-dense", **MHA)


@pytest.fixture(scope="module")
def moe(make_checkpoint):
    return make_checkpoint("parallel-moe", moe=True)


def assert_same_model(make_artifact, checkpoint, **parallel):
    """Logits within 1e-5 of the largest (float32) and identical greedy tokens."""
    with qwen3c.load(make_artifact(checkpoint)) as whole:
        expected_logits = whole.logits(PROMPT)
        expected_tokens = whole.generate(PROMPT, max_new_tokens=24).token_ids
    with qwen3c.load(make_artifact(checkpoint, **parallel)) as sharded:
        logits = sharded.logits(PROMPT)
        tokens = sharded.generate(PROMPT, max_new_tokens=24).token_ids
    scale = np.abs(expected_logits).max()
    np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=1e-5 * scale)
    assert tokens == expected_tokens


@pytest.mark.parametrize("shards", [2, 4])
def test_tensor_parallel_dense_equals_unsharded(make_artifact, dense, shards):
    assert_same_model(make_artifact, dense, tensor_parallel=shards)


@pytest.mark.parametrize("vocab_size", [600, 613])  # lm_head cut by rows / whole (613 is odd)
def test_tensor_parallel_untied_head_equals_unsharded(make_checkpoint, make_artifact,
                                                      vocab_size):
    checkpoint = make_checkpoint(f"parallel-untied-{vocab_size}", tie_word_embeddings=False,
                                 vocab_size=vocab_size)
    assert_same_model(make_artifact, checkpoint, tensor_parallel=2)


def test_tensor_parallel_bfloat16_equals_unsharded(make_artifact, dense):
    """bfloat16 shards, whose prefill projections run on AMX tiles where the CPU has them
    (schedules/amx_gemm.py): every worker process asks Linux for the tile registers, or dies
    of SIGILL at the first prefill. The shards sum their float32 partial sums in another
    order than the whole model, so outputs rounded to bfloat16 differ in the last bit."""
    with qwen3c.load(make_artifact(dense, dtype="bfloat16")) as whole:
        expected = whole.logits(PROMPT)
    with qwen3c.load(make_artifact(dense, dtype="bfloat16", tensor_parallel=2)) as sharded:
        logits = sharded.logits(PROMPT)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=2e-2 * scale)
    assert np.mean(logits.argmax(-1) == expected.argmax(-1)) >= 0.9


def test_tensor_parallel_moe_equals_unsharded(make_artifact, moe):
    assert_same_model(make_artifact, moe, tensor_parallel=2)


def test_expert_parallel_equals_unsharded_with_the_same_router_stats(make_artifact, moe):
    assert_same_model(make_artifact, moe, tensor_parallel=2, expert_parallel=True)
    stats = []
    for options in ({}, {"tensor_parallel": 2, "expert_parallel": True}):
        with qwen3c.load(make_artifact(moe, **options)) as model:
            model.enable_router_stats()
            model.generate(PROMPT, max_new_tokens=8)
            stats.append(model.router_stats())
    whole, sharded = stats
    assert [s.layer for s in sharded] == [s.layer for s in whole]
    for a, b in zip(whole, sharded, strict=True):
        assert a.tokens == b.tokens
        np.testing.assert_array_equal(a.counts, b.counts)
        np.testing.assert_allclose(a.weight_sums, b.weight_sums, rtol=1e-5)
        np.testing.assert_allclose(a.prob_sums, b.prob_sums, rtol=1e-5)


def test_batched_generation_on_shards_equals_each_prompt_alone(make_artifact, dense):
    prompts = [PROMPT, PROMPT[:7], PROMPT[3:15]]
    with qwen3c.load(make_artifact(dense, tensor_parallel=2)) as model:
        batch = [r.token_ids for r in model.generate_batch(prompts, max_new_tokens=12)]
        alone = [model.generate(p, max_new_tokens=12).token_ids for p in prompts]
    assert batch == alone


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (workers run behind mpiexec and its proxy)."""
    children = set()
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:  # ended while we looked
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children |= {int(entry)} | descendants(int(entry))
    return children


def test_a_dead_worker_stops_all_workers_with_a_clear_error(make_artifact, dense):
    before = descendants(os.getpid())
    model = qwen3c.load(make_artifact(dense, tensor_parallel=4))
    pids = model.executor.worker_pids()
    assert len(pids) == 3  # worker 0 is a thread of this process
    model.generate(PROMPT, max_new_tokens=4)
    killer = threading.Timer(0.3, os.kill, (pids[1], signal.SIGKILL))
    killer.start()
    with pytest.raises(WorkerError, match=r"worker 2 (exited|process \d+ is gone)"):
        for _ in range(1000):  # generation is under way when the worker dies
            model.generate(PROMPT, max_new_tokens=64)
    killer.join()
    assert descendants(os.getpid()) == before  # workers, launchers: all stopped and reaped
    for pid in pids:  # and none escaped as an orphan
        assert not os.path.exists(f"/proc/{pid}")
    with pytest.raises(WorkerError, match="load the model again"):
        model.generate(PROMPT, max_new_tokens=4)


def test_impossible_splits_are_refused(make_checkpoint, dense, moe, tmp_path):
    with pytest.raises(ConfigError, match="num_attention_heads = 4 is not divisible by 3"):
        qwen3c.compile_model(dense, output=tmp_path / "a", tensor_parallel=3)
    with pytest.raises(ConfigError, match="num_key_value_heads = 2 is not divisible by 4"):
        qwen3c.compile_model(moe, output=tmp_path / "b", tensor_parallel=4)
    odd_experts = make_checkpoint("parallel-moe-6", moe=True, num_experts=6, **MHA)
    with pytest.raises(ConfigError, match="num_experts = 6 is not divisible by 4"):
        qwen3c.compile_model(odd_experts, output=tmp_path / "c", tensor_parallel=4,
                             expert_parallel=True)
    with pytest.raises(ConfigError, match="needs a Qwen3-MoE model"):
        qwen3c.compile_model(dense, output=tmp_path / "d", tensor_parallel=2,
                             expert_parallel=True)


def test_devices_must_match_the_artifact(make_artifact, dense):
    sharded = make_artifact(dense, tensor_parallel=2)
    with pytest.raises(TargetError, match="compiled for 2 device"):
        qwen3c.load(sharded, devices="cpu:0")
    with pytest.raises(TargetError, match="expected cpu:INDEX"):
        qwen3c.load(sharded, devices="cuda:0,cuda:1")
    with pytest.raises(TargetError, match="names a device twice"):
        qwen3c.load(sharded, devices="cpu:0,cpu:0")
    with pytest.raises(TargetError, match="--tensor-parallel 2"):
        qwen3c.load(make_artifact(dense), devices="cpu:0,cpu:1")


def test_fused_parameters_are_cut_part_by_part():
    """qkv [q; k; v] over 2 shards: shard r holds [q_r; k_r; v_r]."""
    q, k, v = (np.full((4, 3), fill) for fill in (1.0, 2.0, 3.0))
    q[2:], k[2:], v[2:] = 10, 20, 30  # the second half of each part goes to shard 1
    shards = ShardSpec(0, (2, 2, 2)).split(np.concatenate([q, k, v]), 2)
    np.testing.assert_array_equal(shards[0][:, 0], [1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(shards[1][:, 0], [10, 10, 20, 20, 30, 30])
    columns = ShardSpec(1).split(np.arange(12).reshape(2, 6), 3)
    np.testing.assert_array_equal(columns[2], [[4, 5], [10, 11]])


def test_cli_compiles_inspects_runs_and_serves_a_sharded_model(dense, make_artifact, tmp_path):
    out = tmp_path / "tp2"
    compiled = CliRunner().invoke(main, ["compile", str(dense), "--dtype", "float32",
                                         "--tensor-parallel", "2", "-o", str(out)])
    assert compiled.exit_code == 0 and "2 shards" in compiled.output, compiled.output
    shown = CliRunner().invoke(main, ["inspect", str(out)]).output
    assert "shards: 2" in shown
    assert re.search(r"qkv_proj\.weight +\[384, 64\] cut on axis 0 in parts \[64, 64, 64\] "
                     r"-> \[192, 64\] per shard", shown)

    with qwen3c.load(make_artifact(dense)) as whole:
        expected = whole.generate(PROMPT, max_new_tokens=8).token_ids
    ran = subprocess.run([sys.executable, "-m", "qwen3c.cli", "run", str(out), "--devices",
                          "cpu:0,cpu:1", "--prompt", "def run(", "--max-new-tokens", "6"],
                         capture_output=True, text=True, timeout=300)
    with qwen3c.load(make_artifact(dense)) as whole:
        assert ran.stdout == whole.generate("def run(", max_new_tokens=6).text + "\n"

    with live_server(out, "--devices", "cpu:0,cpu:1") as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        completion = client.completions.create(model="qwen3c", prompt=PROMPT, max_tokens=8,
                                               temperature=0, logprobs=1)
        assert completion.choices[0].logprobs.tokens is not None
        served = completion.choices[0].text
    with qwen3c.load(make_artifact(dense)) as whole:
        assert served == whole.tokenizer.decode(expected)

    refused = CliRunner().invoke(main, ["run", str(out), "--devices", "cpu:0", "--prompt", "x"])
    assert refused.exit_code == 1
    assert refused.output.startswith("error: this artifact was compiled for 2 device(s)")


def test_cuda_sharded_artifact_builds_with_disco_collectives(dense, tmp_path):
    """Compile-only (no GPU here): the per-shard library calls disco's collectives."""
    out = qwen3c.compile_model(dense, target="cuda", arch="sm_90", dtype="float16",
                               output=tmp_path / "cuda-tp2", tensor_parallel=2)
    _, manifest = read_manifest(out)
    assert (manifest.target.name, manifest.parallel.shards) == ("cuda", 2)
    assert len(manifest.weight_files) == 2
    library = (out / "model.so").read_bytes()
    assert b"runtime.disco.allreduce" in library and b"runtime.disco.allgather" in library
