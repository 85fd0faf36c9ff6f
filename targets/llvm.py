"""CPU through LLVM: x86-64 and aarch64 (cross-compiled with Debian's aarch64 GNU toolchain).

Kernels are vectorised for the chosen CPU: the register-tiled GEMM takes its vector width and
register count from the target's features (AVX-512: 32 x 16 float32 lanes, AVX2: 16 x 8,
NEON: 32 x 4).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import tvm
from tvm import relax
from tvm.support.cc import cross_compiler

from qwen3c.compile.config import Qwen3Config
from qwen3c.errors import TargetError
from qwen3c.schedules import amx_gemm, dispatch_cpu_gemm, schedule_cpu_matmuls
from qwen3c.schedules.mlp import fuse_gate_up_silu
from qwen3c.schedules.qk_norm import fuse_qk_norm
from qwen3c.schedules.residual_norm import fuse_residual_norm
from qwen3c.targets.base import Phase, Target, TargetChoice
from qwen3c.targets.noalias import uniform_noalias


@dataclasses.dataclass(frozen=True)
class CpuArch:
    """What LLVM and the linker need to produce a library for one CPU architecture."""

    triple: str
    features: tuple[str, ...]  # LLVM -mattr every CPU of this architecture has
    cross_compiler: str  # the GNU C++ driver that links its shared libraries on another host


ARCHES = {
    "x86_64": CpuArch("x86_64-linux-gnu", (), "x86_64-linux-gnu-g++"),
    "aarch64": CpuArch("aarch64-linux-gnu", ("+neon",), "aarch64-linux-gnu-g++"),
}


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def host_cpu() -> str:
    """LLVM's name for this CPU; ``mcpu=native`` silently means ``generic`` in TVM 0.27."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


# The x86 features the kernels choose their instructions by (``schedules.quant.integer_dots``,
# ``schedules.bf16_dot``, ``schedules.amx_gemm``), as /proc/cpuinfo and LLVM's -mattr name
# them. LLVM derives a host's CPU name from its model number, and a virtual machine may report
# an older model than the features it passes through: an Intel Xeon with AVX512-BF16 and AMX
# reads as ``rocketlake``, which has neither, so a kernel choosing by it would never see them.
KERNEL_FEATURES = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512_vnni": "avx512vnni",
    "avx512_bf16": "avx512bf16",
    "amx_tile": "amx-tile",
    "amx_bf16": "amx-bf16",
}

# Linux keeps the AMX tile registers off until a process asks for them (arch_prctl
# ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, Linux 5.16 and later); the first tile
# instruction of a process that did not ask is killed by SIGILL.
_SYS_ARCH_PRCTL = 158
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def host_kernel_features() -> frozenset[str]:
    """The ``KERNEL_FEATURES`` this host's CPUs report (LLVM names; empty off Linux x86)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])
    return frozenset(KERNEL_FEATURES[f] for f in flags if f in KERNEL_FEATURES)


def features_beyond(cpu: str, triple: str, available: frozenset[str]) -> tuple[str, ...]:
    """The ``available`` features LLVM's model of ``cpu`` lacks, sorted: the -mattr that make
    a build for this host use everything the kernels can."""
    named = tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": cpu})
    return tuple(sorted(f for f in available
                        if not tvm.target.codegen.target_has_features(f, named)))


def request_tile_data() -> None:
    """Ask Linux for this process's AMX tile registers (every thread's, once for all; asking
    again is harmless)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        raise TargetError(
            "this artifact's kernels use AMX tiles, and the OS refused them to this process "
            f"({os.strerror(ctypes.get_errno())}; Linux 5.16 or later grants them); recompile "
            "with --cpu naming a CPU without AMX, e.g. --cpu icelake-server")


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        cpus = os.sched_getaffinity(0)
    else:
        cpus = range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("?", str(cpu)))
    return max(1, len(cores))


