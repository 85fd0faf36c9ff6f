"""Our CPU schedules against numpy, on shapes that do not divide the tiles."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import tvm
from conftest import host_target
from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.script.parser.core.parser import ScriptMacro

from qwen3c.compile.model import Linear
from qwen3c.compile.pipeline import run_pipeline
from qwen3c.schedules import (
    amx_gemm,
    bf16_dot,
    bf16_packed,
    bf16_panel,
    fast_math,
    nt_gemm,
    schedule_nt_matmul,
    tvmscript_macros,
)
from qwen3c.schedules.mlp import gate_up_silu
from qwen3c.targets import get_target


class ProjectionWithResidual(nn.Module):
    def __init__(self, k: int, n: int, dtype: str):
        self.proj = Linear(k, n, bias=False, dtype=dtype)

    def forward(self, x: nn.Tensor, residual: nn.Tensor) -> nn.Tensor:
        return residual + self.proj(x)


def build(k: int, n: int, dtype: str):
    module = ProjectionWithResidual(k, n, dtype)
    spec = {"forward": {"x": nn.spec.Tensor(["m", k], dtype),
                        "residual": nn.spec.Tensor(["m", n], dtype),
                        "$": {"param_mode": "packed", "effect_mode": "none"}}}
    mod = module.export_tvm(spec=spec)[0]
    backend = get_target("llvm")
    target = host_target()
    mod = run_pipeline(mod, backend.pipeline(target), target)
    return mod, relax.VirtualMachine(relax.build(mod, target=target, relax_pipeline=None),
                                     tvm.cpu())


def has_parallel_loop(func: tirx.PrimFunc) -> bool:
    return "T.parallel(" in func.script()


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("k, n, kernel", [
    (50, 37, "schedule"),  # sizes off the GEMM tiles: the generic schedule (16-row blocks)
    (64, 40, "nt_gemm"),  # the register-tiled kernel
    (48, 40, "nt_gemm"),  # 3 steps of 16: bfloat16 rows not a whole number of cache lines
])
def test_projection_matches_numpy(dtype, tolerance, k, n, kernel):
    mod, vm = build(k, n, dtype)
    names = [gvar.name_hint for gvar in mod.functions]
    assert any(name.startswith("nt_gemm") for name in names) == (kernel == "nt_gemm"), names
    scheduled = [f for f in mod.functions.values()
                 if isinstance(f, tirx.PrimFunc) and has_parallel_loop(f)]
    assert scheduled, "the projection was not scheduled"

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(n, k)).astype(np_dtype)
    for m in (1, 3, 4, 5, 17, 70):  # decode below a tile; dot tiles; panels from 64 tokens
        x = rng.normal(size=(m, k)).astype(np_dtype)
        residual = rng.normal(size=(m, n)).astype(np_dtype)
        out = vm["forward"](tvm.runtime.tensor(x), tvm.runtime.tensor(residual),
                            [tvm.runtime.tensor(weight)]).numpy().astype(np.float32)
        expected = (residual.astype(np.float32)
                    + x.astype(np.float32) @ weight.astype(np.float32).T)
        np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance * 10)


def test_schedule_declines_what_is_not_a_projection():
    """An elementwise block, even one with the matmul's name, is left alone."""
    a = te.placeholder((8, 4), name="a")
    doubled = te.compute((8, 4), lambda i, j: a[i, j] * 2.0, name="NT_matmul")
    assert schedule_nt_matmul(te.create_prim_func([a, doubled])) is None


