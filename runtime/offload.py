"""The partitions of an Ascend or MLU artifact (BYOC): where their code comes from at load time.

The host graph in model.so calls each partition by its symbol. Those symbols come from the
vendor library built at compile time (``vendor/partitions.so``), or, with
``reference_partitions``, from qwen3c's numpy implementations, which let the host graph run and
be checked on a machine without the accelerator.
"""

from __future__ import annotations

from pathlib import Path

import tvm

from qwen3c.errors import ArtifactError
from qwen3c.runtime.artifact import Manifest
from qwen3c.targets import byoc_reference, get_target
from qwen3c.targets.byoc import Partition


def attach_partitions(library: tvm.runtime.Module, directory: Path, manifest: Manifest,
                      reference: bool) -> None:
    offload = manifest.offload
    if offload is None:
        if reference:
            raise ArtifactError("reference_partitions applies to Ascend and MLU artifacts; "
                                f"this one is for {manifest.target.name}")
        return
    if reference:
        byoc_reference.register([Partition.from_dict(p) for p in offload["partitions"]])
        return
    if offload["library"] is None:
        target = get_target(manifest.target.name)
        raise ArtifactError(
            f"this {target.name} artifact has no partition library ({offload['build']}); "
            f"recompile with {target.sdk_env} pointing at the {target.sdk}, or load it with "
            "reference_partitions=True (CLI: --reference-partitions) to run the partitions with "
            "qwen3c's CPU references")
    library.import_module(tvm.runtime.load_module(str(directory / offload["library"])))
