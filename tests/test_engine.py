"""The continuous-batching engine under page pressure, with shared prefixes and cancellation."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import qwen3c
from qwen3c.runtime.engine import Engine, Request, RequestEvent
from qwen3c.runtime.sampling import SamplingParams


class Collector:
    """Gathers each request's events; ``wait`` returns once all have finished."""

    def __init__(self, count: int):
        self.tokens: dict[int, list[int]] = {i: [] for i in range(count)}
        self.finish: dict[int, RequestEvent] = {}
        self._done = threading.Event()

    def callback(self, index: int):
        def on_event(event: RequestEvent) -> None:
            self.tokens[index].extend(event.token_ids)
            if event.finish_reason:
                self.finish[index] = event
                if len(self.finish) == len(self.tokens):
                    self._done.set()
        return on_event

    def wait(self) -> None:
        assert self._done.wait(120), f"only {len(self.finish)} requests finished"


@pytest.fixture
def small_cache_engine(make_artifact, tiny_checkpoint):
    # 128 tokens of KV (9 pages) for 8 requests of ~40 tokens each: most must wait their turn.
    model = qwen3c.load(make_artifact(tiny_checkpoint), max_batch_size=4, kv_cache_tokens=128)
    engine = Engine(model, max_cached_prefixes=4)
    engine.start()
    yield engine
    engine.stop()


def test_requests_wait_for_pages_and_match_running_alone(small_cache_engine, tiny_model):
    rng = np.random.default_rng(0)
    shared = rng.integers(0, 600, 20).tolist()
    prompts = [shared + rng.integers(0, 600, n).tolist() for n in (3, 9, 1, 14, 5, 7, 2, 11)]
    collector = Collector(len(prompts))
    for i, prompt in enumerate(prompts):
        small_cache_engine.submit(Request(prompt, 12, SamplingParams(), collector.callback(i)))
    collector.wait()
    for i, prompt in enumerate(prompts):
        assert collector.finish[i].error is None
        assert collector.tokens[i] == tiny_model.generate(prompt, max_new_tokens=12).token_ids
    assert small_cache_engine.counters.reused_prefix_tokens > 0


def test_a_request_that_can_never_fit_is_refused(small_cache_engine):
    with pytest.raises(qwen3c.RequestError, match="KV pages"):
        small_cache_engine.submit(Request(list(range(1, 100)), 100, SamplingParams(),
                                          lambda event: None))


def test_cancel_frees_the_sequence(small_cache_engine):
    started = threading.Event()
    request = Request(list(range(1, 30)), 90, SamplingParams(temperature=1.0, seed=0),
                      lambda event: started.set())
    small_cache_engine.submit(request)
    assert started.wait(60)
    small_cache_engine.cancel(request.request_id)
    collector = Collector(1)
    small_cache_engine.submit(Request([5, 6, 7], 4, SamplingParams(), collector.callback(0)))
    collector.wait()
    assert small_cache_engine.running == 0
