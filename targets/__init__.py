"""Registry of compilation targets; the only place that maps a target name to its module."""

from __future__ import annotations

from qwen3c.errors import TargetError
from qwen3c.targets.ascend import AscendTarget
from qwen3c.targets.base import Phase, Target, TargetChoice
from qwen3c.targets.cuda import CudaTarget
from qwen3c.targets.llvm import LlvmTarget
from qwen3c.targets.mlu import MluTarget

_REGISTRY: dict[str, Target] = {
    t.name: t for t in (LlvmTarget(), CudaTarget(), AscendTarget(), MluTarget())}


def get_target(name: str) -> Target:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TargetError(
            f"unknown target {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def all_targets() -> list[Target]:
    return list(_REGISTRY.values())


__all__ = ["Phase", "Target", "TargetChoice", "all_targets", "get_target"]
