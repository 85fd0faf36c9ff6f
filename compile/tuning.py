"""meta_schedule tuning for the kernels qwen3c has no hand schedule for, and the records' replay.

After legalization and fusion, the kernels our schedules do not take (on CPUs: the first
layer's input RMSNorm, casts, MoE glue) are plain loop nests, one per fused op, on one core.
``qwen3c tune`` searches schedules for them with meta_schedule and writes its JSON database;
``qwen3c compile --tuning-records`` replays the best schedule of each kernel. Hand-written and
hand-scheduled kernels (``tirx.is_scheduled``) are never tuned nor replaced.

meta_schedule measures static shapes only, while our kernels have a symbolic token count
(prefill) or batch (decode). Each kernel is tuned with its symbolic sizes set to
``PREFILL_TOKENS``, or ``DECODE_BATCH`` where only decode calls it, and the best trace is
replayed on the symbolic kernel: tile sizes sampled for the static axes are kept, a symbolic axis
is kept whole (meta_schedule's replay does not split an extent it cannot see), and
parallel/vectorize annotations apply as tuned.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import threading
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx

from qwen3c.errors import ConfigError, Qwen3cError
from qwen3c.targets import Phase

PREFILL_TOKENS = 128  # the size a symbolic kernel is measured at...
DECODE_BATCH = 1  # ...or, where only decode functions call it, this
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"


@dataclasses.dataclass(frozen=True)
class TunedKernel:
    """One kernel's result: how often a forward calls it and its time before and after."""

    name: str
    calls: int
    untuned_us: float
    tuned_us: float | None  # None: no candidate built and ran


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A PrimFunc tuning may schedule, how many call sites the model has for it, and the size
    its symbolic dimensions are measured at."""

    func: tirx.PrimFunc
    calls: int
    size: int

    def workload(self) -> tvm.IRModule:
        """The kernel at its measuring size, as meta_schedule's workload."""
        static = {p: tirx.decl_buffer([_static(d, self.size) for d in p.shape], p.dtype,
                                      name=p.name)
                  for p in self.func.params if not all(map(_is_constant, p.shape))}
        func = self.func.specialize(static) if static else self.func
        return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def tunable_kernels(mod: tvm.IRModule) -> dict[tvm.ir.GlobalVar, Kernel]:
    """The called PrimFuncs tuning may schedule: not scheduled already, not a reshape (those
    become views), with only float tensors as arguments (a gather's time depends on its indices,
    and random indices would read out of bounds), each dimension a constant or a symbolic
    size."""
    callers = _callers(mod)
    kernels = {}
    for gvar, func in mod.functions.items():
        if (isinstance(func, tirx.PrimFunc) and gvar.name_hint in callers
                and not (func.attrs and func.attrs.get("tirx.is_scheduled"))
                and not relax.analysis.has_reshape_pattern(func)
                and all(_is_float_buffer(p) for p in func.params)
                and all(isinstance(d, (tirx.IntImm, tirx.Var))
                        for p in func.params for d in p.shape)):
            names = callers[gvar.name_hint]
            decode_only = all(name.startswith("decode") for name in names)
            kernels[gvar] = Kernel(func, len(names),
                                   DECODE_BATCH if decode_only else PREFILL_TOKENS)
    return kernels


def require_tuning_packages() -> None:
    """meta_schedule imports these only once it runs; say what is missing before that."""
    missing = [name for name in ("xgboost", "psutil", "cloudpickle")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"qwen3c tune needs {', '.join(missing)}: "
                          "pip install 'qwen3c[tune]'")


