"""cuda artifacts on a real NVIDIA GPU against HF transformers. Skipped where there is no GPU
(CI has none; these ran on an H100 lent to one session: see README, "cuda")."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import WIDER_CONFIG, assert_as_faithful_as_hf_16bit

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


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_16bit_is_as_close_to_float32_as_hf_on_the_gpu(dtype, make_checkpoint,
                                                            make_artifact):
    checkpoint = make_checkpoint("gpu-wide", **WIDER_CONFIG)
    model = qwen3c.load(make_artifact(checkpoint, dtype=dtype, target="cuda", arch=gpu_arch()))
    ids = np.random.default_rng(5).integers(0, model.vocab_size, 64).tolist()
    # Near-ties flip either way on a GPU (other summation orders than HF's kernels): the
    # helper bounds the errors, not top-1 agreement.
    exact = HFReference(checkpoint, "float32").logits(ids)
    assert_as_faithful_as_hf_16bit(model.logits(ids), exact,
                                   HFReference(checkpoint, dtype, device="cuda").logits(ids))
