"""The ``qwen3c`` command line: compile, run, inspect, demo."""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from qwen3c.compile.quantization import SCHEMES
from qwen3c.errors import Qwen3cError

DTYPES = ["float32", "float16", "bfloat16"]

threads_option = click.option(
    "--threads", type=int, default=None,
    help="CPU threads per worker (default: TVM_NUM_THREADS, else the physical cores, shared "
         "out among the workers of a sharded artifact).")
devices_option = click.option(
    "--devices", default=None,
    help="Devices of a sharded artifact, e.g. cpu:0,cpu:1 (default: devices 0..N-1 of its "
         "target).")


class _Group(click.Group):
    """Print a user error as one line and exit 1; keep tracebacks for real bugs only."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Qwen3cError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="qwen3c")
def main() -> None:
    """Ahead-of-time compiler and runtime for Qwen3 models on Apache TVM."""


@main.command("compile")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--target", default="llvm", show_default=True, help="Compilation target.")
@click.option("--arch", default=None,
              help="llvm: x86_64 or aarch64 (default: this host's); cuda: sm_80 (default) "
                   "or sm_90.")
@click.option("--cpu", default=None, help="LLVM CPU name (default: this host's; 'generic' "
              "for a portable artifact).")
@click.option("--dtype", type=click.Choice(DTYPES), default="bfloat16", show_default=True)
@click.option("--context-length", type=int, default=None,
              help="Longest sequence the artifact serves (default: min(4096, the model's)).")
@click.option("--prefill-chunk", type=int, default=None, help="Tokens per prefill call.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Artifact directory to write.")
@click.option("--tensor-parallel", type=int, default=1, show_default=True,
              help="Cut the model over this many devices (heads, intermediate rows).")
@click.option("--expert-parallel", is_flag=True,
              help="MoE: partition the experts over the devices instead of cutting each.")
@click.option("--quant", type=click.Choice(list(SCHEMES)), default=None,
              help="Store the projections as group-wise int8, int6 or int4 (lm_head: see "
              "--quant-head).")
@click.option("--quant-group", type=int, default=32, show_default=True,
              help="Weights per quantization scale.")
@click.option("--quant-head", type=click.Choice(list(SCHEMES)), default=None,
              help="With --quant: the lm_head's integers (default q8 with --quant q8, else q6; "
              "q4 reads fewer bytes and moves the logits more).")
@click.option("--tuning-records", type=click.Path(path_type=Path), default=None,
              help="Replay the schedules `qwen3c tune` wrote into this directory.")
@click.option("--packed-weights/--no-packed-weights", default=True, show_default=True,
              help="bfloat16 on a CPU with bfloat16 dot products: keep the lm_head and the "
              "dense projections losslessly in 12 bits (3/4 of the bytes decode reads).")
@click.option("--dump-ir", type=click.Path(path_type=Path), default=None,
              help="Write the IR after each pipeline phase into this directory.")
def compile_command(model_dir: Path, target: str, arch: str | None, cpu: str | None, dtype: str,
                    context_length: int | None, prefill_chunk: int | None, output: Path,
                    tensor_parallel: int, expert_parallel: bool, quant: str | None,
                    quant_group: int, quant_head: str | None, tuning_records: Path | None,
                    packed_weights: bool, dump_ir: Path | None) -> None:
    """Compile the Hugging Face checkpoint in MODEL_DIR into an artifact directory."""
    from qwen3c.compile import compile_model
    from qwen3c.runtime.artifact import read_manifest

    out = compile_model(model_dir, target=target, dtype=dtype, output=output, arch=arch,
                        cpu=cpu, context_length=context_length,
                        prefill_chunk_size=prefill_chunk, tensor_parallel=tensor_parallel,
                        expert_parallel=expert_parallel, quant=quant, quant_group=quant_group,
                        quant_head=quant_head, tuning_records=tuning_records,
                        packed_weights=packed_weights, dump_ir=dump_ir)
    _, manifest = read_manifest(out)
    shards = f", {tensor_parallel} shards" if tensor_parallel > 1 else ""
    shards += f", {_short_quant(manifest.quant)}" if manifest.quant else ""
    shards += _describe_tuning(manifest.tuning)
    click.echo(f"compiled {model_dir} -> {out / 'model.so'} "
               f"({manifest.target.name}/{manifest.target.arch}/{manifest.target.cpu}, "
               f"{dtype}{shards}, {manifest.compile_seconds:.1f} s)")


def _describe_tuning(tuning: dict | None) -> str:
    if not tuning:
        return ""
    failed = f", {len(tuning['failed'])} did not replay" if tuning["failed"] else ""
    return f", tuned schedules on {tuning['applied']} of {tuning['kernels']} kernels{failed}"


@main.command("tune")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--target", default="llvm", show_default=True, help="Compilation target.")
@click.option("--cpu", default=None, help="LLVM CPU name (default: this host's).")
@click.option("--dtype", type=click.Choice(DTYPES), default="bfloat16", show_default=True)
@click.option("--quant", type=click.Choice(list(SCHEMES)), default=None,
              help="Tune the kernels of the quantized model.")
@click.option("--quant-group", type=int, default=32, show_default=True)
@click.option("--trials", type=int, default=64, show_default=True,
              help="Schedules measured per kernel.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Directory for the tuning database (for compile --tuning-records).")
@threads_option
def tune_command(model_dir: Path, target: str, cpu: str | None, dtype: str, quant: str | None,
                 quant_group: int, trials: int, output: Path, threads: int | None) -> None:
    """Search schedules with meta_schedule for the kernels of MODEL_DIR that qwen3c has no hand
    schedule for (norms, SwiGLU's elementwise part, casts, residual adds), on this host."""
    from qwen3c.compile import tune_model

    kernels = tune_model(model_dir, output, target=target, dtype=dtype, cpu=cpu, quant=quant,
                         quant_group=quant_group, trials=trials, threads=threads)
    click.echo(f"{'kernel':44s} {'calls':>5s} {'untuned µs':>11s} {'tuned µs':>9s} "
               f"{'speedup':>7s}")
    for k in sorted(kernels, key=lambda k: -k.calls * k.untuned_us):
        tuned = f"{k.tuned_us:9.1f} {k.untuned_us / k.tuned_us:6.2f}x" if k.tuned_us else \
            f"{'-':>9s} {'-':>7s}"
        click.echo(f"{k.name[:44]:44s} {k.calls:5d} {k.untuned_us:11.1f} {tuned}")
    click.echo(f"wrote {output} (use: qwen3c compile ... --tuning-records {output})")


@main.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", default=None,
              help="Prompt text; without it, --chat starts an interactive conversation.")
