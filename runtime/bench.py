"""``qwen3c bench``: decode and prefill throughput of an artifact, optionally beside HF eager.

Both engines run in the same process on the same random prompts, one after the other, so
their ratio is meaningful on a noisy machine; each figure is the median of ``runs``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from qwen3c.compile.quantization import default_head_bits
from qwen3c.runtime.artifact import Manifest
from qwen3c.runtime.model import Model
from qwen3c.schedules.quant import QuantScheme

DECODE_CONTEXT = 32  # decode starts from a prompt of this many tokens, unless asked otherwise


@dataclasses.dataclass(frozen=True)
class BenchRow:
    engine: str
    metric: str  # "decode" (after DECODE_CONTEXT tokens), "decode-at-<context>",
    #             "prefill-<prompt length>", "ttft-<prompt length>", "peak-rss"
    value: float
    unit: str = "tok/s"  # or "ms" (time to first token), "GB" (peak resident memory)


def decode_metric(context: int) -> str:
    """The name of the decode row that starts after ``context`` prompt tokens."""
    return "decode" if context == DECODE_CONTEXT else f"decode-at-{context}"


def decode_context(metric: str) -> int | None:
    """The context a decode row starts from (None for other rows)."""
    if metric == "decode":
        return DECODE_CONTEXT
    return int(metric.removeprefix("decode-at-")) if metric.startswith("decode-at-") else None


def bench_qwen3c(model: Model, prompts: dict[int, list[int]],
                 decode_prompts: dict[int, list[int]], decode_tokens: int,
                 runs: int) -> list[BenchRow]:
    engine = engine_label(model.manifest)

    def decode_rate(prompt: list[int]) -> float:
        timings = model.generate(prompt, max_new_tokens=decode_tokens, ignore_eos=True).timings
        return timings.decode_tokens_per_s

    model.generate(next(iter(decode_prompts.values())), max_new_tokens=4)  # first-call work
    rows = [BenchRow(engine, decode_metric(n), _median(partial(decode_rate, ids), runs))
            for n, ids in decode_prompts.items()]
    for n, ids in prompts.items():
        # The first token is sampled when the prompt's prefill ends: that time is the TTFT.
        prefills = sorted(model.generate(ids, max_new_tokens=1).timings.prefill_s
                          for _ in range(runs))
        seconds = statistics.median(prefills)
        rows += [BenchRow(engine, f"prefill-{n}", n / seconds),
                 BenchRow(engine, f"ttft-{n}", seconds * 1e3, "ms")]
    return rows


def median_of_rounds(rounds: list[list[BenchRow]]) -> list[BenchRow]:
    """The first round's rows, each value the median of that row over all rounds (no rows
    for no rounds)."""
    values: dict[tuple[str, str], list[float]] = {}
    for rows in rounds:
        for row in rows:
            values.setdefault((row.engine, row.metric), []).append(row.value)
    return [dataclasses.replace(row, value=statistics.median(values[row.engine, row.metric]))
            for row in (rounds[0] if rounds else [])]


def reset_peak_memory() -> bool:
    """Restart this process's peak-RSS count (Linux: ``/proc/self/clear_refs``), so the next
    engine's peak is its own; False where that is not possible. The C heap's free pages go
    back to the system first (glibc's ``malloc_trim``): what an earlier engine freed but the
    heap kept counted in the next one's peak (0.6B bf16 measured second: 2.16 GB, alone 1.62)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory_row(engine: str, pids: list[int]) -> BenchRow:
    """Peak resident memory since ``reset_peak_memory`` of this process, plus the current
    peak of ``pids`` (a sharded model's worker processes)."""
    kib = sum(_vm_hwm_kib(pid) for pid in ["self", *pids])
    return BenchRow(engine, "peak-rss", kib / (1 << 20), "GB")


def _vm_hwm_kib(pid: int | str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def bench_hf(model_dir: Path, dtype: str, threads: int | None, prompts: dict[int, list[int]],
             decode_prompts: dict[int, list[int]], decode_tokens: int, runs: int,
             device: str = "cpu") -> list[BenchRow]:
    """HF eager on the torch device the artifact runs on ("cpu" or "cuda")."""
    from qwen3c.reference import HFReference

    reference = HFReference(model_dir, dtype, threads=threads, device=device)
    reference.time_generate(next(iter(decode_prompts.values())), 4)  # warm-up

    def decode_rate(prompt: list[int]) -> float:
        # Generating n tokens minus generating 1 leaves n - 1 decode steps, as llama-bench does.
        full = reference.time_generate(prompt, decode_tokens)
        first = reference.time_generate(prompt, 1)
        return (decode_tokens - 1) / (full - first)

    rows = [BenchRow("hf-eager", decode_metric(n), _median(partial(decode_rate, ids), runs))
            for n, ids in decode_prompts.items()]
    for n, ids in prompts.items():
        seconds = statistics.median(reference.time_prefill(ids) for _ in range(runs))
        rows += [BenchRow("hf-eager", f"prefill-{n}", n / seconds),
                 BenchRow("hf-eager", f"ttft-{n}", seconds * 1e3, "ms")]
    return rows


def engine_label(manifest: Manifest) -> str:
    """qwen3c, with the quantization and sharding of the artifact: e.g. qwen3c-q4,
    qwen3c-q4-head-q4 (an lm_head other than the default), -tp2."""
    parallel, label = manifest.parallel, "qwen3c"
    if manifest.quant:
        label += f"-q{manifest.quant['bits']}"
        scheme = QuantScheme(manifest.quant["bits"], manifest.quant["group"])
        if manifest.quant["head_bits"] != default_head_bits(scheme):
            label += f"-head-q{manifest.quant['head_bits']}"
    if parallel.shards > 1:
        label += f"-{'ep' if parallel.expert_parallel else 'tp'}{parallel.shards}"
    return label


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> dict[int, list[int]]:
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, vocab_size, n).tolist() for n in lengths}


def standard_prompts(vocab_size: int, lengths: list[int], decode_contexts: list[int]
                     ) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """The prefill prompts of the given lengths, and the prompts decode starts from, one per
    context length: the same for every engine of a run."""
    decode_prompts = {n: random_prompts(vocab_size, [n], seed=1)[n] for n in decode_contexts}
    return random_prompts(vocab_size, lengths), decode_prompts


def format_table(rows: list[BenchRow]) -> str:
    """One column per engine, then the first engine's ratio to each other one (above 1 is
    better for tok/s, below 1 for ms and GB)."""
    engines = list(dict.fromkeys(r.engine for r in rows))
    metrics = list(dict.fromkeys((r.metric, r.unit) for r in rows))
    value = {(r.engine, r.metric): r.value for r in rows}
    header = ["metric", *engines] + ([f"{engines[0]}/{e}" for e in engines[1:]])
    lines = [header]
    for metric, unit in metrics:
        values = [value.get((e, metric)) for e in engines]
        ratios = [f"{values[0] / v:.2f}x" if v and values[0] else "-" for v in values[1:]]
        lines.append([f"{metric} {unit}", *(_cell(v, unit) for v in values), *ratios])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True))
                     for line in lines)


def _cell(value: float | None, unit: str) -> str:
    if not value:
        return "-"
    return f"{value:.2f}" if unit == "GB" else f"{value:.1f}"


def write_json(path: Path, rows: list[BenchRow], context: dict[str, object]) -> None:
    path.write_text(json.dumps({**context, "rows": [dataclasses.asdict(r) for r in rows]},
                               indent=2) + "\n", encoding="utf-8")


def _median(measure: Callable[[], float], runs: int) -> float:
    return statistics.median(measure() for _ in range(runs))
