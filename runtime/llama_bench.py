"""llama.cpp's ``llama-bench`` on a GGUF file, as rows beside qwen3c's in ``qwen3c bench``.

The runs mirror qwen3c's own: prefill of each prompt length from an empty context, and decode of
``decode_tokens`` new tokens after each decode context (``-d 32`` by default, prefilled
untimed), on the same number of threads. Each figure is the median of llama-bench's
per-repetition samples.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

from qwen3c.errors import Qwen3cError
from qwen3c.runtime.bench import BenchRow, decode_metric

ENGINE = "llama.cpp"


def check_inputs(llama_bench: Path, gguf: Path) -> None:
    """Refuse missing files before anything is timed."""
    for path, what in ((llama_bench, "llama-bench"), (gguf, "GGUF file")):
        if not path.is_file():
            raise Qwen3cError(f"{what} not found: {path}")


def bench_llama_cpp(llama_bench: Path, gguf: Path, threads: int, prompt_lengths: list[int],
                    decode_contexts: list[int], decode_tokens: int,
                    runs: int) -> list[BenchRow]:
    common = [str(llama_bench), "-m", str(gguf), "-t", str(threads), "-r", str(runs),
              "-o", "jsonl"]
    decode = _run([*common, "-p", "0", "-n", str(decode_tokens),
                   "-d", ",".join(map(str, decode_contexts))])
    prefill = _run([*common, "-p", ",".join(map(str, prompt_lengths)), "-n", "0", "-d", "0"])
    rows = [BenchRow(ENGINE, decode_metric(result["n_depth"]),
                     statistics.median(result["samples_ts"])) for result in decode]
    for result in prefill:
        n, rate = result["n_prompt"], statistics.median(result["samples_ts"])
        rows += [BenchRow(ENGINE, f"prefill-{n}", rate),
                 BenchRow(ENGINE, f"ttft-{n}", n / rate * 1e3, "ms")]
    return rows


def _run(command: list[str]) -> list[dict]:
    """llama-bench's results, one JSON object per test."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
        raise Qwen3cError(f"could not start llama-bench: {error}") from None
    if done.returncode != 0:
        how = (f"was killed by signal {-done.returncode}" if done.returncode < 0
               else f"failed (exit {done.returncode})")
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise Qwen3cError(f"llama-bench {how}: {' '.join(command)}\n{tail}".rstrip())
    try:
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    except json.JSONDecodeError:
        raise Qwen3cError("llama-bench printed something other than JSON lines; is this "
                          "llama.cpp's llama-bench?") from None
