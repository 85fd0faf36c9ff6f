"""Routing statistics of a Qwen3-MoE model, accumulated over the tokens it has processed."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class LayerRouting:
    """One MoE layer: what each expert received over ``tokens`` tokens."""

    layer: int
    tokens: int
    counts: np.ndarray  # [E] tokens routed to each expert (sums to tokens * top_k)
    weight_sums: np.ndarray  # [E] summed routing weight (after top-k renormalisation)
    prob_sums: np.ndarray  # [E] summed softmax probability over all tokens

    @property
    def count_cv(self) -> float:
        """Coefficient of variation of the counts: 0 when perfectly balanced."""
        mean = self.counts.mean()
        return float(self.counts.std() / mean) if mean else 0.0

    @property
    def aux_loss(self) -> float:
        """Switch-Transformer balance loss E · Σ f_i P_i as HF computes it (f_i: share of
        tokens routed to i, P_i: mean router probability); equals top_k when balanced."""
        if not self.tokens:
            return 0.0
        f = self.counts / self.tokens
        p = self.prob_sums / self.tokens
        return float(len(self.counts) * np.sum(f * p))

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "tokens": self.tokens,
                "counts": self.counts.astype(int).tolist(),
                "weight_sums": [round(float(w), 6) for w in self.weight_sums],
                "count_cv": self.count_cv, "aux_loss": self.aux_loss}


class RouterStatsAccumulator:
    """Sums the per-call [layers, 3, E] statistics the ``*_router_stats`` entry points return."""

    def __init__(self, moe_layers: list[int], num_experts: int, top_k: int):
        self.moe_layers = moe_layers
        self.top_k = top_k
        self.totals = np.zeros((len(moe_layers), 3, num_experts), dtype=np.float64)

    def add(self, stats: np.ndarray) -> None:
        self.totals += stats

    def reset(self) -> None:
        self.totals[:] = 0

    def layers(self) -> list[LayerRouting]:
        return [LayerRouting(layer=layer,
                             tokens=round(self.totals[i, 0].sum() / self.top_k),
                             counts=np.rint(self.totals[i, 0]).astype(np.int64),
                             weight_sums=self.totals[i, 1].copy(),
                             prob_sums=self.totals[i, 2].copy())
                for i, layer in enumerate(self.moe_layers)]


def format_router_table(layers: list[LayerRouting], busiest: int = 4) -> str:
    lines = [f"{'layer':>5} {'tokens':>7} {'cv':>6} {'aux':>7}  busiest experts (tokens)"]
    for stats in layers:
        top = np.argsort(-stats.counts, kind="stable")[:busiest]
        experts = " ".join(f"{e}:{stats.counts[e]}" for e in top)
        lines.append(f"{stats.layer:>5} {stats.tokens:>7} {stats.count_cv:>6.2f} "
                     f"{stats.aux_loss:>7.3f}  {experts}")
    return "\n".join(lines)
