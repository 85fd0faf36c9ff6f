"""A bfloat16 artifact must be at least as faithful to HF float32 as HF's own bfloat16 is."""

from __future__ import annotations

import numpy as np
from conftest import WIDER_CONFIG, assert_as_faithful_as_hf_16bit

import qwen3c
from qwen3c.reference import HFReference


def test_bfloat16_artifact_is_as_close_to_float32_as_hf_bfloat16(make_checkpoint, make_artifact):
    checkpoint = make_checkpoint("bf16", **WIDER_CONFIG)
    model = qwen3c.load(make_artifact(checkpoint, dtype="bfloat16"))
    ids = np.random.default_rng(5).integers(0, model.vocab_size, 64).tolist()
    exact = HFReference(checkpoint, "float32").logits(ids)
    assert_as_faithful_as_hf_16bit(model.logits(ids), exact,
                                   HFReference(checkpoint, "bfloat16").logits(ids),
                                   top1_slack=0.01)
