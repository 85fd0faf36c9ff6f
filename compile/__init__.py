"""HF checkpoint → Relax IRModule → per-target library, manifest and converted weights."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import tvm
from tvm import relax

from qwen3c import __version__
from qwen3c.compile.config import Qwen3Config, load_config
from qwen3c.compile.model import Build, Qwen3ForCausalLM
from qwen3c.compile.pipeline import run_pipeline
from qwen3c.compile.quantization import DEFAULT_GROUP, parse_scheme, quant_param
from qwen3c.compile.sharding import Parallelism, shard_spec
from qwen3c.compile.weights import (
    NUMPY_DTYPES,
    Checkpoint,
    check_coverage,
    converted_params,
    write_shards,
)
from qwen3c.errors import ConfigError, Qwen3cError
from qwen3c.runtime.artifact import LIBRARY, MANIFEST, Manifest, ParamInfo, sha256_file
from qwen3c.targets import get_target
from qwen3c.targets.byoc_target import VENDOR_DIR

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")
DEFAULT_CONTEXT = 4096
DEFAULT_PREFILL_CHUNK = 512


def compile_model(model_dir: str | Path, *, target: str = "llvm", dtype: str = "float32",
                  output: str | Path, arch: str | None = None, cpu: str | None = None,
                  context_length: int | None = None, prefill_chunk_size: int | None = None,
                  tensor_parallel: int = 1, expert_parallel: bool = False,
                  quant: str | None = None, quant_group: int = DEFAULT_GROUP,
                  dump_ir: str | Path | None = None) -> Path:
    """Compile a Qwen3 checkpoint into an artifact directory and return its path.

    With ``tensor_parallel`` N > 1 the library holds the functions of one shard (run by each of
    N workers) and the weights are cut into N sets; ``expert_parallel`` partitions MoE experts
    over the shards instead of cutting every expert. ``quant`` ("q8" or "q4") stores the
    projections as group-wise integers (``compile/quantization.py``).
    """
    started = time.perf_counter()
    model_dir, output = Path(model_dir), Path(output)
    if dtype not in NUMPY_DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; choose one of {', '.join(NUMPY_DTYPES)}")
    config = load_config(model_dir)
    context_length = _context_length(config, context_length)
    prefill_chunk_size = min(prefill_chunk_size or DEFAULT_PREFILL_CHUNK, context_length)
    backend = get_target(target)
    choice = backend.resolve(arch, cpu)
    backend.check_model(config)
    parallel = Parallelism(tensor_parallel, expert_parallel)
    parallel.check(config)
    backend.check_parallel(parallel)
    scheme = parse_scheme(quant, quant_group)
    if scheme is not None:
        backend.check_quantization(scheme, parallel)
    tvm_target = backend.tvm_target(choice)

    with tvm_target:
        model = Qwen3ForCausalLM(
            config, Build(dtype, parallel, scheme, gpu=tvm_target.kind.name == "cuda"))
        mod, named_params = model.export_tvm(spec=model.get_default_spec())[:2]
    params = [ParamInfo(name, tuple(int(d) for d in p.shape), str(p.dtype), shard_spec(p),
                        quant_param(p))
              for name, p in named_params]
    entry_points = _entry_points(mod)

    with Checkpoint(model_dir) as checkpoint:
        check_coverage(checkpoint, params, config)
        _prepare_output(output)
        weight_names = write_shards(
            converted_params(checkpoint, params, config, parallel.shards), output,
            parallel.shards)

    mod = run_pipeline(mod, backend.pipeline(tvm_target), tvm_target,
                       Path(dump_ir) if dump_ir else None)
    executable = backend.build(mod, tvm_target, choice)
    backend.export(executable, output / LIBRARY, choice)
    offload = backend.write_extras(mod, output)

    tokenizer_files = [n for n in TOKENIZER_FILES if (model_dir / n).is_file()]
    for name in tokenizer_files:
        shutil.copy2(model_dir / name, output / name)
    manifest = Manifest(
        qwen3c_version=__version__,
        tvm_version=tvm.__version__,
        architecture=config.architecture,
        model=config.to_dict(),
        target=choice,
        dtype=dtype,
        context_length=context_length,
        prefill_chunk_size=prefill_chunk_size,
        entry_points=entry_points,
        parallel=parallel,
        quant=None if scheme is None else {"bits": scheme.bits, "group": scheme.group},
        params=tuple(params),
        weight_files=tuple({name: sha256_file(output / name) for name in names}
                           for names in weight_names),
        tokenizer_files=tuple(tokenizer_files),
        library_sha256=sha256_file(output / LIBRARY),
        compile_seconds=round(time.perf_counter() - started, 2),
        offload=offload,
    )
    (output / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    return output


def _context_length(config: Qwen3Config, requested: int | None) -> int:
    limit = config.max_position_embeddings
    if requested is None:
        return min(limit, DEFAULT_CONTEXT)
    if not 0 < requested <= limit:
        raise ConfigError(f"context length {requested} must be in 1..{limit} "
                          "(max_position_embeddings)")
    return requested


def _prepare_output(output: Path) -> None:
    """Create the output directory; refuse to mix with unrelated files in an existing one."""
    if output.exists():
        if not output.is_dir():
            raise Qwen3cError(f"output {output} exists and is not a directory")
        foreign = [p.name for p in output.iterdir() if not _is_artifact_file(p.name)]
        if foreign:
            raise Qwen3cError(f"output {output} holds files that are not from a qwen3c artifact "
                              f"({', '.join(sorted(foreign)[:3])}); choose an empty directory")
        for stale in output.glob("weights-*.safetensors"):
            stale.unlink()
    output.mkdir(parents=True, exist_ok=True)


def _is_artifact_file(name: str) -> bool:
    return (name in (LIBRARY, MANIFEST, VENDOR_DIR) or name in TOKENIZER_FILES
            or (name.startswith("weights-") and name.endswith(".safetensors")))


def _entry_points(mod: tvm.IRModule) -> dict[str, dict[str, object]]:
    """Signatures of the Relax functions the runtime calls, as text, for `inspect`."""
    entries = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function) and func.attrs and "global_symbol" in func.attrs:
            entries[gvar.name_hint] = {
                "params": [_describe_param(p) for p in func.params],
                "returns": str(func.ret_ty),
            }
    return entries


def _describe_param(param: relax.Var) -> str:
    if param.name == "packed_params":  # the weights: listed in the manifest's params
        return f"packed_params: {len(param.ty.fields)} weight tensors"
    return f"{param.name}: {param.ty}"
