"""Weight quantization declared on the model: which parameters hold integers, which their scales.

``qwen3c compile --quant q8|q4`` stores the decoder projections (q/k/v, o, gate/up, down) and
the MoE experts' gate_up and down as group-wise symmetric integers with bfloat16 scales
(``schedules/quant.py``, ``schedules/moe_quant.py``). The lm_head is int8 unless
``--quant-head q4`` asks for int4 (a tied head gets its own integer copy of the embedding
table): it is 40 % of the bytes a 0.6B q4 model reads per token (79 % for the MoE-small
shape), but its errors land on the logits directly, so the smaller head is the user's choice,
not the default. The embedding lookup, norms and the MoE router stay in the model dtype, as
does any projection whose sizes the group or the kernels' row tiles do not divide.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tvm.relax.frontend import nn

from qwen3c.errors import ConfigError
from qwen3c.schedules.quant import QuantScheme

QUANT_ATTR = "quant"
SCALE_SUFFIX = "_scale"
DEFAULT_HEAD = "q8"
SCHEMES = {"q8": 8, "q4": 4}
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
        return (*lead, cols * (2 if self.bits == 4 else 1))

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
    if group < 8 or group % 8:
        raise ConfigError(f"quantization group size must be a multiple of 8, got {group}")
    return QuantScheme(SCHEMES[name], group)


def parse_quantization(name: str | None, group: int, head: str | None
                       ) -> tuple[QuantScheme | None, QuantScheme | None]:
    """The schemes of the projections and of the lm_head (int8 unless ``head`` says)."""
    scheme = parse_scheme(name, group)
    if scheme is None:
        if head is not None:
            raise ConfigError("--quant-head needs --quant: an unquantized model keeps its "
                              "lm_head in the model dtype")
        return None, None
    return scheme, parse_scheme(head or DEFAULT_HEAD, group)


def mark_quantized(values: nn.Parameter, scales: nn.Parameter, scheme: QuantScheme) -> None:
    values.attrs[QUANT_ATTR] = QuantParam(scheme.bits, scheme.group, "values")
    scales.attrs[QUANT_ATTR] = QuantParam(scheme.bits, scheme.group, "scales")


def quant_param(param: nn.Parameter) -> QuantParam | None:
    return param.attrs.get(QUANT_ATTR)
