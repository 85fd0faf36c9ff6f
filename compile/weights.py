"""Where each weight comes from: HF checkpoint tensors → our parameters → artifact shards.

The declarative mappings (``FUSED``, ``STACKED_EXPERTS``) are the one place that says how HF's
separate projections become our fused ones and how per-expert tensors become one tensor per
layer; everything else is a 1:1 rename-free copy with a dtype conversion.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from qwen3c.compile.config import Qwen3Config
from qwen3c.errors import CheckpointError
from qwen3c.runtime.artifact import ParamInfo
from qwen3c.schedules import bf16_packed, bf16_panel
from qwen3c.schedules.quant import LAYOUTS as QUANT_LAYOUTS
from qwen3c.schedules.quant import quantize

# Our fused module → the HF modules whose weights are concatenated (output axis) to make it.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
# Our per-layer expert tensors → the HF per-expert modules, stacked over experts ``{e}``.
STACKED_EXPERTS = {
    "mlp.experts.gate_up_proj": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"),
    "mlp.experts.down_proj": ("mlp.experts.{e}.down_proj",),
}
# HF tensors that carry no information for us (a tied head repeats the embedding table).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TIED_HEAD = "lm_head.weight"
TIED_EMBEDDING = "model.embed_tokens.weight"

NUMPY_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


@dataclasses.dataclass(frozen=True)
class Sources:
    """The HF tensors that make one of our parameters: the names in each row are concatenated
    along the output axis; a stacked parameter has one row per expert, stacked on axis 0."""

    rows: tuple[tuple[str, ...], ...]
    stacked: bool = False

    def names(self) -> list[str]:
        return [name for row in self.rows for name in row]


def hf_sources(param_name: str, num_experts: int = 0, tied: bool = False) -> Sources:
    """Where one of our parameters comes from in an HF checkpoint (a tied head, which only a
    quantized or 12-bit model has, is the embedding table)."""
    if tied and param_name == TIED_HEAD:
        return Sources(((TIED_EMBEDDING,),))
    for stacked, parts in STACKED_EXPERTS.items():
        if param_name.endswith(stacked):
            prefix = param_name[: -len(stacked)]
            return Sources(tuple(tuple(f"{prefix}{part.format(e=e)}.weight" for part in parts)
                                 for e in range(num_experts)), stacked=True)
    module, _, leaf = param_name.rpartition(".")
    for fused, parts in FUSED.items():
        if module.endswith(fused):
            prefix = module[: -len(fused)]
            return Sources((tuple(f"{prefix}{part}.{leaf}" for part in parts),))
    return Sources(((param_name,),))


class Checkpoint:
    """Read-only view of a checkpoint's safetensors files (single file or sharded with index)."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.files = self._weight_files(model_dir)
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self.location: dict[str, Path] = {}
        try:
            for file in self.files:
                handle = self._open(file)
                self._handles[file] = handle
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    self.location[key] = file
        except BaseException:
            self._stack.close()  # files opened before the bad one
            raise

    @staticmethod
    def _weight_files(model_dir: Path) -> list[Path]:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as bad:
                raise CheckpointError(f"{index} is malformed: {bad}") from None
            files = sorted({model_dir / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names missing weight files: {', '.join(missing)}")
            return files
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors weight files in {model_dir}")
        return files

    def _open(self, file: Path):
        try:
            return self._stack.enter_context(safe_open(str(file), framework="numpy"))
        except (SafetensorError, OSError, ValueError) as bad:
            raise CheckpointError(
                f"{file} is not a readable safetensors file (truncated or corrupt?): {bad}"
            ) from None

    def keys(self) -> set[str]:
        return set(self.location)

    def tensor(self, name: str) -> np.ndarray:
        if name not in self.location:
            raise CheckpointError(f"weight {name!r} is missing from the checkpoint in "
                                  f"{self.model_dir}")
        file = self.location[name]
        try:
            return self._handles[file].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as bad:
            raise CheckpointError(f"cannot read {name!r} from {file} (truncated or corrupt?): "
                                  f"{bad}") from None

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sources(param: ParamInfo, config: Qwen3Config) -> Sources:
    """HF sources of a parameter, or of the float weight a quantized or packed one is made
    from."""
    return hf_sources(_source_name(param), config.num_experts, config.tie_word_embeddings)


def _source_name(param: ParamInfo) -> str:
    if param.quant:
        return param.quant.float_name(param.name)
    role = bf16_packed.part_role(param.layout)
    return param.name if role is None else bf16_packed.part_source(param.name, role)


def check_coverage(checkpoint: Checkpoint, params: list[ParamInfo],
                   config: Qwen3Config) -> None:
    """Every tensor we need is present and every tensor present is used: else the checkpoint is
    not the model the config describes."""
    needed = {src for param in params for src in _sources(param, config).names()}
    present = checkpoint.keys()
    missing = sorted(needed - present)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} weights the config needs, "
                              f"e.g. {', '.join(missing[:3])}")
    unused = sorted(name for name in present - needed
                    if name != TIED_HEAD and not name.endswith(IGNORED_SUFFIXES))
    if unused:
        raise CheckpointError(f"checkpoint has {len(unused)} weights this architecture does not "
                              f"use, e.g. {', '.join(unused[:3])}: does config.json match?")


