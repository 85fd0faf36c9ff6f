"""Hugging Face transformers as the numerical reference (needs the ``test`` extra).

Used by ``qwen3c demo`` and the test suite; the compiled runtime never imports this module.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from qwen3c.errors import Qwen3cError


def _transformers():
    try:
        import torch
        import transformers
    except ImportError:
        raise Qwen3cError("the HF comparison needs torch and transformers: "
                          "pip install 'qwen3c[test]'") from None
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


class HFReference:
    """An HF model loaded from a local checkpoint (never the hub), in a chosen dtype, on a torch
    device ("cpu", or "cuda" to time HF beside a cuda artifact on the same GPU)."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32", threads: int | None = None,
                 device: str = "cpu"):
        torch, transformers = _transformers()
        self._torch = torch
        self._device = torch.device(device)
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype),
            local_files_only=True).to(self._device).eval()

    def _tensor(self, ids: list[int]):
        return self._torch.tensor([ids], dtype=self._torch.long, device=self._device)

    def _synchronize(self) -> None:
        """Wait for queued GPU work, so a timing covers the work and not its launch."""
        if self._device.type == "cuda":
            self._torch.cuda.synchronize()

    def logits(self, ids: list[int]) -> np.ndarray:
        with self._torch.inference_mode():
            out = self.model(self._tensor(ids))
        return out.logits[0].float().cpu().numpy()

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation without any stop token."""
        if max_new_tokens == 0:  # transformers refuses to generate nothing
            return []
        torch = self._torch
        prompt = self._tensor(ids)
        with torch.inference_mode():
            out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      max_new_tokens=max_new_tokens,
                                      min_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=None, pad_token_id=0, use_cache=True)
        return out[0, len(ids):].tolist()

    def time_generate(self, ids: list[int], max_new_tokens: int) -> float:
        """Seconds for a greedy generation of exactly ``max_new_tokens`` tokens."""
        started = time.perf_counter()
        self.greedy(ids, max_new_tokens)
        self._synchronize()
        return time.perf_counter() - started

    def time_prefill(self, ids: list[int]) -> float:
        """Seconds for one forward over the prompt, keeping only the last logits."""
        torch = self._torch
        with torch.inference_mode():
            started = time.perf_counter()
            self.model(self._tensor(ids), use_cache=True, logits_to_keep=1)
            self._synchronize()
            return time.perf_counter() - started