@click.option("--chat", is_flag=True, help="Use the model's chat template.")
@click.option("--think/--no-think", default=False, show_default=True,
              help="Qwen3 thinking mode (with --chat).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@threads_option
@devices_option
@click.option("--router-stats", is_flag=True, help="MoE: print per-layer routing statistics.")
@click.option("--router-stats-json", type=click.Path(path_type=Path), default=None,
              help="MoE: also write the routing statistics as JSON here.")
@click.option("--reference-partitions", is_flag=True,
              help="Ascend/MLU artifacts: run the offloaded partitions with qwen3c's CPU "
                   "references (a check on a machine without the device).")
def run_command(artifact: Path, prompt: str, chat: bool, think: bool, max_new_tokens: int,
                temperature: float, top_k: int, top_p: float, seed: int | None,
                stop: tuple[str, ...], threads: int | None, devices: str | None,
                router_stats: bool, router_stats_json: Path | None,
                reference_partitions: bool) -> None:
    """Generate text from PROMPT with a compiled ARTIFACT (its directory or model.so)."""
    import qwen3c
    from qwen3c.runtime.router_stats import format_router_table

    model = qwen3c.load(artifact, threads=threads, devices=devices,
                        reference_partitions=reference_partitions)
    if router_stats or router_stats_json:
        model.enable_router_stats()
    if prompt is None:
        if not chat:
            raise click.UsageError("give --prompt, or --chat for an interactive conversation")
        _chat_loop(model, temperature, top_k, top_p, seed, max_new_tokens, think)
        return
    if chat:
        if model.tokenizer is None:
            raise qwen3c.RequestError("--chat needs the artifact's tokenizer files")
        prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     enable_thinking=think)
    result = model.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, stop=list(stop))
    click.echo(result.text if result.text is not None else " ".join(map(str, result.token_ids)))
    t = result.timings
    click.echo(f"[{len(result.prompt_ids)} prompt tokens: {t.prefill_tokens_per_s:.1f} tok/s "
               f"prefill; {len(result.token_ids)} new tokens: {t.decode_tokens_per_s:.1f} tok/s "
               f"decode; finish: {result.finish_reason}]", err=True)
    if router_stats or router_stats_json:
        layers = model.router_stats()
        if router_stats:
            click.echo(format_router_table(layers))
        if router_stats_json:
            router_stats_json.write_text(json.dumps([s.to_dict() for s in layers], indent=1),
                                         encoding="utf-8")


