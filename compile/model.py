"""Qwen3 decoder in Relax ``nn``, mirroring the Hugging Face module tree.

Per layer, with x the residual stream (RMSNorm statistics and every matmul sum in float32):

    [q; k; v]  = qkv_proj(norm(x))
    h          = x + o_proj(Attention(RoPE(q_norm(q)), RoPE(k_norm(k)), v))
    [gate; up] = gate_up_proj(norm(h))
    out        = h + down_proj(silu(gate) * up)

q/k/v and gate/up are fused into one projection each (weights are concatenated at load time, see
``weights.py``). Attention runs over TVM's paged KV cache, which applies RoPE and stores k/v.

Built for one shard of N (``Parallelism``), every module holds its shard's heads, intermediate
rows or experts, declares how its parameters are cut (``sharding.py``), and o_proj, down_proj
and the expert block sum their partial results over the shards (all-reduce, in float32).

In Qwen3-MoE the MLP of most layers is a mixture of experts (``Qwen3MoeBlock``):

    p          = softmax(router(norm(h)))                   over all E experts, float32
    top        = the k largest p, renormalised to sum 1     when norm_topk_prob
    out        = h + Σ_{e in top} p_e · down_e(silu(gate_e) * up_e)
"""

from __future__ import annotations

import dataclasses

import tvm_ffi
from tvm import relax as rx
from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu
from tvm.relax.frontend.nn.llm._prefill_kernels import (
    _attention_prefill_cpu,
    _attention_prefill_ragged_cpu,
)
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map
from tvm.target import Target

from qwen3c.compile.config import Qwen3Config
from qwen3c.compile.quantization import mark_quantized
from qwen3c.compile.sharding import SINGLE_DEVICE, Parallelism, shard
from qwen3c.schedules import (
    amx_gemm,
    attention,
    bf16_dot,
    bf16_packed,
    bf16_panel,
    mlp,
    moe,
    moe_gpu,
    moe_quant,
    quant,
    quant_tiles,
    tile_attention,
    vector_unit,
)
from qwen3c.schedules.quant import QuantScheme
from qwen3c.schedules.rope import split_rotary

ACCUMULATE = "float32"
LAYOUT_ATTR = "layout"  # a parameter stored in a kernel's layout, named in the manifest
RouterStats = list[Tensor]  # one [3, E] tensor per MoE layer, gathered while tracing


