"""NVIDIA GPUs through TVM's CUDA codegen, scheduled by TVM's dlight GPU rules.

nvcc compiles the kernels at build time into a fatbin in the library (``cuda_fatbin.py``):
machine code for the requested arch plus its PTX, which the driver can compile for newer GPUs.
The build machines have no GPU; sm_90 artifacts ran on an H100 once (README, "cuda").
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from qwen3c.compile.config import Qwen3Config
from qwen3c.errors import TargetError
from qwen3c.targets.base import Phase, Target, TargetChoice
from qwen3c.targets.cuda_fatbin import fatbin_packer, nvcc_as_cuda_compiler

ARCHS = ("sm_80", "sm_90")


class CudaTarget(Target):
    name = "cuda"
    description = "NVIDIA GPUs (sm_80, sm_90) via TVM's CUDA codegen and dlight schedules"
    device_kind = "cuda"
    verified = ("dense and MoE Qwen3 compiled for sm_80/sm_90 in float16/bfloat16/float32 "
                "(nvcc SASS + PTX for the arch); sm_90 ran once on an H100 and matched HF "
                "(tests/gpu/run_gpu_checks.sh); sm_80 and sharded (--tensor-parallel) "
                "compiled only (several GPUs need a TVM built with NCCL)")

    def resolve(self, arch: str | None, cpu: str | None) -> TargetChoice:
        arch = arch or ARCHS[0]
        if arch not in ARCHS:
            raise TargetError(f"cuda target: unsupported arch {arch!r}; supported: "
                              f"{', '.join(ARCHS)}")
        if cpu is not None:
            raise TargetError("--cpu applies to the llvm target only")
        return TargetChoice(name=self.name, arch=arch, cpu="generic")

    def check_model(self, config: Qwen3Config) -> None:
        """Dense and MoE Qwen3 both compile (MoE with schedules/moe_gpu.py)."""

    def check_parallel(self, parallel: Any) -> None:
        """Sharded models compile for cuda (NCCL collectives at run time)."""

    def check_quantization(self, scheme: Any, parallel: Any) -> None:
        raise TargetError("quantized weights cannot be compiled for cuda yet: qwen3c's "
                          "dequantizing kernels are CPU-only")

    def tvm_target(self, choice: TargetChoice) -> tvm.target.Target:
        return tvm.target.Target({"kind": "cuda", "arch": choice.arch},
                                 host={"kind": "llvm", "mcpu": choice.cpu})

    def pipeline(self, tvm_target: tvm.target.Target) -> list[Phase]:
        return [
            Phase("prepare", "fold transposes into matmuls before they are lowered", [
                relax.transform.FuseTransposeMatmul(),
            ]),
            Phase("default", "TVM's cuda pipeline: legalize, fuse, dlight GPU schedules, lower", [
                relax.pipeline.get_default_pipeline(tvm_target),
            ]),
        ]

    def build(self, mod: tvm.IRModule, tvm_target: tvm.target.Target,
              choice: TargetChoice) -> tvm.runtime.Executable:
        _require_nvcc()
        with nvcc_as_cuda_compiler(choice.arch):
            return super().build(mod, tvm_target, choice)

    def export(self, executable: tvm.runtime.Executable, path: Path,
               choice: TargetChoice) -> None:
        executable.export_library(str(path), fpack_imports=fatbin_packer(choice.arch))

    def device(self) -> tvm.runtime.Device:
        return tvm.cuda(0)

    def configure_threads(self, threads: int | None, workers: int = 1) -> None:
        """GPU kernels do not use the host thread pool."""
        return None

    def worker_launcher(self) -> list[str]:
        return []

    def start_collectives(self, session: Any, device_ids: list[int], scratch: Path) -> None:
        if tvm.get_global_func("runtime.disco.nccl.init_ccl", allow_missing=True) is None:
            raise TargetError("running on several GPUs needs NCCL, and this TVM build has none "
                              "(build TVM with USE_NCCL=ON)")
        session.init_ccl("nccl", *device_ids)

    def prepare_process(self, choice: TargetChoice) -> None:
        """CUDA kernels need nothing of the host process."""

    def check_runnable(self, choice: TargetChoice) -> None:
        if not tvm.cuda(0).exist:
            raise TargetError(f"this artifact runs on an NVIDIA GPU ({choice.arch}); no CUDA "
                              "device is visible on this machine")


def _require_nvcc() -> None:
    if shutil.which("nvcc") is None:
        raise TargetError("compiling for cuda needs nvcc (the CUDA toolkit) on PATH")
