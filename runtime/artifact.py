"""The compiled artifact on disk: a directory with model.so, manifest.json, weights, tokenizer.

The manifest makes the artifact self-describing and lets loading refuse, with a reason, anything
that would crash or silently compute garbage: another TVM, another target, edited weight files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import tvm
from safetensors import safe_open

from qwen3c.compile.config import Qwen3Config
from qwen3c.compile.quantization import QuantParam
from qwen3c.compile.sharding import Parallelism, ShardSpec
from qwen3c.errors import ArtifactError, Qwen3cError
from qwen3c.runtime.host_memory import HugePageArena, is_host
from qwen3c.targets import TargetChoice, get_target

FORMAT_VERSION = 6
MANIFEST = "manifest.json"
LIBRARY = "model.so"


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter as each shard holds it; ``shard`` says how the whole was cut (None:
    every shard holds all of it)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    shard: ShardSpec | None = None
    quant: QuantParam | None = None  # integers or scales of a quantized weight
    layout: str | None = None  # a kernel's layout of the weight (schedules/bf16_panel.py)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * tvm.DataType(self.dtype).bits // 8


@dataclasses.dataclass(frozen=True)
class Manifest:
    qwen3c_version: str
    tvm_version: str
    architecture: str
    model: dict[str, Any]
    target: TargetChoice
    dtype: str
    context_length: int
    prefill_chunk_size: int
    entry_points: dict[str, dict[str, Any]]
    parallel: Parallelism
    quant: dict[str, int] | None  # {"bits", "group", "head_bits"}, None: not quantized
    params: tuple[ParamInfo, ...]
    weight_files: tuple[dict[str, str], ...]  # per shard: file name -> sha256
    tokenizer_files: tuple[str, ...]
    library_sha256: str
    compile_seconds: float
    # BYOC targets: partitions, vendor sources/library and their sha256 (byoc_target.py)
    offload: dict[str, Any] | None = None
    tuning: dict[str, Any] | None = None  # tuning records replayed: how many kernels took them
    format_version: int = FORMAT_VERSION

    def config(self) -> Qwen3Config:
        return Qwen3Config(**self.model)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        if raw.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"artifact format {raw.get('format_version')} is not the supported "
                f"{FORMAT_VERSION}; recompile it with this qwen3c")
        raw["target"] = TargetChoice(**{**raw["target"],
                                         "features": tuple(raw["target"].get("features", ()))})
        raw["parallel"] = Parallelism(**raw["parallel"])
        raw["params"] = tuple(
            ParamInfo(p["name"], tuple(p["shape"]), p["dtype"],
                      ShardSpec.from_dict(p["shard"]) if p["shard"] else None,
                      QuantParam.from_dict(p["quant"]) if p["quant"] else None,
                      p["layout"])
            for p in raw["params"])
        raw["weight_files"] = tuple(raw["weight_files"])
        if len(raw["weight_files"]) != raw["parallel"].shards:
            raise ValueError("weight_files does not list one set of files per shard")
        raw["tokenizer_files"] = tuple(raw["tokenizer_files"])
        return cls(**raw)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_dir(path: str | Path) -> Path:
    """Accept either the artifact directory or the model.so inside it."""
    path = Path(path)
    directory = path.parent if path.suffix == ".so" else path
    if not (directory / MANIFEST).is_file():
        raise ArtifactError(f"{path} is not a qwen3c artifact: {directory / MANIFEST} not found")
    return directory


def read_manifest(path: str | Path) -> tuple[Path, Manifest]:
    directory = artifact_dir(path)
    try:
        manifest = Manifest.from_json((directory / MANIFEST).read_text(encoding="utf-8"))
        manifest.config()
    except Qwen3cError:
        raise
    except (ValueError, KeyError, TypeError) as bad:
        raise ArtifactError(f"{directory / MANIFEST} is malformed: {bad}") from None
    return directory, manifest


def verify_artifact(directory: Path, manifest: Manifest) -> None:
    """Refuse an artifact this host cannot run correctly: TVM, target, or files differ."""
    if manifest.tvm_version != tvm.__version__:
        raise ArtifactError(
            f"artifact was built with TVM {manifest.tvm_version}, this is TVM {tvm.__version__}; "
            "recompile it")
    try:
        get_target(manifest.target.name).check_runnable(manifest.target)
    except Qwen3cError as err:
        raise ArtifactError(str(err)) from None
    expected = {LIBRARY: manifest.library_sha256}
    if manifest.offload:
        expected |= manifest.offload["sha256"]
    for files in manifest.weight_files:
        expected |= files
    for name, digest in expected.items():
        file = directory / name
        if not file.is_file():
            raise ArtifactError(f"artifact file {file} is missing")
        if sha256_file(file) != digest:
            raise ArtifactError(
                f"{file} does not match the sha256 in the manifest: it was changed after "
                "compilation; recompile the artifact")


def load_params(directory: Path, manifest: Manifest, device: tvm.runtime.Device,
                shard: int = 0) -> list[tvm.runtime.Tensor]:
    """One shard's weights as device tensors, in the order the compiled functions take them.

    Read one tensor at a time, each from a fresh mapping of its file: the mapping's pages
    count as this process's memory while it is open, so reading all tensors through one
    mapping (or loading whole files) held a second copy of the weights at the peak (0.6B
    bf16: peak RSS 2.62 GB; now the weights plus one tensor). Host weights go into one
    huge-page arena (``host_memory.py``)."""
    files = {}
    for name in manifest.weight_files[shard]:
        with safe_open(str(directory / name), framework="numpy") as handle:
            files.update(dict.fromkeys(handle.keys(), directory / name))
    arena = None
    if is_host(device):
        arena = HugePageArena(sum(HugePageArena.footprint(param.nbytes)
                                  for param in manifest.params))
    tensors = []
    for param in manifest.params:
        array = None
        if param.name in files:
            with safe_open(str(files[param.name]), framework="numpy") as handle:
                array = handle.get_tensor(param.name)
        if array is None or tuple(array.shape) != param.shape or str(array.dtype) != param.dtype:
            raise ArtifactError(f"weight {param.name!r} in {directory} does not match the "
                                "manifest; recompile the artifact")
        tensors.append(arena.tensor(array, param.dtype) if arena
                       else tvm.runtime.tensor(array, device))
    return tensors
