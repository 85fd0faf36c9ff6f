"""``qwen3c bench-serve``: a bounded load generator for a running ``qwen3c serve``.

Each of ``concurrency`` clients sends its requests one after another as streaming
completions of random token ids; time to first token is measured at the first streamed chunk.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import time

import httpx
import numpy as np


@dataclasses.dataclass(frozen=True)
class LoadResult:
    concurrency: int
    requests: int
    completion_tokens: int
    seconds: float
    ttft_p50_ms: float
    ttft_p99_ms: float

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds


def run_load(url: str, *, concurrency: int, requests_per_client: int, prompt_tokens: int,
             max_tokens: int, model: str = "qwen3c", api_key: str | None = None,
             vocab: int = 1000, timeout: float = 600.0) -> LoadResult:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, prompt_tokens).tolist()
               for _ in range(concurrency * requests_per_client)]

    def one(prompt: list[int]) -> tuple[float, int]:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "temperature": 0, "stream_options": {"include_usage": True}}
        started, first, tokens = time.perf_counter(), None, 0
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers,
                          timeout=timeout) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                first = first or time.perf_counter()
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
        return (first or time.perf_counter()) - started, tokens

    def client(index: int) -> list[tuple[float, int]]:
        mine = prompts[index * requests_per_client:(index + 1) * requests_per_client]
        return [one(p) for p in mine]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = [r for rs in pool.map(client, range(concurrency), timeout=timeout)
                   for r in rs]
    seconds = time.perf_counter() - started
    ttfts = np.array([t for t, _ in results]) * 1e3
    return LoadResult(concurrency, len(results), sum(n for _, n in results), seconds,
                      float(np.percentile(ttfts, 50)), float(np.percentile(ttfts, 99)))