class Linear(nn.Linear):
    """y = x Wᵀ (+ b), summed in float32 and returned in the weight dtype.

    16-bit weights summed in their own dtype give wrong tokens from the first step. A
    row-parallel projection (``all_reduce``) holds a slice of the input features on each shard:
    the shards' partial products are summed, still in float32, before the bias is added once.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: str,
                 all_reduce: bool = False):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, out_dtype=ACCUMULATE)
        self.weight_dtype = dtype
        self.all_reduce = all_reduce

    def forward(self, x: Tensor) -> Tensor:
        y = op.matmul(x, op.permute_dims(self.weight), out_dtype=ACCUMULATE)
        if self.all_reduce:
            y = op.ccl_allreduce(y, "sum")
        if self.bias is not None:
            y = y + self.bias
        return y.astype(self.weight_dtype)


def quantized_params(rows: int, cols: int, scheme: QuantScheme, lead: tuple[int, ...] = (),
                     layout: str | None = None) -> tuple[nn.Parameter, nn.Parameter]:
    """The integers and scales of a [*lead, rows, cols] weight (``lead``: e.g. experts), its
    rows in the order of ``layout`` (``quant.LAYOUTS``) if given."""
    values = nn.Parameter((*lead, *scheme.storage_shape(rows, cols)), scheme.storage_dtype)
    scales = nn.Parameter((*lead, *scheme.scale_shape(rows, cols)), quant.SCALE_DTYPE)
    mark_quantized(values, scales, scheme)
    if layout:
        values.attrs[LAYOUT_ATTR] = scales.attrs[LAYOUT_ATTR] = layout
    return values, scales


class QuantLinear(nn.Module):
    """y = x Wᵀ (+ b) with W stored as group-wise integers and bfloat16 scales
    (``schedules/quant.py``), multiplied in integers with the activations rounded to int8 per
    group; on a CPU with AMX, prefills of ``quant_tiles.MIN_TOKENS`` or more multiply bfloat16
    rows rebuilt from the integers on the tiles instead (``schedules/quant_tiles.py``). Sums
    are float32; the result is in ``out_dtype`` (the model dtype unless given), rounded by the
    kernel unless a bias is added first.

    A ``gate_up`` projection is used through ``swiglu``; where its prefills take no AMX tiles
    its rows are stored in ``quant.GATE_UP_LAYOUT`` for the fused kernel."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: str,
                 scheme: QuantScheme, out_dtype: str | None = None, gate_up: bool = False):
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.scheme, self.out_dtype = dtype, scheme, out_dtype or dtype
        self.tiles = quant_tiles.usable(Target.current(), scheme, dtype, out_features,
                                        in_features)
        self.fused_swiglu = gate_up and not self.tiles
        self.weight, self.weight_scale = quantized_params(
            out_features, in_features, scheme,
            layout=quant.GATE_UP_LAYOUT if self.fused_swiglu else None)
        self.bias = nn.Parameter((out_features,), ACCUMULATE) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        assert not self.fused_swiglu, "rows in GATE_UP_LAYOUT: use swiglu()"
        N, K, target = self.out_features, self.in_features, Target.current()
        matmul = quant_tiles.quantized_matmul if self.tiles else quant.quantized_matmul
        return kernel_projection(
            x, N, self.bias, self.out_dtype, "quantized_matmul",
            lambda sums: matmul(N, K, self.scheme, self.dtype, quant.integer_dots(target), sums),
            self.weight, self.weight_scale)

    def swiglu(self, x: Tensor) -> Tensor:
        """silu(gate) * up of this gate_up projection in one kernel, from its float32 sums
        (``quant.dense_gate_up_silu``); with AMX tiles, the projection and SwiGLU after it."""
        H, I, target = self.in_features, self.out_features // 2, Target.current()
        assert self.bias is None, "Qwen3's MLP has no bias"
        if not self.fused_swiglu:
            gate, up = op.split(self(x), indices_or_sections=2, axis=-1)
            return op.silu(gate) * up
        return kernel_projection(
            x, I, None, self.dtype, "dense_gate_up_silu",
            lambda _: quant.dense_gate_up_silu(H, I, self.scheme, self.dtype,
                                               quant.integer_dots(target)),
            self.weight, self.weight_scale)


