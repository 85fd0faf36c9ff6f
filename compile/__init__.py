"""HF checkpoint → Relax IRModule → per-target library, manifest and converted weights."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from qwen3c import __version__
from qwen3c.compile.config import Qwen3Config, load_config
from qwen3c.compile.model import LAYOUT_ATTR, Build, Qwen3ForCausalLM
from qwen3c.compile.pipeline import run_pipeline
from qwen3c.compile.quantization import DEFAULT_GROUP, parse_quantization, quant_param
from qwen3c.compile.sharding import Parallelism, shard_spec
from qwen3c.compile.tuning import (
    TunedKernel,
    TuningRecords,
    phases_until,
    require_tuning_packages,
    tune_kernels,
    with_tuning_phase,
    write_summary,
)
from qwen3c.compile.weights import (
    NUMPY_DTYPES,
    Checkpoint,
    check_coverage,
    converted_params,
    head_exceptions,
    projection_exceptions,
    write_shards,
)
from qwen3c.errors import ConfigError, Qwen3cError, TargetError
from qwen3c.runtime.artifact import LIBRARY, MANIFEST, Manifest, ParamInfo, sha256_file
from qwen3c.schedules import bf16_dot, bf16_panel
from qwen3c.schedules.quant import QuantScheme
from qwen3c.targets import Target, get_target
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
                  quant_head: str | None = None, tuning_records: str | Path | None = None,
                  packed_weights: bool = True, dump_ir: str | Path | None = None) -> Path:
    """Compile a Qwen3 checkpoint into an artifact directory and return its path.

    With ``tensor_parallel`` N > 1 the library holds the functions of one shard (run by each of
    N workers) and the weights are cut into N sets; ``expert_parallel`` partitions MoE experts
    over the shards instead of cutting every expert. ``quant`` ("q8" or "q4") stores the
    projections as group-wise integers (``compile/quantization.py``), the lm_head as int8 or
    as ``quant_head`` says. ``tuning_records`` is a directory written by ``tune_model`` for the
    same target and CPU. ``packed_weights``: where the build stores bfloat16 panels, keep the
    lm_head and the dense projections losslessly in 12 bits (``schedules/bf16_packed.py``).
    """
    started = time.perf_counter()
    model_dir, output = Path(model_dir), Path(output)
    config = load_config(model_dir)
    context_length = _context_length(config, context_length)
    prefill_chunk_size = min(prefill_chunk_size or DEFAULT_PREFILL_CHUNK, context_length)
    backend = get_target(target)
    choice = backend.resolve(arch, cpu)
    parallel = Parallelism(tensor_parallel, expert_parallel)
    scheme, head_scheme = parse_quantization(quant, quant_group, quant_head)
    tvm_target = backend.tvm_target(choice)
    records = None
    if tuning_records is not None:
        if backend.tuning_phase is None:
            raise TargetError(f"target {backend.name} takes no tuning records")
        records = TuningRecords(Path(tuning_records), tvm_target)
    build = _build(backend, tvm_target, dtype, parallel, scheme, head_scheme)
    packing = packed_weights and build.panels
    if (packing and head_scheme is None and parallel.vocab_shards(config.vocab_size) == 1
            and bf16_panel.fits(config.vocab_size, config.hidden_size)):
        build = dataclasses.replace(build, packed_head=head_exceptions(model_dir, config))
    model = _model(config, backend, build, tvm_target)
    if packing and parallel.shards == 1:  # the projections' capacities, from the panel build
        capacities = projection_exceptions(model_dir, _param_infos(model.named_parameters()),
                                           config)
        if capacities:
            build = dataclasses.replace(build, packed_projections=tuple(capacities.items()))
            model = _model(config, backend, build, tvm_target)
    mod, named_params = _export(model, tvm_target)
    params = _param_infos(named_params)
    entry_points = _entry_points(mod)

    with Checkpoint(model_dir) as checkpoint:
        check_coverage(checkpoint, params, config)
        _prepare_output(output)
        weight_names = write_shards(
            converted_params(checkpoint, params, config, parallel.shards), output,
            parallel.shards)

    phases = backend.pipeline(tvm_target)
    if records is not None:
        phases = with_tuning_phase(phases, backend.tuning_phase, records)
    mod = run_pipeline(mod, phases, tvm_target, Path(dump_ir) if dump_ir else None)
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
        quant=None if scheme is None else {"bits": scheme.bits, "group": scheme.group,
                                           "head_bits": head_scheme.bits},
        params=tuple(params),
        weight_files=tuple({name: sha256_file(output / name) for name in names}
                           for names in weight_names),
        tokenizer_files=tuple(tokenizer_files),
        library_sha256=sha256_file(output / LIBRARY),
        compile_seconds=round(time.perf_counter() - started, 2),
        offload=offload,
        tuning=None if records is None else records.summary(),
    )
    (output / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    return output


def tune_model(model_dir: str | Path, records_dir: str | Path, *, target: str = "llvm",
               dtype: str = "float32", cpu: str | None = None, quant: str | None = None,
               quant_group: int = DEFAULT_GROUP, trials: int = 64,
               threads: int | None = None) -> list[TunedKernel]:
    """Tune the kernels of the model in ``model_dir`` that have no hand schedule, on this
    host, and write meta_schedule's database into ``records_dir`` (for ``tuning_records``)."""
    if trials < 1:
        raise ConfigError(f"trials must be >= 1, got {trials}")
    require_tuning_packages()
    config = load_config(Path(model_dir))
    backend = get_target(target)
    if backend.tuning_phase is None:
        raise TargetError(f"target {backend.name} cannot be tuned on this host: tuning runs "
                          "every candidate kernel, and only llvm kernels run here")
    choice = backend.resolve(None, cpu)
    backend.check_runnable(choice)
    backend.configure_threads(threads)
    backend.prepare_process(choice)
    scheme, head_scheme = parse_quantization(quant, quant_group, None)
    tvm_target = backend.tvm_target(choice)
    build = _build(backend, tvm_target, dtype, Parallelism(1, False), scheme, head_scheme)
    mod, _ = _export(_model(config, backend, build, tvm_target), tvm_target)
    phases = phases_until(backend.pipeline(tvm_target), backend.tuning_phase)
    mod = run_pipeline(mod, phases, tvm_target)
    records_dir = Path(records_dir)
    records_dir.mkdir(parents=True, exist_ok=True)
    kernels = tune_kernels(mod, tvm_target, records_dir, trials)
    write_summary(records_dir, kernels, model=config.architecture, dtype=dtype,
                  quant=quant, target=choice.to_dict(), trials_per_kernel=trials)
    return kernels