@pytest.mark.parametrize("lanes, registers", [(4, 32), (8, 16), (16, 32)])  # NEON/AVX2/512
@pytest.mark.parametrize("n", [40, 96, 128])  # panels of 8, 32 and 64 or 16 weight rows
def test_register_tiled_gemm_any_vector_unit(lanes, registers, n):
    k = 128  # two blocks of 64 for the AVX-512 panels' transposition
    kernel = tvm.compile(nt_gemm(n, k, "float32", lanes, registers).with_attr(
        "global_symbol", "gemm"), target="llvm")
    rng = np.random.default_rng(lanes)
    weight = rng.normal(size=(n, k)).astype(np.float32)
    for m in (1, 6, 17, 70):  # decode, dot tiles (full and partial), panels (partial tile)
        x = rng.normal(size=(m, k)).astype(np.float32)
        y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
        kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(weight), y)
        np.testing.assert_allclose(y.numpy(), x @ weight.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n, k", [(40, 64), (16, 96)])  # 2 and 3 dot-product steps
def test_bf16_dot_product_gemm_matches_numpy(n, k):
    target = host_target()
    if not bf16_dot.available(target, "bfloat16", k):
        pytest.skip("bfloat16 dot products need a CPU with AVX512-BF16")
    kernel = tvm.compile(nt_gemm(n, k, "bfloat16", bf16=True).with_attr("global_symbol", "gemm"),
                         target=target)
    rng = np.random.default_rng(k)
    weight = rng.normal(size=(n, k)).astype(ml_dtypes.bfloat16)
    for m in (1, 5, 6, 17, 70):  # decode (GEMV), one tile, partial tiles
        x = rng.normal(size=(m, k)).astype(ml_dtypes.bfloat16)
        y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
        kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(weight), y)
        # bfloat16 products are exact in float32: only the order of the sums differs
        np.testing.assert_allclose(y.numpy(), x.astype(np.float32) @ weight.astype(np.float32).T,
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n, k, out_dtype", [(64, 32, "float32"), (128, 96, "bfloat16")])
def test_bf16_panel_gemm_matches_numpy(n, k, out_dtype):
    target = host_target()
    assert bf16_panel.fits(n, k)
    if not bf16_dot.available(target, "bfloat16", k):
        pytest.skip("bfloat16 panels need a CPU with AVX512-BF16")
    kernel = tvm.compile(bf16_panel.panel_gemm(n, k, out_dtype).with_attr("global_symbol",
                                                                          "gemm"), target=target)
    rng = np.random.default_rng(k)
    weight = rng.normal(size=(n, k)).astype(ml_dtypes.bfloat16)
    panels = bf16_panel.to_panels(weight)
    assert bf16_panel.weight_shape(panels.shape) == (n, k)
    for m in (1, 2, 6, 7, 17):  # decode, a partial tile, one tile, tiles and a partial one
        x = rng.normal(size=(m, k)).astype(ml_dtypes.bfloat16)
        y = tvm.runtime.tensor(np.zeros((m, n), out_dtype))
        kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(panels), y)
        exact = x.astype(np.float32) @ weight.astype(np.float32).T
        # products of bfloat16 are exact in float32; a bfloat16 store rounds to 8 bits
        tolerance = 1e-5 if out_dtype == "float32" else 2**-8
        np.testing.assert_allclose(y.numpy().astype(np.float32), exact, rtol=tolerance,
                                   atol=tolerance * np.abs(exact).max())


@pytest.mark.parametrize("cpu, chosen", [("znver5", True), ("sapphirerapids", False),
                                         ("skylake-avx512", False)])
def test_bf16_dot_products_are_built_only_where_they_pay(cpu, chosen):
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu})
    assert bf16_dot.usable(target, "bfloat16", 64) is chosen


def test_bf16_dot_products_compile_to_vdpbf16ps():
    """On any AVX512-BF16 CPU (this host need not have one) the imported LLVM function is
    inlined: the kernel's machine code holds the instruction and no call to the helper."""
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                                "mcpu": "sapphirerapids"})
    assert bf16_dot.available(target, "bfloat16", 64)
    assert not bf16_dot.available(target, "float32", 64)
    assert not bf16_dot.available(target, "bfloat16", 48)
    kernel = tvm.tirx.build(nt_gemm(40, 64, "bfloat16", bf16=True).with_attr(
        "global_symbol", "gemm"), target=target)
    assembly = kernel.inspect_source("asm")
    assert "vdpbf16ps" in assembly
    assert bf16_dot.SYMBOL not in assembly


@pytest.mark.parametrize("n, k", [(32, 32), (96, 160)])  # one block and step; 3 x 5
def test_amx_tile_gemm_matches_numpy(n, k):
    target = host_target()
    if not amx_gemm.usable(target, "bfloat16", n, k):
        pytest.skip("AMX tile GEMMs need a CPU with AMX-BF16")
    kernel = tvm.compile(nt_gemm(n, k, "bfloat16", amx=True).with_attr("global_symbol", "gemm"),
                         target=target)
    rng = np.random.default_rng(n + k)
    weight = rng.normal(size=(n, k)).astype(ml_dtypes.bfloat16)
    for m in (1, 2, 16, 17, 32, 70):  # decode (GEMV); one partial, whole and several blocks
        x = rng.normal(size=(m, k)).astype(ml_dtypes.bfloat16)
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
        kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(weight), y)
        # bfloat16 products are exact in float32: only the order of the sums differs
        np.testing.assert_allclose(y.numpy(), x.astype(np.float32) @ weight.astype(np.float32).T,
                                   rtol=1e-5, atol=1e-4)


