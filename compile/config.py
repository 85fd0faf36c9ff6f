"""Read a Hugging Face Qwen3 config.json into a validated, typed model configuration.

Everything the model definition needs comes from here, so an unsupported checkpoint is refused
once, with a message, before any compilation starts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from qwen3c.errors import ConfigError

DENSE, MOE = "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"
SUPPORTED_ARCHITECTURES = (DENSE, MOE)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """The subset of a Qwen3 / Qwen3-MoE config.json that determines the computation."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...] = ()
    # Mixture of experts (Qwen3-MoE); num_experts == 0 means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_moe_layer(self, layer: int) -> bool:
        """HF's rule: experts unless listed in mlp_only_layers or off the sparse step."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def parameter_count(self) -> int:
        """The checkpoint's parameters as HF counts them (``num_parameters()``): what the model
        is, whatever layout, packing or quantization an artifact stores it in."""
        H, D, V = self.hidden_size, self.head_dim, self.vocab_size
        q, kv = self.num_attention_heads * D, self.num_key_value_heads * D
        attention = 2 * H * q + 2 * H * kv + 2 * D  # q, k, v, o; q_norm and k_norm
        if self.attention_bias:
            attention += q + 2 * kv + H
        dense_mlp = 3 * H * self.intermediate_size
        experts = self.num_experts * (H + 3 * H * self.moe_intermediate_size)  # router too
        layers = sum(attention + 2 * H + (experts if self.is_moe_layer(i) else dense_mlp)
                     for i in range(self.num_hidden_layers))
        return V * H + layers + H + (0 if self.tie_word_embeddings else V * H)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Qwen3Config:
        architecture = _check_supported(raw)
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            config = cls(
                architecture=architecture,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_parameters(raw).get("rope_theta", 10000.0)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", False)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
                eos_token_ids=_token_ids(raw.get("eos_token_id")),
                **(_moe_fields(raw) if architecture == MOE else {}),
            )
        except KeyError as missing:
            raise ConfigError(f"config.json lacks the required field {missing}") from None
        except (TypeError, ValueError) as bad:
            raise ConfigError(f"config.json has a malformed field: {bad}") from None
        config._check_shapes()
        return config

    def _check_shapes(self) -> None:
        sizes = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim",
                 "max_position_embeddings"]
        if self.architecture == MOE:
            sizes += ["num_experts", "moe_intermediate_size", "decoder_sparse_step"]
        for name in sizes:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: {name} must be positive, "
                                  f"got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim must be even for RoPE, got {self.head_dim}")
        if self.architecture == MOE and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"config.json: num_experts_per_tok ({self.num_experts_per_tok}) "
                              f"must be in 1..num_experts ({self.num_experts})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(model_dir: str | Path) -> Qwen3Config:
    """Read ``model_dir/config.json`` (and eos ids from generation_config.json when present)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir} is not a directory (expected a Hugging Face checkpoint)")
    raw = _read_json(model_dir / "config.json", required=True)
    generation = _read_json(model_dir / "generation_config.json", required=False)
    if generation.get("eos_token_id") is not None:
        merged = _token_ids(raw.get("eos_token_id")) + _token_ids(generation["eos_token_id"])
        raw = {**raw, "eos_token_id": list(dict.fromkeys(merged))}
    return Qwen3Config.from_dict(raw)


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ConfigError(f"{path} not found: is {path.parent} a Hugging Face checkpoint?")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as bad:
        raise ConfigError(f"{path} is not valid JSON: {bad}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _moe_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """MoE settings; transformers 5 writes num_local_experts, older files num_experts."""
    experts = raw.get("num_experts", raw.get("num_local_experts"))
    if experts is None:
        raise ConfigError("config.json lacks num_experts (or num_local_experts)")
    return {
        "num_experts": int(experts),
        "num_experts_per_tok": int(raw["num_experts_per_tok"]),
        "moe_intermediate_size": int(raw["moe_intermediate_size"]),
        "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
        "decoder_sparse_step": int(raw.get("decoder_sparse_step", 1)),
        "mlp_only_layers": tuple(int(i) for i in raw.get("mlp_only_layers") or ()),
    }


def _check_supported(raw: dict[str, Any]) -> str:
    """The supported architecture named by the config, or a ConfigError."""
    architectures = raw.get("architectures") or []
    supported = [arch for arch in architectures if arch in SUPPORTED_ARCHITECTURES]
    if not supported:
        found = ", ".join(architectures) or f"model_type={raw.get('model_type')!r}"
        raise ConfigError(
            f"unsupported architecture {found}; "
            f"qwen3c compiles {', '.join(SUPPORTED_ARCHITECTURES)}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"unsupported hidden_act {raw['hidden_act']!r}; Qwen3 uses 'silu'")
    if raw.get("use_sliding_window") or "sliding_attention" in (raw.get("layer_types") or []):
        raise ConfigError("sliding-window attention is not supported; set use_sliding_window false")
    rope_type = _rope_parameters(raw).get("rope_type", _rope_parameters(raw).get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"unsupported rope scaling type {rope_type!r}; only 'default' RoPE is")
    return supported[0]


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings: transformers 5 nests them in rope_parameters, older files at top level."""
    nested = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(nested, dict):
        raise ConfigError("config.json: rope_parameters / rope_scaling must be an object")
    merged = dict(nested)
    if "rope_theta" in raw:
        merged.setdefault("rope_theta", raw["rope_theta"])
    return merged


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
