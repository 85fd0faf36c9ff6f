"""A bfloat16 artifact must be at least as faithful to HF float32 as HF's own bfloat16 is."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import WIDER_CONFIG, assert_as_faithful_as_hf_16bit, host_target

import qwen3c
from qwen3c.cli import main
from qwen3c.reference import HFReference
from qwen3c.schedules import amx_gemm, bf16_dot, bf16_packed, bf16_panel


@pytest.mark.parametrize("chunk", [None, 16], ids=["one-chunk", "chunks-of-16"])
def test_bfloat16_artifact_is_as_close_to_float32_as_hf_bfloat16(chunk, make_checkpoint,
                                                                  make_artifact):
    """Also in chunks: the later ones attend to the earlier ones' keys in the cache's pages."""
    checkpoint = make_checkpoint("bf16", **WIDER_CONFIG)
    chunking = {"prefill_chunk_size": chunk} if chunk else {}
    model = qwen3c.load(make_artifact(checkpoint, dtype="bfloat16", **chunking))
    ids = np.random.default_rng(5).integers(0, model.vocab_size, 64).tolist()
    exact = HFReference(checkpoint, "float32").logits(ids)
    assert_as_faithful_as_hf_16bit(model.logits(ids), exact,
                                   HFReference(checkpoint, "bfloat16").logits(ids))


@pytest.mark.parametrize("tied", [False, True], ids=["untied-with-bias", "tied"])
@pytest.mark.parametrize("packed_weights", [True, False], ids=["packed", "panels"])
def test_bfloat16_projections_packed_or_on_panels_match_hf(tied, packed_weights,
                                                           make_checkpoint, make_artifact):
    """Where the CPU has bfloat16 dot products, the head and the projections' weights are
    stored in 12 bits (``schedules/bf16_packed.py``; a tied head is the embedding table,
    packed, which the token lookup then reads), or with ``packed_weights=False`` in panels
    (``schedules/bf16_panel.py``); a q/k/v bias is added to the float32 sums, and the head's
    logits are its float32 sums. Prompts of 32 tokens and more take the packed kernels'
    prefill path (each panel decoded once), shorter ones their tiles."""
    if not bf16_dot.usable(host_target(), "bfloat16"):
        pytest.skip("builds store bfloat16 panels only for CPUs in bf16_dot.PAYS_ON")
    checkpoint = make_checkpoint(f"bf16-{'tied' if tied else 'bias-untied'}", **WIDER_CONFIG,
                                 attention_bias=not tied, tie_word_embeddings=tied,
                                 vocab_size=640)  # 10 panels
    artifact = make_artifact(checkpoint, dtype="bfloat16", packed_weights=packed_weights)
    params = json.loads((artifact / "manifest.json").read_text())["params"]
    layouts = {p["name"]: p["layout"] for p in params}
    projections = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    on_panels = {name.split(".")[-2] for name, layout in layouts.items()
                 if layout == bf16_panel.LAYOUT}
    packed = {}  # role -> the names of the packed weights' parts
    for name, layout in layouts.items():
        if bf16_packed.part_role(layout):
            packed.setdefault(bf16_packed.part_role(layout), []).append(name)
    if not packed_weights:
        assert on_panels == projections | (set() if tied else {"lm_head"}) and not packed
        assert "model.embed_tokens.weight" in layouts
    else:
        assert not on_panels
        assert set(packed) == {"values", "table", "offsets", "at", "value"}
        assert {name.split(".")[-2] for name in packed["values"]} == projections | {"lm_head"}
        # tied: the packed head is the only table (tokens are looked up in it)
        assert ("model.embed_tokens.weight" in layouts) is not tied
        assert math.prod(next(p["shape"] for p in params if p["name"] == "lm_head.weight")) \
            == 640 * WIDER_CONFIG["hidden_size"] * 3 // 2  # 12 bits a weight
        shown = CliRunner().invoke(main, ["inspect", str(artifact)]).output
        assert f"{bf16_packed.part_layout('values')} x{len(packed['values'])}" in shown
    model = qwen3c.load(artifact)
    for length in (64, 20):
        ids = np.random.default_rng(length).integers(0, model.vocab_size, length).tolist()
        exact = HFReference(checkpoint, "float32").logits(ids)
        assert_as_faithful_as_hf_16bit(model.logits(ids), exact,
                                       HFReference(checkpoint, "bfloat16").logits(ids))


def test_prefill_on_amx_tiles_runs_in_a_fresh_process(make_checkpoint, make_artifact):
    """Where builds take AMX tiles, the runtime asks Linux for the tile registers before the
    first prefill (a process that did not ask dies of SIGILL there): ``qwen3c run`` in a new
    process gives the tokens this process gives."""
    if not amx_gemm.has_tiles(host_target()):
        pytest.skip("builds use AMX tiles only for CPUs with AMX-BF16")
    artifact = make_artifact(make_checkpoint("bf16", **WIDER_CONFIG), dtype="bfloat16")
    machine_code = subprocess.run(["objdump", "-d", str(artifact / "model.so")],
                                  capture_output=True, text=True, check=True).stdout
    assert "tdpbf16ps" in machine_code  # binutils comes with the C++ compiler builds link with
    prompt = "def fibonacci(n): return n if n < 2 else"  # several tokens: a tile prefill
    ran = subprocess.run([sys.executable, "-m", "qwen3c.cli", "run", str(artifact), "--prompt",
                          prompt, "--max-new-tokens", "5"], capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == qwen3c.load(artifact).generate(prompt, max_new_tokens=5).text + "\n"