class PanelLinear(nn.Module):
    """y = x Wᵀ (+ b) with a bfloat16 W stored in panels for ``vdpbf16ps``
    (``schedules/bf16_panel.py``): the same sums as ``Linear`` (exact products, float32), from
    a layout whose tiles need no horizontal sums, for decode and prefill alike."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: str,
                 out_dtype: str | None = None):
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.out_dtype = dtype, out_dtype or dtype
        self.weight = nn.Parameter(bf16_panel.panel_shape(out_features, in_features), dtype)
        self.weight.attrs[LAYOUT_ATTR] = bf16_panel.LAYOUT
        self.bias = nn.Parameter((out_features,), ACCUMULATE) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        N, K = self.out_features, self.in_features
        return kernel_projection(x, N, self.bias, self.out_dtype, "panel_gemm",
                                 lambda sums: bf16_panel.panel_gemm(N, K, sums), self.weight)

    def swiglu(self, x: Tensor) -> Tensor:
        """silu(gate) * up of this gate_up projection in one kernel, from its float32 sums (as
        the rewrite pass ``mlp.fuse_gate_up_silu`` makes of ``Linear``)."""
        H, I = self.in_features, self.out_features // 2
        assert self.bias is None, "Qwen3's MLP has no bias"
        return kernel_projection(x, I, None, self.dtype, "gate_up_silu",
                                 lambda _: mlp.gate_up_silu(H, I, self.dtype, panels=True),
                                 self.weight)


class PackedLinear(nn.Module):
    """y = x Wᵀ (+ b) with a bfloat16 W stored losslessly in 12 bits
    (``schedules/bf16_packed.py``): the same products as ``PanelLinear`` from 3/4 of the
    bytes, which decode streams whole every step (prefills of ``WHOLE_PANEL_TOKENS`` or more
    decode each panel once, then run ``PanelLinear``'s tiles). ``exceptions``: how many of W's
    values the packing lists apart (``bf16_packed.count_exceptions``, known before the graph;
    a capacity, when one kernel serves several weights of the shape). Sums are float32; the
    result is in ``out_dtype``."""

    def __init__(self, in_features: int, out_features: int, exceptions: int, *,
                 bias: bool = False, out_dtype: str = ACCUMULATE):
        self.in_features, self.out_features, self.exceptions = (in_features, out_features,
                                                                exceptions)
        self.out_dtype = out_dtype
        parts = bf16_packed.parameter_shapes(out_features, in_features, exceptions)
        for role, (shape, dtype) in parts.items():
            part = nn.Parameter(shape, dtype)
            part.attrs[LAYOUT_ATTR] = bf16_packed.part_layout(role)
            setattr(self, "weight" if role == "values" else f"weight_{role}", part)
        self.bias = nn.Parameter((out_features,), ACCUMULATE) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        N, K, E = self.out_features, self.in_features, self.exceptions
        return kernel_projection(x, N, self.bias, self.out_dtype, "packed_gemm",
                                 lambda sums: bf16_packed.packed_gemm(N, K, E, sums),
                                 *self.parts())

    def swiglu(self, x: Tensor) -> Tensor:
        """silu(gate) * up of this gate_up projection in one kernel, from its float32 sums."""
        H, I, E = self.in_features, self.out_features // 2, self.exceptions
        assert self.bias is None, "Qwen3's MLP has no bias"
        return kernel_projection(x, I, None, self.out_dtype, "packed_gate_up_silu",
                                 lambda _: bf16_packed.packed_gemm(2 * I, H, E, self.out_dtype,
                                                                   swiglu=True),
                                 *self.parts())

    def rows(self, ids: Tensor) -> Tensor:
        """W[ids] in bfloat16: the token lookup of a tied model, from the packed head."""
        N, K, E = self.out_features, self.in_features, self.exceptions
        return op.tensor_ir_op(bf16_packed.packed_rows(N, K, E), "packed_rows",
                               [ids, *self.parts()],
                               Tensor.placeholder((ids.shape[0], K), "bfloat16"))

    def parts(self) -> list[nn.Parameter]:
        return [self.weight, self.weight_table, self.weight_offsets, self.weight_at,
                self.weight_value]


def kernel_projection(x: Tensor, features: int, bias: nn.Parameter | None, out_dtype: str,
                      name: str, kernel, *weights: nn.Parameter) -> Tensor:
    """y = x Wᵀ (+ b) by ``kernel(sums_dtype)`` over x as [tokens, k] rows: the kernel rounds
    its float32 sums to ``out_dtype`` as it stores them, unless a bias is added first."""
    flat = op.reshape(x, (-1, x.shape[-1]))
    sums = ACCUMULATE if bias is not None else out_dtype
    y = op.tensor_ir_op(kernel(sums), name, [flat, *weights],
                        Tensor.placeholder((flat.shape[0], features), sums))
    y = op.reshape(y, (*x.shape[:-1], features))
    if bias is not None:
        y = y + bias
    return y.astype(out_dtype)


def use_own_cache_kernels(builder: rx.BlockBuilder, kv_heads: int, heads: int, head_dim: int,
                          rope_theta: float, dtype: str) -> None:
    """Swap TVM's serial CPU kernels for the cache's RoPE, its prefill attention over new
    tokens and over cached pages, and its decode attention for ours (``schedules/rope.py``,
    ``schedules/attention.py``; the prefills on ``schedules/tile_attention.py``'s tile
    products where the CPU has them; same signatures), in the module being built."""
    products = tile_attention.products_for(Target.current(), dtype, head_dim)
    prefill, options = ((attention, {}) if products is None
                        else (tile_attention, {"products": products}))
    replacements = [
        (llama_rope_with_position_map(rope_theta, 1, head_dim, heads, kv_heads, dtype, {},
                                      head_dim),
         split_rotary(rope_theta, head_dim, heads, kv_heads, dtype)),
        (_attention_prefill_ragged_cpu(kv_heads, heads, head_dim, head_dim, dtype, {}),
         prefill.ragged_prefill_attention(kv_heads, heads, head_dim, dtype, **options)),
        (_attention_prefill_cpu(kv_heads, heads, head_dim, dtype, False, {}),
         prefill.paged_prefill_attention(kv_heads, heads, head_dim, dtype, **options)),
        (_attention_decode_cpu(kv_heads, heads, head_dim, dtype, False, {}),
         attention.paged_decode_attention(kv_heads, heads, head_dim, dtype)),
    ]
    for stock, own in replacements:
        # map_free_vars: TVM's kernels name let-bound sizes in their blocks' read regions
        gvar = next(g for g, f in builder.get().functions.items()
                    if isinstance(f, tirx.PrimFunc)
                    and tvm_ffi.structural_equal(f, stock, map_free_vars=True))
        builder.update_func(gvar, own)


@dataclasses.dataclass(frozen=True)
class Build:
    """What this copy of the model is: its storage dtype, the shard it computes, the
    quantization of its projections and of its lm_head, whether its own kernels run on a GPU,
    and whether its 16-bit projections are stored for the CPU's bfloat16 dot products."""

    dtype: str
    parallel: Parallelism = SINGLE_DEVICE
    quant: QuantScheme | None = None
    head_quant: QuantScheme | None = None
    gpu: bool = False  # MoE kernels with thread bindings (schedules/moe_gpu.py)
    panels: bool = False  # bfloat16 projections stored in panels (schedules/bf16_panel.py)
    packed_head: int | None = None  # the lm_head in 12 bits with this many exceptions
    # dense projections in 12 bits: ((out_features, in_features), exception capacity) per shape
    packed_projections: tuple[tuple[tuple[int, int], int], ...] = ()

    def packed_capacity(self, out_features: int, in_features: int) -> int | None:
        """The exception capacity of packed [out, in] projections, or None if not packed."""
        return dict(self.packed_projections).get((out_features, in_features))


def projection(in_features: int, out_features: int, *, bias: bool, build: Build,
               all_reduce: bool = False, gate_up: bool = False) -> nn.Module:
    """A quantized projection where the build asks for one and the shape fits its kernels,
    else, where the build stores bfloat16 panels (one shard only: the panels are cut from the
    whole weight), one packed in 12 bits if the build packs the shape, else one on panels;
    else the plain one. ``gate_up``: the MLP's, for SwiGLU."""
    scheme = build.quant
    if scheme is not None and scheme.fits(out_features, in_features) and not all_reduce:
        return QuantLinear(in_features, out_features, bias=bias, dtype=build.dtype,
                           scheme=scheme, gate_up=gate_up)
    if (build.panels and build.parallel.shards == 1
            and bf16_panel.fits(out_features, in_features)):
        capacity = build.packed_capacity(out_features, in_features)
        if capacity is not None:
            return PackedLinear(in_features, out_features, capacity, bias=bias,
                                out_dtype=build.dtype)
        return PanelLinear(in_features, out_features, bias=bias, dtype=build.dtype)
    return Linear(in_features, out_features, bias=bias, dtype=build.dtype,
                  all_reduce=all_reduce)


def shard_index() -> Tensor:
    """This worker's index among the shards (TVM disco's worker id), as an int64 [1] tensor."""
    worker_id = rx.call_pure_packed("runtime.disco.worker_id", ty_args=rx.ShapeType(ndim=1))
    return nn.wrap_nested(rx.op.shape_to_tensor(worker_id), name="shard_index")


class Embedding(nn.Module):
    """The token table. Cut by vocabulary rows over the shards (``shards`` > 1): each shard
    looks up the ids in its range, zeros the others, and the shards' rows are summed."""

    def __init__(self, vocab_size: int, hidden: int, dtype: str, shards: int):
        self.shards, self.rows = shards, vocab_size // shards
        self.weight = nn.Parameter((self.rows, hidden), dtype)
        if shards > 1:
            shard(self.weight, 0)

    def forward(self, ids: Tensor) -> Tensor:
        if self.shards == 1:
            return op.take(self.weight, ids, axis=0)
        first_row = op.astype(shard_index(), "int32") * op.full((1,), self.rows, "int32")
        local = ids - first_row
        clipped = op.minimum(op.maximum(local, op.zeros((1,), "int32")),
                             op.full((1,), self.rows - 1, "int32"))
        mine = op.reshape(op.equal(clipped, local), (ids.shape[0], 1))  # in this shard's range
        rows = op.take(self.weight, clipped, axis=0).astype(ACCUMULATE)
        rows = op.where(mine, rows, op.zeros((1, 1), ACCUMULATE))
        return op.ccl_allreduce(rows, "sum").astype(self.weight.dtype)


def gather_vocab(logits: Tensor, shards: int) -> Tensor:
    """[n, V/N] logits of each shard's vocabulary rows -> [n, V] on every shard."""
    if shards == 1:
        return logits
    n, rows = logits.shape
    gathered = op.ccl_allgather(logits, num_workers=shards)  # [N * n, V/N], shard-major
    return op.reshape(op.permute_dims(op.reshape(gathered, (shards, n, rows)), [1, 0, 2]),
                      (n, shards * rows))


class RMSNorm(nn.Module):
    """x / rms(x) · w over the last axis, with the statistics in float32 as HF computes them.
    The weight is stored in float32 (exact for 16-bit checkpoints): converting it on every
    call was three kernel launches per layer and token."""

    def __init__(self, size: int, eps: float):
        self.weight = nn.Parameter((size,), ACCUMULATE)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        normed = op.rms_norm(x.astype(ACCUMULATE), self.weight, axes=-1, epsilon=self.eps)
        return normed.astype(x.dtype)


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3Config, build: Build):
        shards = build.parallel.shards
        self.num_heads = config.num_attention_heads // shards
        self.num_kv_heads = config.num_key_value_heads // shards
        self.head_dim = config.head_dim
        q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = projection(config.hidden_size, q_rows + 2 * kv_rows,
                                   bias=config.attention_bias, build=build)
        self.o_proj = projection(q_rows, config.hidden_size, bias=config.attention_bias,
                                 build=build, all_reduce=shards > 1)
        for qkv_param in filter(None, (self.qkv_proj.weight, self.qkv_proj.bias)):
            shard(qkv_param, 0, q_rows, kv_rows, kv_rows)
        shard(self.o_proj.weight, 1)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: Tensor, kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        batch, seq_len, _ = x.shape
        h_q, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = op.reshape(self.qkv_proj(x), (batch, seq_len, h_q + 2 * h_kv, d))
        q, k, v = op.split(qkv, indices_or_sections=[h_q, h_q + h_kv], axis=2)
        qkv = op.concat([self.q_norm(q), self.k_norm(k), v], dim=2)
        attended = kv_cache.attention_with_fused_qkv(layer_id, qkv, h_q, sm_scale=d**-0.5)
        return self.o_proj(op.reshape(attended, (batch, seq_len, h_q * d)))