def converted_params(checkpoint: Checkpoint, params: list[ParamInfo], config: Qwen3Config,
                     shards: int = 1) -> Iterator[tuple[str, list[np.ndarray]]]:
    """Yield each of our parameters, assembled from its HF sources in its own dtype, as one
    array per shard: cut by its ``ShardSpec``, or the same array for every shard. A quantized
    weight is assembled in float32 and quantized once for its integers and its scales."""

    def assemble(param: ParamInfo, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        return _assembled(checkpoint, param, config, dtype, shape)

    quantized: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # float name -> (values, scales)
    packed: dict[str, dict[str, np.ndarray]] = {}  # weight name -> its parts left to write
    for param in tqdm(params, desc="converting weights", unit="tensor", leave=False):
        role = bf16_packed.part_role(param.layout)
        if role is not None:  # one part of a 12-bit bfloat16 weight (never cut)
            source = bf16_packed.part_source(param.name, role)
            if source not in packed:
                shape, capacity = _packed_shape(params, source)
                weight = assemble(param, NUMPY_DTYPES["bfloat16"], shape)
                packed[source] = dataclasses.asdict(bf16_packed.pack(weight, capacity))
            array = packed[source].pop(role)
            if not packed[source]:
                del packed[source]
            if array.shape != param.shape:  # the checkpoint changed since the count
                raise CheckpointError(f"weight {source!r} packs with {array.shape} for its "
                                      f"{role}, the graph was built for {param.shape}")
            yield param.name, [array] * shards
            continue
        if param.quant:
            float_name = param.quant.float_name(param.name)
            if float_name not in quantized:
                weight = assemble(param, np.dtype(np.float32),
                                  param.quant.float_shape(param.shape))
                if param.layout:  # the rows' order in the kernel's layout
                    weight = QUANT_LAYOUTS[param.layout](weight)
                quantized[float_name] = quantize(weight, param.quant.scheme)
            values, scales = quantized[float_name]
            if param.quant.role == "scales":
                del quantized[float_name]
            yield param.name, [values if param.quant.role == "values" else scales] * shards
            continue
        whole = param.shard.full_shape(param.shape, shards) if param.shard else param.shape
        if param.layout:  # a kernel's layout: never cut (panels: one shard only, model.py)
            weight = assemble(param, NUMPY_DTYPES[param.dtype], bf16_panel.weight_shape(whole))
            yield param.name, [bf16_panel.LAYOUTS[param.layout](weight)] * shards
            continue
        array = assemble(param, NUMPY_DTYPES[param.dtype], whole)
        if param.shard and shards > 1:
            yield param.name, param.shard.split(array, shards)
        else:
            yield param.name, [array] * shards


def head_exceptions(model_dir: Path, config: Qwen3Config) -> int:
    """How many of the lm_head's values (the embedding table's when tied), converted to
    bfloat16 as ``converted_params`` does, its 12-bit packing lists apart (``bf16_packed``):
    a parameter's size, needed before the graph is built."""
    (name,), = hf_sources(TIED_HEAD, tied=config.tie_word_embeddings).rows
    with Checkpoint(model_dir) as checkpoint:
        weight = _cast(checkpoint.tensor(name), NUMPY_DTYPES["bfloat16"])
    return bf16_packed.count_exceptions(weight)


def projection_exceptions(model_dir: Path, params: list[ParamInfo],
                          config: Qwen3Config) -> dict[tuple[int, int], int]:
    """For each [n, k] shape of the dense projections stored in bfloat16 panels (``params``
    of a build without packed projections), the most exceptions the 12-bit packing of one of
    them lists apart: the capacity of the shape's packed parameters, needed before the graph
    is built (one kernel per shape, not per weight)."""
    capacity: dict[tuple[int, int], int] = {}
    with Checkpoint(model_dir) as checkpoint:
        for param in params:
            if param.layout != bf16_panel.LAYOUT or len(param.shape) != 4:  # dense weights only
                continue
            shape = bf16_panel.weight_shape(param.shape)
            weight = _assembled(checkpoint, param, config, NUMPY_DTYPES["bfloat16"], shape)
            count = bf16_packed.count_exceptions(weight)
            capacity[shape] = max(capacity.get(shape, 0), count)
    return capacity


def _assembled(checkpoint: Checkpoint, param: ParamInfo, config: Qwen3Config, dtype: np.dtype,
               shape: tuple[int, ...]) -> np.ndarray:
    """The float weight of ``param`` from its HF sources, in ``dtype``, checked to be
    ``shape``."""
    sources = _sources(param, config)
    try:
        rows = [_concatenated(checkpoint, names, dtype) for names in sources.rows]
        array = np.stack(rows) if sources.stacked else rows[0]
    except ValueError as bad:  # parts whose shapes do not line up
        raise CheckpointError(f"cannot assemble {param.name!r} from "
                              f"{', '.join(sources.names()[:3])}: {bad}") from None
    if tuple(array.shape) != tuple(shape):
        raise CheckpointError(f"weight {param.name!r} has shape {tuple(array.shape)} in the "
                              f"checkpoint, but config.json implies {tuple(shape)}")
    return np.ascontiguousarray(array)


def _packed_shape(params: list[ParamInfo], source: str) -> tuple[tuple[int, int], int]:
    """The [n, k] shape of a packed weight, from its values part ([n / 64, k / 2, .]), and its
    exception capacity, from its ``at`` part."""
    values = next(p for p in params if p.name == source)
    at = next(p for p in params if p.name == f"{source}_at")
    panels, pairs, _ = values.shape
    return (panels * bf16_packed.PANEL, pairs * 2), at.shape[0]


def _concatenated(checkpoint: Checkpoint, names: tuple[str, ...], dtype: np.dtype) -> np.ndarray:
    parts = [_cast(checkpoint.tensor(name), dtype) for name in names]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return array if array.dtype == dtype else array.astype(np.float32).astype(dtype)


class ShardWriter:
    """Writes one shard's tensors into ``{prefix}NNNNN.safetensors`` files of about
    ``file_bytes`` each, so no file holds more than one shard."""

    def __init__(self, out_dir: Path, prefix: str, file_bytes: int = 2 << 30):
        self.out_dir, self.prefix, self.file_bytes = out_dir, prefix, file_bytes
        self.names: list[str] = []
        self._pending: dict[str, np.ndarray] = {}
        self._size = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if self._pending and self._size + array.nbytes > self.file_bytes:
            self.flush()
        self._pending[name] = array
        self._size += array.nbytes

    def flush(self) -> None:
        if self._pending:
            name = f"{self.prefix}{len(self.names) + 1:05d}.safetensors"
            save_file(self._pending, str(self.out_dir / name))
            self.names.append(name)
            self._pending, self._size = {}, 0


def write_shards(tensors: Iterator[tuple[str, list[np.ndarray]]], out_dir: Path,
                 shards: int) -> list[list[str]]:
    """Write each shard's arrays into its own weight files; return the file names per shard."""
    prefixes = ["weights-"] if shards == 1 else [f"weights-shard{r}-" for r in range(shards)]
    writers = [ShardWriter(out_dir, prefix) for prefix in prefixes]
    for name, arrays in tensors:
        for writer, array in zip(writers, arrays, strict=True):
            writer.add(name, array)
    for writer in writers:
        writer.flush()
    return [writer.names for writer in writers]