def test_amx_tiles_are_chosen_by_cpu_dtype_and_shape():
    def target(cpu: str) -> tvm.target.Target:
        return tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu})

    assert amx_gemm.usable(target("sapphirerapids"), "bfloat16", 64, 96)
    assert not amx_gemm.usable(target("sapphirerapids"), "float32", 64, 96)
    assert not amx_gemm.usable(target("sapphirerapids"), "bfloat16", 48, 96)  # half a block
    assert not amx_gemm.usable(target("sapphirerapids"), "bfloat16", 64, 48)  # half a step
    assert not amx_gemm.usable(target("znver5"), "bfloat16", 64, 96)
    assert not amx_gemm.usable(target("icelake-server"), "bfloat16", 64, 96)


def test_amx_tile_gemm_compiles_to_tile_instructions():
    """On any AMX CPU (this host need not have one) LLVM configures the tiles itself: the
    kernel holds ldtilecfg and the tile products."""
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                                "mcpu": "sapphirerapids"})
    kernel = tvm.tirx.build(nt_gemm(64, 96, "bfloat16", amx=True).with_attr(
        "global_symbol", "gemm"), target=target)
    assembly = kernel.inspect_source("asm")
    for instruction in ("ldtilecfg", "tileloadd", "tdpbf16ps", "tilestored"):
        assert instruction in assembly, instruction


class SwiGLU(nn.Module):
    """The dense MLP's first half, written as the model writes it."""

    def __init__(self, hidden: int, intermediate: int, dtype: str):
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False, dtype=dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        gate, up = nn.op.split(self.gate_up_proj(x), indices_or_sections=2, axis=-1)
        return nn.op.silu(gate) * up


