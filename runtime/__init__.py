"""Load a compiled artifact and run it: KV cache, sampling, generation, batching."""

from qwen3c.runtime.model import GenerationResult, Model, Timings, load

__all__ = ["GenerationResult", "Model", "Timings", "load"]
