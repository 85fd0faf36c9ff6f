"""The one interface every compilation target implements.

Nothing outside ``qwen3c.targets`` looks at a target's name: compile and runtime ask the target
object for its TVM target, its pipeline, how to export, and where to run.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from qwen3c.compile.config import Qwen3Config


@dataclasses.dataclass(frozen=True)
class Phase:
    """A named step of the compilation pipeline: a list of passes with a one-line purpose."""

    name: str
    purpose: str
    passes: list[tvm.transform.Pass]


@dataclasses.dataclass(frozen=True)
class TargetChoice:
    """What the user asked for, resolved to concrete values; recorded in the manifest."""

    name: str
    arch: str
    cpu: str
    # LLVM -mattr the CPU's name does not imply (the build host's, found by ``resolve``)
    features: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Target(ABC):
    """A compilation target: how to build for it, and whether this host can run the result."""

    name: str
    description: str
    verified: str  # what has actually been executed for this target, in plain words
    device_kind: str  # as written in --devices: "cpu", "cuda"
    # The pipeline phase after which `qwen3c tune` takes the kernels still unscheduled and
    # tuning records are replayed; None where this host cannot measure the target's kernels.
    tuning_phase: str | None = None

    @abstractmethod
    def resolve(self, arch: str | None, cpu: str | None) -> TargetChoice:
        """Fill in defaults (the host's arch and CPU) and reject unknown values."""

    @abstractmethod
    def check_model(self, config: Qwen3Config) -> None:
        """Raise ``TargetError`` for a model this target cannot compile."""

    @abstractmethod
    def check_parallel(self, parallel: Any) -> None:
        """Raise ``TargetError`` when this target cannot run a model cut over devices."""

    @abstractmethod
    def check_quantization(self, scheme: Any, parallel: Any) -> None:
        """Raise ``TargetError`` when this target has no kernels for quantized weights
        (``schedules/quant.py``) in that configuration."""

    @abstractmethod
    def tvm_target(self, choice: TargetChoice) -> tvm.target.Target: ...

    @abstractmethod
    def pipeline(self, tvm_target: tvm.target.Target) -> list[Phase]: ...

    def build(self, mod: tvm.IRModule, tvm_target: tvm.target.Target,
              choice: TargetChoice) -> tvm.runtime.Executable:
        """The lowered module, built into an executable (code generation for host and
        device)."""
        return relax.build(mod, target=tvm_target, relax_pipeline=None)

    @abstractmethod
    def export(self, executable: tvm.runtime.Executable, path: Path,
               choice: TargetChoice) -> None: ...

    def write_extras(self, mod: tvm.IRModule, output: Path) -> dict[str, Any] | None:
        """Write files beside the library from the compiled module; return what the
        manifest records about them (None: nothing)."""
        return None

    @abstractmethod
    def device(self) -> tvm.runtime.Device: ...

    @abstractmethod
    def configure_threads(self, threads: int | None, workers: int = 1) -> int | None:
        """Set how many host threads the runtime's kernels use in each of ``workers``
        processes sharing this host, before the first kernel runs; return that number (None
        where the kernels do not run on host threads)."""

    @abstractmethod
    def worker_launcher(self) -> list[str]:
        """The command prefix that starts each worker process of a sharded model (empty when
        a plain process will do)."""

    @abstractmethod
    def start_collectives(self, session: Any, device_ids: list[int], scratch: Path) -> None:
        """Connect the workers of a disco ``session`` through this target's collective library
        (``scratch`` is a private directory that lives as long as the session)."""

    @abstractmethod
    def prepare_process(self, choice: TargetChoice) -> None:
        """Set up this process to run kernels built for ``choice``, before the first runs
        (each worker process too)."""

    @abstractmethod
    def check_runnable(self, choice: TargetChoice) -> None:
        """Raise ``TargetError`` when an artifact built for ``choice`` cannot run on this host."""
