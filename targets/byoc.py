"""Bring-your-own-codegen partitions: which ops an accelerator library takes, and how.

A BYOC target (``ascend.py``, ``mlu.py``) builds the host graph for the CPU like ``llvm`` and
hands these ops to the vendor's operator library:

==============  ====================================================================
``matmul``      y = x · Wᵀ into float32 (q/k/v, o, gate-up, down, router, lm_head)
``rms_norm``    RMSNorm over the last axis (layer norms, q and k norms)
``swiglu``      silu(a) · b over the two halves of a fused gate-up projection
``moe_route``   softmax over the experts, top-k, renormalised when the model says so
``moe_experts`` grouping by expert, grouped gate-up-SiLU and down GEMMs, weighted sum
==============  ====================================================================

Attention and RoPE are not offloaded: they run inside TVM's PagedKVCache runtime object, which
a vendor library cannot reach through a partition.

Partitioning is TVM's: ``FuseOpsByPattern(annotate_codegen=True)`` wraps each match in a
function marked for the backend, ``describe_partitions`` records what each computes in the
module's attributes, and ``RunCodegen`` (through ``relax.ext.<backend>``) replaces the calls by
calls to external symbols. ``MergeCompositeFunctions`` is not used: in TVM 0.27 it only visits
a function named ``main`` and fails on any graph holding a ``call_dps_packed`` (every
PagedKVCache call is one). The vendor sources are generated from the records when the
artifact is written (``qwen3c.targets.vendor``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.dpl import DFPattern, is_call_tir, is_op, is_tuple_get_item, wildcard
from tvm.relax.transform import FusionPattern

PARTITIONS_ATTR = "qwen3c.partitions"


@dataclasses.dataclass(frozen=True)
class Operand:
    role: str  # what the op does with it: "x", "weight", "logits", ...
    ndim: int
    dtype: str


@dataclasses.dataclass(frozen=True)
class Partition:
    """One external function: the op it computes, its operands in call order (inputs, then
    the outputs it writes), and the op's attributes."""

    symbol: str
    op: str
    inputs: tuple[Operand, ...]
    outputs: tuple[Operand, ...]
    attrs: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Partition:
        return cls(raw["symbol"], raw["op"], tuple(Operand(**o) for o in raw["inputs"]),
                   tuple(Operand(**o) for o in raw["outputs"]), raw["attrs"])

    def operand(self, role: str) -> Operand:
        return next(o for o in self.inputs + self.outputs if o.role == role)


# ---- patterns ---------------------------------------------------------------------------------

def _matmul() -> DFPattern:
    return is_op("relax.matmul")(wildcard(), is_op("relax.permute_dims")(wildcard()))


def _rms_norm() -> DFPattern:
    return is_op("relax.nn.rms_norm")(wildcard(), wildcard())


def _swiglu() -> DFPattern:
    halves = is_op("relax.split")(wildcard())
    return is_op("relax.multiply")(is_op("relax.nn.silu")(is_tuple_get_item(halves, 0)),
                                   is_tuple_get_item(halves, 1))


def _moe_route() -> DFPattern:
    return is_call_tir("moe_route")


def _moe_experts() -> DFPattern:
    group = is_call_tir("moe_group")
    offsets, order = is_tuple_get_item(group, 0), is_tuple_get_item(group, 1)
    act = is_call_tir("moe_gate_up_silu", [wildcard(), wildcard(), offsets, order])
    return is_call_tir("moe_down_scatter", [act, wildcard(), offsets, order, wildcard()])


PATTERNS: dict[str, Callable[[], DFPattern]] = {
    "matmul": _matmul, "rms_norm": _rms_norm, "swiglu": _swiglu,
    "moe_route": _moe_route, "moe_experts": _moe_experts,
}


# The call_tir kernel each MoE pattern ends in. TVM's GlobalVarPattern matches names by
# substring (``moe_route`` would also take ``moe_router_stats``): a check insists on the name.
FINAL_KERNEL = {"moe_route": "moe_route", "moe_experts": "moe_down_scatter"}


def _calls_kernel(name: str) -> Callable[[Any], bool]:
    return lambda context: context.matched_expr.args[0].name_hint == name


def fusion_patterns(backend: str) -> list[FusionPattern]:
    return [FusionPattern(f"{backend}.{op}", make(), {},
                          _calls_kernel(FINAL_KERNEL[op]) if op in FINAL_KERNEL else None)
            for op, make in PATTERNS.items()]


# ---- what each partition computes ---------------------------------------------------------------

