"""Token sampling on float32 logits in numpy: penalties, temperature, top-k, top-p, min-p."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from qwen3c.errors import RequestError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Greedy when ``temperature`` is 0; otherwise reproducible for a given ``seed``.

    Penalties follow vLLM/OpenAI: ``repetition_penalty`` (> 1 discourages) divides positive and
    multiplies negative logits of every token seen in the prompt or output;
    ``presence_penalty`` and ``frequency_penalty`` subtract once per token present, and per
    occurrence, in the output so far.
    """

    temperature: float = 0.0
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(f"{message}; got {self}")


class Sampler:
    """Draws tokens for one sequence; owns that sequence's random stream."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, prompt: list[int] | None = None,
                 output: list[int] | None = None) -> int:
        logits = self._penalised(logits, prompt or [], output or [])
        if self.params.temperature == 0:
            return int(np.argmax(logits))  # the same token in float32: no copy needed
        candidates, probs = self._distribution(np.asarray(logits, np.float64))
        return int(candidates[self._rng.choice(len(candidates), p=probs)])

    def _penalised(self, logits: np.ndarray, prompt: list[int],
                   output: list[int]) -> np.ndarray:
        """A float64 copy of ``logits`` with the penalties applied; ``logits`` itself where
        none applies (the row is the VM's output: it must not be written)."""
        p = self.params
        repeated = p.repetition_penalty != 1 and (prompt or output)
        counted = (p.presence_penalty or p.frequency_penalty) and output
        if not (repeated or counted):
            return logits
        logits = logits.astype(np.float64)
        if repeated:
            seen = np.unique(np.asarray(prompt + output))
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / p.repetition_penalty,
                                    values * p.repetition_penalty)
        if counted:
            counts = Counter(output)
            tokens = np.fromiter(counts, dtype=np.int64)
            occurrences = np.fromiter(counts.values(), dtype=np.float64)
            logits[tokens] -= p.presence_penalty + p.frequency_penalty * occurrences
        return logits

    def _distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate token ids and their renormalised probabilities after top-k/top-p/min-p."""
        order = np.argsort(-logits, kind="stable")
        if self.params.top_k:
            order = order[: self.params.top_k]
        scaled = logits[order] / self.params.temperature
        probs = np.exp(scaled - scaled[0])
        probs /= probs.sum()
        keep = len(order)
        if self.params.top_p < 1:
            # The smallest head whose mass reaches top_p: each token whose predecessors' mass
            # is still below it (always the first).
            keep = int(np.count_nonzero(np.cumsum(probs) - probs < self.params.top_p))
        if self.params.min_p:
            keep = min(keep, int(np.count_nonzero(probs >= self.params.min_p * probs[0])))
        return order[:keep], probs[:keep] / probs[:keep].sum()


def top_logprobs(logits: np.ndarray, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of ``token`` and its ``n`` most likely alternatives, from the
    raw logits (before penalties and temperature), as OpenAI reports them."""
    shifted = logits.astype(np.float64) - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    best = np.argsort(-logprobs, kind="stable")[:n]
    return float(logprobs[token]), [(int(t), float(logprobs[t])) for t in best]
