"""Shared fixtures: tiny seeded random Qwen3 checkpoints built with HF transformers, and their
compiled artifacts (compiled once per session and configuration)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tvm
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import qwen3c
from qwen3c.compile.random_checkpoint import train_tokenizer, write_tokenizer
from qwen3c.schedules import amx_gemm
from qwen3c.targets import get_target
from qwen3c.targets.llvm import request_tile_data

# Small but not degenerate: several heads per kv head, head_dim != hidden / heads, two layers.
BASE_CONFIG = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
                   tie_word_embeddings=True, initializer_range=0.1)
MOE_CONFIG = dict(BASE_CONFIG, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=48, norm_topk_prob=True)
# Wide enough that 16-bit rounding shows in the logits.
WIDER_CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=32)


def host_target() -> tvm.target.Target:
    """The llvm target qwen3c compiles for on this host."""
    backend = get_target("llvm")
    return backend.tvm_target(backend.resolve(None, None))


@pytest.fixture(scope="session", autouse=True)
def tile_registers() -> None:
    """Kernel tests run AMX kernels outside the runtime, which asks for the tile registers
    itself (tested in a fresh process by test_bfloat16.py); without them the first tile
    instruction kills the process."""
    if amx_gemm.has_tiles(host_target()):
        request_tile_data()


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(train_tokenizer(), directory)
    return directory


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer_files):
    """make_checkpoint(name, moe=False, **config overrides) -> a HF checkpoint directory
    (cached by name)."""
    made: dict[str, Path] = {}

    def make(name: str, *, moe: bool = False, seed: int = 0, max_shard_size: str | None = None,
             **overrides) -> Path:
        if name not in made:
            directory = tmp_path_factory.mktemp(f"hf-{name}")
            config_class, model_class, base = (
                (Qwen3MoeConfig, Qwen3MoeForCausalLM, MOE_CONFIG) if moe
                else (Qwen3Config, Qwen3ForCausalLM, BASE_CONFIG))
            config = config_class(**{**base, "vocab_size": 600, **overrides})
            torch.manual_seed(seed)
            model = model_class(config).eval()
            kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
            model.save_pretrained(directory, **kwargs)
            for file in tokenizer_files.iterdir():
                shutil.copy2(file, directory / file.name)
            made[name] = directory
        return made[name]

    return make


@pytest.fixture(scope="session")
def make_artifact(tmp_path_factory):
    """make_artifact(checkpoint, dtype=..., target=..., **compile options) -> artifact dir
    (cached)."""
    made: dict[tuple, Path] = {}

    def make(checkpoint: Path, dtype: str = "float32", target: str = "llvm",
             **options) -> Path:
        key = (checkpoint, dtype, target, tuple(sorted(options.items())))
        if key not in made:
            output = tmp_path_factory.mktemp(f"artifact-{checkpoint.name}-{target}-{dtype}")
            made[key] = qwen3c.compile_model(checkpoint, target=target, dtype=dtype,
                                             output=output, **options)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint) -> Path:
    return make_checkpoint("tiny")


@pytest.fixture(scope="session")
def tiny_model(make_artifact, tiny_checkpoint) -> qwen3c.runtime.Model:
    return qwen3c.load(make_artifact(tiny_checkpoint))


def assert_as_faithful_as_hf_16bit(ours: np.ndarray, exact: np.ndarray,
                                   hf_16bit: np.ndarray) -> None:
    """A 16-bit artifact's logits (``ours``) against HF float32 (``exact``) must be at least as
    good as HF's own 16-bit ones: mean error no larger than HF's, largest error within 1.5x of
    HF's; and not exact, or it did not compute in 16-bit. Not top-1 agreement: a random
    model's logits hold near ties, and over 64 or 256 positions HF's bfloat16 and ours (either
    attention kernel) each missed 1-5 more or fewer of float32's top tokens than the other,
    from one prompt to the next, while our mean error stayed 4-12 % under HF's."""
    ours_error, hf_error = np.abs(ours - exact), np.abs(hf_16bit - exact)
    assert ours_error.mean() <= hf_error.mean(), (ours_error.mean(), hf_error.mean())
    assert ours_error.max() <= 1.5 * hf_error.max(), (ours_error.max(), hf_error.max())
    assert ours_error.max() > 0


@contextlib.contextmanager
def live_server(artifact: Path, *options: str) -> Iterator[str]:
    """``qwen3c serve ARTIFACT OPTIONS`` in a subprocess on a free port; yields its base URL
    once /health answers, and stops it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "qwen3c.cli", "serve", str(artifact), "--port", str(port),
         *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
        if process.poll() is not None:
            pytest.fail(f"server exited: {process.stderr.read()}")
    else:
        process.kill()
        pytest.fail("server did not answer /health in 120 s")
    try:
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