def _chat_loop(model, temperature: float, top_k: int, top_p: float, seed: int | None,
               max_new_tokens: int, think: bool) -> None:
    from qwen3c.runtime.chat import interactive_chat
    from qwen3c.runtime.sampling import SamplingParams

    def read() -> str | None:
        try:
            return input("> ")
        except EOFError:
            return None

    click.echo("chat: type a message, /exit or Ctrl-D to leave", err=True)
    interactive_chat(model, params=SamplingParams(temperature=temperature, top_k=top_k,
                                                  top_p=top_p, seed=seed),
                     max_tokens=max_new_tokens, enable_thinking=think, read=read,
                     write=lambda text: click.echo(text, nl=False))


@main.command("serve")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 exposes the server to the network.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on /v1/*.")
@click.option("--model-name", default="qwen3c", show_default=True,
              help="The model id clients must send.")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="Requests decoded together.")
@click.option("--kv-cache-tokens", type=int, default=None,
              help="KV cache capacity in tokens (default: the context length).")
@threads_option
@devices_option
def serve_command(artifact: Path, host: str, port: int, api_key: str | None, model_name: str,
                  max_batch: int, kv_cache_tokens: int | None, threads: int | None,
                  devices: str | None) -> None:
    """Serve ARTIFACT over an OpenAI-compatible HTTP API."""
    from qwen3c.runtime.server import serve

    click.echo(f"serving {artifact} as {model_name!r} on http://{host}:{port}/v1", err=True)
    serve(str(artifact), host=host, port=port, api_key=api_key, model_name=model_name,
          max_batch_size=max_batch, kv_cache_tokens=kv_cache_tokens, threads=threads,
          devices=devices)


@main.command("targets")
def targets_command() -> None:
    """List the compilation targets and what each has been verified to do."""
    from qwen3c.targets import all_targets

    for target in all_targets():
        click.echo(f"{target.name:6} {target.description}\n       verified: {target.verified}")


@main.command("inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def inspect_command(artifact: Path, as_json: bool) -> None:
    """Show what a compiled ARTIFACT holds."""
    from qwen3c.runtime.artifact import read_manifest

    directory, manifest = read_manifest(artifact)
    if as_json:
        click.echo((directory / "manifest.json").read_text(encoding="utf-8"), nl=False)
        return
    model = manifest.model
    stored_bytes = sum(p.nbytes for p in manifest.params)
    lines = [
        f"artifact      {directory}",
        f"architecture  {manifest.architecture}: {model['num_hidden_layers']} layers, hidden "
        f"{model['hidden_size']}, heads {model['num_attention_heads']}/"
        f"{model['num_key_value_heads']} x {model['head_dim']}, vocab {model['vocab_size']}, "
        f"{'tied' if model['tie_word_embeddings'] else 'untied'} embeddings",
        f"parameters    {manifest.config().parameter_count() / 1e6:.1f} M, stored as "
        f"{stored_bytes / 1e6:.1f} MB per shard in {len(manifest.params)} tensors, "
        f"{manifest.dtype}, {sum(map(len, manifest.weight_files))} weight file(s)",
        f"quantized     {_describe_quant(manifest.quant)}",
        f"layouts       {_describe_layouts(manifest.params)}",
        f"target        {manifest.target.name} {manifest.target.arch} cpu={manifest.target.cpu}"
        + "".join(f" +{feature}" for feature in manifest.target.features),
        f"offloaded     {_describe_offload(manifest.offload)}",
        f"context       {manifest.context_length} tokens, prefill chunk "
        f"{manifest.prefill_chunk_size}",
        f"built with    qwen3c {manifest.qwen3c_version}, TVM {manifest.tvm_version}, "
        f"in {manifest.compile_seconds:.1f} s",
        f"tokenizer     {', '.join(manifest.tokenizer_files) or 'none'}",
        "entry points:",
    ]
    for name, signature in manifest.entry_points.items():
        lines.append(f"  {name}({', '.join(signature['params'])}) -> {signature['returns']}")
    click.echo("\n".join(lines + _shard_layout(manifest)))


def _describe_offload(offload: dict | None) -> str:
    """What the BYOC partitions of an Ascend or MLU artifact take, and their library."""
    if offload is None:
        return "nothing (the whole graph runs on the target)"
    ops = Counter(partition["op"] for partition in offload["partitions"])
    taken = ", ".join(f"{op} x{count}" for op, count in sorted(ops.items()))
    return (f"{len(offload['partitions'])} partitions ({taken}); library "
            f"{offload['library'] or 'none'}: {offload['build']}")


def _describe_layouts(params) -> str:
    """Which tensors are stored in a kernel's layout (bfloat16 panels) rather than as in HF."""
    layouts = Counter(p.layout for p in params if p.layout)
    stored = ", ".join(f"{layout} x{count}" for layout, count in sorted(layouts.items()))
    return stored or "as in the checkpoint (row-major)"


def _short_quant(quant: dict[str, int]) -> str:
    return f"q{quant['bits']} (group {quant['group']}, lm_head int{quant['head_bits']})"


def _describe_quant(quant: dict[str, int] | None) -> str:
    if quant is None:
        return "no"
    return (f"projections and MoE experts int{quant['bits']}, lm_head int{quant['head_bits']}, "
            f"group {quant['group']}, bfloat16 scales; embedding, norms and MoE router in the "
            "model dtype")


def _shard_layout(manifest) -> list[str]:
    """How each kind of parameter is cut over the shards (layers folded into one line)."""
    parallel = manifest.parallel
    if parallel.shards == 1:
        return ["shards: 1 (compile with --tensor-parallel N to cut the model over N devices)"]
    experts = "partitioned" if parallel.expert_parallel else "each cut by intermediate rows"
    lines = [f"shards: {parallel.shards} (tensor parallel; MoE experts {experts})"]
    kinds: dict[str, str] = {}
    for param in manifest.params:
        kind = re.sub(r"\.layers\.\d+\.", ".layers.*.", param.name)
        shape = list(param.shape)
        if param.shard is None:
            kinds[kind] = f"{shape} replicated"
        else:
            whole = list(param.shard.full_shape(param.shape, parallel.shards))
            parts = f" in parts {list(param.shard.segments)}" if param.shard.segments else ""
            kinds[kind] = f"{whole} cut on axis {param.shard.dim}{parts} -> {shape} per shard"
    width = max(map(len, kinds))
    lines += [f"  {kind:{width}}  {layout}" for kind, layout in kinds.items()]
    return lines


@main.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--text-file", type=click.Path(path_type=Path), default=None,
              help="Text to score instead of the built-in paragraph.")
def verify_command(artifact: Path, model_dir: Path, text_file: Path | None) -> None:
    """Compare ARTIFACT's logits with HF transformers (float32) on MODEL_DIR."""
    from qwen3c.verify import FIXED_TEXT, verify

    text = text_file.read_text(encoding="utf-8") if text_file else FIXED_TEXT
    result = verify(artifact, model_dir, text)
    click.echo(f"{result.positions} positions of {'your text' if text_file else 'a fixed text'}"
               f" vs HF transformers float32\n"
               f"  top-1 agreement  {result.agreement:.3f}\n"
               f"  mean KL(HF||us)  {result.kl:.2e} nats\n"
               f"  perplexity       {result.perplexity:.3f} (HF: "
               f"{result.reference_perplexity:.3f}, change "
               f"{result.perplexity / result.reference_perplexity - 1:+.2%})")


@main.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt-lengths", default="128", show_default=True,
              help="Comma-separated prompt lengths for prefill.")
@click.option("--decode-tokens", type=int, default=64, show_default=True)
@click.option("--decode-contexts", default="32", show_default=True,
              help="Comma-separated prompt lengths decode starts from (prefilled untimed), "
                   "e.g. 32,2048 for decode at a long context too.")
@click.option("--runs", type=int, default=3, show_default=True, help="Median of this many.")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --vs-llama-cpp: alternate the artifact and llama.cpp this many "
                   "times (each --runs), each figure the median of its rounds, so that a "
                   "machine whose speed drifts weighs on both alike.")
@threads_option
@devices_option
@click.option("--vs-hf", "hf_dir", type=click.Path(path_type=Path), default=None,
              help="Also time HF transformers eager on this checkpoint, in the same run.")
@click.option("--vs-artifact", "other", type=click.Path(path_type=Path), default=None,
              help="Also time another artifact of the model (e.g. unsharded), in the same run.")
@click.option("--vs-llama-cpp", "llama_bench", type=click.Path(path_type=Path), default=None,
              help="Also run llama.cpp's llama-bench (this binary) on --gguf, same threads.")
@click.option("--gguf", type=click.Path(path_type=Path), default=None,
              help="The GGUF file of the same model for --vs-llama-cpp.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Write the results as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="Write a PNG here: prefill tok/s against prompt length, decode tok/s.")
def bench_command(artifact: Path, prompt_lengths: str, decode_tokens: int,
                  decode_contexts: str, runs: int, rounds: int, threads: int | None,
                  devices: str | None, hf_dir: Path | None,
                  other: Path | None, llama_bench: Path | None, gguf: Path | None,
                  json_path: Path | None, plot_path: Path | None) -> None:
    """Decode and prefill tokens/s, time to first token and peak memory of ARTIFACT, optionally
    beside HF transformers, llama.cpp or another artifact."""
    import qwen3c
    from qwen3c.runtime import bench
    from qwen3c.runtime.artifact import read_manifest
    from qwen3c.targets import get_target

    lengths = _positive_integers(prompt_lengths, "--prompt-lengths", "32,128")
    contexts = _positive_integers(decode_contexts, "--decode-contexts", "32,2048")
    if (llama_bench is None) != (gguf is None):
        raise click.UsageError("--vs-llama-cpp and --gguf go together")
    # refused before anything is loaded or timed
    manifests = {path: read_manifest(path)[1] for path in (artifact, other) if path is not None}
    positions = max(contexts) + decode_tokens
    for path, held in manifests.items():
        if positions > held.context_length:
            raise click.BadParameter(
                f"decode from a {max(contexts)}-token context for {decode_tokens} tokens "
                f"needs {positions} positions; {path} holds {held.context_length}",
                param_hint="--decode-contexts")
    if llama_bench is not None:
        from qwen3c.runtime.llama_bench import bench_llama_cpp, check_inputs

        if get_target(manifests[artifact].target.name).device_kind != "cpu":
            raise click.UsageError("--vs-llama-cpp compares CPU artifacts (host threads)")
        check_inputs(llama_bench, gguf)
    measure_memory = bench.reset_peak_memory()

    def timed(model) -> list:
        prompts = bench.standard_prompts(model.vocab_size, lengths, contexts)
        rows = bench.bench_qwen3c(model, *prompts, decode_tokens, runs)
        if measure_memory:
            rows.append(bench.peak_memory_row(rows[0].engine, model.executor.worker_pids()))
        return rows

    def llama_cpp(threads_used: int) -> list:
        return bench_llama_cpp(llama_bench, gguf, threads_used, lengths, contexts,
                               decode_tokens, runs)

    def measured(path: Path, partner: Callable[[int], list] | None = None,
                 **options) -> tuple[list, list, Any]:
        """Rows and manifest of one artifact, its memory released before the next engine
        loads (each engine's peak memory is its own); with a ``partner`` engine (llama.cpp,
        in its own processes), the two take turns for ``rounds`` rounds."""
        with qwen3c.load(path, threads=threads, **options) as model:
            own, partners = [], []
            for _ in range(rounds if partner else 1):
                own.append(timed(model))
                partners.append(partner(model.threads) if partner else [])
            return (bench.median_of_rounds(own), bench.median_of_rounds(partners),
                    (model.manifest, model.vocab_size, model.threads))

    other_rows = []
    if other is not None:  # first: a sharded artifact would resize this process's threads
        other_rows = measured(other)[0]
        gc.collect()
        bench.reset_peak_memory()
    rows, llama_rows, (manifest, vocab_size, threads_used) = measured(
        artifact, llama_cpp if llama_bench is not None else None, devices=devices)
    gc.collect()
    if other_rows and other_rows[0].engine == rows[0].engine:  # same kind: name it by path
        other_rows = [dataclasses.replace(r, engine=f"{r.engine}:{other.name}")
                      for r in other_rows]
    rows += other_rows
    if hf_dir is not None:
        bench.reset_peak_memory()
        prompts, decode_prompts = bench.standard_prompts(vocab_size, lengths, contexts)
        rows += bench.bench_hf(hf_dir, manifest.dtype, threads_used, prompts, decode_prompts,
                               decode_tokens, runs, get_target(manifest.target.name).device_kind)
        if measure_memory:
            rows.append(bench.peak_memory_row("hf-eager", []))
    rows += llama_rows
    click.echo(f"{artifact}: {manifest.dtype}, {threads_used or 'device'} threads, "
               f"median of {runs}" + (f", median of {rounds} rounds with llama.cpp"
                                      if llama_rows and rounds > 1 else ""))
    click.echo(bench.format_table(rows))
    if json_path is not None:
        bench.write_json(json_path, rows, {"artifact": str(artifact), "threads": threads_used,
                                           "dtype": manifest.dtype, "runs": runs,
                                           "rounds": rounds, "decode_tokens": decode_tokens,
                                           "decode_contexts": contexts})
    if plot_path is not None:
        from qwen3c.runtime.bench_plot import plot_rows

        plot_rows(rows, plot_path, f"{artifact.name}: {manifest.dtype}, "
                                   f"{threads_used or 'device'} threads")


def _positive_integers(text: str, option: str, example: str) -> list[int]:
    """A comma-separated list of positive integers, or a usage error naming ``option``."""
    try:
        values = [int(n) for n in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise click.BadParameter(f"{option} takes positive integers, e.g. {example}")
    return values


@main.command("bench-serve")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True)
@click.option("--concurrency", default="1,4,16", show_default=True,
              help="Comma-separated numbers of concurrent streaming clients.")
@click.option("--requests", "requests_per_client", type=int, default=2, show_default=True,
              help="Requests per client, one after another.")
@click.option("--prompt-tokens", type=int, default=32, show_default=True)
@click.option("--max-tokens", type=int, default=32, show_default=True)
@click.option("--model-name", default="qwen3c", show_default=True)
@click.option("--api-key", default=None)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def bench_serve_command(url: str, concurrency: str, requests_per_client: int,
                        prompt_tokens: int, max_tokens: int, model_name: str,
                        api_key: str | None, json_path: Path | None) -> None:
    """Throughput and time to first token of a running qwen3c serve, at several loads."""
    import dataclasses

    from qwen3c.runtime.load_test import run_load

    rows = []
    click.echo(f"{'streams':>7} {'requests':>8} {'tok/s':>8} {'TTFT p50 ms':>12} "
               f"{'TTFT p99 ms':>12}")
    for level in (int(c) for c in concurrency.split(",")):
        result = run_load(url, concurrency=level, requests_per_client=requests_per_client,
                          prompt_tokens=prompt_tokens, max_tokens=max_tokens, model=model_name,
                          api_key=api_key)
        rows.append({**dataclasses.asdict(result), "tokens_per_s": result.tokens_per_s})
        click.echo(f"{level:>7} {result.requests:>8} {result.tokens_per_s:>8.1f} "
                   f"{result.ttft_p50_ms:>12.0f} {result.ttft_p99_ms:>12.0f}")
    if json_path is not None:
        json_path.write_text(json.dumps({"url": url, "prompt_tokens": prompt_tokens,
                                         "max_tokens": max_tokens, "rows": rows}, indent=2),
                             encoding="utf-8")


@main.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("artifacts/demo"),
              show_default=True, help="Where the tiny checkpoint and its artifact go.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--moe", is_flag=True, help="A tiny Qwen3-MoE instead, with its router table.")
def demo_command(workdir: Path, dtype: str, moe: bool) -> None:
    """Build a tiny random Qwen3, compile it, generate, and compare with HF transformers."""
    from qwen3c.demo import run_demo

    run_demo(workdir, dtype=dtype, moe=moe, echo=click.echo)


if __name__ == "__main__":
    main()
