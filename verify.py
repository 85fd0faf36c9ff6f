"""``qwen3c verify``: how far an artifact's logits are from HF transformers (float32) on the same
checkpoint, e.g. after quantization: top-1 agreement, KL divergence, perplexity of a fixed text.
Needs the ``test`` extra (torch, transformers) for the reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from qwen3c.errors import RequestError
from qwen3c.reference import HFReference
from qwen3c.runtime.model import load

# A fixed English text, so figures are comparable between artifacts and runs.
FIXED_TEXT = (
    "The river rose through the night, and by morning the lower road was under water. The "
    "ferryman tied his boat to the old oak, counted the sacks of grain twice, and walked up "
    "to the mill, where the miller's daughter was already writing the names of the families "
    "who would need bread before the week was out. Nobody in the valley remembered a spring "
    "like it: the snow had come late, melted all at once, and every stream that fed the river "
    "had turned brown and loud. By noon the bridge was closed, the school was a shelter, and "
    "the baker had lit both ovens for the first time since the harvest festival."
)


@dataclasses.dataclass(frozen=True)
class Comparison:
    positions: int
    agreement: float  # share of positions whose top token is the same
    kl: float  # mean KL(reference || ours) per position, nats
    perplexity: float  # ours, on the text's next tokens
    reference_perplexity: float


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def compare_logits(ours: np.ndarray, reference: np.ndarray, ids: list[int]) -> Comparison:
    """Compare two [positions, vocab] logit arrays computed over the same ``ids``."""
    log_q, log_p = log_softmax(ours.astype(np.float64)), log_softmax(reference.astype(np.float64))
    kl = float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())
    following = np.asarray(ids[1:])

    def perplexity(log_probs: np.ndarray) -> float:
        return float(np.exp(-log_probs[np.arange(len(following)), following].mean()))

    return Comparison(len(ids), float((ours.argmax(-1) == reference.argmax(-1)).mean()), kl,
                      perplexity(log_q[:-1]), perplexity(log_p[:-1]))


def verify(artifact: str | Path, model_dir: str | Path, text: str = FIXED_TEXT,
           max_tokens: int = 256) -> Comparison:
    with load(artifact) as model:
        if model.tokenizer is None:
            raise RequestError("verify needs the artifact's tokenizer files to encode its text")
        ids = model.tokenizer.encode(text)[:min(max_tokens, model.context_length)]
        if len(ids) < 2:
            raise RequestError("the text is too short to verify with (fewer than 2 tokens)")
        ours = model.logits(ids)
    return compare_logits(ours, HFReference(model_dir, "float32").logits(ids), ids)
