"""Batching, sampling and stopping behaviour of the runtime."""

from __future__ import annotations

import numpy as np
import pytest

import qwen3c
from qwen3c.runtime.sampling import Sampler, SamplingParams


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, vocab, n).tolist() for n in (5, 23, 11)]


def test_ragged_batch_equals_each_prompt_alone(tiny_model):
    batch = tiny_model.generate_batch(prompts(tiny_model.vocab_size), max_new_tokens=16)
    alone = [tiny_model.generate(p, max_new_tokens=16) for p in prompts(tiny_model.vocab_size)]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert all(len(r.token_ids) == 16 for r in batch)


def test_batch_prefill_spanning_chunks(make_checkpoint, make_artifact, tiny_model):
    """With a 16-token prefill chunk the three prompts share and split chunks."""
    small_chunks = qwen3c.load(make_artifact(make_checkpoint("tiny"), prefill_chunk_size=16))
    ours = small_chunks.generate_batch(prompts(tiny_model.vocab_size), max_new_tokens=8)
    reference = tiny_model.generate_batch(prompts(tiny_model.vocab_size), max_new_tokens=8)
    assert [r.token_ids for r in ours] == [r.token_ids for r in reference]


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_model):
    ids = prompts(tiny_model.vocab_size)[1]

    def sample(seed: int) -> list[int]:
        return tiny_model.generate(ids, max_new_tokens=24, temperature=1.0, top_p=0.95,
                                   top_k=100, seed=seed).token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_top_k_one_is_greedy(tiny_model):
    ids = prompts(tiny_model.vocab_size)[0]
    greedy = tiny_model.generate(ids, max_new_tokens=12)
    sampled = tiny_model.generate(ids, max_new_tokens=12, temperature=0.8, top_k=1, seed=3)
    assert sampled.token_ids == greedy.token_ids


def test_sampler_follows_the_softmax_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    counts = np.bincount([sampler(logits) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.015)


def test_top_p_keeps_the_smallest_head_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0))
    counts = np.bincount([sampler(logits) for _ in range(5000)], minlength=4) / 5000
    assert counts[2] == counts[3] == 0
    np.testing.assert_allclose(counts[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)


def test_stop_string_cuts_the_text(tiny_model):
    free = tiny_model.generate("def load(path):", max_new_tokens=24)
    assert len(free.text) > 4
    stop = free.text[2:4]
    cut = tiny_model.generate("def load(path):", max_new_tokens=24, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]


def test_end_of_sequence_stops_unless_ignored(tiny_model, monkeypatch):
    """A first greedy token that is an end-of-sequence token ends generation with no tokens and
    empty text; ``ignore_eos`` generates past it, the same tokens as when it is not special."""
    prompt = prompts(tiny_model.vocab_size)[1]
    plain = tiny_model.generate(prompt, max_new_tokens=6)
    monkeypatch.setattr(tiny_model, "eos_token_ids", frozenset({plain.token_ids[0]}))
    stopped = tiny_model.generate(prompt, max_new_tokens=6)
    assert (stopped.token_ids, stopped.text, stopped.finish_reason) == ([], "", "stop")
    ignored = tiny_model.generate(prompt, max_new_tokens=6, ignore_eos=True)
    assert ignored.token_ids == plain.token_ids and ignored.finish_reason == "length"


def test_generation_stops_at_the_context_length(make_checkpoint, make_artifact):
    model = qwen3c.load(make_artifact(make_checkpoint("tiny"), context_length=32))
    result = model.generate(list(range(1, 29)), max_new_tokens=50)
    assert result.finish_reason == "length"
    assert len(result.prompt_ids) + len(result.token_ids) == 33  # last token needs no slot


@pytest.mark.parametrize("options", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2},
                                     {"max_new_tokens": 0}])
def test_invalid_sampling_options_are_refused(tiny_model, options):
    with pytest.raises(qwen3c.RequestError):
        tiny_model.generate([1, 2, 3], **options)


def test_penalties_follow_their_definitions():
    logits = np.array([2.0, 1.0, -1.0, 0.5])
    prompt, output = [0], [2, 2, 3]
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5,
                            frequency_penalty=0.25)
    penalised = Sampler(params)._penalised(logits.copy(), prompt, output)
    expected = logits.copy()
    expected[0] /= 2.0  # seen in the prompt, positive: divided
    expected[2] *= 2.0  # seen in the output, negative: multiplied
    expected[3] /= 2.0
    expected[2] -= 0.5 + 0.25 * 2  # present, twice
    expected[3] -= 0.5 + 0.25 * 1
    np.testing.assert_allclose(penalised, expected)


def test_min_p_drops_unlikely_tokens():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(SamplingParams(temperature=1.0, min_p=0.5, seed=0))
    counts = np.bincount([sampler(logits) for _ in range(4000)], minlength=4) / 4000
    assert counts[2] == counts[3] == 0  # below 0.5 * 0.5
    np.testing.assert_allclose(counts[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)


def test_strip_thinking_from_history_only_for_assistant_turns():
    from qwen3c.runtime.chat import strip_thinking

    messages = [{"role": "user", "content": "<think>keep</think> q"},
                {"role": "assistant", "content": "<think>\nreasoning\n</think>\n\nanswer"}]
    assert strip_thinking(messages) == [messages[0], {"role": "assistant", "content": "answer"}]
