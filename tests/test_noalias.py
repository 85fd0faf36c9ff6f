"""uniform_noalias: every kernel of a CPU module is emitted with distinct-buffer alias info."""

from __future__ import annotations

import re

import tvm
from tvm import relax
from tvm.script import tirx as T

from qwen3c.targets.noalias import NOALIAS, uniform_noalias


@T.prim_func(private=True)
def row_sums(x: T.Buffer((8, 64), "float32"), y: T.Buffer((8,), "float32")):
    T.func_attr({"tirx.noalias": True})
    for i in range(8):
        y[i] = T.float32(0)
        for j in range(64):
            y[i] = y[i] + x[i, j]


@T.prim_func(private=True)
def zz_add(a: T.Buffer((8,), "float32"), b: T.Buffer((8,), "float32"),
           out: T.Buffer((8,), "float32")):
    for i in range(8):
        out[i] = a[i] + b[i]


def kernel_module() -> tvm.IRModule:
    """Two kernels; the unflagged one sorts last, as TVM's tree-attention kernel does."""
    return tvm.IRModule({"row_sums": row_sums.with_attr("global_symbol", "row_sums"),
                         "zz_add": zz_add.with_attr("global_symbol", "zz_add")})


def aliased_accesses(mod: tvm.IRModule) -> int:
    """Loads and stores LLVM was told may touch any buffer (TVM's "tvm-alias" TBAA tag)."""
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"})
    ir = tvm.tirx.build(mod, target=target).inspect_source("ll")
    alias_type = re.search(r'^(!\d+) = !\{!"tvm-alias"', ir, re.M)
    if alias_type is None:  # LLVM drops metadata that nothing uses
        return 0
    node = alias_type.group(1)
    tag = re.search(rf"^(!\d+) = !\{{{node}, {node}, i64 0\}}", ir, re.M)
    return 0 if tag is None else len(re.findall(rf"!tbaa {tag.group(1)}\b", ir))


def test_tvm_applies_the_last_kernels_flag_to_all_and_the_pass_evens_it():
    mod = kernel_module()
    assert aliased_accesses(mod) > 0  # row_sums inherits zz_add's missing flag
    flagged = uniform_noalias(mod)
    assert all(func.attrs[NOALIAS] for func in flagged.functions.values())
    assert aliased_accesses(flagged) == 0


def relax_module(same_tensor_twice: bool) -> tvm.IRModule:
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8,), "float32"))
    other = relax.Var("other", relax.TensorType((8,), "float32"))
    with builder.function("main", [x, other]):
        add = builder.add_func(zz_add, "zz_add")
        second = x if same_tensor_twice else other
        out = builder.emit(relax.call_tir(add, [x, second], relax.TensorType((8,), "float32")))
        builder.emit_func_output(out)
    return builder.get()


def test_a_call_passing_one_tensor_twice_keeps_the_module_unflagged():
    assert uniform_noalias(relax_module(same_tensor_twice=False))["zz_add"].attrs[NOALIAS]
    assert NOALIAS not in (uniform_noalias(relax_module(same_tensor_twice=True))["zz_add"].attrs
                           or {})
