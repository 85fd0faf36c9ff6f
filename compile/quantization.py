"""Weight quantization declared on the model: which parameters hold integers, which their scales.

``qwen3c compile --quant q8|q6|q4`` stores the decoder projections (q/k/v, o, gate/up, down)
and the MoE experts' gate_up and down as group-wise symmetric integers with bfloat16 scales
(``schedules/quant.py``, ``schedules/moe_quant.py``). The lm_head (a tied head gets its own
integer copy of the embedding table) is int8 in q8 builds and int6 in q6 and q4 builds, as
llama.cpp gives its q4_0 files a Q6_K head: the head is 40 % of the bytes a 0.6B q4 model
reads per token with int8 (79 % for the MoE-small shape), and its errors land on the logits
directly, so it keeps more bits than the projections unless ``--quant-head q4`` asks for
int4. The embedding lookup, norms and the MoE router stay in the model dtype, as does any
projection whose sizes the group or the kernels' row tiles do not divide.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tvm.relax.frontend import nn

from qwen3c.errors import ConfigError
from qwen3c.schedules.quant import QuantScheme

QUANT_ATTR = "quant"
SCALE_SUFFIX = "_scale"
SCHEMES = {"q8": 8, "q6": 6, "q4": 4}
DEFAULT_GROUP = 32


@dataclasses.dataclass(frozen=True)
class QuantParam:
    """A parameter holding a quantized weight's integers (``role="values"``) or its scales."""

    bits: int
    group: int
    role: str

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.group)

    def float_name(self, name: str) -> str:
        """The float weight this parameter is made from."""
        return name.removesuffix(SCALE_SUFFIX) if self.role == "scales" else name

    def float_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        *lead, cols = shape
        if self.role == "scales":
            return (*lead, cols * self.group)
        return (*lead, cols * 8 // self.bits)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> QuantParam:
        return cls(int(raw["bits"]), int(raw["group"]), str(raw["role"]))


def parse_scheme(name: str | None, group: int = DEFAULT_GROUP) -> QuantScheme | None:
    """``q8`` / ``q4`` / None -> the scheme; anything else is refused."""
    if name is None:
        return None
    if name not in SCHEMES:
        raise ConfigError(f"unknown quantization {name!r}; choose one of {', '.join(SCHEMES)}")
    scheme = QuantScheme(SCHEMES[name], group)
    if not scheme.group_fits:
        raise ConfigError(f"{name}'s group size must be a multiple of {scheme.group_multiple}, "
                          f"got {group}")
    return scheme


def default_head_bits(scheme: QuantScheme) -> int:
    """int8 beside int8 projections; int6 beside narrower ones where the group allows it."""
    return 6 if scheme.bits < 8 and QuantScheme(6, scheme.group).group_fits else 8


def parse_quantization(name: str | None, group: int, head: str | None
                       ) -> tuple[QuantScheme | None, QuantScheme | None]:
    """The schemes of the projections and of the lm_head (``default_head_bits`` unless
    ``head`` says)."""
    scheme = parse_scheme(name, group)
    if scheme is None:
        if head is not None:
            raise ConfigError("--quant-head needs --quant: an unquantized model keeps its "
                              "lm_head in the model dtype")
        return None, None
    if head is None:
        return scheme, QuantScheme(default_head_bits(scheme), group)
    return scheme, parse_scheme(head, group)


def mark_quantized(values: nn.Parameter, scales: nn.Parameter, scheme: QuantScheme) -> None:
    values.attrs[QUANT_ATTR] = QuantParam(scheme.bits, scheme.group, "values")
    scales.attrs[QUANT_ATTR] = QuantParam(scheme.bits, scheme.group, "scales")


def quant_param(param: nn.Parameter) -> QuantParam | None:
    return param.attrs.get(QUANT_ATTR)
