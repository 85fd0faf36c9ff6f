"""``qwen3c demo``: a tiny random Qwen3 end to end, checked against HF transformers."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qwen3c.compile import compile_model
from qwen3c.compile.random_checkpoint import TINY, TINY_MOE, write_random_checkpoint
from qwen3c.errors import Qwen3cError
from qwen3c.runtime import load
from qwen3c.runtime.router_stats import format_router_table

PROMPT = "def compile_model(model_dir, target):"


def run_demo(workdir: Path, *, dtype: str = "float32", moe: bool = False,
             echo: Callable[[str], None] = print, new_tokens: int = 24) -> None:
    checkpoint, artifact = workdir / "checkpoint", workdir / "artifact"
    shutil.rmtree(checkpoint, ignore_errors=True)
    write_random_checkpoint(checkpoint, TINY_MOE if moe else TINY)
    echo(f"wrote a tiny random {'Qwen3-MoE' if moe else 'Qwen3'} checkpoint to {checkpoint}")

    started = time.perf_counter()
    compile_model(checkpoint, target="llvm", dtype=dtype, output=artifact)
    echo(f"compiled it for llvm ({dtype}) in {time.perf_counter() - started:.1f} s -> "
         f"{artifact / 'model.so'}")

    model = load(artifact)
    if moe:
        model.enable_router_stats()
    result = model.generate(PROMPT, max_new_tokens=new_tokens, ignore_eos=True)
    t = result.timings
    echo(f"prompt   {PROMPT!r} ({len(result.prompt_ids)} tokens)")
    echo(f"greedy   {result.text!r}")
    echo(f"speed    prefill {t.prefill_tokens_per_s:.0f} tok/s, decode "
         f"{t.decode_tokens_per_s:.0f} tok/s")
    if moe:
        echo("router   (cv: spread of tokens over experts; aux: balance loss, top_k if even)")
        echo(format_router_table(model.router_stats(reset=True)))

    try:
        from qwen3c.reference import HFReference

        reference = HFReference(checkpoint)
    except Qwen3cError as missing:
        echo(f"HF check skipped: {missing}")
        return
    ids = result.prompt_ids + result.token_ids
    ours, theirs = model.logits(ids), reference.logits(ids)
    relative = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    hf_tokens = reference.greedy(result.prompt_ids, len(result.token_ids))
    same = hf_tokens == result.token_ids
    echo(f"vs HF    max |Δlogit| / max |logit| = {relative:.1e} over {len(ids)} positions; "
         f"greedy tokens {'identical' if same else 'DIFFER'} ({len(hf_tokens)} tokens)")
    if not same or (dtype == "float32" and relative > 1e-4):
        raise Qwen3cError("the compiled model disagrees with HF transformers")