class LlvmTarget(Target):
    name = "llvm"
    description = ("CPU via LLVM: x86_64, aarch64 (--arch; vectorised for the build host's CPU "
                   "unless --cpu is given)")
    device_kind = "cpu"
    tuning_phase = "schedule"
    verified = ("x86_64: compiled and run here, logits checked against HF transformers; "
                "sharded (--tensor-parallel 2/4, --expert-parallel) run on CPU worker "
                "processes and checked against the unsharded model. aarch64 (NEON): "
                "cross-compiled here, the whole tiny dense and MoE models run under qemu-user "
                "through TVM's aarch64 runtime, logits checked against the x86_64 build; never "
                "run on aarch64 hardware, and the Python runtime never ran on aarch64")

    def resolve(self, arch: str | None, cpu: str | None) -> TargetChoice:
        arch = arch or host_arch()
        if arch not in ARCHES:
            raise TargetError(
                f"llvm target: unsupported arch {arch!r}; supported: {', '.join(ARCHES)}")
        triple = ARCHES[arch].triple
        if cpu is None:
            if arch != host_arch():
                return TargetChoice(name=self.name, arch=arch, cpu="generic")
            cpu = host_cpu()
            return TargetChoice(name=self.name, arch=arch, cpu=cpu,
                                features=features_beyond(cpu, triple, host_kernel_features()))
        if cpu != "generic" and not tvm.target.codegen.llvm_is_valid_cpu(cpu, triple):
            raise TargetError(f"LLVM knows no {arch} CPU named {cpu!r}; see `llc "
                              f"-mtriple={triple} -mcpu=help`, or use generic")
        return TargetChoice(name=self.name, arch=arch, cpu=cpu)

    def check_model(self, config: Qwen3Config) -> None:
        """Dense and MoE Qwen3 both compile for the CPU."""

    def check_parallel(self, parallel: Any) -> None:
        """Tensor and expert parallelism run on CPU worker processes."""

    def check_quantization(self, scheme: Any, parallel: Any) -> None:
        if parallel.shards > 1:
            raise TargetError("quantized weights cannot be sharded yet: compile with --quant "
                              "or with --tensor-parallel, not both")

    def tvm_target(self, choice: TargetChoice) -> tvm.target.Target:
        arch = ARCHES[choice.arch]
        mattr = [*arch.features, *(f"+{feature}" for feature in choice.features)]
        return tvm.target.Target({
            "kind": "llvm",
            "mtriple": arch.triple,
            "mcpu": choice.cpu,
            **({"mattr": mattr} if mattr else {}),
            "num-cores": physical_cores(),
            # Without reassociation LLVM will not vectorise float reductions (about 4.7x slower).
            "fast-math-reassoc": True,
            "fast-math-contract": True,
        })

    def pipeline(self, tvm_target: tvm.target.Target) -> list[Phase]:
        return [
            Phase("kernels", "route projections, the q/k norms, residual add + RMSNorm and the "
                  "MLP's SwiGLU to our kernels", [
                fuse_qk_norm(),
                fuse_residual_norm(),
                fuse_gate_up_silu(tvm_target),
                relax.transform.DeadCodeElimination(),
                dispatch_cpu_gemm(tvm_target),
                # Our kernels take 2-D rows: chains of reshapes around them become one or none.
                relax.transform.RemoveRedundantReshape(),
                relax.transform.DeadCodeElimination(),
            ]),
            Phase("prepare", "fold remaining transposes into matmuls before lowering", [
                relax.transform.FuseTransposeMatmul(),
            ]),
            Phase("dispatch", "route sampling and sort/scan ops to library kernels", [
                relax.backend.DispatchSampling(),
                relax.backend.DispatchSortScan(),
            ]),
            Phase("legalize", "lower Relax ops to TIR and fuse neighbours into single kernels", [
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
            ]),
            Phase("schedule", "parallel, vectorised schedule for the other matmuls", [
                schedule_cpu_matmuls,
            ]),
            Phase("lower", "leave dataflow form and rewrite calls into destination passing", [
                relax.transform.RewriteDataflowReshape(),
                relax.transform.ToNonDataflow(),
                relax.transform.RemovePurityChecking(),
                relax.transform.CallTIRRewrite(),
            ]),
            Phase("finalize", "plan memory and lower to VM builtins", [
                relax.transform.StaticPlanBlockMemory(),
                relax.transform.LowerAllocTensor(),
                relax.transform.KillAfterLastUse(),
                relax.transform.LowerRuntimeBuiltin(),
                relax.transform.ComputePrimValue(),
                relax.transform.VMShapeLower(),
                relax.transform.AttachGlobalSymbol(),
                uniform_noalias,
            ]),
        ]

    def export(self, executable: tvm.runtime.Executable, path: Path,
               choice: TargetChoice) -> None:
        """Link with the host's compiler, or for another architecture with its GNU cross
        compiler (Debian: g++-aarch64-linux-gnu)."""
        if choice.arch == host_arch():
            executable.export_library(str(path))
            return
        compiler = ARCHES[choice.arch].cross_compiler
        if shutil.which(compiler) is None:
            raise TargetError(f"linking for {choice.arch} needs the cross compiler {compiler}, "
                              "which is not on PATH (Debian/Ubuntu: apt-get install "
                              f"g++-{ARCHES[choice.arch].triple})")
        executable.export_library(str(path), fcompile=cross_compiler(compiler))

    def device(self) -> tvm.runtime.Device:
        return tvm.cpu()

    def configure_threads(self, threads: int | None, workers: int = 1) -> int:
        """TVM's pool reads TVM_NUM_THREADS once, when it starts; unset, it assumes x86 has
        hyper-threading and halves the CPU count (one thread on a 2-core machine). Workers
        of a sharded model share the cores."""
        if threads is not None:
            if threads < 1:
                raise TargetError(f"threads must be >= 1, got {threads}")
            os.environ["TVM_NUM_THREADS"] = str(threads)
        elif workers > 1:
            os.environ["TVM_NUM_THREADS"] = str(max(1, physical_cores() // workers))
        else:
            os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))
        return int(os.environ["TVM_NUM_THREADS"])

    def worker_launcher(self) -> list[str]:
        """TVM has no CPU collectives; qwen3c's run on MPI, one MPI job per worker (importing
        them registers them in this process, for worker 0)."""
        from qwen3c.runtime import collectives

        return collectives.worker_launcher()

    def start_collectives(self, session: Any, device_ids: list[int], scratch: Path) -> None:
        init = session.get_global_func("qwen3c.collectives.init")
        init(str(scratch), len(device_ids))

    def prepare_process(self, choice: TargetChoice) -> None:
        """Kernels on AMX tiles need the tile registers, which Linux grants on request."""
        if amx_gemm.has_tiles(self.tvm_target(choice)):
            request_tile_data()

    def check_runnable(self, choice: TargetChoice) -> None:
        if choice.arch != host_arch():
            raise TargetError(
                f"artifact was built for {choice.arch}; this host is {host_arch()}")
        if choice.cpu not in ("generic", host_cpu()):
            raise TargetError(
                f"artifact was built for CPU {choice.cpu!r} but this host is {host_cpu()!r}; "
                "recompile here, or compile with --cpu generic for a portable artifact")
        missing = set(choice.features) - host_kernel_features()
        if missing:
            raise TargetError(
                "artifact was built for CPU features this host lacks: "
                f"{', '.join(sorted(missing))}; recompile here, or compile with --cpu generic "
                "for a portable artifact")
