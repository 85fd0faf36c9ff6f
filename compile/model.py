"""Qwen3 decoder in Relax ``nn``, mirroring the Hugging Face module tree.

Per layer, with x the residual stream (RMSNorm statistics and every matmul sum in float32):

    [q; k; v]  = qkv_proj(norm(x))
    h          = x + o_proj(Attention(RoPE(q_norm(q)), RoPE(k_norm(k)), v))
    [gate; up] = gate_up_proj(norm(h))
    out        = h + down_proj(silu(gate) * up)

q/k/v and gate/up are fused into one projection each (weights are concatenated at load time, see
``weights.py``). Attention runs over TVM's paged KV cache, which applies RoPE and stores k/v.
"""

from __future__ import annotations

from tvm import relax as rx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from qwen3c.compile.config import Qwen3Config

ACCUMULATE = "float32"


class Linear(nn.Linear):
    """y = x Wᵀ (+ b), summed in float32 and returned in the weight dtype.

    16-bit weights summed in their own dtype give wrong tokens from the first step.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: str):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, out_dtype=ACCUMULATE)
        self.weight_dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).astype(self.weight_dtype)


class RMSNorm(nn.Module):
    """x / rms(x) · w over the last axis, with the statistics in float32 as HF computes them."""

    def __init__(self, size: int, eps: float, dtype: str):
        self.weight = nn.Parameter((size,), dtype)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        normed = op.rms_norm(x.astype(ACCUMULATE), self.weight.astype(ACCUMULATE),
                             axes=-1, epsilon=self.eps)
        return normed.astype(x.dtype)


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3Config, dtype: str):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_heads = self.num_heads + 2 * self.num_kv_heads
        self.qkv_proj = Linear(config.hidden_size, qkv_heads * self.head_dim,
                               bias=config.attention_bias, dtype=dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size,
                             bias=config.attention_bias, dtype=dtype)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)

    def forward(self, x: Tensor, kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        batch, seq_len, _ = x.shape
        h_q, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = op.reshape(self.qkv_proj(x), (batch, seq_len, h_q + 2 * h_kv, d))
        q, k, v = op.split(qkv, indices_or_sections=[h_q, h_q + h_kv], axis=2)
        qkv = op.concat([self.q_norm(q), self.k_norm(k), v], dim=2)
        attended = kv_cache.attention_with_fused_qkv(layer_id, qkv, h_q, sm_scale=d**-0.5)
        return self.o_proj(op.reshape(attended, (batch, seq_len, h_q * d)))


class Qwen3MLP(nn.Module):
    def __init__(self, config: Qwen3Config, dtype: str):
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size,
                                   bias=False, dtype=dtype)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size,
                                bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), indices_or_sections=2, axis=-1)
        return self.down_proj(op.silu(gate) * up)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, dtype: str):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Qwen3Attention(config, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = Qwen3MLP(config, dtype)

    def forward(self, x: Tensor, kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv_cache, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config, dtype: str):
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            [Qwen3DecoderLayer(config, dtype) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, x: Tensor, kv_cache: PagedKVCache) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv_cache, layer_id)
        return self.norm(x)


class Qwen3ForCausalLM(nn.Module):
    """The compiled entry points: ragged batched prefill, batched decode, KV cache creation."""

    def __init__(self, config: Qwen3Config, dtype: str):
        self.config = config
        self.dtype = dtype
        self.model = Qwen3Model(config, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False,
                                     dtype=dtype, out_dtype=ACCUMULATE)

    def logits(self, hidden: Tensor) -> Tensor:
        """Float32 logits; a tied head reuses the embedding matrix."""
        if self.config.tie_word_embeddings:
            table = op.permute_dims(self.model.embed_tokens.weight)
            return op.matmul(hidden, table, out_dtype=ACCUMULATE)
        return self.lm_head(hidden)

    def prefill(self, input_ids: Tensor, logit_positions: Tensor, kv_cache: PagedKVCache):
        """Append the concatenated prompts of every sequence in the batch to the cache.

        ``logit_positions`` picks the rows of the flat token axis that need logits: the last
        token of each sequence for generation, or all of them to score a prompt.
        """
        hidden = op.reshape(self.model.embed_tokens(input_ids), (1, input_ids.shape[0], -1))
        hidden = self.model(hidden, kv_cache)
        hidden = op.take(op.reshape(hidden, (input_ids.shape[0], -1)), logit_positions, axis=0)
        return self.logits(hidden)

    def decode(self, input_ids: Tensor, kv_cache: PagedKVCache):
        """One new token for each of the batch's sequences."""
        hidden = op.reshape(self.model.embed_tokens(input_ids), (input_ids.shape[0], 1, -1))
        hidden = self.model(hidden, kv_cache)
        return self.logits(op.reshape(hidden, (input_ids.shape[0], -1)))

    def create_paged_kv_cache(self, max_batch_size: int, max_total_seq_len: int,
                              prefill_chunk_size: int, page_size: int,
                              support_sliding_window: int) -> PagedKVCache:
        config = self.config
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, config.num_hidden_layers]),
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            qk_head_dim=config.head_dim,
            v_head_dim=config.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=config.rope_theta,
            rope_scaling={},
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=config.head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=Target.current(),
        )

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        packed = {"param_mode": "packed", "effect_mode": "none"}
        kv_cache = nn.spec.Object(object_type=PagedKVCache)
        spec = {
            "prefill": {
                "input_ids": nn.spec.Tensor(["seq_len"], "int32"),
                "logit_positions": nn.spec.Tensor(["num_logits"], "int32"),
                "kv_cache": kv_cache,
                "$": packed,
            },
            "decode": {
                "input_ids": nn.spec.Tensor(["batch_size"], "int32"),
                "kv_cache": kv_cache,
                "$": packed,
            },
            "create_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)