class Qwen3MLP(nn.Module):
    def __init__(self, config: Qwen3Config, build: Build):
        shards = build.parallel.shards
        rows = config.intermediate_size // shards
        self.gate_up_proj = projection(config.hidden_size, 2 * rows, bias=False, build=build,
                                       gate_up=True)
        self.down_proj = projection(rows, config.hidden_size, bias=False, build=build,
                                    all_reduce=shards > 1)
        shard(self.gate_up_proj.weight, 0, rows, rows)
        shard(self.down_proj.weight, 1)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.gate_up_proj, PanelLinear | PackedLinear | QuantLinear):  # own kernels
            return self.down_proj(self.gate_up_proj.swiglu(x))
        gate, up = op.split(self.gate_up_proj(x), indices_or_sections=2, axis=-1)
        return self.down_proj(op.silu(gate) * up)  # mlp.fuse_gate_up_silu rewrites this


class Qwen3MoeExperts(nn.Module):
    """The experts of a layer this shard holds, stacked: gate_up_proj [E, 2I, H], down_proj
    [E, H, I] (all experts, each cut by intermediate rows; or, expert parallel, a contiguous
    range of whole experts).

    On the CPU tokens are grouped by expert so each expert's weights are read once per call,
    and experts that no token chose are not read at all (see ``schedules/moe.py``); on a GPU
    every (token, slot) pair gets its own threads (``schedules/moe_gpu.py``).
    """

    def __init__(self, config: Qwen3Config, build: Build):
        parallel, dtype = build.parallel, build.dtype
        expert_parallel = parallel.expert_parallel
        self.num_experts = config.num_experts // (parallel.shards if expert_parallel else 1)
        self.top_k = config.num_experts_per_tok
        self.hidden = config.hidden_size
        self.intermediate = config.moe_intermediate_size // (
            1 if expert_parallel else parallel.shards)
        self.expert_parallel = expert_parallel
        self.dtype = dtype
        self.gpu = build.gpu
        E, H, I = self.num_experts, self.hidden, self.intermediate
        scheme = build.quant
        self.scheme = scheme if scheme and H % scheme.group == I % scheme.group == 0 else None
        if self.scheme:  # quantization is never sharded (LlvmTarget.check_quantization)
            self.gate_up_proj, self.gate_up_proj_scale = quantized_params(
                2 * I, H, self.scheme, (E,), quant.GATE_UP_LAYOUT)
            self.down_proj, self.down_proj_scale = quantized_params(H, I, self.scheme, (E,))
            return
        self.panels = (build.panels and parallel.shards == 1
                       and bf16_panel.experts_fit(H, I))
        if self.panels:  # bfloat16 panels, gate and up rows paired (schedules/bf16_panel.py)
            self.gate_up_proj = nn.Parameter((E, *bf16_panel.panel_shape(2 * I, H)), dtype)
            self.down_proj = nn.Parameter((E, *bf16_panel.panel_shape(H, I)), dtype)
            self.gate_up_proj.attrs[LAYOUT_ATTR] = bf16_panel.PAIRED_LAYOUT
            self.down_proj.attrs[LAYOUT_ATTR] = bf16_panel.LAYOUT
            return
        self.gate_up_proj = nn.Parameter((E, 2 * I, H), dtype)
        self.down_proj = nn.Parameter((E, H, I), dtype)
        if expert_parallel:
            shard(self.gate_up_proj, 0)
            shard(self.down_proj, 0)
        else:
            shard(self.gate_up_proj, 1, I, I)
            shard(self.down_proj, 2)

    def first_expert(self) -> Tensor:
        """The global index of this shard's first expert, as an int64 [1] tensor."""
        if not self.expert_parallel:
            return op.zeros((1,), "int64")
        return op.multiply(shard_index(), op.full((1,), self.num_experts, "int64"))

    def forward(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """x [n, H], routing weights / expert ids [n, k] -> float32 [n, H], summed over the
        experts this shard holds."""
        E, k, H, I = self.num_experts, self.top_k, self.hidden, self.intermediate
        n = x.shape[0]
        if self.gpu:
            act = op.tensor_ir_op(
                moe_gpu.moe_gate_up_silu(E, k, H, I, self.dtype), "moe_gate_up_silu",
                [x, self.gate_up_proj, experts, self.first_expert()],
                Tensor.placeholder((n * k, I), self.dtype))
            return op.tensor_ir_op(
                moe_gpu.moe_down_sum(E, k, H, I, self.dtype), "moe_down_sum",
                [act, self.down_proj, experts, self.first_expert(), weights],
                Tensor.placeholder((n, H), ACCUMULATE))
        offsets, order = op.tensor_ir_op(
            moe.moe_group(E, k), "moe_group", [experts, self.first_expert()],
            [Tensor.placeholder((E + 1,), "int32"), Tensor.placeholder((n * k,), "int32")])
        if self.scheme:
            dots = quant.integer_dots(Target.current())
            act = op.tensor_ir_op(
                moe_quant.quantized_gate_up_silu(E, k, H, I, self.scheme, self.dtype, dots),
                "quantized_gate_up_silu",
                [x, self.gate_up_proj, self.gate_up_proj_scale, offsets, order],
                Tensor.placeholder((n * k, I), self.dtype))
            return op.tensor_ir_op(
                moe_quant.quantized_down_scatter(E, k, H, I, self.scheme, self.dtype, dots),
                "quantized_down_scatter",
                [act, self.down_proj, self.down_proj_scale, offsets, order, weights],
                Tensor.placeholder((n, H), ACCUMULATE))
        if self.panels:
            gate_up = bf16_panel.expert_gate_up_silu(E, k, H, I)
            down = bf16_panel.expert_down_scatter(E, k, H, I)
        else:
            vectors = vector_unit(Target.current())
            bf16 = bf16_dot.usable(Target.current(), self.dtype, H, I)
            amx = amx_gemm.experts_usable(Target.current(), self.dtype, H, I)
            gate_up = moe.moe_gate_up_silu(E, k, H, I, self.dtype, *vectors, bf16, amx)
            down = moe.moe_down_scatter(E, k, H, I, self.dtype, *vectors, bf16, amx)
        act = op.tensor_ir_op(gate_up, "moe_gate_up_silu", [x, self.gate_up_proj, offsets, order],
                              Tensor.placeholder((n * k, I), self.dtype))
        return op.tensor_ir_op(down, "moe_down_scatter",
                               [act, self.down_proj, offsets, order, weights],
                               Tensor.placeholder((n, H), ACCUMULATE))


class Qwen3MoeBlock(nn.Module):
    def __init__(self, config: Qwen3Config, build: Build):
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        # Router logits are rounded to the model dtype before the float32 softmax, as in HF.
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False,
                           dtype=build.dtype)
        self.experts = Qwen3MoeExperts(config, build)
        self.all_reduce = build.parallel.shards > 1
        self.kernels = moe_gpu if build.gpu else moe

    def forward(self, x: Tensor, router_stats: RouterStats | None = None) -> Tensor:
        batch, seq_len, hidden = x.shape
        tokens = op.reshape(x, (batch * seq_len, hidden))
        n, E, k = tokens.shape[0], self.num_experts, self.top_k
        logits = self.gate(tokens).astype(ACCUMULATE)
        weights, experts = op.tensor_ir_op(
            self.kernels.moe_route(E, k, self.norm_topk_prob), "moe_route", [logits],
            [Tensor.placeholder((n, k), ACCUMULATE), Tensor.placeholder((n, k), "int32")])
        if router_stats is not None:
            router_stats.append(op.tensor_ir_op(
                self.kernels.moe_router_stats(E, k), "moe_router_stats",
                [logits, weights, experts],
                Tensor.placeholder((3, E), ACCUMULATE)))
        out = self.experts(tokens, weights, experts)
        if self.all_reduce:
            out = op.ccl_allreduce(out, "sum")
        return op.reshape(out.astype(x.dtype), (batch, seq_len, hidden))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, build: Build, layer_id: int):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = Qwen3Attention(config, build)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.is_moe = config.is_moe_layer(layer_id)
        mlp = Qwen3MoeBlock if self.is_moe else Qwen3MLP
        self.mlp = mlp(config, build)

    def forward(self, x: Tensor, kv_cache: PagedKVCache, layer_id: int,
                router_stats: RouterStats | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv_cache, layer_id)
        normed = self.post_attention_layernorm(x)
        return x + (self.mlp(normed, router_stats) if self.is_moe else self.mlp(normed))


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config, build: Build):
        if not (config.tie_word_embeddings and build.packed_head is not None):
            # (else the packed head is the only copy of the table: ``PackedLinear.rows``)
            self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, build.dtype,
                                          build.parallel.vocab_shards(config.vocab_size))
        self.layers = nn.ModuleList([Qwen3DecoderLayer(config, build, i)
                                     for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, kv_cache: PagedKVCache,
                router_stats: RouterStats | None = None) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv_cache, layer_id, router_stats)
        return self.norm(x)


