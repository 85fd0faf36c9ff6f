"""A bfloat16 artifact must be at least as faithful to HF float32 as HF's own bfloat16 is."""

from __future__ import annotations

import numpy as np

import qwen3c
from qwen3c.reference import HFReference

WIDER = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=2, head_dim=32)


def test_bfloat16_artifact_is_as_close_to_float32_as_hf_bfloat16(make_checkpoint, make_artifact):
    checkpoint = make_checkpoint("bf16", **WIDER)
    model = qwen3c.load(make_artifact(checkpoint, dtype="bfloat16"))
    ids = np.random.default_rng(5).integers(0, model.vocab_size, 64).tolist()

    exact = HFReference(checkpoint, "float32").logits(ids)
    hf_bf16 = HFReference(checkpoint, "bfloat16").logits(ids)
    ours = model.logits(ids)

    def top1_agreement(logits: np.ndarray) -> float:
        return float(np.mean(logits.argmax(-1) == exact.argmax(-1)))

    ours_error, hf_error = np.abs(ours - exact).max(), np.abs(hf_bf16 - exact).max()
    assert top1_agreement(ours) >= top1_agreement(hf_bf16) - 0.01
    assert ours_error <= 1.5 * hf_error, (ours_error, hf_error)
    assert ours_error > 0  # the artifact really computed in 16-bit
