"""One generation request in flight: its tokens, sampler, stop conditions, and its output."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from qwen3c.runtime.sampling import Sampler, top_logprobs

INCOMPLETE_UTF8 = "\ufffd"  # what a byte-level decoder shows for a partial character


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class SequenceState:
    seq_id: int
    prompt_ids: list[int]
    max_new_tokens: int
    sampler: Sampler
    decode: Callable[[list[int]], str] | None = None
    stop_strings: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # record this many top alternatives per token
    prefilled: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)
    token_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length"
    text: str | None = None  # None only without a tokenizer

    def __post_init__(self) -> None:
        if self.decode is not None and self.text is None:
            self.text = ""  # a sequence whose first token is a stop token has empty text

    @property
    def prompt_left(self) -> int:
        return len(self.prompt_ids) - self.prefilled

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, logits: np.ndarray) -> int:
        """Sample the next token from ``logits`` and update text and finish state."""
        token = self.sampler(logits, self.prompt_ids, self.generated)
        if self.logprobs is not None:
            logprob, top = top_logprobs(logits, token, self.logprobs)
            self.token_logprobs.append(TokenLogprob(token, logprob, top))
        if token in self.stop_token_ids:
            self.finish_reason = "stop"
            return token
        previous = len(self.text or "")
        self.generated.append(token)
        if self.decode is not None:
            self.text = self.decode(self.generated)
            self._check_stop_strings(previous)
        if not self.finished and len(self.generated) >= self.max_new_tokens:
            self.finish_reason = "length"
        return token

    def _check_stop_strings(self, previous: int) -> None:
        if not self.stop_strings:
            return
        start = max(0, previous - max(map(len, self.stop_strings)))
        hits = [i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"

    def stable_text_end(self) -> int:
        """How much of ``text`` can be shown now: not a partial UTF-8 character at the end,
        nor a tail that could still grow into a stop string."""
        text = self.text or ""
        if self.finished:
            return len(text)
        end = len(text.rstrip(INCOMPLETE_UTF8))
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, end), 0, -1):
                if text[end - size:end] == stop[:size]:
                    end -= size
                    break
        return end