def _panels(backend: Target, tvm_target: tvm.target.Target, dtype: str) -> bool:
    """Whether the build stores its bfloat16 weights for the CPU's ``vdpbf16ps``."""
    return backend.name == "llvm" and bf16_dot.usable(tvm_target, dtype)


def _build(backend: Target, tvm_target: tvm.target.Target, dtype: str, parallel: Parallelism,
           scheme: QuantScheme | None, head_scheme: QuantScheme | None) -> Build:
    """How the model is built for this target, nothing packed in 12 bits yet."""
    return Build(dtype, parallel, scheme, head_scheme, gpu=tvm_target.kind.name == "cuda",
                 panels=_panels(backend, tvm_target, dtype))


def _model(config: Qwen3Config, backend: Target, build: Build,
           tvm_target: tvm.target.Target) -> Qwen3ForCausalLM:
    """The model's modules and parameters, after checking the target can build it this way."""
    if build.dtype not in NUMPY_DTYPES:
        raise ConfigError(f"unsupported dtype {build.dtype!r}; "
                          f"choose one of {', '.join(NUMPY_DTYPES)}")
    backend.check_model(config)
    build.parallel.check(config)
    backend.check_parallel(build.parallel)
    if build.quant is not None:
        backend.check_quantization(build.quant, build.parallel)
    with tvm_target:
        return Qwen3ForCausalLM(config, build)


def _export(model: Qwen3ForCausalLM, tvm_target: tvm.target.Target
            ) -> tuple[tvm.IRModule, list[tuple[str, Any]]]:
    """The model as a Relax module, and its parameters by name."""
    with tvm_target:
        mod, named_params = model.export_tvm(spec=model.get_default_spec())[:2]
    return mod, named_params


def _param_infos(named_params: Iterable[tuple[str, Any]]) -> list[ParamInfo]:
    """What the manifest records of each parameter of the graph."""
    return [ParamInfo(name, tuple(int(d) for d in p.shape), str(p.dtype), shard_spec(p),
                      quant_param(p), p.attrs.get(LAYOUT_ATTR))
            for name, p in named_params]


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
