"""Qwen3-MoE against HF transformers: logits, chosen experts, greedy tokens, router stats."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import host_target

import qwen3c
from qwen3c.reference import HFReference
from qwen3c.schedules import bf16_dot, bf16_packed, bf16_panel

VARIANTS = {
    "norm-topk": {"norm_topk_prob": True},
    "no-norm": {"norm_topk_prob": False},
    "sparse-step": {"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]},
    "top1": {"num_experts_per_tok": 1},
    "top4-untied": {"num_experts_per_tok": 4, "tie_word_embeddings": False},
}


def prompt(vocab: int, length: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, length).tolist()


def moe_model(variant: str, make_checkpoint, make_artifact, dtype: str = "float32"):
    checkpoint = make_checkpoint(f"moe-{variant}", moe=True, **VARIANTS[variant])
    return checkpoint, qwen3c.load(make_artifact(checkpoint, dtype=dtype))


def hf_router_choices(reference: HFReference, ids: list[int]) -> dict[int, np.ndarray]:
    """Expert ids [tokens, k] HF's router picks in each MoE layer (read by a forward hook)."""
    choices: dict[int, np.ndarray] = {}
    hooks = []
    for index, layer in enumerate(reference.model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if isinstance(gate, torch.nn.Module) and hasattr(layer.mlp, "experts"):
            hooks.append(gate.register_forward_hook(
                lambda _m, _i, out, index=index: choices.__setitem__(index, out[2].numpy())))
    reference.logits(ids)
    for hook in hooks:
        hook.remove()
    return choices


@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_logits_match_hf_at_every_position(variant, make_checkpoint, make_artifact):
    checkpoint, model = moe_model(variant, make_checkpoint, make_artifact)
    ids = prompt(model.vocab_size, 40)
    reference = HFReference(checkpoint).logits(ids)
    ours = model.logits(ids)
    assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()


@pytest.mark.parametrize("variant", ["top4-untied", "sparse-step"])
def test_chosen_experts_and_router_counts_match_hf(variant, make_checkpoint, make_artifact):
    checkpoint, model = moe_model(variant, make_checkpoint, make_artifact)
    ids = prompt(model.vocab_size, 24, seed=2)
    hf_choices = hf_router_choices(HFReference(checkpoint), ids)
    k, experts = model.config.num_experts_per_tok, model.config.num_experts
    assert sorted(hf_choices) == [i for i in range(model.config.num_hidden_layers)
                                  if model.config.is_moe_layer(i)]

    model.enable_router_stats()
    model.logits(ids)
    for stats in model.router_stats(reset=True):
        assert stats.tokens == len(ids)
        assert stats.counts.sum() == len(ids) * k
        hf_counts = np.bincount(hf_choices[stats.layer].reshape(-1), minlength=experts)
        np.testing.assert_array_equal(stats.counts, hf_counts)

    # Per token: the routing of token t is what scoring ids[:t+1] adds to ids[:t]'s counts.
    previous = {s.layer: s.counts for s in model.router_stats()}
    for t in range(len(ids)):
        model.logits(ids[: t + 1])
        for stats in model.router_stats(reset=True):
            added = stats.counts - previous.get(stats.layer, 0) * (t > 0)
            assert set(np.flatnonzero(added)) == set(hf_choices[stats.layer][t].tolist())
            previous[stats.layer] = stats.counts


def test_moe_greedy_tokens_match_hf(make_checkpoint, make_artifact):
    checkpoint, model = moe_model("norm-topk", make_checkpoint, make_artifact)
    ids = prompt(model.vocab_size, 12, seed=3)
    ours = model.generate(ids, max_new_tokens=32)
    assert len(ours.token_ids) == 32 or ours.finish_reason == "stop"
    assert ours.token_ids == HFReference(checkpoint).greedy(ids, len(ours.token_ids))


def test_moe_ragged_batch_equals_each_alone(make_checkpoint, make_artifact):
    _, model = moe_model("top4-untied", make_checkpoint, make_artifact)
    prompts = [prompt(model.vocab_size, n, seed=n) for n in (3, 17, 9)]
    batch = model.generate_batch(prompts, max_new_tokens=12)
    assert [r.token_ids for r in batch] == [model.generate(p, max_new_tokens=12).token_ids
                                            for p in prompts]


def test_router_stats_off_by_default_and_dense_models_refuse(make_checkpoint, make_artifact,
                                                            tiny_model):
    _, model = moe_model("norm-topk", make_checkpoint, make_artifact)
    with pytest.raises(qwen3c.RequestError, match="enable_router_stats"):
        model.router_stats()
    with pytest.raises(qwen3c.RequestError, match="Qwen3-MoE"):
        tiny_model.enable_router_stats()


# Experts whose sizes fit bfloat16 panels (schedules/bf16_panel.py: rows in 64s, gate and up
# paired), with a head of 10 panels, so that on AVX512-BF16 every weight but the embedding and
# the head (in 12 bits, bf16_packed.py) is stored in panels; on AMX the same sizes put the
# experts' prefills on tiles (amx_gemm.py).
PANEL_VARIANT = dict(VARIANTS["top4-untied"], moe_intermediate_size=64, vocab_size=640)


@pytest.mark.parametrize("variant", ["top4-untied", "top4-panels"])
def test_bfloat16_moe_against_hf_bfloat16(variant, make_checkpoint, make_artifact):
    """16-bit routing may legitimately pick other experts than float32 on near-ties, so the
    16-bit artifact is held to HF's own bfloat16 run."""
    config = PANEL_VARIANT if variant == "top4-panels" else VARIANTS[variant]
    checkpoint = make_checkpoint(f"moe-{variant}", moe=True, **config)
    artifact = make_artifact(checkpoint, dtype="bfloat16")
    if variant == "top4-panels" and bf16_dot.usable(host_target(), "bfloat16"):
        layouts = {p["name"]: p["layout"]
                   for p in json.loads((artifact / "manifest.json").read_text())["params"]}
        assert layouts["model.layers.0.mlp.experts.gate_up_proj"] == bf16_panel.PAIRED_LAYOUT
        assert layouts["model.layers.0.mlp.experts.down_proj"] == bf16_panel.LAYOUT
        assert layouts["lm_head.weight"] == bf16_packed.part_layout("values")
    model = qwen3c.load(artifact)
    ids = prompt(model.vocab_size, 64, seed=4)
    exact = HFReference(checkpoint, "float32").logits(ids)
    hf_bf16 = HFReference(checkpoint, "bfloat16").logits(ids)
    ours = model.logits(ids)

    def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean(a.argmax(-1) == b.argmax(-1)))

    assert top1_agreement(ours, hf_bf16) >= 0.95
    assert top1_agreement(ours, exact) >= top1_agreement(hf_bf16, exact) - 0.01
    ours_error, hf_error = np.abs(ours - exact).max(), np.abs(hf_bf16 - exact).max()
    assert 0 < ours_error <= 1.5 * hf_error, (ours_error, hf_error)