class Qwen3ForCausalLM(nn.Module):
    """The compiled entry points: ragged batched prefill, batched decode, KV cache creation;
    for MoE models also ``*_router_stats`` variants that return per-layer routing counts, so
    the plain entry points pay nothing for statistics."""

    def __init__(self, config: Qwen3Config, build: Build):
        self.config = config
        self.dtype = build.dtype
        self.parallel = build.parallel
        self.gpu = build.gpu
        self.model = Qwen3Model(config, build)
        self.vocab_shards = build.parallel.vocab_shards(config.vocab_size)
        rows = config.vocab_size // self.vocab_shards
        head_scheme = build.head_quant
        if head_scheme and head_scheme.fits(rows, config.hidden_size):
            # A quantized head is a copy of the embedding table when tied.
            self.lm_head = QuantLinear(config.hidden_size, rows, bias=False, dtype=build.dtype,
                                       scheme=head_scheme, out_dtype=ACCUMULATE)
        elif build.packed_head is not None:
            # A tied head is the embedding table, packed; tokens are looked up in it.
            self.lm_head = PackedLinear(config.hidden_size, rows, build.packed_head)
        elif not config.tie_word_embeddings:
            # bfloat16 panels where the projections have them (a tied head would need a copy)
            panels = (build.panels and self.vocab_shards == 1
                      and bf16_panel.fits(rows, config.hidden_size))
            head = PanelLinear if panels else nn.Linear
            self.lm_head = head(config.hidden_size, rows, bias=False, dtype=build.dtype,
                                out_dtype=ACCUMULATE)
        if hasattr(self, "lm_head") and self.vocab_shards > 1:
            shard(self.lm_head.weight, 0)

    def embed(self, input_ids: Tensor) -> Tensor:
        """The tokens' rows of the embedding table (of the packed head, where that is it)."""
        if hasattr(self.model, "embed_tokens"):
            return self.model.embed_tokens(input_ids)
        return self.lm_head.rows(input_ids)

    def logits(self, hidden: Tensor) -> Tensor:
        """Float32 logits; a tied head reuses the embedding matrix. Each shard computes its
        vocabulary rows' logits, gathered on every shard."""
        if hasattr(self, "lm_head"):
            logits = self.lm_head(hidden)
        else:
            table = op.permute_dims(self.model.embed_tokens.weight)
            logits = op.matmul(hidden, table, out_dtype=ACCUMULATE)
        return gather_vocab(logits, self.vocab_shards)

    def prefill(self, input_ids: Tensor, logit_positions: Tensor, kv_cache: PagedKVCache,
                router_stats: RouterStats | None = None):
        """Append the concatenated prompts of every sequence in the batch to the cache.

        ``logit_positions`` picks the rows of the flat token axis that need logits: the last
        token of each sequence for generation, or all of them to score a prompt.
        """
        hidden = op.reshape(self.embed(input_ids), (1, input_ids.shape[0], -1))
        hidden = self.model(hidden, kv_cache, router_stats)
        hidden = op.take(op.reshape(hidden, (input_ids.shape[0], -1)), logit_positions, axis=0)
        return self.logits(hidden)

    def decode(self, input_ids: Tensor, kv_cache: PagedKVCache,
               router_stats: RouterStats | None = None):
        """One new token for each of the batch's sequences."""
        hidden = op.reshape(self.embed(input_ids), (input_ids.shape[0], 1, -1))
        hidden = self.model(hidden, kv_cache, router_stats)
        return self.logits(op.reshape(hidden, (input_ids.shape[0], -1)))

    def prefill_router_stats(self, input_ids: Tensor, logit_positions: Tensor,
                             kv_cache: PagedKVCache):
        stats: RouterStats = []
        logits = self.prefill(input_ids, logit_positions, kv_cache, stats)
        return logits, op.concat([op.reshape(s, (1, *s.shape)) for s in stats], dim=0)

    def decode_router_stats(self, input_ids: Tensor, kv_cache: PagedKVCache):
        stats: RouterStats = []
        logits = self.decode(input_ids, kv_cache, stats)
        return logits, op.concat([op.reshape(s, (1, *s.shape)) for s in stats], dim=0)

    def create_paged_kv_cache(self, max_batch_size: int, max_total_seq_len: int,
                              prefill_chunk_size: int, page_size: int,
                              support_sliding_window: int) -> PagedKVCache:
        config = self.config
        heads = config.num_attention_heads // self.parallel.shards
        kv_heads = config.num_key_value_heads // self.parallel.shards
        cache = TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, config.num_hidden_layers]),
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
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
        if not self.gpu:
            use_own_cache_kernels(rx.BlockBuilder.current(), kv_heads, heads, config.head_dim,
                                  config.rope_theta, self.dtype)
        return cache

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        packed = {"param_mode": "packed", "effect_mode": "none"}
        kv_cache = nn.spec.Object(object_type=PagedKVCache)
        prefill = {
            "input_ids": nn.spec.Tensor(["seq_len"], "int32"),
            "logit_positions": nn.spec.Tensor(["num_logits"], "int32"),
            "kv_cache": kv_cache,
            "$": packed,
        }
        decode = {"input_ids": nn.spec.Tensor(["batch_size"], "int32"), "kv_cache": kv_cache,
                  "$": packed}
        spec = {
            "prefill": prefill,
            "decode": decode,
            "create_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        if self.config.num_experts:  # copies: from_raw consumes the "$" entries
            spec |= {"prefill_router_stats": {**prefill, "$": packed},
                     "decode_router_stats": {**decode, "$": packed}}
        return nn.spec.ModuleSpec.from_raw(spec, self)