def _calls(func: relax.Function) -> dict[str, relax.Call]:
    """The calls in a composite function by operator (or call_tir kernel) name."""
    found = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                name = value.op.name
                if name == "relax.call_tir":
                    name = value.args[0].name_hint
                found[name] = value
    return found


def _describe(op: str, composite: relax.Function,
              mod: tvm.IRModule) -> tuple[dict[relax.Var, str], dict[str, Any]]:
    """Which parameter plays which role, and the op's attributes."""
    calls = _calls(composite)
    if op == "matmul":
        matmul = calls["relax.matmul"]
        return ({matmul.args[0]: "x", calls["relax.permute_dims"].args[0]: "weight"},
                {"out_dtype": str(matmul.attrs.out_dtype)})
    if op == "rms_norm":
        norm = calls["relax.nn.rms_norm"]
        return {norm.args[0]: "x", norm.args[1]: "weight"}, {"eps": float(norm.attrs.epsilon)}
    if op == "swiglu":
        return {calls["relax.split"].args[0]: "gate_up"}, {}
    if op == "moe_route":
        route = calls["moe_route"]
        kernel = mod[route.args[0]]
        return ({route.args[1][0]: "logits"},
                {"top_k": int(route.ty.fields[0].shape[1]),
                 "normalize": bool(kernel.attrs["qwen3c.normalize"])})
    if op == "moe_experts":
        group, gate_up = calls["moe_group"].args[1], calls["moe_gate_up_silu"].args[1]
        down = calls["moe_down_scatter"].args[1]
        return ({group[0]: "experts", group[1]: "first_expert", gate_up[0]: "x",
                 gate_up[1]: "gate_up", down[1]: "down", down[4]: "routing"},
                {"top_k": int(group[0].ty.shape[1])})
    raise ValueError(f"no description for {op}")


def _operand(role: str, ty: relax.TensorType) -> Operand:
    return Operand(role, ty.ndim, str(ty.dtype))


def _outputs(ty: Any) -> tuple[Operand, ...]:
    if isinstance(ty, relax.TupleType):
        return tuple(_operand(f"out{i}", field) for i, field in enumerate(ty.fields))
    return (_operand("out", ty),)


def describe(outer: relax.Function, mod: tvm.IRModule) -> Partition:
    """The record of a function ``FuseOpsByPattern`` marked for a backend."""
    bindings = outer.body.blocks[0].bindings
    composite: relax.Function = bindings[0].value
    call = next(b.value for b in bindings if isinstance(b.value, relax.Call)
                and b.value.op.same_as(bindings[0].var))
    op = str(composite.attrs["Composite"]).split(".", 1)[1]
    roles, attrs = _describe(op, composite, mod)
    # The external function takes the outer function's parameters, in its own order.
    role_of = {arg: roles[param] for arg, param in zip(call.args, composite.params, strict=True)}
    inputs = tuple(_operand(role_of[param], param.ty) for param in outer.params)
    return Partition(str(outer.attrs["global_symbol"]), op, inputs,
                     _outputs(composite.body.body.ty), attrs)


@tvm.transform.module_pass(opt_level=0, name="DescribePartitions")
def describe_partitions(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Record every partition in the module attribute ``qwen3c.partitions`` (JSON)."""
    records = [describe(func, mod).to_dict() for _, func in sorted(
        mod.functions.items(), key=lambda item: item[0].name_hint)
        if isinstance(func, relax.Function) and func.attrs and "Codegen" in func.attrs]
    return mod.with_attr(PARTITIONS_ATTR, json.dumps(records, sort_keys=True))


def partitions_of(mod: tvm.IRModule) -> list[Partition]:
    raw = (mod.attrs or {}).get(PARTITIONS_ATTR, "[]")
    return [Partition.from_dict(r) for r in json.loads(str(raw))]


def register_codegen(backend: str) -> None:
    """``relax.ext.<backend>`` for RunCodegen: it only has to exist, since the partitions are
    compiled by the vendor's toolchain outside TVM (a TVM-packed module cannot carry a library
    that links the vendor runtime); the calls are rewritten to the external symbols."""
    tvm_ffi.register_global_func(f"relax.ext.{backend}", lambda functions, options,
                                 constant_names: [], override=True)


def partition_passes(backend: str) -> list[tvm.transform.Pass]:
    register_codegen(backend)
    return [
        relax.transform.FuseOpsByPattern(fusion_patterns(backend), bind_constants=False,
                                         annotate_codegen=True),
        describe_partitions,
        relax.transform.RunCodegen(),
    ]
