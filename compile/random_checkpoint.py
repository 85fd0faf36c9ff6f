"""Write a seeded random Qwen3 checkpoint in HF layout, with a real byte-level BPE tokenizer
trained here, so the demo, the tests and the benchmarks need no download and no model at hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qwen3c.compile.config import DENSE, MOE, Qwen3Config
from qwen3c.compile.weights import NUMPY_DTYPES

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# ChatML, as Qwen3 uses it; an empty think block switches thinking off.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
# The demo's model: big enough to exercise GQA and several layers, compiled in seconds.
TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
# The MoE demo's model: 8 experts, top-2, one dense layer between sparse ones.
TINY_MOE: dict[str, Any] = {
    **TINY,
    "num_hidden_layers": 3,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 48,
    "norm_topk_prob": True,
    "mlp_only_layers": [1],
}
# The shape of Qwen3-0.6B (random weights), the benchmarks' reference model.
QWEN3_0_6B: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
}
# The benchmarks' small MoE shape.
QWEN3_MOE_SMALL: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "moe_intermediate_size": 384,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": False,
    "vocab_size": 151936,
}


def train_tokenizer(vocab_size: int = 600) -> Tokenizer:
    """Byte-level BPE trained on qwen3c's own source files (always present, deterministic)."""
    package = Path(__file__).resolve().parent.parent
    sources = [*package.glob("*.py"),
               *(f for sub in ("compile", "runtime", "targets", "schedules")
                 for f in (package / sub).glob("*.py"))]
    corpus = sorted(str(p) for p in sources)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train(corpus, trainer)
    return tokenizer


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "bos_token": None, "chat_template": CHAT_TEMPLATE}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1),
                                                   encoding="utf-8")


def write_random_checkpoint(out_dir: str | Path, shape: dict[str, Any] | None = None, *,
                            seed: int = 0, std: float = 0.1, dtype: str = "float32") -> Path:
    """A random Qwen3 checkpoint (config, safetensors, tokenizer) of ``shape`` (default
    ``TINY``; a shape with ``num_experts`` makes a Qwen3-MoE); the vocabulary is the trained
    tokenizer's unless the shape sets one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    write_tokenizer(tokenizer, out_dir)
    shape = shape or TINY
    moe = "num_experts" in shape
    config = {"vocab_size": tokenizer.get_vocab_size(), **shape,
              "architectures": [MOE if moe else DENSE],
              "model_type": "qwen3_moe" if moe else "qwen3",
              "eos_token_id": tokenizer.token_to_id("<|im_end|>"), "torch_dtype": dtype}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    weights = _random_weights(config, np.random.default_rng(seed), std, NUMPY_DTYPES[dtype])
    save_file(weights, str(out_dir / "model.safetensors"))
    return out_dir


def _random_weights(config: dict[str, Any], rng: np.random.Generator, std: float,
                    dtype: np.dtype) -> dict[str, np.ndarray]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads, d = (config["num_attention_heads"], config["num_key_value_heads"],
                          config["head_dim"])

    def normal(*shape: int) -> np.ndarray:
        return (np.float32(std) * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    def norm_weight(size: int) -> np.ndarray:
        return (1.0 + std * rng.standard_normal(size, dtype=np.float32)).astype(dtype)

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden),
               "model.norm.weight": norm_weight(hidden)}
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = normal(config["vocab_size"], hidden)
    layout = Qwen3Config.from_dict(config)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if layout.is_moe_layer(i):
            moe_inter = config["moe_intermediate_size"]
            weights[p + "mlp.gate.weight"] = normal(config["num_experts"], hidden)
            for e in range(config["num_experts"]):
                weights |= {
                    f"{p}mlp.experts.{e}.gate_proj.weight": normal(moe_inter, hidden),
                    f"{p}mlp.experts.{e}.up_proj.weight": normal(moe_inter, hidden),
                    f"{p}mlp.experts.{e}.down_proj.weight": normal(hidden, moe_inter),
                }
        else:
            weights |= {
                p + "mlp.gate_proj.weight": normal(inter, hidden),
                p + "mlp.up_proj.weight": normal(inter, hidden),
                p + "mlp.down_proj.weight": normal(hidden, inter),
            }
        weights |= {
            p + "input_layernorm.weight": norm_weight(hidden),
            p + "post_attention_layernorm.weight": norm_weight(hidden),
            p + "self_attn.q_proj.weight": normal(heads * d, hidden),
            p + "self_attn.k_proj.weight": normal(kv_heads * d, hidden),
            p + "self_attn.v_proj.weight": normal(kv_heads * d, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, heads * d),
            p + "self_attn.q_norm.weight": norm_weight(d),
            p + "self_attn.k_norm.weight": norm_weight(d),
        }
    return weights
