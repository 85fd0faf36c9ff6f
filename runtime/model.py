"""A loaded artifact: score prompts, generate text, batch several requests together."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tvm

from qwen3c.compile.config import Qwen3Config
from qwen3c.errors import RequestError
from qwen3c.runtime.artifact import LIBRARY, Manifest, load_params, read_manifest, verify_artifact
from qwen3c.runtime.kv_cache import PagedKVCache
from qwen3c.runtime.router_stats import LayerRouting, RouterStatsAccumulator
from qwen3c.runtime.sampling import Sampler, SamplingParams
from qwen3c.runtime.tokenizer import Tokenizer
from qwen3c.targets import get_target

Prompt = str | Sequence[int]


@dataclasses.dataclass(frozen=True)
class Timings:
    prefill_tokens: int
    prefill_s: float
    decode_tokens: int
    decode_s: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]  # the generated tokens only, without a final stop token
    text: str | None  # None when the artifact has no tokenizer
    finish_reason: str  # "stop" (stop token or string) or "length"
    timings: Timings


@dataclasses.dataclass
class _Sequence:
    """One request in flight."""

    seq_id: int
    prompt_ids: list[int]
    max_new_tokens: int
    sampler: Sampler
    prefilled: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None


class Model:
    def __init__(self, directory: Path, manifest: Manifest, *, max_batch_size: int = 8,
                 kv_cache_tokens: int | None = None, threads: int | None = None):
        verify_artifact(directory, manifest)
        self.manifest = manifest
        target = get_target(manifest.target.name)
        target.configure_threads(threads)
        device = target.device()
        self._vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(directory / LIBRARY)),
                                            device)
        self._params = load_params(directory, manifest, device)
        self.tokenizer = Tokenizer.from_dir(directory)
        self.vocab_size = int(manifest.model["vocab_size"])
        self.context_length = manifest.context_length
        self.eos_token_ids = frozenset(manifest.model["eos_token_ids"])
        self.kv_cache = PagedKVCache(
            self._vm, max_batch_size=max_batch_size,
            capacity_tokens=kv_cache_tokens or self.context_length,
            prefill_chunk_size=manifest.prefill_chunk_size)
        self.config = Qwen3Config(**manifest.model)
        self._router_stats: RouterStatsAccumulator | None = None

    # ---- public API -------------------------------------------------------------------------

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Float32 logits ``[len(token_ids), vocab]`` of a fresh sequence at every position."""
        ids = self._checked_ids(token_ids)
        seq = _Sequence(self.kv_cache.add_sequence(), ids, 0, Sampler(SamplingParams()))
        try:
            rows = [logits for _, logits in self._prefill([seq], every_position=True)]
        finally:
            self.kv_cache.remove_sequence(seq.seq_id)
        return np.concatenate(rows, axis=0)

    def generate(self, prompt: Prompt, *, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None) -> GenerationResult:
        return self.generate_batch([prompt], max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                   stop=stop)[0]

    def generate_batch(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 32,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       seed: int | None = None,
                       stop: str | Sequence[str] | None = None) -> list[GenerationResult]:
        """Generate for several prompts at once: one ragged prefill, then batched decode steps.

        Each prompt gets its own random stream (seed + its index), so a result does not depend
        on which other prompts share the batch.
        """
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        prompt_ids = [self._checked_ids(self._encode(p)) for p in prompts]
        results: list[GenerationResult] = []
        size = self.kv_cache.max_batch_size
        for start in range(0, len(prompt_ids), size):
            group = prompt_ids[start:start + size]
            samplers = [Sampler(SamplingParams(temperature, top_k, top_p,
                                               None if seed is None else seed + start + i))
                        for i in range(len(group))]
            results.extend(self._generate_group(group, samplers, max_new_tokens, stops))
        return results

    def enable_router_stats(self, enabled: bool = True) -> None:
        """Gather MoE routing statistics from now on (off by default: then the compiled entry
        points without statistics run, and gathering costs nothing)."""
        if not self.config.num_experts:
            raise RequestError("router statistics need a Qwen3-MoE model")
        if not enabled:
            self._router_stats = None
        elif self._router_stats is None:
            moe_layers = [i for i in range(self.config.num_hidden_layers)
                          if self.config.is_moe_layer(i)]
            self._router_stats = RouterStatsAccumulator(
                moe_layers, self.config.num_experts, self.config.num_experts_per_tok)

    def router_stats(self, *, reset: bool = False) -> list[LayerRouting]:
        """Per MoE layer: tokens per expert, summed routing weights, balance figures."""
        if self._router_stats is None:
            raise RequestError("router statistics are off: call enable_router_stats() first")
        layers = self._router_stats.layers()
        if reset:
            self._router_stats.reset()
        return layers

    # ---- internals --------------------------------------------------------------------------

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this artifact has no tokenizer.json; pass token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) > self.context_length:
            raise RequestError(f"the prompt has {len(ids)} tokens, more than the compiled "
                               f"context length {self.context_length}")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary "
                               f"(0..{self.vocab_size - 1})")
        return ids

    def _generate_group(self, prompt_ids: list[list[int]], samplers: list[Sampler],
                        max_new_tokens: int, stops: list[str]) -> list[GenerationResult]:
        seqs: list[_Sequence] = []
        try:
            for ids, sampler in zip(prompt_ids, samplers, strict=True):
                # The first new token needs no cache slot; each later one needs its predecessor's.
                budget = min(max_new_tokens, self.context_length - len(ids) + 1)
                seqs.append(_Sequence(self.kv_cache.add_sequence(), ids, budget, sampler))
            started = time.perf_counter()
            for seq, logits in self._prefill(seqs, every_position=False):
                self._accept(seq, seq.sampler(logits[-1]), stops)
            prefill_s = time.perf_counter() - started
            decode_tokens = self._decode_until_done(seqs, stops)
            decode_s = time.perf_counter() - started - prefill_s
        finally:
            for seq in seqs:
                self.kv_cache.remove_sequence(seq.seq_id)
        timings = Timings(sum(len(s.prompt_ids) for s in seqs), prefill_s,
                          decode_tokens, decode_s)
        return [GenerationResult(s.prompt_ids, s.generated, s.text,
                                 s.finish_reason or "length", timings) for s in seqs]

    def _prefill(self, seqs: list[_Sequence], *, every_position: bool):
        """Feed prompts in ragged chunks of up to ``prefill_chunk_size`` tokens.

        Yields ``(sequence, logits)`` for each chunk that needs logits: every chunk when
        ``every_position``, otherwise a sequence's last chunk with the last row only.
        """
        chunk_size = self.kv_cache.prefill_chunk_size
        pending = [s for s in seqs if s.prefilled < len(s.prompt_ids)]
        while pending:
            batch, lengths, room = [], [], chunk_size
            for seq in pending:
                if room == 0:
                    break
                take = min(room, len(seq.prompt_ids) - seq.prefilled)
                batch.append(seq)
                lengths.append(take)
                room -= take
            ids, positions, offset = [], [], 0
            for seq, take in zip(batch, lengths, strict=True):
                ids.extend(seq.prompt_ids[seq.prefilled:seq.prefilled + take])
                last = seq.prefilled + take == len(seq.prompt_ids)
                if every_position:
                    positions.extend(range(offset, offset + take))
                elif last:
                    positions.append(offset + take - 1)
                offset += take
            with self.kv_cache.forward([s.seq_id for s in batch], lengths):
                # A chunk that completes no sequence still runs, for its KV; row 0 is discarded.
                logits = self._call("prefill", ids, positions or [0])
            row = 0
            for seq, take in zip(batch, lengths, strict=True):
                seq.prefilled += take
                rows = take if every_position else int(seq.prefilled == len(seq.prompt_ids))
                if rows:
                    yield seq, logits[row:row + rows]
                row += rows
            pending = [s for s in pending if s.prefilled < len(s.prompt_ids)]

    def _decode_until_done(self, seqs: list[_Sequence], stops: list[str]) -> int:
        steps = 0
        while active := [s for s in seqs if s.finish_reason is None]:
            with self.kv_cache.forward([s.seq_id for s in active], [1] * len(active)):
                logits = self._call("decode", [s.generated[-1] for s in active])
            for seq, row in zip(active, logits, strict=True):
                self._accept(seq, seq.sampler(row), stops)
            steps += len(active)
        return steps

    def _accept(self, seq: _Sequence, token: int, stops: list[str]) -> None:
        """Record a sampled token and decide whether the sequence is finished."""
        if token in self.eos_token_ids:
            seq.finish_reason = "stop"
            seq.text = self._text(seq.generated)
            return
        seq.generated.append(token)
        seq.text = self._text(seq.generated)
        if stops and seq.text is not None:
            cut = min((seq.text.find(s) for s in stops if s in seq.text), default=-1)
            if cut >= 0:
                seq.text = seq.text[:cut]
                seq.finish_reason = "stop"
                return
        if len(seq.generated) >= seq.max_new_tokens:
            seq.finish_reason = "length"

    def _text(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids) if self.tokenizer else None

    def _call(self, entry: str, ids: list[int], positions: list[int] | None = None) -> np.ndarray:
        args = [tvm.runtime.tensor(np.asarray(ids, dtype=np.int32))]
        if positions is not None:
            args.append(tvm.runtime.tensor(np.asarray(positions, dtype=np.int32)))
        if self._router_stats is None:
            return self._vm[entry](*args, self.kv_cache.handle, self._params).numpy()
        logits, stats = self._vm[f"{entry}_router_stats"](*args, self.kv_cache.handle,
                                                          self._params)
        self._router_stats.add(stats.numpy())
        return logits.numpy()


def load(path: str | Path, *, max_batch_size: int = 8, kv_cache_tokens: int | None = None,
         threads: int | None = None) -> Model:
    """Load an artifact (its directory or its model.so) after checking it can run here.

    ``threads`` (default: TVM_NUM_THREADS, else the physical cores) takes effect only in a
    process that has not run a TVM kernel yet: TVM's thread pool is sized once.
    """
    directory, manifest = read_manifest(path)
    return Model(directory, manifest, max_batch_size=max_batch_size,
                 kv_cache_tokens=kv_cache_tokens, threads=threads)
