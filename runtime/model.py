"""A loaded artifact: score prompts, generate text, batch several requests together."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qwen3c.errors import RequestError
from qwen3c.runtime.artifact import Manifest, read_manifest, verify_artifact
from qwen3c.runtime.executor import open_executor
from qwen3c.runtime.kv_cache import PagedKVCache
from qwen3c.runtime.router_stats import LayerRouting, RouterStatsAccumulator
from qwen3c.runtime.sampling import Sampler, SamplingParams
from qwen3c.runtime.sequence import SequenceState
from qwen3c.runtime.tokenizer import Tokenizer

Prompt = str | Sequence[int]
GREEDY = SamplingParams()


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


class Model:
    def __init__(self, directory: Path, manifest: Manifest, *, max_batch_size: int = 8,
                 kv_cache_tokens: int | None = None, threads: int | None = None,
                 devices: str | None = None, reference_partitions: bool = False):
        verify_artifact(directory, manifest)
        self.manifest = manifest
        self.executor = open_executor(directory, manifest, devices, threads,
                                      reference_partitions)
        self.threads = self.executor.threads
        self.tokenizer = Tokenizer.from_dir(directory)
        self.config = manifest.config()
        self.vocab_size = self.config.vocab_size
        self.context_length = manifest.context_length
        self.eos_token_ids = frozenset(self.config.eos_token_ids)
        self.kv_cache = PagedKVCache(
            self.executor, max_batch_size=max_batch_size,
            capacity_tokens=kv_cache_tokens or self.context_length,
            prefill_chunk_size=manifest.prefill_chunk_size)
        self._router_stats: RouterStatsAccumulator | None = None

    # ---- public API -------------------------------------------------------------------------

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Float32 logits ``[len(token_ids), vocab]`` of a fresh sequence at every position."""
        seq = self.new_sequence(self.checked_ids(token_ids), max_new_tokens=0)
        rows = []
        try:
            while seq.prompt_left:
                rows += [logits for _, logits in self.prefill_step([seq], every_position=True)]
        finally:
            self.kv_cache.remove_sequence(seq.seq_id)
        return np.concatenate(rows, axis=0)

    def generate(self, prompt: Prompt, *, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None,
                 ignore_eos: bool = False) -> GenerationResult:
        return self.generate_batch([prompt], max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                   stop=stop, ignore_eos=ignore_eos)[0]

    def generate_batch(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 32,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       seed: int | None = None, stop: str | Sequence[str] | None = None,
                       ignore_eos: bool = False) -> list[GenerationResult]:
        """Generate for several prompts at once: one ragged prefill, then batched decode steps.

        Each prompt gets its own random stream (seed + its index), so a result does not depend
        on which other prompts share the batch. ``ignore_eos`` generates on past the model's
        end-of-sequence tokens (benchmarks and demos: always ``max_new_tokens`` tokens).
        """
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        prompt_ids = [self.checked_ids(self.encode(p)) for p in prompts]
        params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                 seed=None if seed is None else seed + i)
                  for i in range(len(prompt_ids))]
        results: list[GenerationResult] = []
        size = self.kv_cache.max_batch_size
        for start in range(0, len(prompt_ids), size):
            results.extend(self._generate_group(prompt_ids[start:start + size],
                                                params[start:start + size], max_new_tokens,
                                                stops, ignore_eos))
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

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this artifact has no tokenizer.json; pass token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def checked_ids(self, ids: Sequence[int]) -> list[int]:
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

    def new_sequence(self, prompt_ids: list[int], *, max_new_tokens: int,
                     params: SamplingParams = GREEDY, stop: Sequence[str] = (),
                     stop_token_ids: Sequence[int] = (), logprobs: int | None = None,
                     seq_id: int | None = None, ignore_eos: bool = False) -> SequenceState:
        """A request's state; ``seq_id`` names a KV-cache sequence made by the caller (e.g. a
        fork that already holds a prefix), otherwise a fresh one is added."""
        # The first new token needs no cache slot; each later one needs its predecessor's.
        budget = min(max_new_tokens, self.context_length - len(prompt_ids) + 1)
        eos = frozenset() if ignore_eos else self.eos_token_ids
        return SequenceState(
            seq_id=self.kv_cache.add_sequence() if seq_id is None else seq_id,
            prompt_ids=prompt_ids, max_new_tokens=budget, sampler=Sampler(params),
            decode=self.tokenizer.decode if self.tokenizer else None,
            stop_strings=list(stop),
            stop_token_ids=eos | set(stop_token_ids),
            logprobs=logprobs)

    def prefill_step(self, seqs: Sequence[SequenceState], *,
                     every_position: bool = False) -> list[tuple[SequenceState, np.ndarray]]:
        """Feed one ragged chunk of up to ``prefill_chunk_size`` prompt tokens, taken from the
        sequences in order. Returns ``(sequence, logits)`` for every sequence the chunk touched
        when ``every_position``; otherwise for each sequence whose prompt it completed, with
        the last row only."""
        batch, lengths, room = [], [], self.kv_cache.prefill_chunk_size
        for seq in seqs:
            if room == 0 or len(batch) == self.kv_cache.max_batch_size:
                break
            if seq.prompt_left:
                batch.append(seq)
                lengths.append(min(room, seq.prompt_left))
                room -= lengths[-1]
        ids, positions, offset = [], [], 0
        for seq, take in zip(batch, lengths, strict=True):
            ids.extend(seq.prompt_ids[seq.prefilled:seq.prefilled + take])
            if every_position:
                positions.extend(range(offset, offset + take))
            elif take == seq.prompt_left:
                positions.append(offset + take - 1)
            offset += take
        with self.kv_cache.forward([s.seq_id for s in batch], lengths):
            # A chunk that completes no sequence still runs, for its KV; row 0 is discarded.
            logits = self._call("prefill", ids, positions or [0])
        out, row = [], 0
        for seq, take in zip(batch, lengths, strict=True):
            seq.prefilled += take
            rows = take if every_position else int(seq.prompt_left == 0)
            if rows:
                out.append((seq, logits[row:row + rows]))
            row += rows
        return out

    def decode_step(self, seqs: Sequence[SequenceState]) -> np.ndarray:
        """Logits ``[len(seqs), vocab]`` after feeding each sequence its last generated token."""
        with self.kv_cache.forward([s.seq_id for s in seqs], [1] * len(seqs)):
            return self._call("decode", [s.generated[-1] for s in seqs])

    # ---- internals --------------------------------------------------------------------------

    def _generate_group(self, prompt_ids: list[list[int]], params: list[SamplingParams],
                        max_new_tokens: int, stops: list[str],
                        ignore_eos: bool) -> list[GenerationResult]:
        seqs: list[SequenceState] = []
        try:
            for ids, sampling in zip(prompt_ids, params, strict=True):
                seqs.append(self.new_sequence(ids, max_new_tokens=max_new_tokens,
                                              params=sampling, stop=stops,
                                              ignore_eos=ignore_eos))
            started = time.perf_counter()
            while any(s.prompt_left for s in seqs):
                for seq, logits in self.prefill_step(seqs):
                    seq.accept(logits[-1])
            prefill_s = time.perf_counter() - started
            decode_tokens = 0
            while active := [s for s in seqs if not s.finished]:
                for seq, row in zip(active, self.decode_step(active), strict=True):
                    seq.accept(row)
                decode_tokens += len(active)
            decode_s = time.perf_counter() - started - prefill_s
        finally:
            for seq in seqs:
                self.kv_cache.remove_sequence(seq.seq_id)
        timings = Timings(sum(len(s.prompt_ids) for s in seqs), prefill_s,
                          decode_tokens, decode_s)
        return [GenerationResult(s.prompt_ids, s.generated, s.text, s.finish_reason or "length",
                                 timings) for s in seqs]

    def _call(self, entry: str, ids: list[int], positions: list[int] | None = None) -> np.ndarray:
        inputs = [np.asarray(ids, dtype=np.int32)]
        if positions is not None:
            inputs.append(np.asarray(positions, dtype=np.int32))
        if self._router_stats is None:
            return self.executor.run(entry, inputs, self.kv_cache.handle)[0]
        logits, stats = self.executor.run(f"{entry}_router_stats", inputs, self.kv_cache.handle,
                                          outputs=2)
        self._router_stats.add(stats)
        return logits

    def close(self) -> None:
        """Stop the workers of a sharded model (a no-op for one device); later calls fail."""
        self.executor.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | Path, *, max_batch_size: int = 8, kv_cache_tokens: int | None = None,
         threads: int | None = None, devices: str | None = None,
         reference_partitions: bool = False) -> Model:
    """Load an artifact (its directory or its model.so) after checking it can run here.

    ``threads`` (default: TVM_NUM_THREADS, else the physical cores, shared out among the
    workers of a sharded artifact) takes effect only in a process that has not run a TVM kernel
    yet: TVM's thread pool is sized once. ``devices`` (``cpu:0,cpu:1``) places the shards of an
    artifact compiled with ``--tensor-parallel N``; by default they go to devices 0..N-1.
    ``reference_partitions`` runs an Ascend or MLU artifact's partitions with qwen3c's CPU
    references instead of the vendor library (to check it on a machine without the device).
    """
    directory, manifest = read_manifest(path)
    return Model(directory, manifest, max_batch_size=max_batch_size,
                 kv_cache_tokens=kv_cache_tokens, threads=threads, devices=devices,
                 reference_partitions=reference_partitions)
