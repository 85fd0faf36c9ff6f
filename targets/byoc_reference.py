"""numpy implementations of the BYOC partitions, to run an Ascend or MLU artifact's host graph
on a machine without the accelerator.

Each partition symbol is registered as a TVM global function computing exactly what the vendor
source computes from the same operands (``targets/vendor/*_ops.h``), in float32, so the host
graph around the partitions (boundaries, operand order, layouts, dtypes) is checked against HF.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_dtypes
import numpy as np
import tvm
import tvm_ffi

from qwen3c.targets.byoc import Partition


def _f32(tensor: tvm.runtime.Tensor) -> np.ndarray:
    return tensor.numpy().astype(np.float32)


def matmul(p: Partition, x: np.ndarray, weight: np.ndarray) -> list[np.ndarray]:
    return [x @ weight.T]


def rms_norm(p: Partition, x: np.ndarray, weight: np.ndarray) -> list[np.ndarray]:
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + p.attrs["eps"])
    return [x * scale * weight]


def swiglu(p: Partition, gate_up: np.ndarray) -> list[np.ndarray]:
    gate, up = np.split(gate_up, 2, axis=-1)
    return [gate / (1.0 + np.exp(-gate)) * up]


def moe_route(p: Partition, logits: np.ndarray) -> list[np.ndarray]:
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :p.attrs["top_k"]]
    weights = np.take_along_axis(probs, experts, -1)
    if p.attrs["normalize"]:
        weights /= weights.sum(-1, keepdims=True)
    return [weights, experts]


def moe_experts(p: Partition, experts: np.ndarray, first_expert: np.ndarray, x: np.ndarray,
                gate_up: np.ndarray, down: np.ndarray, routing: np.ndarray) -> list[np.ndarray]:
    """Σ_slots routing[t, s] · down[e] · swiglu(gate_up[e] · x[t]) over this shard's experts."""
    out = np.zeros((x.shape[0], down.shape[1]), np.float32)
    local = experts.astype(np.int64) - int(first_expert[0])
    for (token, slot), expert in np.ndenumerate(local):
        if 0 <= expert < gate_up.shape[0]:
            act = swiglu(p, gate_up[expert] @ x[token])[0]
            out[token] += routing[token, slot] * (down[expert] @ act)
    return [out]


OPS: dict[str, Callable[..., list[np.ndarray]]] = {
    "matmul": matmul, "rms_norm": rms_norm, "swiglu": swiglu, "moe_route": moe_route,
    "moe_experts": moe_experts,
}


def _numpy_dtype(dtype: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def register(partitions: list[Partition]) -> None:
    """Make every partition symbol resolve to its numpy implementation in this process."""
    for partition in partitions:
        tvm_ffi.register_global_func(partition.symbol, _implementation(partition),
                                     override=True)


def _implementation(partition: Partition) -> Callable[..., None]:
    compute, count = OPS[partition.op], len(partition.inputs)

    def run(*operands: tvm.runtime.Tensor) -> None:
        inputs = {o.role: _f32(t) if o.dtype.startswith(("float", "bfloat")) else t.numpy()
                  for t, o in zip(operands[:count], partition.inputs, strict=True)}
        results = compute(partition, **inputs)
        for target, result, operand in zip(operands[count:], results, partition.outputs,
                                           strict=True):
            target.copyfrom(np.ascontiguousarray(result).astype(_numpy_dtype(operand.dtype)))

    return run