def reference_swiglu(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    y = x.astype(np.float32) @ weight.astype(np.float32).T
    gate, up = np.split(y, 2, axis=-1)
    return gate / (1 + np.exp(-gate)) * up


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_gate_up_and_swiglu_become_one_kernel(dtype, tolerance):
    hidden, intermediate = 64, 40
    module = SwiGLU(hidden, intermediate, dtype)
    spec = {"forward": {"x": nn.spec.Tensor(["m", hidden], dtype),
                        "$": {"param_mode": "packed", "effect_mode": "none"}}}
    backend = get_target("llvm")
    target = host_target()
    mod = run_pipeline(module.export_tvm(spec=spec)[0], backend.pipeline(target), target)
    names = [gvar.name_hint for gvar in mod.functions]
    assert any(name.startswith("gate_up_silu") for name in names), names
    assert not any(name.startswith("nt_gemm") for name in names), names
    vm = relax.VirtualMachine(relax.build(mod, target=target, relax_pipeline=None), tvm.cpu())
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    rng = np.random.default_rng(1)
    weight = (rng.normal(size=(2 * intermediate, hidden)) * 0.3).astype(np_dtype)
    for m in (1, 3, 17, 70):
        x = rng.normal(size=(m, hidden)).astype(np_dtype)
        out = vm["forward"](tvm.runtime.tensor(x), [tvm.runtime.tensor(weight)])
        np.testing.assert_allclose(out.numpy().astype(np.float32), reference_swiglu(x, weight),
                                   rtol=tolerance, atol=tolerance)


class SwiGLUOnly(nn.Module):
    """SwiGLU over a tensor no projection of ours made (as after a quantized projection)."""

    def forward(self, y: nn.Tensor) -> nn.Tensor:
        gate, up = nn.op.split(y, indices_or_sections=2, axis=-1)
        return nn.op.silu(gate) * up


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_swiglu_without_projection_runs_our_kernel(dtype, tolerance):
    intermediate = 36
    spec = {"forward": {"y": nn.spec.Tensor(["m", 2 * intermediate], dtype),
                        "$": {"param_mode": "packed", "effect_mode": "none"}}}
    backend = get_target("llvm")
    target = host_target()
    mod = run_pipeline(SwiGLUOnly().export_tvm(spec=spec)[0], backend.pipeline(target), target)
    names = [gvar.name_hint for gvar in mod.functions]
    assert any(name.startswith("swiglu") for name in names), names
    vm = relax.VirtualMachine(relax.build(mod, target=target, relax_pipeline=None), tvm.cpu())
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    for m in (1, 9):
        y = np.random.default_rng(m).normal(size=(m, 2 * intermediate)).astype(np_dtype)
        out = vm["forward"](tvm.runtime.tensor(y), []).numpy().astype(np.float32)
        gate, up = np.split(y.astype(np.float32), 2, axis=-1)
        np.testing.assert_allclose(out, gate / (1 + np.exp(-gate)) * up, rtol=tolerance,
                                   atol=tolerance)


@pytest.mark.parametrize("kernel", ["avx512", "avx2", "neon", "avx512-bf16"])
def test_gate_up_silu_kernel_matches_numpy(kernel):
    """Every projection body under the fused kernel: float32 tiles for three vector units
    (decode, dot tiles, panels) and the bfloat16 dot products."""
    lanes, registers, bf16 = {"avx512": (16, 32, False), "avx2": (8, 16, False),
                              "neon": (4, 32, False), "avx512-bf16": (16, 32, True)}[kernel]
    hidden, intermediate, dtype = 96, 24, "bfloat16"
    target = host_target()
    if bf16 and not bf16_dot.available(target, dtype, hidden):
        pytest.skip("bfloat16 dot products need a CPU with AVX512-BF16")
    fused = tvm.compile(gate_up_silu(hidden, intermediate, dtype, lanes, registers, bf16)
                        .with_attr("global_symbol", "gate_up"), target=target)
    rng = np.random.default_rng(2)
    weight = (rng.normal(size=(2 * intermediate, hidden)) * 0.3).astype(ml_dtypes.bfloat16)
    for m in (1, 6, 17, 70):
        x = rng.normal(size=(m, hidden)).astype(ml_dtypes.bfloat16)
        act = tvm.runtime.tensor(np.zeros((m, intermediate), ml_dtypes.bfloat16))
        fused(tvm.runtime.tensor(x), tvm.runtime.tensor(weight), act)
        np.testing.assert_allclose(act.numpy().astype(np.float32), reference_swiglu(x, weight),
                                   rtol=1e-2, atol=1e-2)


def test_fast_sigmoid_matches_numpy():
    """The arithmetic sigmoid behind SwiGLU, over the whole float32 range (no overflow)."""
    @tvm.script.tirx.prim_func
    def sigmoids(x: tvm.script.tirx.Buffer((64,), "float32"),
                 y: tvm.script.tirx.Buffer((64,), "float32")):
        for i in range(64):
            y[i] = fast_math.sigmoid(x[i])

    kernel = tvm.compile(sigmoids, target="llvm")
    x = np.concatenate([np.linspace(-100, 100, 60), [-3e38, 3e38, 0, -0.0]]).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros(64, np.float32))
    kernel(tvm.runtime.tensor(x), y)
    with np.errstate(over="ignore"):
        expected = 1 / (1 + np.exp(-x.astype(np.float64)))
    # relative error grows with |x| (x log2(e) is rounded); below 2^-126 results flush to it
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1.2e-38)


def workspace_calls_in_tasks(kernel: tirx.PrimFunc) -> list[str]:
    """The buffers a built kernel takes from TVM's workspace pool inside its parallel tasks
    (calls through ``__TVMBackendAllocWorkspace`` in the ``__tvm_parallel_lambda`` functions)."""
    target = host_target()
    ir = tvm.tirx.build(kernel.with_attr("global_symbol", "kernel"),
                        target=target).inspect_source("ll")
    found, in_task, pool = [], False, set()
    for line in ir.splitlines():
        if line.startswith("define"):
            in_task, pool = "@__tvm_parallel_lambda" in line, set()
        elif "= load ptr, ptr @__TVMBackendAllocWorkspace" in line:
            pool.add(line.split("=")[0].strip())
        elif in_task and "call" in line and any(f" {p}(" in line for p in pool):
            found.append(line.split("=")[0].strip())
    return found


