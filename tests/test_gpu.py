"""cuda artifacts on a real NVIDIA GPU against HF transformers. Skipped where there is no GPU
(every machine this project has run on so far: these tests have never run)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

import qwen3c
from qwen3c.reference import HFReference

pytestmark = pytest.mark.skipif(not tvm.cuda(0).exist, reason="needs an NVIDIA GPU")


def gpu_arch() -> str:
    major = tvm.cuda(0).compute_version.split(".")[0]
    return "sm_90" if int(major) >= 9 else "sm_80"


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_cuda_logits_and_greedy_tokens_match_hf(moe, make_checkpoint, make_artifact):
    checkpoint = make_checkpoint("moe" if moe else "tiny", moe=moe)
    model = qwen3c.load(make_artifact(checkpoint, target="cuda", arch=gpu_arch()))
    hf = HFReference(checkpoint)
    ids = np.random.default_rng(5).integers(0, model.vocab_size, 24).tolist()
    ours, reference = model.logits(ids), hf.logits(ids)
    assert np.abs(ours - reference).max() <= 1e-3 * np.abs(reference).max()
    generated = model.generate(ids[:8], max_new_tokens=16, stop=None).token_ids
    assert generated == hf.greedy(ids[:8], len(generated))
