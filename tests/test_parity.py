"""Compiled Qwen3 logits and greedy tokens against HF transformers in float32."""

from __future__ import annotations

import numpy as np
import pytest

import qwen3c
from qwen3c.reference import HFReference

PROMPT_LEN = 40

VARIANTS = {
    "tied": {},
    "untied": {"tie_word_embeddings": False},
    "mqa-odd-vocab": {"num_key_value_heads": 1, "vocab_size": 613},
    "mha-wide-head": {"num_key_value_heads": 4, "head_dim": 48, "attention_bias": True},
}


def prompt(vocab: int, length: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, length).tolist()


def assert_close_to_hf(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    error = np.abs(ours - reference).max()
    assert error <= 1e-4 * np.abs(reference).max(), f"max |Δlogit| {error}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_hf_at_every_position(variant, make_checkpoint, make_artifact):
    checkpoint = make_checkpoint(variant, **VARIANTS[variant])
    model = qwen3c.load(make_artifact(checkpoint))
    ids = prompt(model.vocab_size, PROMPT_LEN)
    assert_close_to_hf(model.logits(ids), HFReference(checkpoint).logits(ids))


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_greedy_tokens_match_hf_generate(variant, make_checkpoint, make_artifact):
    checkpoint = make_checkpoint(variant, **VARIANTS[variant])
    model = qwen3c.load(make_artifact(checkpoint))
    ids = prompt(model.vocab_size, 12, seed=2)
    ours = model.generate(ids, max_new_tokens=32, stop=None)
    # The tiny model has no trained stop token; compare the full 32 tokens unless HF stops too.
    assert ours.token_ids == HFReference(checkpoint).greedy(ids, len(ours.token_ids))
    assert len(ours.token_ids) == 32 or ours.finish_reason == "stop"


def test_prefill_split_over_chunks_matches_hf(make_checkpoint, make_artifact):
    """A prompt longer than the prefill chunk is fed in pieces; the cache must stitch them."""
    checkpoint = make_checkpoint("tied")
    model = qwen3c.load(make_artifact(checkpoint, prefill_chunk_size=16))
    ids = prompt(model.vocab_size, PROMPT_LEN, seed=3)
    assert_close_to_hf(model.logits(ids), HFReference(checkpoint).logits(ids))


def test_sharded_checkpoint_with_index(make_checkpoint, make_artifact):
    checkpoint = make_checkpoint("sharded", max_shard_size="100KB")
    assert (checkpoint / "model.safetensors.index.json").is_file()
    model = qwen3c.load(make_artifact(checkpoint))
    ids = prompt(model.vocab_size, PROMPT_LEN, seed=4)
    assert_close_to_hf(model.logits(ids), HFReference(checkpoint).logits(ids))