def test_decode_kernels_take_no_workspace_per_task():
    """The decode GEMVs' per-task scratch stays on the stack (schedules/scratch.py): a pool
    allocation per task took 8 % of a q4 decode step."""
    from qwen3c.schedules.quant import QuantScheme, quantized_matmul

    for kernel in (quantized_matmul(64, 512, QuantScheme(4, 32), "bfloat16", False),
                   quantized_matmul(64, 512, QuantScheme(8, 32), "bfloat16", False),
                   float_gemv(64, 512, "bfloat16")):
        assert workspace_calls_in_tasks(kernel) == []
    # the check sees them where they are: TVMScript's `x = expr` is a pool-served scalar
    assert workspace_calls_in_tasks(scalar_in_task()) == ["%scalar"]


def float_gemv(n: int, k: int, dtype: str) -> tirx.PrimFunc:
    """The decode path of ``nt_gemm`` alone (its prefill tiles keep a 1.5 KB pool buffer)."""
    from tvm.script import tirx as T

    from qwen3c.schedules.cpu_gemm import gemv

    run = gemv(n, k, dtype)

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_x: T.handle, w: T.Buffer((n, k), dtype), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(var_x, (m, T.int64(k)), dtype)
        y = T.match_buffer(var_y, (m, T.int64(n)), "float32")
        run(x, w, y, m)

    return kernel


def scalar_in_task() -> tirx.PrimFunc:
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((64,), "float32")):
        T.func_attr({"tirx.is_scheduled": True})
        for task in T.parallel(64):
            with T.sblock("task"):
                T.reads()
                T.writes()
                scalar = x[task] * T.float32(2)
                x[task] = scalar + T.float32(1)

    return kernel


def test_stack_buffer_refuses_what_would_not_be_on_the_stack():
    from tvm.script import tirx as T

    from qwen3c.schedules.scratch import stack_buffer

    with pytest.raises(tvm.error.DiagnosticError, match="would not be on the stack"):
        @T.prim_func(private=True, s_tir=True)
        def kernel(x: T.Buffer((64,), "float32")):
            for task in T.parallel(64):
                with T.sblock("task"):
                    scratch = stack_buffer((16, 16), "float32")
                    scratch[0, 0] = x[task]


class QKNorm(nn.Module):
    """The q/k-norm chain of our Qwen3Attention over a fused qkv tensor."""

    def __init__(self, q_heads: int, kv_heads: int, head_dim: int):
        from qwen3c.compile.model import RMSNorm

        self.heads = (q_heads, kv_heads)
        self.q_norm, self.k_norm = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)

    def forward(self, qkv: nn.Tensor) -> nn.Tensor:
        q_heads, kv_heads = self.heads
        q, k, v = nn.op.split(qkv, indices_or_sections=[q_heads, q_heads + kv_heads], axis=2)
        return nn.op.concat([self.q_norm(q), self.k_norm(k), v], dim=2)


def reference_qk_norm(qkv: np.ndarray, w_q: np.ndarray, w_k: np.ndarray,
                      q_heads: int, kv_heads: int) -> np.ndarray:
    x = qkv.astype(np.float32)
    out = x.copy()
    for heads, weight in ((slice(0, q_heads), w_q), (slice(q_heads, q_heads + kv_heads), w_k)):
        part = x[..., heads, :]
        out[..., heads, :] = part / np.sqrt((part ** 2).mean(-1, keepdims=True) + 1e-6) * weight
    return out


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_qk_norm_chain_becomes_one_kernel(dtype, tolerance):
    q_heads, kv_heads, head_dim = 3, 1, 24
    spec = {"forward": {"qkv": nn.spec.Tensor(["b", "s", q_heads + 2 * kv_heads, head_dim],
                                              dtype),
                        "$": {"param_mode": "packed", "effect_mode": "none"}}}
    backend = get_target("llvm")
    target = host_target()
    module = QKNorm(q_heads, kv_heads, head_dim)
    mod = run_pipeline(module.export_tvm(spec=spec)[0], backend.pipeline(target), target)
    names = [gvar.name_hint for gvar in mod.functions]
    assert any(name.startswith("qk_norm") for name in names), names
    assert not any("rms_norm" in name or "concatenate" in name for name in names), names
    vm = relax.VirtualMachine(relax.build(mod, target=target, relax_pipeline=None), tvm.cpu())
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    rng = np.random.default_rng(4)
    w_q, w_k = (rng.normal(size=head_dim).astype(np.float32) for _ in range(2))
    for batch, seq in ((1, 1), (2, 5)):
        qkv = rng.normal(size=(batch, seq, q_heads + 2 * kv_heads, head_dim)).astype(np_dtype)
        out = vm["forward"](tvm.runtime.tensor(qkv),
                            [tvm.runtime.tensor(w_q), tvm.runtime.tensor(w_k)])
        np.testing.assert_allclose(out.numpy().astype(np.float32),
                                   reference_qk_norm(qkv, w_q, w_k, q_heads, kv_heads),
                                   rtol=tolerance, atol=tolerance)


