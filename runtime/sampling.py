"""Token sampling on float32 logits in numpy: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import dataclasses

import numpy as np

from qwen3c.errors import RequestError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Greedy when ``temperature`` is 0; otherwise reproducible for a given ``seed``."""

    temperature: float = 0.0
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    """Draws tokens for one sequence; owns that sequence's random stream."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.temperature == 0:
            return int(np.argmax(logits))
        candidates, probs = self._distribution(logits.astype(np.float64))
        return int(candidates[self._rng.choice(len(candidates), p=probs)])

    def _distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate token ids and their renormalised probabilities after top-k and top-p."""
        order = np.argsort(-logits, kind="stable")
        if self.params.top_k:
            order = order[: self.params.top_k]
        scaled = logits[order] / self.params.temperature
        probs = np.exp(scaled - scaled[0])
        probs /= probs.sum()
        if self.params.top_p < 1:
            # Keep the smallest head whose mass reaches top_p: each token whose predecessors'
            # mass is still below it (always the first).
            keep = int(np.count_nonzero(np.cumsum(probs) - probs < self.params.top_p))
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return order, probs
