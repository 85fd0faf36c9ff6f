"""A residual add and the RMSNorm after it, as one CPU kernel.

Every decoder layer adds the attention's output to the residual stream and normalises the sum
for the MLP, then adds the MLP's output and normalises that for the next layer (or the final
norm). Legalized, each is an add (with the projection's cast to the model dtype folded in), a
cast up, the norm and a cast down: three kernel launches and their buffers, shapes and frees in
the VM, around almost no work in decode. ``fuse_residual_norm`` routes each to
``add_rms_norm``, which writes both the new residual and its normalised copy.
"""

from __future__ import annotations

import functools

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.script import tirx as T

from qwen3c.schedules.cpu_gemm import (
    FLOATS,
    is_op,
    kernel_once,
    relax_function_pass,
    token_count,
)
from qwen3c.schedules.lane_sum import fold_lanes
from qwen3c.schedules.rows import each_row
from qwen3c.schedules.scratch import stack_buffer

LANES = 16  # float32 partial sums of squares (one AVX-512 vector)


@functools.cache
def add_rms_norm(hidden: int, eps: float, dtype: str, addend_dtype: str) -> tirx.PrimFunc:
    """s = x + y and out = s / rms(s) · w over rows of ``hidden``: y is rounded to the model
    dtype first and s after the add (as HF adds a projection's output to the residual), the
    statistics are float32. One task per token in a prefill (``rows.each_row``)."""
    H = hidden
    CHUNKS = H // LANES
    fold = fold_lanes(LANES)

    @T.macro
    def normalise(t, x, y, w, s, out):
        with T.sblock("token"):
            T.reads()  # one token per call; nothing schedules this block
            T.writes()
            squares = stack_buffer((LANES,), "float32")
            for lane in T.vectorized(LANES):
                squares[lane] = T.float32(0)
            for chunk in range(CHUNKS):
                for lane in T.vectorized(LANES):
                    s[t, chunk * LANES + lane] = T.Cast(dtype, T.Cast(
                        "float32", x[t, chunk * LANES + lane]) + T.Cast(
                        "float32", T.Cast(dtype, y[t, chunk * LANES + lane])))
                    squares[lane] = squares[lane] + T.Cast(
                        "float32", s[t, chunk * LANES + lane]) * T.Cast(
                        "float32", s[t, chunk * LANES + lane])
            fold(squares, ())
            scale: T.let = T.rsqrt(squares[0] / T.float32(H) + T.float32(eps))
            for i in T.vectorized(H):
                out[t, i] = T.Cast(dtype, T.Cast("float32", s[t, i]) * scale * w[i])

    normalise_rows = each_row(normalise)

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_x: T.handle, var_y: T.handle, w: T.Buffer((H,), "float32"),
               var_s: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, T.int64(H)), dtype)
        y = T.match_buffer(var_y, (n, T.int64(H)), addend_dtype)
        s = T.match_buffer(var_s, (n, T.int64(H)), dtype)
        out = T.match_buffer(var_out, (n, T.int64(H)), dtype)
        normalise_rows(n, x, y, w, s, out)

    return kernel


def _residual_norms(func: relax.Function) -> dict[relax.Var, tuple]:
    """For each ``s = add(x, y)`` whose sum is normalised, ``norm(s)`` in the model dtype:
    s's variable -> (the normalised variable, the norm's weight, epsilon). Shapes must agree
    (no broadcasting), the hidden size must be a multiple of LANES."""
    values = {binding.var: binding.value for block in func.body.blocks
              for binding in block.bindings if isinstance(binding, relax.VarBinding)}
    found = {}
    for var, value in values.items():
        norm = values.get(value.args[0]) if is_op(value, "relax.astype") else value
        if not is_op(norm, "relax.nn.rms_norm"):
            continue
        summed = norm.args[0]
        widened = values.get(summed)
        if is_op(widened, "relax.astype") and widened.attrs.dtype == "float32":
            summed = widened.args[0]
        add = values.get(summed)
        if not (is_op(add, "relax.add") and isinstance(var.ty, relax.TensorType)):
            continue
        x, y = add.args
        weight = norm.args[1]
        if (summed.ty.dtype in FLOATS and var.ty.dtype == summed.ty.dtype
                and tvm_ffi.structural_equal(x.ty.shape, y.ty.shape)
                and isinstance(summed.ty.shape[-1], tirx.IntImm)
                and int(summed.ty.shape[-1]) % LANES == 0
                and list(norm.attrs.axes) in ([-1], [summed.ty.ndim - 1])
                and weight.ty.dtype == "float32" and weight.ty.ndim == 1):
            found[summed] = (var, weight, float(norm.attrs.epsilon))
    return found


@relax.expr_functor.mutator
class _ResidualNormFuser(relax.PyExprMutator):
    """At each matched add, emits one ``add_rms_norm`` call; the add's variable then names its
    sum and the norm's variable its normalised output. The cast, norm and cast it bypasses are
    left for dead-code elimination."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self.fusions: dict[relax.Var, tuple] = {}
        self.normed: dict[relax.Var, relax.Var] = {}

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        self.fusions = _residual_norms(func)
        return super().visit_function_(func)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.normed:
            self.set_var_remap(binding.var, self.normed[binding.var])
        elif binding.var in self.fusions:
            norm_var, weight, eps = self.fusions[binding.var]
            total, normed = self._fused(self.visit_expr(binding.value), self.visit_expr(weight),
                                        eps)
            self.set_var_remap(binding.var, total)
            self.normed[norm_var] = normed
        else:
            super().visit_var_binding_(binding)

    def _fused(self, add: relax.Call, weight: relax.Expr,
               eps: float) -> tuple[relax.Var, relax.Var]:
        x, y = add.args
        y = self._before_rounding(y)
        shape, dtype = x.ty.shape, x.ty.dtype
        *lead, hidden = list(shape)
        tokens = token_count(lead)
        kernel = kernel_once(self.builder_, self.kernels,
                             ("add_rms_norm", int(hidden), eps, dtype, y.ty.dtype),
                             lambda: add_rms_norm(int(hidden), eps, dtype, y.ty.dtype))
        rows = [self.builder_.emit(relax.op.reshape(v, [tokens, hidden])) for v in (x, y)]
        row_type = relax.TensorType([tokens, hidden], dtype)
        both = self.builder_.emit(relax.call_tir(kernel, [*rows, weight], [row_type, row_type]))
        return tuple(self.builder_.emit(relax.op.reshape(relax.TupleGetItem(both, i), shape))
                     for i in (0, 1))

    def _before_rounding(self, y: relax.Expr) -> relax.Expr:
        """The float tensor ``y`` was rounded from to the model dtype, through reshapes (the
        kernel rounds a projection's or the MoE block's float32 output itself), else ``y``."""
        value = y
        while isinstance(value, relax.Var):
            bound = self.lookup_binding(value)
            if is_op(bound, "relax.reshape"):
                value = bound.args[0]
            elif is_op(bound, "relax.astype") and bound.args[0].ty.dtype in FLOATS:
                return bound.args[0]
            else:
                break
        return y


def fuse_residual_norm() -> tvm.transform.Pass:
    """The pass that routes each residual add + RMSNorm to ``add_rms_norm``."""
    return relax_function_pass("FuseResidualNorm", _ResidualNormFuser)