class ResidualNorm(nn.Module):
    """Our decoder layer's residual add of a float32 projection output, then the RMSNorm."""

    def __init__(self, hidden: int):
        from qwen3c.compile.model import RMSNorm

        self.norm = RMSNorm(hidden, 1e-6)

    def forward(self, x: nn.Tensor, projected: nn.Tensor) -> nn.Tensor:
        total = x + projected.astype(x.dtype)
        return nn.op.concat([total, self.norm(total)], dim=-1)


def reference_residual_norm(x: np.ndarray, projected: np.ndarray, weight: np.ndarray,
                            dtype) -> np.ndarray:
    total = (x.astype(np.float32) + projected.astype(dtype).astype(np.float32)).astype(dtype)
    wide = total.astype(np.float32)
    normed = wide / np.sqrt((wide ** 2).mean(-1, keepdims=True) + 1e-6) * weight
    return np.concatenate([wide, normed], axis=-1)


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_residual_add_and_norm_become_one_kernel(dtype, tolerance):
    hidden = 48
    spec = {"forward": {"x": nn.spec.Tensor(["b", "s", hidden], dtype),
                        "projected": nn.spec.Tensor(["b", "s", hidden], "float32"),
                        "$": {"param_mode": "packed", "effect_mode": "none"}}}
    backend = get_target("llvm")
    target = host_target()
    mod = run_pipeline(ResidualNorm(hidden).export_tvm(spec=spec)[0],
                       backend.pipeline(target), target)
    names = [gvar.name_hint for gvar in mod.functions]
    assert any(name.startswith("add_rms_norm") for name in names), names
    assert not any("rms_norm" in name and not name.startswith("add_rms_norm")
                   for name in names), names
    vm = relax.VirtualMachine(relax.build(mod, target=target, relax_pipeline=None), tvm.cpu())
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    rng = np.random.default_rng(5)
    weight = rng.normal(size=hidden).astype(np.float32)
    for batch, seq in ((1, 1), (2, 5)):  # one token: the serial path; more: one task each
        x = rng.normal(size=(batch, seq, hidden)).astype(np_dtype)
        projected = rng.normal(size=(batch, seq, hidden)).astype(np.float32)
        out = vm["forward"](tvm.runtime.tensor(x), tvm.runtime.tensor(projected),
                            [tvm.runtime.tensor(weight)])
        np.testing.assert_allclose(out.numpy().astype(np.float32),
                                   reference_residual_norm(x, projected, weight, np_dtype),
                                   rtol=tolerance, atol=tolerance)


def test_reshapes_around_our_row_kernels_collapse(tiny_checkpoint, tmp_path):
    """Each reshape is VM instructions in every decode step. Our kernels take [tokens,
    features] rows, and the reshapes nn and our passes put around them must collapse
    (RemoveRedundantReshape): per layer only the pair around the paged-KV attention is left."""
    import qwen3c

    qwen3c.compile_model(tiny_checkpoint, output=tmp_path / "artifact", dtype="float32",
                         dump_ir=tmp_path / "ir")
    text = (tmp_path / "ir" / "07-finalize.py").read_text()
    decode = text[text.index("    def decode("):]
    decode = decode[:decode.find("    @R.function")]
    layers = json.loads((tiny_checkpoint / "config.json").read_text())["num_hidden_layers"]
    assert decode.count('"vm.builtin.reshape"') <= 2 * layers + 2, decode


def test_macros_expand_as_with_tvms_own_parser_search(monkeypatch):
    """``tvmscript_macros``' faster search finds the same parser: a kernel of nested and
    recursive macros parses to the same PrimFunc either way."""
    assert ScriptMacro._find_parser_def is tvmscript_macros.find_parser
    ours = bf16_packed.packed_gemm.__wrapped__(128, 64, 3)
    monkeypatch.setattr(ScriptMacro, "_find_parser_def", tvmscript_macros.TVM_SEARCH)
    tvm.ir.assert_structural_equal(bf16_packed.packed_gemm.__wrapped__(128, 64, 3), ours)