def tune_kernels(mod: tvm.IRModule, target: tvm.target.Target, records_dir: Path,
                 trials: int) -> list[TunedKernel]:
    """Search ``trials`` schedules for each tunable kernel of ``mod`` (a module after the
    target's tuning phase) and write meta_schedule's database into ``records_dir``.

    The kernel as legalization left it is measured by the same runner and committed as a
    record too, so a search that finds nothing faster leaves the kernel untouched."""
    from tvm.s_tir import meta_schedule as ms

    tasks = _tasks(mod, target)
    builder = ms.builder.LocalBuilder(f_build=build_kernel, timeout_sec=120)
    runner = ms.runner.LocalRunner(
        timeout_sec=60,
        evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=20))
    database = ms.database.JSONDatabase(work_dir=str(records_dir))
    untuned = _measure_untuned(tasks, target, builder, runner, database)
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)  # console only
    # The evolutionary search ranks a population with the cost model before each round of
    # measurements; 512 (meta_schedule's default) is far more than a short search can use.
    strategy = ms.search_strategy.EvolutionarySearch(population_size=min(512, 32 * trials))
    _import_tensor_intrinsics()
    contexts, task_weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, str(records_dir), strategy=strategy)
    ms.tune_tasks(tasks=contexts, task_weights=task_weights, work_dir=str(records_dir),
                  max_trials_global=trials * len(contexts), max_trials_per_task=trials,
                  num_trials_per_iter=min(trials, 16), database=database,
                  builder=builder, runner=runner)
    records = records_by_workload(database)
    results = []
    for task, untuned_us in zip(tasks, untuned, strict=True):
        tuned = [_mean_us(r.run_secs) for r in records.get(tvm_ffi.structural_hash(task.mod), [])
                 if not _is_untuned(r.trace)]
        results.append(TunedKernel(task.task_name, int(task.weight), untuned_us,
                                   min(tuned, default=None)))
    return results


def records_by_workload(database) -> dict[int, list]:
    """Every measured record, grouped by the structural hash of its workload. (The database's
    own top-k query skips a record with an empty trace: the untuned kernel's.)"""
    grouped: dict[int, list] = {}
    for record in database.get_all_tuning_records():
        if record.run_secs:
            grouped.setdefault(tvm_ffi.structural_hash(record.workload.mod), []).append(record)
    return grouped


def _import_tensor_intrinsics() -> None:
    """Import TVM's tensor-intrinsic library (which each meta_schedule ``TuneContext`` imports)
    from a new thread. TVMScript's parser calls ``inspect.stack()`` for each of its ~550
    functions, so the import takes time in proportion to the caller's stack depth: 32 s from
    the top level here, 166 s under 60 frames (as inside pytest); a new thread's stack is a few
    frames deep. A failed import raises again, with its message, where meta_schedule
    imports it."""
    thread = threading.Thread(target=importlib.import_module, args=("tvm.s_tir.tensor_intrin",))
    thread.start()
    thread.join()


def build_kernel(mod: tvm.IRModule, target: tvm.target.Target, _params=None) -> tvm.runtime.Module:
    """meta_schedule's builder without its default's import of ``tvm.s_tir.tensor_intrin``
    (about 50 s per worker process here, longer than its timeout)."""
    return tvm.tirx.build(mod, target=target)


def _tasks(mod: tvm.IRModule, target: tvm.target.Target) -> list:
    """One meta_schedule task per distinct tunable kernel, weighted by its call sites."""
    from tvm.s_tir import meta_schedule as ms

    workloads: dict[int, tvm.IRModule] = {}  # identical kernels are tuned once
    names: dict[int, str] = {}
    weights: dict[int, int] = {}
    for gvar, kernel in tunable_kernels(mod).items():
        workload = kernel.workload()
        key = tvm_ffi.structural_hash(workload)
        workloads[key] = workload
        names.setdefault(key, gvar.name_hint)
        weights[key] = weights.get(key, 0) + kernel.calls
    return [ms.ExtractedTask(names[key], workload, target, [workload], weights[key])
            for key, workload in workloads.items()]


def _measure_untuned(tasks: list, target: tvm.target.Target, builder, runner,
                     database) -> list[float]:
    """Microseconds per call of each task's kernel as legalization left it, also committed to
    ``database`` as that workload's record with an empty trace."""
    from tvm.s_tir import meta_schedule as ms

    built = builder.build([ms.builder.BuilderInput(t.mod, target) for t in tasks])
    for task, result in zip(tasks, built, strict=True):
        if result.error_msg:
            raise Qwen3cError(f"kernel {task.task_name} does not build: {result.error_msg}")
    args = [ms.arg_info.ArgInfo.from_prim_func(t.mod["main"]) for t in tasks]
    futures = runner.run([ms.runner.RunnerInput(r.artifact_path, "cpu", a)
                          for r, a in zip(built, args, strict=True)])
    times = []
    for task, future, arg in zip(tasks, futures, args, strict=True):
        result = future.result()
        if result.error_msg:
            raise Qwen3cError(f"kernel {task.task_name} does not run: {result.error_msg}")
        database.commit_tuning_record(ms.database.TuningRecord(
            s_tir.Schedule(task.mod).trace, database.commit_workload(task.mod),
            [float(s) for s in result.run_secs], target, arg))
        times.append(_mean_us(result.run_secs))
    return times


