"""The MoE kernels in schedules/moe.py against numpy, including degenerate routings, and the
GPU kernels of schedules/moe_gpu.py against them."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
import tvm
from conftest import host_target
from tvm.script import from_source

from qwen3c.schedules import amx_gemm, bf16_dot, bf16_panel, moe, moe_gpu

E, K, H, I = 8, 3, 40, 24  # H and I are not multiples of the 16-row blocks
FIRST_EXPERT_0 = np.zeros(1, np.int64)


# The expert kernels' variants: (float32 lanes, vector registers, bfloat16 dot products,
# hidden, intermediate); the dot products need sizes in steps of 32, the panels
# (schedules/bf16_panel.py, bfloat16 weights stored for them) rows in steps of 64.
KERNELS = {"avx512": (16, 32, False, H, I), "avx2": (8, 16, False, H, I),
           "neon": (4, 32, False, H, I), "avx512-bf16": (16, 32, True, 64, 96),
           "avx512-bf16-panels": (16, 32, True, 64, 96), "amx": (16, 32, False, 64, 96)}
PANELS = "avx512-bf16-panels"
AMX = "amx"  # prefills on AMX tiles (schedules/amx_gemm.py), decode on the avx512 kernels


def build(normalize: bool, dtype: str, local_experts: int = E, kernel: str = "avx512"):
    lanes, registers, bf16, hidden, intermediate = KERNELS[kernel]
    if kernel == PANELS:
        gate_up = bf16_panel.expert_gate_up_silu(local_experts, K, hidden, intermediate)
        down = bf16_panel.expert_down_scatter(local_experts, K, hidden, intermediate)
    else:
        gate_up = moe.moe_gate_up_silu(local_experts, K, hidden, intermediate, dtype, lanes,
                                       registers, bf16, kernel == AMX)
        down = moe.moe_down_scatter(local_experts, K, hidden, intermediate, dtype, lanes,
                                    registers, bf16, kernel == AMX)
    funcs = {"route": moe.moe_route(E, K, normalize), "group": moe.moe_group(local_experts, K),
             "gate_up": gate_up, "down": down}
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    return tvm.compile(mod, target=host_target())


def run(lib, name: str, *arrays: np.ndarray, outputs: list[tuple[tuple[int, ...], str]]):
    outs = [tvm.runtime.tensor(np.zeros(shape, dtype=np.dtype(dt) if dt != "bfloat16"
                                        else ml_dtypes.bfloat16)) for shape, dt in outputs]
    lib[name](*[tvm.runtime.tensor(a) for a in arrays], *outs)
    return [o.numpy() for o in outs]


def reference_route(logits: np.ndarray, normalize: bool):
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :K]
    weights = np.take_along_axis(probs, experts, -1)
    if normalize:
        weights /= weights.sum(-1, keepdims=True)
    return weights, experts


@pytest.mark.parametrize("normalize", [True, False])
def test_route_matches_softmax_topk(normalize):
    lib = build(normalize, "float32")
    logits = np.random.default_rng(0).normal(size=(33, E)).astype(np.float32)
    logits[5] = 0.0  # all tied: lowest indices win, as torch.topk
    weights, experts = run(lib, "route", logits, outputs=[((33, K), "float32"),
                                                           ((33, K), "int32")])
    ref_weights, ref_experts = reference_route(logits, normalize)
    np.testing.assert_array_equal(experts, ref_experts)
    np.testing.assert_array_equal(experts[5], [0, 1, 2])
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-5)


def routings(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    spread = np.stack([rng.choice(E, K, replace=False) for _ in range(n)])
    crowded = np.tile([6, 2, 0], (n, 1))  # every token on the same three experts; 5 idle
    return {"spread": spread.astype(np.int32), "crowded": crowded.astype(np.int32)}


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("routing", ["spread", "crowded"])
@pytest.mark.parametrize("n", [1, 3, 13, 40])  # a decode, a batch of decodes (one
#                                              parallel region), a few tokens, many tiles
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_grouped_expert_mlp_matches_numpy(dtype, tolerance, routing, n, kernel):
    *_, bf16, H, I = KERNELS[kernel]
    if bf16 and not bf16_dot.available(host_target(), dtype, H, I):
        pytest.skip("bfloat16 dot products: bfloat16 on a CPU with AVX512-BF16 only")
    if kernel == AMX and not amx_gemm.experts_usable(host_target(), dtype, H, I):
        pytest.skip("AMX tiles: bfloat16 on a CPU with AMX-BF16 only")
    lib = build(True, dtype, kernel=kernel)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    rng = np.random.default_rng(2)
    experts = routings(n)[routing]
    routing_weights = rng.uniform(0.1, 1.0, (n, K)).astype(np.float32)
    x = rng.normal(size=(n, H)).astype(np_dtype)
    w_gate_up = (rng.normal(size=(E, 2 * I, H)) * 0.3).astype(np_dtype)
    w_down = (rng.normal(size=(E, H, I)) * 0.3).astype(np_dtype)

    offsets, order = run(lib, "group", experts, FIRST_EXPERT_0,
                         outputs=[((E + 1,), "int32"), ((n * K,), "int32")])
    counts = np.bincount(experts.reshape(-1), minlength=E)
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(counts)]))
    np.testing.assert_array_equal(order, np.argsort(experts.reshape(-1), kind="stable"))

    stored_gate_up, stored_down = (
        (bf16_panel.LAYOUTS[bf16_panel.PAIRED_LAYOUT](w_gate_up),
         bf16_panel.LAYOUTS[bf16_panel.LAYOUT](w_down)) if kernel == PANELS
        else (w_gate_up, w_down))
    (act,) = run(lib, "gate_up", x, stored_gate_up, offsets, order,
                 outputs=[((n * K, I), dtype)])
    (out,) = run(lib, "down", act, stored_down, offsets, order, routing_weights,
                 outputs=[((n, H), "float32")])

    xf, w1, w2 = (a.astype(np.float32) for a in (x, w_gate_up, w_down))
    expected = np.zeros((n, H), np.float32)
    for t in range(n):
        for s in range(K):
            e = experts[t, s]
            gate, up = w1[e, :I] @ xf[t], w1[e, I:] @ xf[t]
            hidden = (gate / (1 + np.exp(-gate)) * up).astype(np_dtype).astype(np.float32)
            expected[t] += routing_weights[t, s] * (w2[e] @ hidden)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(out, expected, atol=tolerance * scale, rtol=tolerance)


@pytest.mark.parametrize("routing", ["spread", "crowded"])
def test_expert_shards_sum_to_the_whole(routing):
    """Expert parallelism: each shard groups only its own experts, and the shards' outputs
    add up to the output over all experts."""
    n, half = 13, E // 2
    whole, shard = build(True, "float32"), build(True, "float32", local_experts=half)
    rng = np.random.default_rng(3)
    experts = routings(n)[routing]
    routing_weights = rng.uniform(0.1, 1.0, (n, K)).astype(np.float32)
    x = rng.normal(size=(n, H)).astype(np.float32)
    w_gate_up = rng.normal(size=(E, 2 * I, H)).astype(np.float32)
    w_down = rng.normal(size=(E, H, I)).astype(np.float32)

    def mlp(lib, first: int, experts_held: slice) -> np.ndarray:
        local = lib is shard
        offsets, order = run(lib, "group", experts, np.array([first], np.int64),
                             outputs=[((half + 1 if local else E + 1,), "int32"),
                                      ((n * K,), "int32")])
        if local:
            held = (experts >= first) & (experts < first + half)
            counts = np.bincount(experts[held] - first, minlength=half)
            np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(counts)]))
        (act,) = run(lib, "gate_up", x, w_gate_up[experts_held], offsets, order,
                     outputs=[((n * K, I), "float32")])
        return run(lib, "down", act, w_down[experts_held], offsets, order, routing_weights,
                   outputs=[((n, H), "float32")])[0]

    expected = mlp(whole, 0, slice(None))
    shards = mlp(shard, 0, slice(0, half)) + mlp(shard, half, slice(half, E))
    np.testing.assert_allclose(shards, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def threads_as_loops(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """A GPU kernel whose thread-bound loops run as serial loops: the same results, since no
    thread of these kernels reads what another writes, and it runs on this GPU-less host."""
    text = re.sub(r'T\.thread_binding\(([^,]+), thread="[a-zA-Z.]+"\)', r"T.serial(\1)",
                  func.script())
    assert "thread_binding" not in text
    return from_source(text)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("routing", ["spread", "crowded"])
@pytest.mark.parametrize("n, first, local_experts", [(1, 0, E), (13, 0, E), (13, 4, E // 2)])
def test_gpu_kernels_compute_what_the_cpu_kernels_do(dtype, routing, n, first, local_experts):
    funcs = {"route": moe_gpu.moe_route(E, K, True),
             "gate_up": moe_gpu.moe_gate_up_silu(local_experts, K, H, I, dtype),
             "down": moe_gpu.moe_down_sum(local_experts, K, H, I, dtype),
             "stats": moe_gpu.moe_router_stats(E, K)}
    gpu = tvm.compile(tvm.IRModule({name: threads_as_loops(f).with_attr("global_symbol", name)
                                    for name, f in funcs.items()}), target="llvm")
    cpu = build(True, dtype, local_experts)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(n, E)).astype(np.float32)
    route_outputs = [((n, K), "float32"), ((n, K), "int32")]
    np.testing.assert_array_equal(run(gpu, "route", logits, outputs=route_outputs)[1],
                                  run(cpu, "route", logits, outputs=route_outputs)[1])
    experts = routings(n)[routing]
    weights = rng.uniform(0.1, 1.0, (n, K)).astype(np.float32)
    x = rng.normal(size=(n, H)).astype(np_dtype)
    held = slice(first, first + local_experts)
    w_gate_up = (rng.normal(size=(E, 2 * I, H)) * 0.3).astype(np_dtype)[held]
    w_down = (rng.normal(size=(E, H, I)) * 0.3).astype(np_dtype)[held]
    start = np.array([first], np.int64)

    (act,) = run(gpu, "gate_up", x, w_gate_up, experts, start, outputs=[((n * K, I), dtype)])
    (ours,) = run(gpu, "down", act, w_down, experts, start, weights,
                  outputs=[((n, H), "float32")])
    offsets, order = run(cpu, "group", experts, start,
                         outputs=[((local_experts + 1,), "int32"), ((n * K,), "int32")])
    (act,) = run(cpu, "gate_up", x, w_gate_up, offsets, order, outputs=[((n * K, I), dtype)])
    (expected,) = run(cpu, "down", act, w_down, offsets, order, weights,
                      outputs=[((n, H), "float32")])
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
