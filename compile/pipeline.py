"""Run a target's compilation pipeline phase by phase, optionally dumping the IR after each."""

from __future__ import annotations

from pathlib import Path

import tvm

from qwen3c.targets import Phase


def run_pipeline(mod: tvm.IRModule, phases: list[Phase], tvm_target: tvm.target.Target,
                 dump_dir: Path | None = None) -> tvm.IRModule:
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "00-input.py").write_text(mod.script(), encoding="utf-8")
    with tvm_target, tvm.transform.PassContext(opt_level=3):
        for number, phase in enumerate(phases, start=1):
            mod = tvm.transform.Sequential(phase.passes, name=phase.name)(mod)
            if dump_dir is not None:
                (dump_dir / f"{number:02d}-{phase.name}.py").write_text(mod.script(),
                                                                        encoding="utf-8")
    return mod
