"""Tensor and expert parallelism: how the model is cut over devices, declared on its parameters.

The model is built once per shard with the shard's sizes (heads / N, intermediate / N, experts / N)
and tags each split parameter with a ``ShardSpec``; every other parameter is replicated. At
compile time the full HF tensors are cut by those specs into one weight set per shard, and the
model sums partial results with an all-reduce after o_proj and after the MLP or MoE block:

    attention   qkv_proj  split by heads (q, k and v parts each)   o_proj  split by its input
    MLP         gate_up   split by intermediate (gate, up each)    down    split by its input
    MoE, TP     every expert split by intermediate as the MLP
    MoE, EP     experts partitioned: shard r holds experts [r·E/N, (r+1)·E/N)
    vocabulary  embed_tokens and lm_head split by vocabulary rows (when they divide evenly):
                a lookup sums the shards' rows, the logits are gathered from all shards
    replicated  norms, the router (every shard routes every token)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from tvm.relax.frontend import nn

from qwen3c.compile.config import Qwen3Config
from qwen3c.errors import ConfigError

SHARD_ATTR = "shard"


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """How many devices the model spans, and whether MoE experts are partitioned (expert
    parallel) or each split by intermediate size (tensor parallel)."""

    shards: int = 1
    expert_parallel: bool = False

    def check(self, config: Qwen3Config) -> None:
        """Refuse splits that do not divide the model evenly, naming the size at fault."""
        n = self.shards
        if n < 1:
            raise ConfigError(f"--tensor-parallel must be >= 1, got {n}")
        if self.expert_parallel and not config.num_experts:
            raise ConfigError("--expert-parallel needs a Qwen3-MoE model; this one is dense")
        if self.expert_parallel and n == 1:
            raise ConfigError("--expert-parallel needs --tensor-parallel N with N >= 2 devices")
        sizes = {"num_attention_heads": config.num_attention_heads,
                 "num_key_value_heads": config.num_key_value_heads}
        if config.num_experts and self.expert_parallel:
            sizes["num_experts"] = config.num_experts
        elif config.num_experts:
            sizes["moe_intermediate_size"] = config.moe_intermediate_size
        if not all(config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
            sizes["intermediate_size"] = config.intermediate_size
        for name, size in sizes.items():
            if size % n:
                raise ConfigError(f"cannot split the model over {n} devices: {name} = {size} "
                                  f"is not divisible by {n}")

    def vocab_shards(self, vocab_size: int) -> int:
        """The embedding and lm_head are cut by vocabulary rows when the rows divide evenly,
        else every shard holds them whole."""
        return self.shards if vocab_size % self.shards == 0 else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SINGLE_DEVICE = Parallelism()


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Cut a parameter along ``dim``. A fused parameter lists its parts' per-shard sizes in
    ``segments`` (e.g. q, k, v): each part is cut separately, and shard r holds piece r of
    every part, so the per-shard tensor is fused the same way as the whole."""

    dim: int
    segments: tuple[int, ...] = ()

    def split(self, array: np.ndarray, shards: int) -> list[np.ndarray]:
        segments = self.segments or (array.shape[self.dim] // shards,)
        if sum(segments) * shards != array.shape[self.dim]:
            raise ValueError(f"axis {self.dim} of shape {array.shape} does not hold "
                             f"{shards} shards of {segments}")
        parts = np.split(array, np.cumsum([s * shards for s in segments])[:-1], axis=self.dim)
        pieces = [np.split(part, shards, axis=self.dim) for part in parts]
        return [np.ascontiguousarray(np.concatenate([p[r] for p in pieces], axis=self.dim))
                for r in range(shards)]

    def full_shape(self, shard_shape: Sequence[int], shards: int) -> tuple[int, ...]:
        shape = list(shard_shape)
        shape[self.dim] *= shards
        return tuple(shape)

    def to_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "segments": list(self.segments)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ShardSpec:
        return cls(int(raw["dim"]), tuple(int(s) for s in raw["segments"]))


def shard(param: nn.Parameter, dim: int, *segments: int) -> None:
    """Declare that ``param`` is cut along ``dim`` (see ``ShardSpec``)."""
    param.attrs[SHARD_ATTR] = ShardSpec(dim, tuple(segments))


def shard_spec(param: nn.Parameter) -> ShardSpec | None:
    return param.attrs.get(SHARD_ATTR)