def _is_untuned(trace: s_tir.Trace) -> bool:
    return len(trace.insts) == 0


def _mean_us(run_secs) -> float:
    return float(np.mean([float(s) for s in run_secs])) * 1e6


class TuningRecords:
    """A tuning database read for one build, and which kernels it scheduled."""

    def __init__(self, records_dir: Path, target: tvm.target.Target):
        from tvm.s_tir import meta_schedule as ms

        for name in (WORKLOAD_FILE, RECORD_FILE):
            if not (records_dir / name).is_file():
                raise ConfigError(f"{records_dir} holds no tuning records ({name} is missing); "
                                  "write them with `qwen3c tune`")
        try:
            self.records = records_by_workload(ms.database.JSONDatabase(
                work_dir=str(records_dir), allow_missing=False))
            cpus = {_cpu(r.target) for group in self.records.values() for r in group}
        except Exception as error:  # TVM raises its own types for a malformed database
            raise ConfigError(f"cannot read the tuning records in {records_dir}: "
                              f"{str(error).strip().splitlines()[-1]}") from None
        if cpus - {_cpu(target)}:
            raise ConfigError(f"the tuning records in {records_dir} were tuned for CPU "
                              f"{', '.join(sorted(cpus))}, this build is for {_cpu(target)}: "
                              "tune for this CPU")
        self.applied = 0  # kernels that took a tuned schedule
        self.failed: list[str] = []  # kernels whose record did not replay
        self.kernels = 0  # tunable kernels the build had

    def phase(self) -> Phase:
        """The pipeline phase that replays the records on the kernels still unscheduled."""
        return Phase("tuned", "replay tuned schedules on kernels without a hand schedule",
                     [tvm.transform.module_pass(self._apply, opt_level=0,
                                                name="ApplyTuningRecords")])

    def summary(self) -> dict[str, object]:
        return {"kernels": self.kernels, "applied": self.applied, "failed": sorted(self.failed)}

    def _apply(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        kernels = tunable_kernels(mod)
        self.kernels += len(kernels)
        for gvar, kernel in kernels.items():
            measured = self.records.get(tvm_ffi.structural_hash(kernel.workload()))
            if not measured:
                continue
            record = min(measured, key=lambda r: _mean_us(r.run_secs))
            if _is_untuned(record.trace):
                continue
            schedule = s_tir.Schedule(kernel.func)
            try:
                record.trace.apply_to_schedule(schedule, remove_postproc=False)
            except Exception:  # a trace that does not replay leaves the kernel as it was
                self.failed.append(gvar.name_hint)
                continue
            mod[gvar] = schedule.mod["main"].with_attr("tirx.is_scheduled", True)
            self.applied += 1
        return mod


def with_tuning_phase(phases: list[Phase], after: str, records: TuningRecords) -> list[Phase]:
    """``phases`` with the records' replay inserted after the phase named ``after``."""
    head = phases_until(phases, after)
    return [*head, records.phase(), *phases[len(head):]]


def phases_until(phases: list[Phase], last: str) -> list[Phase]:
    return phases[:[p.name for p in phases].index(last) + 1]


def write_summary(records_dir: Path, kernels: list[TunedKernel], **about: object) -> None:
    """What was tuned, for people reading the records directory."""
    summary = {**about, "kernels": [dataclasses.asdict(k) for k in kernels]}
    (records_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n",
                                              encoding="utf-8")


def _callers(mod: tvm.IRModule) -> dict[str, list[str]]:
    """For each PrimFunc called through call_tir, the Relax function of each call site."""
    callers: dict[str, list[str]] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            def visit(expr: relax.Expr, caller: str = gvar.name_hint) -> None:
                if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
                    callers.setdefault(expr.args[0].name_hint, []).append(caller)

            relax.analysis.post_order_visit(func, visit)
    return callers


def _cpu(target: tvm.target.Target) -> str:
    return str(target.attrs.get("mcpu", "generic"))


def _is_float_buffer(param: tirx.Var) -> bool:
    try:
        return str(param.dtype).startswith(("float", "bfloat"))
    except AttributeError:  # a scalar parameter, not a buffer
        return False


def _is_constant(dim: tirx.PrimExpr) -> bool:
    return isinstance(dim, tirx.IntImm)


def _static(dim: tirx.PrimExpr, size: int) -> tirx.PrimExpr:
    return dim if _is_constant(dim) else tirx.IntImm(dim.ty.dtype, size)
